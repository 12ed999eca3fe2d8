"""The object store: one contract suite run on both backends (a local folder and the real S3 server of the test
session), plus the S3 retry behaviour (stopping and restarting that server) and ``open_store``."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import urllib3
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from minio.error import InvalidResponseError, S3Error, ServerError

from sae_shared.settings import ConfigError, Settings
from sae_shared.storage import (
    MANIFEST_NAME,
    FileStore,
    IncompleteArtifact,
    InvalidKey,
    NotFound,
    ObjectStore,
    S3Store,
    StorageError,
    _is_transient,
    make_minio_client,
    open_store,
    validate_key,
    validate_prefix,
)

MB = 1 << 20


def s3_store(settings: Settings, bucket: str, retry_seconds: float = 10.0) -> S3Store:
    endpoint, access, secret = settings.require_s3()
    return S3Store(make_minio_client(endpoint, access, secret), bucket, retry_seconds=retry_seconds)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ObjectStore:
    """The same contract for both backends. The S3 servers start only when an s3 case runs."""
    if request.param == "file":
        return FileStore(tmp_path / "store")
    return s3_store(request.getfixturevalue("settings"), request.getfixturevalue("bucket"))


# ------------------------------------------------------------------------------------------- round trips


def test_bytes_round_trip_and_overwrite(store):
    store.put_bytes("a/b.bin", b"hello")
    assert store.get_bytes("a/b.bin") == b"hello"
    store.put_bytes("a/b.bin", bytearray(b"replaced"))
    assert store.get_bytes("a/b.bin") == b"replaced"
    store.put_bytes("a/view.bin", memoryview(b"0123456789")[2:6])
    assert store.get_bytes("a/view.bin") == b"2345"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b"" and store.size("empty") == 0
    store.put_bytes("unicode/é 漢字.txt", b"ok")
    assert store.get_bytes("unicode/é 漢字.txt") == b"ok"


def test_json_round_trip(store):
    doc = {"schema": 1, "name": "ünïcode", "layers": [0, 5, 11], "nested": {"x": 1.5, "ok": True, "none": None}}
    store.put_json("cfg/cfg.json", doc)
    assert store.get_json("cfg/cfg.json") == doc
    store.put_bytes("cfg/broken.json", b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.get_json("cfg/broken.json")


def test_tensor_round_trip_keeps_dtypes_shapes_and_metadata(store):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w_f32": torch.randn(64, 32, generator=g),
        "w_bf16": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "w_f16": torch.randn(3, 5, generator=g).to(torch.float16),
        "idx_i64": torch.arange(10),
        "q_i8": torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous: stored as a contiguous copy
    }
    store.put_tensors("saes/x/sae.safetensors", tensors, metadata={"schema": "1"})
    back = store.get_tensors("saes/x/sae.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    raw = store.get_bytes("saes/x/sae.safetensors")
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"] == {"schema": "1"}
    store.put_bytes("saes/x/junk.safetensors", b"\x00" * 3)
    with pytest.raises(StorageError, match="safetensors"):
        store.get_tensors("saes/x/junk.safetensors")


def test_100mb_object_round_trips_from_memory_and_file(store, tmp_path):
    data = os.urandom(100 * MB)
    store.put_bytes("big/mem.bin", data)
    assert store.size("big/mem.bin") == len(data)
    assert store.get_bytes("big/mem.bin") == data

    src, dst = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    src.write_bytes(data)
    store.put_file("big/file.bin", src)
    assert store.size("big/file.bin") == len(data)
    store.get_file("big/file.bin", dst)  # creates the missing out/ folder
    assert dst.stat().st_size == len(data)
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert os.listdir(dst.parent) == ["dst.bin"]  # the temporary download file is gone


# ------------------------------------------------------------------------------------------- ranged reads


def test_ranged_reads_behave_like_slicing(store):
    data = bytes(range(256)) * 40  # 10240 bytes
    store.put_bytes("r", data)
    n = len(data)
    assert store.get_bytes("r", 0, 100) == data[:100]  # start
    assert store.get_bytes("r", 5000, 1234) == data[5000:6234]  # middle
    assert store.get_bytes("r", n - 10) == data[-10:]  # to the end
    assert store.get_bytes("r", n - 10, 10) == data[-10:]  # exactly the end
    assert store.get_bytes("r", n - 10, 100) == data[-10:]  # past the end: cut at the end
    assert store.get_bytes("r", n) == b""  # offset at the end
    assert store.get_bytes("r", n + 5000, 10) == b""  # offset past the end
    assert store.get_bytes("r", 123, 0) == b""  # zero length
    store.put_bytes("r-empty", b"")
    assert store.get_bytes("r-empty", 0, 10) == b""
    with pytest.raises(ValueError):
        store.get_bytes("r", -1, 10)
    with pytest.raises(ValueError):
        store.get_bytes("r", 0, -1)
    for offset, length in [(0, None), (10, 10), (10**6, 1), (0, 0)]:  # whatever the range, missing is NotFound
        with pytest.raises(NotFound):
            store.get_bytes("r-missing", offset, length)


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 5000), length=st.none() | st.integers(0, 5000))
def test_any_range_equals_the_python_slice(store, offset, length):
    data = bytes(range(251)) * 16  # 4016 bytes, not a power of two
    if not store.exists("h"):
        store.put_bytes("h", data)
    expected = data[offset:] if length is None else data[offset : offset + length]
    assert store.get_bytes("h", offset, length) == expected


# ------------------------------------------------------------------------------------ listing and deleting


def test_list_by_prefix_recursive_and_not(store):
    keys = ["saes/a/cfg.json", "saes/a/sae.safetensors", "saes/ab/cfg.json", "saes/b/x/y.bin", "saes/top.txt", "z"]
    for key in keys:
        store.put_bytes(key, b"x")
    assert store.list() == sorted(keys)
    assert store.list("saes/a") == ["saes/a/cfg.json", "saes/a/sae.safetensors", "saes/ab/cfg.json"]
    assert store.list("saes/a/") == ["saes/a/cfg.json", "saes/a/sae.safetensors"]
    assert store.list("saes/", recursive=False) == ["saes/a/", "saes/ab/", "saes/b/", "saes/top.txt"]
    assert store.list("", recursive=False) == ["saes/", "z"]
    assert store.list("saes/b/", recursive=False) == ["saes/b/x/"]
    assert store.list("nothing/") == []


def test_exists_size_delete(store):
    store.put_bytes("k/v", b"12345")
    assert store.exists("k/v") and store.size("k/v") == 5
    assert not store.exists("k")  # a folder is not an object
    store.delete("k/v")
    assert not store.exists("k/v")
    store.delete("k/v")  # deleting what is not there is fine
    store.delete("never/was")
    assert store.list() == []


def test_delete_prefix_removes_exactly_what_list_returns(store):
    for key in ["jobs/4/a", "jobs/4/b/c", "jobs/42/a", "jobs/5/a"]:
        store.put_bytes(key, b"x")
    assert store.delete_prefix("jobs/4/") == 2
    assert store.list() == ["jobs/42/a", "jobs/5/a"]
    assert store.delete_prefix("jobs/4") == 1  # a string prefix, as in S3: jobs/42 goes too
    assert store.list() == ["jobs/5/a"]
    assert store.delete_prefix("nothing/") == 0
    with pytest.raises(InvalidKey):
        store.delete_prefix("")  # would empty the store


def test_missing_key_raises_not_found_which_is_a_key_error(store, tmp_path):
    for read in (store.get_bytes, store.get_json, store.get_tensors, store.size):
        with pytest.raises(NotFound) as info:
            read("no/such/key")
        assert info.value.key == "no/such/key"
        assert str(info.value) == "no object at key 'no/such/key'"  # no extra quotes from KeyError.__str__
        assert isinstance(info.value, KeyError) and isinstance(info.value, StorageError)
    with pytest.raises(NotFound):
        store.get_file("no/such/key", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert not store.exists("no/such/key")


# ------------------------------------------------------------------------------------------------ keys

BAD_KEYS = {
    "empty": "",
    "absolute": "/abs",
    "dotdot": "a/../b",
    "double slash": "a//b",
    "trailing slash": "a/b/",
    "nul": "a\x00b",
    "newline": "a\nb",
    "backslash": "a\\b",
    "dot": "./a",
    "dot segment": "a/./b",
    "too long": "k" * 1025,
    "too long in utf-8": "é" * 513,
    "lone surrogate": "a\ud800b",
}


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_invalid_keys_are_rejected_before_any_io(store, key):
    with pytest.raises(InvalidKey) as info:
        validate_key(key)
    assert isinstance(info.value, ValueError) and len(str(info.value)) < 300
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.put_json(key, {}),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.put_file(key, __file__),
        lambda: store.get_file(key, "/nonexistent/never-written"),
    ):
        with pytest.raises(InvalidKey):
            call()
    # As prefixes these are invalid too, except that a prefix may end with '/' and list() may take "".
    prefix_calls = [store.artifact, store.is_complete, store.read_manifest, store.delete_prefix]
    if key:
        prefix_calls.append(store.list)
    for call in prefix_calls if not key.endswith("/") else []:
        with pytest.raises(InvalidKey):
            call(key)
    assert store.list() == []


def test_valid_keys_and_prefixes():
    for key in ["a", "a/b.json", "saes/x-1_2/sae.safetensors", "é/漢字 with space", ".hidden/..x/a..b", "k" * 1024]:
        assert validate_key(key) == key
    for prefix in ["", "a/", "a/b", "saes/"]:
        assert validate_prefix(prefix) == prefix
    for prefix in ["/", "a//", "//", "/a/"]:
        with pytest.raises(InvalidKey):
            validate_prefix(prefix)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40) | st.lists(
    st.sampled_from(["a", ".", "..", "", "b c", "~", "\\", ".saev-tmp"]), min_size=1, max_size=5
).map("/".join))
def test_file_store_paths_never_leave_the_root(tmp_path, key):
    store = FileStore(tmp_path)
    try:
        path = store._path(key)
    except InvalidKey:
        return
    assert path.resolve().is_relative_to(tmp_path.resolve())
    assert path != tmp_path and ".saev-tmp" not in path.relative_to(tmp_path).parts[:1]


def test_file_store_specifics(tmp_path):
    store = FileStore(tmp_path / "root")
    store.put_bytes("a", b"x")
    with pytest.raises(StorageError, match="path is an object"):
        store.put_bytes("a/b", b"y")  # S3 allows this; a filesystem cannot
    with pytest.raises(InvalidKey, match="reserved"):
        store.put_bytes(".saev-tmp/x", b"y")
    store.put_bytes("d/e/f", b"z")
    assert store.list() == ["a", "d/e/f"]  # the temp folder is not listed
    assert list((tmp_path / "root" / ".saev-tmp").iterdir()) == []  # and holds no leftovers
    store.delete("d/e/f")
    assert not (tmp_path / "root" / "d").exists()  # empty folders are removed with their last object
    assert (tmp_path / "root" / "a").read_bytes() == b"x"  # keys are plain paths under the root


# --------------------------------------------------------------------------------------------- artifacts


def test_artifact_is_invisible_until_committed(store, tmp_path):
    writer = store.artifact("saes/s1")
    writer.put_json("cfg.json", {"d_sae": 8})
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    writer.put_tensors("sae.safetensors", weights)
    (tmp_path / "extra.bin").write_bytes(b"extra bytes")
    writer.put_file("more/extra.bin", tmp_path / "extra.bin")
    writer.put_bytes("raw.bin", b"raw")

    assert store.exists("saes/s1/cfg.json")  # the data is there ...
    assert not store.is_complete("saes/s1")  # ... but the artifact is not
    with pytest.raises(IncompleteArtifact) as info:
        store.read_manifest("saes/s1")
    assert isinstance(info.value, NotFound) and "saes/s1" in str(info.value)
    with pytest.raises(IncompleteArtifact):
        store.open_artifact("saes/s1/")

    manifest = writer.commit(extra={"sae_id": "s1"})
    assert store.is_complete("saes/s1") and store.is_complete("saes/s1/")
    assert store.read_manifest("saes/s1") == manifest == store.open_artifact("saes/s1", verify="sha256")
    assert manifest["schema"] == 1 and manifest["extra"] == {"sae_id": "s1"} and manifest["committed_at"]
    assert set(manifest["files"]) == {"cfg.json", "sae.safetensors", "more/extra.bin", "raw.bin"}
    for name, entry in manifest["files"].items():
        data = store.get_bytes(f"saes/s1/{name}")
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert f"saes/s1/{MANIFEST_NAME}" in store.list("saes/s1/")
    with pytest.raises(StorageError, match="already committed"):
        writer.put_bytes("late.bin", b"x")
    with pytest.raises(StorageError, match="already committed"):
        writer.commit()


def test_fence_that_raises_prevents_the_manifest(store):
    class LeaseLost(Exception):
        pass

    def fence():
        raise LeaseLost("job lease taken by another worker")

    writer = store.artifact("jobs/j1/result")
    writer.put_json("result.json", {"acc": 0.9})
    with pytest.raises(LeaseLost):
        writer.commit(fence=fence)
    assert not store.is_complete("jobs/j1/result")
    assert not store.exists(f"jobs/j1/result/{MANIFEST_NAME}")

    calls = []
    writer.commit(fence=lambda: calls.append(store.is_complete("jobs/j1/result")))
    assert calls == [False]  # the fence runs before the manifest is written
    assert store.is_complete("jobs/j1/result")


def test_rewriting_a_committed_artifact_needs_overwrite_and_hides_it_meanwhile(store):
    first = store.artifact("heads/h")
    first.put_bytes("w.bin", b"old")
    first.commit()
    with pytest.raises(StorageError, match="overwrite=True"):
        store.artifact("heads/h")
    second = store.artifact("heads/h", overwrite=True)
    assert not store.is_complete("heads/h")  # the old manifest no longer vouches for files being replaced
    second.put_bytes("w.bin", b"new!")
    second.commit()
    assert store.open_artifact("heads/h")["files"]["w.bin"]["size"] == 4


def test_open_artifact_detects_missing_or_changed_files(store):
    writer = store.artifact("acts/a1")
    writer.put_bytes("shard-000000.safetensors", b"0123456789")
    writer.put_bytes("shards.json", b"[]")
    writer.commit()
    store.put_bytes("acts/a1/shards.json", b"[1]")
    with pytest.raises(StorageError, match="3 bytes, the manifest says 2"):
        store.open_artifact("acts/a1")
    store.put_bytes("acts/a1/shards.json", b"{}")
    assert store.open_artifact("acts/a1")["files"]["shards.json"]["size"] == 2  # same size passes the size check
    with pytest.raises(StorageError, match="sha256"):
        store.open_artifact("acts/a1", verify="sha256")
    store.delete("acts/a1/shard-000000.safetensors")
    with pytest.raises(IncompleteArtifact, match="missing"):
        store.open_artifact("acts/a1")
    assert store.open_artifact("acts/a1", verify="manifest") == store.read_manifest("acts/a1")
    with pytest.raises(InvalidKey, match="commit"):
        store.artifact("acts/a2").put_bytes(MANIFEST_NAME, b"{}")


# ----------------------------------------------------------------------------------------- S3 retries


def start_s3(infra, within: float = 30.0) -> None:
    """``infra.start("s3")``, tried again while the stopped server's port is still held (it can linger briefly)."""
    from services.infra import InfraError

    deadline = time.monotonic() + within
    while True:
        try:
            infra.start("s3")
            return
        except InfraError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def s3_restart(infra, settings, bucket):
    """For tests that stop the shared S3 server: collects their restart threads, and afterwards makes sure the
    server runs again and serves requests (its first seconds after a start can fail), whatever happened."""
    threads: list[threading.Thread] = []
    try:
        yield threads
    finally:
        for thread in threads:
            thread.join(timeout=60)
        start_s3(infra)
        probe = s3_store(settings, bucket, retry_seconds=60.0)
        probe.put_bytes("_ready", b"1")
        probe.delete("_ready")


