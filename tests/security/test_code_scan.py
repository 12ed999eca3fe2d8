"""Only safetensors / ``weights_only=True`` loading anywhere: the repository's Python code (every tracked ``.py``
file) is parsed, and every call that could unpickle, or otherwise run code while reading data, is refused:
``torch.load`` without ``weights_only=True``, ``pickle`` / ``cloudpickle`` / ``dill`` / ``joblib`` loads,
``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``, ``yaml.load`` without a safe loader, ``marshal.loads``.
Imports are followed through aliases (``import pickle as p``, ``from torch import load``)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {
    # The proof that the loaders refuse code: it must run the payloads unsafely once to show they do run code.
    ("tests/security/test_loaders.py", "pickle.loads"),
    ("tests/security/test_loaders.py", "torch.load"),
    ("tests/test_sae_interop.py", "torch.load"),  # the same proof for the saev importer
}
UNPICKLERS = {f"{m}.{f}" for m in ("pickle", "cloudpickle", "dill", "_pickle") for f in ("load", "loads", "Unpickler")}
UNPICKLERS |= {"joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads", "shelve.open",
               "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load"}


def _python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [REPO / line for line in out.splitlines() if line]
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    return files + [REPO / line for line in untracked.splitlines() if line]


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.calls: list[tuple[int, str, ast.Call]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def _dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name:
            self.calls.append((node.lineno, name, node))
        self.generic_visit(node)


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _round_trip(scanner: _Scanner, call: ast.Call) -> bool:
    """``pickle.loads(pickle.dumps(x))``: an object this process made, pickled and read back (what Ray does to
    errors it carries); never outside data."""
    arg = call.args[0] if call.args else None
    return isinstance(arg, ast.Call) and (scanner._dotted(arg.func) or "").endswith(".dumps")


def problems_in(source: str, rel: str) -> list[str]:
    """Unsafe loading calls in one file's source, as ``file:line: call (why)``."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    found = []
    for line, name, call in scanner.calls:
        why = None
        if name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            why = "torch.load without weights_only=True"
        elif name in UNPICKLERS and not _round_trip(scanner, call):
            why = "unpickles (or runs code from) its input"
        elif name == "numpy.load" and not (_keyword(call, "allow_pickle") is None
                                           or isinstance(_keyword(call, "allow_pickle"), ast.Constant)
                                           and _keyword(call, "allow_pickle").value is False):
            why = "numpy.load with allow_pickle"
        elif name == "yaml.load":
            loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            loader_name = scanner._dotted(loader) if loader is not None else None
            if not loader_name or "Safe" not in loader_name:
                why = "yaml.load without a safe loader"
        if why and (rel, name) not in ALLOWED:
            found.append(f"{rel}:{line}: {name} ({why})")
    return found


def test_the_scanner_finds_every_unsafe_form():
    bad = """
import pickle as p, torch, numpy as np, yaml, dill
from torch import load as tl
from joblib import load
p.loads(b"")
torch.load("f")
torch.load("f", weights_only=False)
tl("f")
np.load("f", allow_pickle=True)
yaml.load(s)
dill.load(f)
load("f")
p.loads(data)
"""
    assert len(problems_in(bad, "x.py")) == 9, problems_in(bad, "x.py")
    good = """
import torch, numpy as np, yaml, json
torch.load("f", map_location="cpu", weights_only=True)
np.load("f")
np.load("f", allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
json.loads("{}")
import pickle
pickle.loads(pickle.dumps(err))
"""
    assert problems_in(good, "x.py") == []


def test_no_code_in_the_repository_unpickles_or_loads_torch_files_unsafely():
    files = _python_files()
    assert len(files) > 100 and any(f.name == "io.py" for f in files)
    found = []
    for path in files:
        if path.is_file():
            found += problems_in(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
    assert not found, "unsafe loading (use safetensors, or torch.load(..., weights_only=True)):\n" + "\n".join(found)


SECRET_WORDS = ("SAEV_", "KEY", "SECRET", "PASSWORD", "TOKEN")


def env_reads(source: str) -> list[tuple[int, str | None]]:
    """(line, variable name or None when not a constant) of every read of the process environment."""
    tree = ast.parse(source)
    reads = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if (f.attr in ("get", "pop") and _is_environ(f.value)) or (
                    f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os"):
                key = node.args[0] if node.args else None
            else:
                continue
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            key = node.left
        else:
            continue
        reads.append((node.lineno, key.value if isinstance(key, ast.Constant) else None))
    return reads


def _is_environ(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def test_credentials_are_read_from_the_environment_only_by_settings():
    """The library and the services read no SAEV_* or credential-like variable themselves: Settings does (so every
    secret is a SecretStr, masked in reprs and logs)."""
    assert env_reads('import os\nos.environ["SAEV_X"]\nos.getenv("A_TOKEN")\n"RAY_ADDRESS" in os.environ\n') == [
        (2, "SAEV_X"), (3, "A_TOKEN"), (4, "RAY_ADDRESS")]
    found, seen = [], set()
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        if not rel.startswith(("sae_shared/", "services/")) or rel == "sae_shared/settings.py" or not path.is_file():
            continue
        for line, name in env_reads(path.read_text(encoding="utf-8")):
            seen.add(name)
            if name is None or any(word in name.upper() for word in SECRET_WORDS):
                found.append(f"{rel}:{line}: reads {name or 'a computed variable name'} from the environment")
    assert "RAY_ADDRESS" in seen, "the scan sees Ray's own variables (read where Ray is joined)"
    assert not found, "read these through sae_shared.settings.Settings:\n" + "\n".join(found)
