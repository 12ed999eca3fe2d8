"""A sweep split into groups of members (in process, and over Ray actors) trains the same SAEs as one trainer, and
their checkpoints are interchangeable."""

from __future__ import annotations

import os
import time

import pytest
import torch

from sae_shared.sae import BatchTopK, Relu, SAEConfig, SweepMember, TopK, TrainConfig
from sae_shared.sae.groups import RayTrainerGroups, TrainerGroups, split_members
from sae_shared.sae.training import Trainer

D = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config() -> TrainConfig:
    members = (
        SweepMember(SAEConfig(D, 48, Relu(l1_coeff=1e-3), seed=1), lr=3e-3),
        SweepMember(SAEConfig(D, 32, TopK(k=4, k_aux=8), seed=2), lr=2e-3),
        SweepMember(SAEConfig(D, 32, BatchTopK(k=4), seed=3), lr=2e-3),
    )
    return TrainConfig(members, batch_size=64, warmup_steps=3, schedule="cosine", dead_window_tokens=128,
                       log_every=4)


def _data(n_batches: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * n_batches, D, generator=g) @ torch.randn(D, D, generator=g)
    return x, [x[i * 64:(i + 1) * 64] for i in range(n_batches)]


def _assert_same(a_saes, b_saes):
    assert len(a_saes) == len(b_saes)
    for i, (a, b) in enumerate(zip(a_saes, b_saes)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), f"member {i}: {name}"


def test_split_members_is_contiguous_balanced_and_never_empty():
    assert split_members(5, 2) == [range(0, 3), range(3, 5)]
    assert split_members(2, 4) == [range(0, 1), range(1, 2)]
    assert [len(r) for r in split_members(10, 3)] == [4, 3, 3]
    with pytest.raises(ValueError):
        split_members(0, 2)


def test_groups_train_the_same_saes_and_log_the_same_metrics_as_one_trainer():
    x, batches = _data()
    config = _config()
    logged_one, logged_groups = [], []
    one = Trainer(config, total_steps=len(batches), init_sample_nd=x, on_metrics=logged_one.append)
    groups = TrainerGroups(config, total_steps=len(batches), init_sample_nd=x, on_metrics=logged_groups.append,
                           n_groups=2)
    for b in batches:
        assert one.step(b) == groups.step(b)
    _assert_same(one.saes, groups.saes)
    assert logged_one == logged_groups and len(logged_one) == 3 * 3
    assert groups.history == one.history
    assert (groups.step_count, groups.tokens, groups.window_tokens) == (one.step_count, one.tokens, one.window_tokens)


def test_a_checkpoint_of_groups_resumes_in_one_trainer_and_the_reverse():
    x, batches = _data()
    config = _config()
    straight = Trainer(config, total_steps=len(batches), init_sample_nd=x)
    for b in batches:
        straight.step(b)

    groups = TrainerGroups(config, total_steps=len(batches), init_sample_nd=x, n_groups=3)
    for b in batches[:5]:
        groups.step(b)
    one = Trainer(config, total_steps=len(batches), init_sample_nd=torch.zeros(1, D))
    one.load_state_dict(groups.state_dict())
    for b in batches[5:9]:
        one.step(b)
    back = TrainerGroups(config, total_steps=len(batches), init_sample_nd=torch.zeros(1, D), n_groups=2)
    back.load_state_dict(one.state_dict())
    for b in batches[9:]:
        back.step(b)
    _assert_same(straight.saes, back.saes)
    assert back.history == straight.history


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


def test_ray_actors_train_the_same_saes_and_resume_from_a_single_trainers_checkpoint(ray_session):
    x, batches = _data()
    config = _config()
    straight = Trainer(config, total_steps=len(batches), init_sample_nd=x)
    for b in batches:
        straight.step(b)

    options = {"num_cpus": 0.5, "threads": 1}  # one torch thread, as in this process: the same float results
    remote = RayTrainerGroups(config, total_steps=len(batches), init_sample_nd=x, n_groups=2, options=options)
    try:
        assert len(remote.groups) == 2
        for b in batches[:6]:
            remote.step(b)
        state = remote.state_dict()
    finally:
        remote.close()
    resumed = RayTrainerGroups(config, total_steps=len(batches), init_sample_nd=torch.zeros(1, D), n_groups=2,
                               options=options)
    try:
        resumed.load_state_dict(state)
        for b in batches[6:]:
            resumed.step(b)
        _assert_same(straight.saes, resumed.saes)
        assert resumed.history == straight.history
    finally:
        resumed.close()


def test_shard_set_training_runs_a_sweep_over_trainer_groups(tmp_path):
    """The factory seam of ShardSetTraining: the same SAEs from a shard set with one trainer or three groups."""
    from sae_shared.sae.sharded import ShardSetTraining
    from sae_shared.shards import ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id
    from sae_shared.storage import FileStore

    store = FileStore(tmp_path)
    g = torch.Generator().manual_seed(1)
    layout = TokenLayout(n_tokens=5, cls_index=0, register_indices=(), patch_start=1, patch_grid=(2, 2))
    acts = torch.randn(48, 1, 5, D, generator=g)
    aug = {"seed": 0, "views_per_image": 1}
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id="fake", dataset_hash="h", backbone_id="fake:vit", layers=[3],
                                tokens="all", dtype="float32", augmentation=aug),
        backbone_id="fake:vit", layers=(3,), tokens="all", token_layout=layout, d_model=D, dtype="float32",
        n_rows=48, rows_per_shard=16, dataset_id="fake", dataset_hash="h", augmentation=aug, transform={})
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        r = meta.shard_rows(s)
        writer.write_shard(s, acts[r.start:r.stop].contiguous(), [{"image_id": f"i{i}"} for i in r])
    writer.commit()

    config = TrainConfig(_config().members, batch_size=32, n_tokens=32 * 5, warmup_steps=2, log_every=2,
                         dead_window_tokens=64)

    def train(**kw):
        run = ShardSetTraining(config, store, meta.acts_id, layer=3, tokens="patches", **kw)
        try:
            for _ in run:
                pass
            return run.finish()
        finally:
            run.close()

    one = train()
    grouped = train(trainer_factory=lambda cfg, **kw: TrainerGroups(cfg, n_groups=3, **kw))
    _assert_same(one.saes, grouped.saes)
    assert [e.fvu for e in one.evaluations] == [e.fvu for e in grouped.evaluations]


def test_actors_that_cannot_start_are_released_with_a_clear_error(ray_session):
    """Actors asking for more than the cluster has never start: the trainer says so within its timeout and kills
    them, so they do not wait for (and later hold) the resources."""
    x, _ = _data()
    with pytest.raises(RuntimeError, match="did not start 2 actors"):
        RayTrainerGroups(_config(), total_steps=4, init_sample_nd=x, n_groups=2, options={"num_cpus": 64},
                         start_timeout_s=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [a for a in ray_session._private.state.actors().values()  # the GCS's table (no dashboard here)
                 if a["ActorClassName"].endswith("MemberGroup") and a["State"] != "DEAD"]
        if not alive:
            break
        time.sleep(0.5)
    assert alive == []