def test_s3_outage_fails_after_the_retry_budget_and_is_ridden_out_by_a_longer_one(
    settings, bucket, infra, s3_restart
):
    patient = s3_store(settings, bucket, retry_seconds=60.0)
    hasty = s3_store(settings, bucket, retry_seconds=1.0)
    patient.put_bytes("before", b"kept across the restart")
    infra.stop("s3")

    # A short budget: a StorageError naming the operation and key once the budget is spent, not before or much after.
    for operation in (lambda: hasty.get_bytes("before"), lambda: hasty.put_bytes("k", b"y")):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            operation()
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 3.0, elapsed
        assert not isinstance(info.value, NotFound)
        assert "attempt" in str(info.value) and bucket in str(info.value)
        assert "get 'before'" in str(info.value) or "put 'k'" in str(info.value)

    # A long budget: the operation waits for the server to come back (restarted 2 s later, same data folder).
    def restart_later():
        time.sleep(2.0)
        start_s3(infra)

    s3_restart.append(threading.Thread(target=restart_later, daemon=True))
    s3_restart[0].start()
    data = os.urandom(4 * MB)
    start = time.monotonic()
    patient.put_bytes("during", data)
    assert time.monotonic() - start >= 1.5
    assert patient.get_bytes("during") == data
    assert patient.get_bytes("before") == b"kept across the restart"


