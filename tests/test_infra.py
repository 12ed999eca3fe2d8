"""The local infrastructure behind `saevctl infra`: real Redis and SeaweedFS processes on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from services.infra import LocalInfra, find_free_base, ports_for, InfraError


def _children_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split(")")[1].split()[0] != "Z"]


@pytest.fixture(scope="module")
def own_infra(tmp_path_factory):
    """A second, private pair of servers: these tests kill and stop them, so they must not share the session's."""
    local = LocalInfra(tmp_path_factory.mktemp("infra-home"), base_port=find_free_base(), grace_seconds=5.0)
    yield local
    local.down()


def test_up_twice_is_harmless_and_keeps_credentials(own_infra):
    first = own_infra.up()
    pids = {name: own_infra.pid(name) for name in ("redis", "s3")}
    second = own_infra.up()
    assert second == first
    assert {name: own_infra.pid(name) for name in ("redis", "s3")} == pids
    assert own_infra.status() == {"redis": "running", "s3": "running"}


def test_connection_file_is_private(own_infra):
    own_infra.up()
    mode = stat.S_IMODE(own_infra.connection_path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((own_infra.home / "s3" / "s3.json").stat().st_mode) == 0o600
    doc = json.loads(own_infra.connection_path.read_text())
    assert doc["s3_secret_key"] and doc["redis_url"].startswith("redis://127.0.0.1:")


def test_servers_listen_on_loopback_only(own_infra):
    own_infra.up()
    import psutil

    for name in ("redis", "s3"):
        proc = psutil.Process(own_infra.pid(name))
        addrs = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert addrs and addrs <= {"127.0.0.1"}, (name, addrs)


def test_status_reflects_a_killed_server_and_up_restarts_it(own_infra):
    own_infra.up()
    own_infra.kill("redis")
    assert own_infra.status() == {"redis": "stopped", "s3": "running"}
    own_infra.up()
    assert own_infra.status() == {"redis": "running", "s3": "running"}


def test_redis_data_survives_a_kill(own_infra):
    """AOF persistence: a write acknowledged before SIGKILL is there after the restart."""
    import redis

    own_infra.up()
    client = redis.Redis.from_url(own_infra.connection().redis_url)
    client.config_set("appendfsync", "always")
    client.set("survivor", "yes")
    own_infra.kill("redis")
    own_infra.up()
    assert redis.Redis.from_url(own_infra.connection().redis_url).get("survivor") == b"yes"


def test_down_leaves_no_process_behind(own_infra):
    own_infra.up()
    pids = [own_infra.pid("redis"), own_infra.pid("s3")]
    assert all(pids)
    stopped = own_infra.down()
    assert stopped == {"s3": True, "redis": True}
    assert _children_alive(pids) == []
    assert own_infra.status() == {"redis": "stopped", "s3": "stopped"}
    assert own_infra.down() == {"s3": False, "redis": False}


def test_busy_port_gives_a_clear_error(tmp_path):
    import socket

    base = find_free_base()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports_for(base)["redis"]))
        s.listen()
        with pytest.raises(InfraError, match="in use"):
            LocalInfra(tmp_path, base_port=base, port_wait_seconds=0.5).up(timeout=5)
    LocalInfra(tmp_path).down()


def test_ports_stay_out_of_rays_range():
    with pytest.raises(InfraError, match="reserved"):
        ports_for(10000)
    assert all(not 10002 <= p < 20000 for p in ports_for(26300).values())


def test_cli_up_status_down(tmp_path):
    """`saevctl infra` end to end, as a user runs it."""
    env = {**os.environ, "SAEV_HOME": str(tmp_path / "home")}
    base = str(find_free_base())
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "services.cli", "infra", *args], env=env, capture_output=True, text=True, timeout=120
    )
    up = run("up", "--base-port", base)
    assert up.returncode == 0, up.stderr
    assert "redis  running" in up.stdout and "s3     running" in up.stdout
    status = run("status")
    assert status.returncode == 0 and "redis  running" in status.stdout and "s3     running" in status.stdout
    down = run("down", "--grace", "5")
    assert down.returncode == 0 and "stopped" in down.stdout
    status = run("status")
    assert status.returncode == 1
    assert status.stdout.splitlines() == ["redis  stopped", "s3     stopped"]
