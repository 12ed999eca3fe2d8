"""The gRPC contracts: committed stubs are current, import cleanly, and RPC method names are unique."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import sae_shared.proto.saev.v1 as v1_pkg

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN = REPO_ROOT / "scripts" / "gen_protos.py"
STUB_DIR = Path(v1_pkg.__file__).parent

EXPECTED_SERVICES = {
    "Activations": {"GetActivations", "ForwardFrom", "ListBackbones"},
    "SAE": {"Encode", "Decode", "Edit", "TopFeatures", "ListSAEs"},
    "TaskHead": {"Predict", "ListHeads"},
    "Interventions": {"Intervene", "PreviewIntervention"},
    "Jobs": {"SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob"},
    "Features": {"GetLatent", "ListLatents", "GetLatentExemplars", "GetImageLatents", "GetLatentHistogram",
                 "ListAnalysedImages", "GetAnalysedImageLatents"},
}


def _gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GEN), *args], capture_output=True, text=True, timeout=120)


def _pb2_modules() -> list:
    names = sorted(m.name for m in pkgutil.iter_modules(v1_pkg.__path__) if m.name.endswith("_pb2"))
    return [importlib.import_module(f"{v1_pkg.__name__}.{n}") for n in names]


def _services() -> dict:
    return {name: svc for mod in _pb2_modules() for name, svc in mod.DESCRIPTOR.services_by_name.items()}


def test_committed_stubs_are_current() -> None:
    out = _gen("--check")
    assert out.returncode == 0, f"stale stubs; run `python scripts/gen_protos.py`:\n{out.stdout}{out.stderr}"


def test_check_reports_stale_missing_and_extra_files(tmp_path: Path) -> None:
    assert _gen("--out", str(tmp_path)).returncode == 0
    assert _gen("--check", "--out", str(tmp_path)).returncode == 0
    stale = tmp_path / "saev" / "v1" / "sae_pb2.py"
    stale.write_text(stale.read_text() + "# edited\n")
    (tmp_path / "saev" / "v1" / "jobs_pb2_grpc.py").unlink()
    (tmp_path / "saev" / "v1" / "old_pb2.py").write_text("")
    out = _gen("--check", "--out", str(tmp_path))
    assert out.returncode == 1
    assert "stale:" in out.stderr and "sae_pb2.py" in out.stderr
    assert "missing:" in out.stderr and "jobs_pb2_grpc.py" in out.stderr
    assert "extra:" in out.stderr and "old_pb2.py" in out.stderr
    assert _gen("--out", str(tmp_path)).returncode == 0  # regenerating repairs and removes leftovers
    assert not (tmp_path / "saev" / "v1" / "old_pb2.py").exists()
    assert _gen("--check", "--out", str(tmp_path)).returncode == 0


def test_services_and_methods_are_the_contract() -> None:
    services = _services()
    assert {name: set(svc.methods_by_name) for name, svc in services.items()} == EXPECTED_SERVICES
    for svc in services.values():
        assert svc.full_name.startswith("saev.v1.")


def test_rpc_method_names_are_unique_across_services() -> None:
    # Ray Serve's gRPC proxy routes by method name alone within an application.
    counts = Counter(m.name for svc in _services().values() for m in svc.methods)
    assert counts and not [name for name, n in counts.items() if n > 1]


def test_streaming_shape() -> None:
    for svc in _services().values():
        for m in svc.methods:
            assert not m.client_streaming, m.full_name
            assert m.server_streaming == (m.full_name == "saev.v1.Jobs.WatchJob"), m.full_name


@pytest.mark.parametrize("service", sorted(EXPECTED_SERVICES))
def test_grpc_stubs_import_and_expose_servicers(service: str) -> None:
    services = _services()
    module_name = services[service].file.name.rsplit("/", 1)[-1].removesuffix(".proto") + "_pb2_grpc"
    grpc_mod = importlib.import_module(f"{v1_pkg.__name__}.{module_name}")
    assert hasattr(grpc_mod, f"{service}Stub")
    assert hasattr(grpc_mod, f"{service}Servicer")
    assert callable(getattr(grpc_mod, f"add_{service}Servicer_to_server"))


def test_generated_imports_are_package_absolute() -> None:
    files = sorted(STUB_DIR.glob("*_pb2*.py*"))
    assert files
    for path in files:
        for line in path.read_text().splitlines():
            assert not line.lstrip().startswith(("from saev", "import saev")), f"{path.name}: {line}"


def test_message_names_used_by_services_exist() -> None:
    from sae_shared.proto.saev.v1 import common_pb2

    for name in ("Tensor", "SparseCodes", "Image", "ErrorDetail", "PatchSelection", "TokenLayout", "LatentEdit"):
        assert hasattr(common_pb2, name), name
    image = common_pb2.Image(encoded=b"png", id="a")
    assert image.WhichOneof("source") == "encoded"


def test_importing_proto_package_needs_no_grpc_or_protobuf() -> None:
    script = (
        "import sys, sae_shared.proto, sae_shared.proto.saev, sae_shared.proto.saev.v1\n"
        "bad = [m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'google.protobuf'))]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_messages_pickle_by_their_real_module_path():
    """Ray Serve pickles requests between its proxy and replicas: the class's module must be importable."""
    import pickle

    from sae_shared.proto.saev.v1 import common_pb2, sae_pb2

    assert common_pb2.Tensor.__module__ == "sae_shared.proto.saev.v1.common_pb2"
    msg = sae_pb2.DecodeRequest() if hasattr(sae_pb2, "DecodeRequest") else common_pb2.Tensor()
    assert pickle.loads(pickle.dumps(msg)) == msg
    t = common_pb2.Tensor(shape=[2, 3])
    assert pickle.loads(pickle.dumps(t)) == t