class _DropFirstStream:
    """A Minio client whose first GET response breaks off mid-body, as when a server dies during a download."""

    def __init__(self, client):
        self._client = client
        self.gets = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, *args, **kwargs):
        response = self._client.get_object(*args, **kwargs)
        self.gets += 1
        if self.gets > 1:
            return response

        class Broken:
            status = response.status

            def read(self, *a, **k):
                response.read(10)
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

            def stream(self, *a, **k):
                yield response.read(10)
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

            def close(self):
                response.close()

            def release_conn(self):
                response.release_conn()

        return Broken()


def test_s3_streamed_reads_retry_the_whole_get(settings, bucket, tmp_path):
    store = s3_store(settings, bucket)
    data = os.urandom(3 * MB)
    store.put_bytes("obj", data)
    store.client = flaky = _DropFirstStream(store.client)
    assert store.get_bytes("obj") == data and flaky.gets == 2
    flaky.gets = 0
    store.get_file("obj", tmp_path / "obj.bin")
    assert (tmp_path / "obj.bin").read_bytes() == data and flaky.gets == 2


def test_s3_not_found_and_client_errors_are_not_retried(settings, bucket):
    store = s3_store(settings, bucket, retry_seconds=30.0)
    start = time.monotonic()
    with pytest.raises(NotFound):
        store.get_bytes("missing")
    with pytest.raises(NotFound):
        store.size("missing")
    endpoint, access, _ = settings.require_s3()
    wrong = S3Store(make_minio_client(endpoint, access, "wrong-secret"), bucket, retry_seconds=30.0)
    with pytest.raises(StorageError, match="SAEV_S3_SECRET_KEY"):
        wrong.put_bytes("k", b"x")
    assert time.monotonic() - start < 5.0


