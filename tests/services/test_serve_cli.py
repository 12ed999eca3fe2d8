"""`saevctl serve`: starts its own Ray, prints the gateway URL and gRPC address, requires the generated key, and
stops cleanly on Ctrl-C. Run with a gateway-only config (the model services are covered by the session stack)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import httpx
import yaml

from services.app import config_path
from services.common.local_ray import free_port


def test_saevctl_serve_prints_addresses_requires_the_key_and_stops_on_ctrl_c(tmp_path, running):
    config = yaml.safe_load(config_path("cpu").read_text())
    config["applications"] = [a for a in config["applications"] if a["name"] == "gateway"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    env = {**os.environ, "SAEV_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("SAEV_API_KEYS", None)
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--config", str(path),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while not any("ready; Ctrl-C to stop" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"saevctl serve exited with {proc.returncode}:\n" + "".join(lines[-30:]))
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines[-30:])
        text = "".join(lines)
        assert re.search(rf"gateway\s+http://127\.0\.0\.1:{http_port}", text), text
        assert re.search(rf"grpc\s+127\.0\.0\.1:{grpc_port}", text), text
        key_file = home / "api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/v1/jobs").status_code == 401
        assert httpx.get(url + "/v1/jobs", headers={"authorization": f"Bearer {key}"}).status_code != 401
        assert (home / "serve.json").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, rest[-3000:]
    assert "stopped" in rest
    assert not (home / "serve.json").exists()
