"""The ``train`` job and the SAE commands, on a real Redis, a real S3 server and real worker processes.

A small synthetic shard set (d_model 16; a planted dictionary of sparse non-negative atoms plus noise; 1 CLS + 16
patch tokens per row; two layers) is written with ``ShardSetWriter``. Jobs train on its patch tokens: a sweep
submitted and watched through ``saevctl train``, a job whose worker is SIGKILLed mid-training and resumed by another,
and, in process, the read counts of a sweep against a single SAE.
"""

from __future__ import annotations

import json
import secrets
import signal
import urllib.request

import pytest
import torch

from sae_shared.queue import JobState
from workers_support import wait_for
from workers_support import cli, env, queue, store, workers  # noqa: F401 - fixtures

LEASE = 1.0
D = 16
N_ROWS = 200
LAYERS = (3, 5)
N_ATOMS = 24


# ------------------------------------------------------------------------------------------------ fixtures


def write_shard_set(store, *, backbone_id: str = "fake:vit") -> str:
    """A committed shard set of planted-dictionary activations; returns its acts_id."""
    from sae_shared.shards import ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id

    layout = TokenLayout(n_tokens=1 + 16, cls_index=0, register_indices=(), patch_start=1, patch_grid=(4, 4))
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(N_ATOMS, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    n = N_ROWS * len(LAYERS) * layout.n_tokens
    codes = torch.zeros(n, N_ATOMS)
    idx = torch.rand(n, N_ATOMS, generator=g).topk(3, dim=1).indices
    codes.scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    acts = (codes @ atoms + 0.02 * torch.randn(n, D, generator=g) + 2.0).reshape(N_ROWS, len(LAYERS), -1, D)
    aug = {"seed": 0, "views_per_image": 1}
    meta = ShardSetMetadata(
        acts_id=compute_acts_id(dataset_id="planted", dataset_hash="h", backbone_id=backbone_id, layers=LAYERS,
                                tokens="all", dtype="float32", augmentation=aug),
        backbone_id=backbone_id, layers=LAYERS, tokens="all", token_layout=layout, d_model=D, dtype="float32",
        n_rows=N_ROWS, rows_per_shard=64, dataset_id="planted", dataset_hash="h", augmentation=aug,
    )
    writer = ShardSetWriter(store, meta)
    for s in range(meta.n_shards):
        rows = meta.shard_rows(s)
        writer.write_shard(s, acts[rows.start:rows.stop].contiguous(),
                           [{"image_index": i, "image_id": f"img{i}", "label": 0, "view": None} for i in rows])
    writer.commit()
    return meta.acts_id


@pytest.fixture
def namespace() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def acts_id(store) -> str:
    return write_shard_set(store)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ tests


def test_commands_have_help_and_train_refuses_bad_input_at_submit(cli, acts_id, namespace):
    for args in (["train"], ["sae"], ["sae", "import"], ["sae", "export"], ["sae", "list"], ["sae", "show"],
                 ["sae", "stats"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0, (args, result.output)
    assert "--member" in cli("train", "--help").output
    base = ["train", "--acts", acts_id, "--d-sae", "32", "--steps", "5", "--namespace", namespace]
    missing = cli("train", "--acts", "nope", "--layer", "3", "--d-sae", "32", "--steps", "5", "--namespace", namespace)
    assert missing.exit_code == 2 and "not complete" in missing.output
    assert "layer 4 was not recorded" in cli(*base, "--layer", "4").output
    too_big_k = cli(*base, "--layer", "3", "--variant", "topk", "--k", "64")
    assert too_big_k.exit_code == 2 and "exceeds d_sae=32" in too_big_k.output
    bad_member = cli(*base, "--layer", "3", "--member", "colour=red")
    assert bad_member.exit_code == 2 and "--member takes key=value" in bad_member.output


def test_cli_train_sweep_with_watch_publishes_loadable_saes_with_statistics(
    cli, store, acts_id, workers, queue, namespace
):
    from sae_shared.sae import BatchTopK, Relu, TopK, load_sae

    port = free_port()
    worker = workers.start("--types", "train", "--metrics-port", str(port), lease=LEASE)
    steps, batch = 40, 128
    result = cli(
        "train", "--acts", acts_id, "--layer", "5", "--d-sae", "48", "--steps", str(steps), "--batch-size",
        str(batch), "--lr", "3e-3", "--warmup", "5", "--spec", '{"log_every": 10, "checkpoint_every": 15}',
        "--member", "variant=relu,l1_coeff=1e-3", "--member", "variant=topk,k=4", "--member", "variant=batchtopk,k=4",
        "--watch", "--namespace", namespace,
    )
    assert result.exit_code == 0, result.output + worker.output()[-3000:]
    lines = result.output.splitlines()
    job_id = lines[0].split()[0]
    ids = [line.split()[1] for line in lines if line.startswith("sae  ")]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert "succeeded" in result.output

    job = queue.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.result["sae_ids"] == ids
    # The sweep read each training batch once: steps batches, whatever the number of members.
    assert job.result["batches_read"] == steps and job.result["tokens_read"] == steps * batch
    assert job.result["heldout_tokens"] == 20 * 16  # the last 10% of the 200 rows, 16 patches each

    for sae_id, variant in zip(ids, (Relu, TopK, BatchTopK)):
        sae = load_sae(f"saes/{sae_id}", store=store)
        assert isinstance(sae.cfg.variant, variant) and sae.d_sae == 48
        assert sae.contract.backbone_id == "fake:vit" and sae.contract.layer == 5 and sae.contract.tokens == "patches"
        stats = sae.require_stats()
        assert stats.n_tokens == 20 * 16 and stats.source == f"{acts_id}:heldout"
        assert stats.metrics.explained_variance > 0.3
        assert (stats.max >= stats.p99).all() and (stats.frequency <= 1).all()
        metrics = [json.loads(line) for line in store.get_bytes(f"saes/{sae_id}/metrics.jsonl").decode().splitlines()]
        assert [m["step"] for m in metrics if m["kind"] == "train"] == [10, 20, 30, 40]
        assert metrics[-1]["kind"] == "eval" and metrics[-1]["n_tokens"] == 20 * 16
        train = store.get_json(f"saes/{sae_id}/train.json")
        assert train["job_id"] == job_id and train["steps"] == steps and train["sweep"] == ids
        manifest = store.read_manifest(f"saes/{sae_id}")
        assert manifest["extra"]["produced_by"]["job_id"] == job_id
    topk_codes = load_sae(f"saes/{ids[1]}", store=store).encode(torch.randn(5, D) + 2.0)
    assert ((topk_codes > 0).sum(-1) <= 4).all()

    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for sae_id in ids:
        assert f'saev_train_step{{sae_id="{sae_id}"}} 40.0' in scraped
        assert f'saev_train_fvu{{sae_id="{sae_id}"}}' in scraped
    assert "saev_train_tokens_total 5120.0" in scraped

    listed = cli("sae", "list")
    assert listed.exit_code == 0 and all(i in listed.output for i in ids)
    shown = cli("sae", "show", ids[1])
    assert shown.exit_code == 0 and "topk" in shown.output and f"job {job_id}" in shown.output

    # The same spec again finds the SAEs and trains nothing.
    again = cli("train", "--acts", acts_id, "--layer", "5", "--d-sae", "48", "--steps", str(steps), "--batch-size",
                str(batch), "--lr", "3e-3", "--warmup", "5", "--spec", '{"log_every": 10, "checkpoint_every": 15}',
                "--member", "variant=relu,l1_coeff=1e-3", "--member", "variant=topk,k=4", "--member",
                "variant=batchtopk,k=4", "--watch", "--namespace", namespace)
    assert again.exit_code == 0 and '"reused": true' in again.output
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_a_sweep_of_three_reads_each_batch_once(store, acts_id, one_thread):
    """Bytes fetched from the shard objects by a sweep of 3 equal those of a single SAE: one pass."""
    from sae_shared.sae import Relu, SAEConfig, SweepMember, TopK, TrainConfig
    from sae_shared.sae.sharded import ShardSetTraining

    class Counting:
        def __init__(self, inner):
            self.inner, self.shard_bytes = inner, 0

        def get_bytes(self, key, offset=0, length=None):
            data = self.inner.get_bytes(key, offset, length)
            if "/shard-" in key and key.endswith(".safetensors") and offset >= 8 and length != 8:
                self.shard_bytes += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def run(members) -> tuple[int, list]:
        counting = Counting(store)
        config = TrainConfig(members=members, batch_size=128, n_tokens=128 * 30, warmup_steps=2, log_every=10)
        training = ShardSetTraining(config, counting, acts_id, layer=3, prefetch=1)
        for _ in training:
            pass
        result = training.finish()
        training.close()
        assert training.data.batches_read == 30 and training.data.heldout_tokens_read == 20 * 16
        return counting.shard_bytes, [s.state_dict()["W_dec"] for s in result.saes]

    one = SweepMember(SAEConfig(D, 32, TopK(k=4)), lr=3e-3)
    single_bytes, (single_w,) = run((one,))
    sweep_bytes, sweep_w = run((one, SweepMember(SAEConfig(D, 32, Relu()), lr=1e-3),
                                SweepMember(SAEConfig(D, 64, TopK(k=2)), lr=3e-3)))
    row_bytes = len(LAYERS) * 17 * D * 4
    assert single_bytes == sweep_bytes
    assert sweep_bytes <= N_ROWS * row_bytes * 2  # 30 steps of 2304 training tokens/epoch: < 2 epochs, + held out
    assert torch.equal(single_w, sweep_w[0])  # members do not influence each other


def test_sigkilled_training_job_resumes_from_its_checkpoint_bit_for_bit(store, acts_id, workers, queue, one_thread):
    from sae_shared.jobs import validate_spec
    from sae_shared.sae import load_sae
    from sae_shared.sae.sharded import ShardSetTraining
    from services.worker.train_handler import config_from_spec

    spec = {"acts_id": acts_id, "layer": 3, "d_sae": 256, "steps": 600, "batch_size": 256, "variant": "topk",
            "k": 4, "lr": 2e-3, "warmup_steps": 20, "log_every": 25, "checkpoint_every": 50, "device": "cpu"}
    job = queue.submit("train", spec)
    first = workers.start("--types", "train", lease=LEASE)
    checkpoint = f"jobs/{job.id}/checkpoints/train.state"
    wait_for(lambda: store.exists(checkpoint), timeout=60, interval=0.02, what="a first checkpoint")
    first.signal(signal.SIGKILL)
    first.wait()
    assert queue.get(job.id).progress.fraction < 0.95, "training ended before the kill; make the job longer"

    second = workers.start("--types", "train", lease=LEASE)
    done = queue.wait(job.id, timeout=90)
    assert done.state is JobState.SUCCEEDED, (done.error, second.output()[-3000:])
    assert done.attempts == 2 and done.lost_leases == 1
    resumed_from = done.result["resumed_from"]
    assert resumed_from is not None and resumed_from > 0 and resumed_from % 50 == 0
    assert done.result["steps"] == 600 and done.result["batches_read"] == 600

    # The same run, undisturbed, in this process.
    model = validate_spec("train", spec)
    reference = ShardSetTraining(config_from_spec(model, D), store, acts_id, layer=3, tokens="patches")
    for _ in reference:
        pass
    expected = reference.finish()
    reference.close()
    (sae_id,) = done.result["sae_ids"]
    assert reference.sae_ids == [sae_id]
    trained = load_sae(f"saes/{sae_id}", store=store)
    for name, value in expected.saes[0].state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    metrics = [json.loads(line) for line in store.get_bytes(f"saes/{sae_id}/metrics.jsonl").decode().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(25, 601, 25))
    assert [{k: v for k, v in m.items() if k != "kind"} for m in train_lines] == [m._asdict() for m in expected.history[0]]
    assert metrics[-1]["fvu"] == expected.evaluations[0].fvu


def test_sae_import_stats_show_export_round_trip(cli, store, acts_id, tmp_path, one_thread):
    """An imported saev checkpoint has no statistics until `sae stats` computes them over a shard set."""
    from sae_shared.sae import MissingStatistics, load_sae
    from sae_shared.sae.interop import import_saelens

    g = torch.Generator().manual_seed(1)
    d_sae = 32
    state = {"W_enc": torch.randn(D, d_sae, generator=g) * 0.3, "b_enc": torch.full((d_sae,), -0.5),
             "W_dec": torch.randn(d_sae, D, generator=g) * 0.3, "b_dec": torch.full((D,), 2.0)}
    path = tmp_path / "sae.pt"
    with open(path, "wb") as fh:
        fh.write((json.dumps({"d_vit": D, "exp_factor": 2, "sparsity_coeff": 4e-4}) + "\n").encode())
        torch.save(state, fh)

    no_contract = cli("sae", "import", str(path), "--id", "x")
    assert no_contract.exit_code == 2 and "--backbone-id" in no_contract.output
    imported = cli("sae", "import", str(path), "--id", "saev-1", "--backbone-id", "fake:vit", "--layer", "3",
                   "--tokens", "patches")
    assert imported.exit_code == 0, imported.output
    assert "sae stats saev-1 --acts" in imported.output
    with pytest.raises(MissingStatistics, match="saevctl sae stats"):
        load_sae("saes/saev-1", store=store).require_stats()
    assert "stats      none" in cli("sae", "show", "saev-1").output

    wrong_backbone_set = write_shard_set(store, backbone_id="other:vit")
    refused = cli("sae", "stats", "saev-1", "--acts", wrong_backbone_set)
    assert refused.exit_code == 2 and "backbone_id" in refused.output

    computed = cli("sae", "stats", "saev-1", "--acts", acts_id)
    assert computed.exit_code == 0, computed.output
    sae = load_sae("saes/saev-1", store=store)
    stats = sae.require_stats()
    assert stats.n_tokens == N_ROWS * 16 and stats.source == acts_id
    torch.testing.assert_close(sae.W_enc.detach(), state["W_enc"])  # the weights are untouched
    assert "stats      3200 tokens" in cli("sae", "show", "saev-1").output

    exported = cli("sae", "export", "saev-1", str(tmp_path / "lens"))
    assert exported.exit_code == 0, exported.output
    back = import_saelens(tmp_path / "lens")
    x = torch.randn(7, D) + 2.0
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    assert back.contract == sae.contract