def _s3_error(status: int, code: str) -> S3Error:
    return S3Error(urllib3.HTTPResponse(body=b"", status=status), code, "msg", "/b/k", "rid", "hid", "b", "k")


@pytest.mark.parametrize(
    "make_error, transient",
    [
        (lambda: _s3_error(503, "SlowDown"), True),
        (lambda: _s3_error(500, "InternalError"), True),
        (lambda: _s3_error(502, "BadGateway"), True),
        (lambda: _s3_error(400, "SlowDown"), True),  # the code decides even when the status is odd
        (lambda: _s3_error(404, "NoSuchKey"), False),
        (lambda: _s3_error(403, "AccessDenied"), False),
        (lambda: _s3_error(416, "InvalidRange"), False),
        (lambda: ConnectionRefusedError(), True),
        (lambda: ConnectionResetError(), True),
        (lambda: urllib3.exceptions.ProtocolError("broken"), True),
        (lambda: urllib3.exceptions.ReadTimeoutError(None, "/", "timed out"), True),
        (lambda: urllib3.exceptions.MaxRetryError(None, "/", ConnectionRefusedError()), True),
        (lambda: urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.SSLError()), False),
        (lambda: ServerError("boom", 503), True),
        (lambda: InvalidResponseError(502, "text/html", "bad gateway"), True),
        (lambda: InvalidResponseError(400, "text/html", "bad request"), False),
        (lambda: ValueError("bug"), False),
    ],
)
def test_transient_error_classification(make_error, transient):
    assert _is_transient(make_error()) is transient


# -------------------------------------------------------------------------------------------- open_store


def test_open_store_file_url(tmp_path):
    store = open_store(Settings(home=tmp_path, storage_url=f"file://{tmp_path}/my%20data"))
    assert isinstance(store, FileStore) and store.root == tmp_path / "my data"
    store.put_bytes("x", b"1")
    assert (tmp_path / "my data" / "x").read_bytes() == b"1"


def test_open_store_s3_url_creates_the_bucket(settings):
    from minio import Minio

    name = f"open-store-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    store = open_store(settings.model_copy(update={"storage_url": f"s3://{name}", "s3_retry_seconds": 7.0}))
    try:
        assert isinstance(store, S3Store) and store.bucket == name and store.retry_seconds == 7.0
        store.put_json("hello.json", {"ok": True})
        again = open_store(settings.model_copy(update={"storage_url": f"s3://{name}"}))  # the bucket exists now
        assert again.get_json("hello.json") == {"ok": True}
    finally:
        client: Minio = store.client  # type: ignore[attr-defined]
        store.delete_prefix("hello.json")
        client.remove_bucket(name)


def test_open_store_without_configuration_names_the_variable(tmp_path, monkeypatch):
    for var in ("SAEV_STORAGE_URL", "SAEV_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SAEV_HOME", str(tmp_path))  # no connection file there
    with pytest.raises(ConfigError, match="SAEV_STORAGE_URL"):
        open_store(Settings(home=tmp_path))


@pytest.mark.parametrize("url", ["file://relative/path", "gs://bucket", "s3://ab", "s3://bucket/sub/path"])
def test_open_store_rejects_bad_urls(tmp_path, url):
    with pytest.raises(ConfigError, match="SAEV_STORAGE_URL"):
        open_store(
            Settings(home=tmp_path, storage_url=url, s3_endpoint="127.0.0.1:1", s3_access_key="a", s3_secret_key="b")
        )


def test_s3_url_without_credentials_names_the_missing_variables(tmp_path, monkeypatch):
    for var in ("SAEV_S3_ENDPOINT", "SAEV_S3_ACCESS_KEY", "SAEV_S3_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SAEV_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="SAEV_S3_ENDPOINT"):
        open_store(Settings(home=tmp_path, storage_url="s3://bucket"))


def test_file_store_works_without_minio_installed(tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('minio', 'urllib3'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from sae_shared.storage import FileStore, open_store
from sae_shared.settings import Settings
store = open_store(Settings(storage_url='file://{tmp_path}'))
w = store.artifact('a')
w.put_json('x.json', [1])
w.commit()
assert 'x.json' in store.open_artifact('a')['files'] and store.get_json('a/x.json') == [1]
assert 'minio' not in sys.modules and 'urllib3' not in sys.modules
"""
    repo = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr


def test_retry_window_runs_from_the_first_failure_and_never_sleeps_past_it():
    from types import SimpleNamespace

    from sae_shared.storage import _RetryWindow

    window = _RetryWindow(retry_seconds=2.0, initial_backoff=0.5, max_backoff=10.0)
    at = lambda t, n: SimpleNamespace(outcome_timestamp=t, attempt_number=n)  # noqa: E731
    assert not window.stop(at(1000.0, 1))  # a transfer that ran 1000 s before failing still gets its window
    assert 0.25 <= window.wait(at(1000.0, 1)) <= 0.5
    assert not window.stop(at(1001.5, 4))
    assert window.wait(at(1001.5, 4)) <= 0.5  # backoff of up to 4 s is cut to the 0.5 s left
    assert window.stop(at(1002.0, 5))
