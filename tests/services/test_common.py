"""The services' shared helpers, without Ray: auth, the byte-bounded cache, patch selections, error mapping,
the OpenAPI schemas, the client's retry policy."""

from __future__ import annotations

import asyncio
import os
import stat

import numpy as np
import pytest

from sae_shared.proto.saev.v1 import common_pb2 as pb
from services.common.auth import ApiKeyCheck, bearer_token, digests_of, ensure_local_key, read_local_key
from services.common.cache import ModelCache
from services.common.errors import (InvalidArgument, NotFound, Overloaded, ServiceError, TooLarge, Unavailable,
                                    to_service_error)
from services.common.protos import patch_mask, split_rows


def test_api_key_check_accepts_only_configured_keys():
    check = ApiKeyCheck(digests_of(["alpha", "beta"]))
    assert check.enabled and check.verify("alpha") and check.verify("beta")
    assert not check.verify("alph") and not check.verify("") and not check.verify(None)
    check.require("Bearer beta")
    for bad in (None, "", "Bearer", "Basic alpha", "Bearer gamma"):
        with pytest.raises(ServiceError) as err:
            check.require(bad)
        assert err.value.code == "UNAUTHENTICATED" and err.value.http_status == 401
    assert bearer_token("bearer  k1 ") == "k1"
    open_check = ApiKeyCheck(())
    assert not open_check.enabled
    open_check.require(None)  # auth off: anything passes


def test_local_key_is_generated_once_with_mode_0600(tmp_path):
    key = ensure_local_key(tmp_path)
    assert key == ensure_local_key(tmp_path) == read_local_key(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / "api_key").st_mode)
    assert mode == 0o600


def test_model_cache_evicts_least_recently_used_bytes_but_never_pinned():
    async def run():
        cache = ModelCache("t", budget_bytes=10, size_of=len)
        cache.put("pinned", "x" * 4, pinned=True)
        a = await cache.get("a", lambda: "a" * 3)
        await cache.get("b", lambda: "b" * 3)  # 10 bytes: at the budget
        assert await cache.get("a", lambda: pytest.fail("cached")) is a  # a is now the most recent
        await cache.get("c", lambda: "c" * 3)  # 13 > 10: b (least recent unpinned) goes
        assert set(cache.keys()) == {"pinned", "a", "c"} and cache.bytes == 10
        await cache.get("huge", lambda: "h" * 50)  # over the budget alone: kept, everything unpinned goes
        assert set(cache.keys()) == {"pinned", "huge"}

    asyncio.run(run())


def test_model_cache_loads_once_for_concurrent_requests():
    calls = []

    def load():
        calls.append(1)
        import time

        time.sleep(0.05)
        return "model"

    async def run():
        cache = ModelCache("t", budget_bytes=100, size_of=len)
        results = await asyncio.gather(*(cache.get("k", load) for _ in range(5)))
        assert results == ["model"] * 5 and len(calls) == 1

    asyncio.run(run())


def test_patch_selection_kinds_and_their_errors():
    grid = (4, 5)
    assert patch_mask(None, grid).all() and patch_mask(pb.PatchSelection(all=True), grid).all()
    idx = patch_mask(pb.PatchSelection(indices=pb.PatchIndices(values=[0, 19])), grid)
    assert np.flatnonzero(idx).tolist() == [0, 19]
    box = patch_mask(pb.PatchSelection(box=pb.PatchBox(row_start=1, col_start=2, row_end=3, col_end=4)), grid)
    assert np.flatnonzero(box).tolist() == [7, 8, 12, 13]
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[3, 4] = 1
    sel = pb.PatchSelection(mask=pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[4, 5], data=mask.tobytes()))
    assert np.flatnonzero(patch_mask(sel, grid)).tolist() == [19]
    for bad in (pb.PatchSelection(indices=pb.PatchIndices(values=[20])), pb.PatchSelection(indices=pb.PatchIndices()),
                pb.PatchSelection(box=pb.PatchBox(row_start=2, row_end=2, col_end=1)), pb.PatchSelection(all=False),
                pb.PatchSelection(mask=pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[3], data=b"\x01\x00\x00"))):
        with pytest.raises(InvalidArgument):
            patch_mask(bad, grid)


def test_split_rows_slices_a_tensor_without_decoding():
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    rows = split_rows(pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3, 4], data=arr.tobytes()))
    assert [list(r.shape) for r in rows] == [[4]] * 3
    assert np.frombuffer(rows[2].data, dtype="<i8").tolist() == [8, 9, 10, 11]


def test_error_mapping_never_leaks_an_unexpected_exception():
    from ray.serve.exceptions import BackPressureError

    from sae_shared.codec import CodecError

    assert isinstance(to_service_error(CodecError("big", too_large=True)), TooLarge)
    assert isinstance(to_service_error(CodecError("bad", field="x")), InvalidArgument)
    assert isinstance(to_service_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)), Overloaded)
    assert isinstance(to_service_error(KeyError("k")), ServiceError)
    internal = to_service_error(RuntimeError("secret /path/to/file.py line 3"))
    assert internal.code == "INTERNAL" and "secret" not in internal.message
    from sae_shared.queue import JobNotFound

    assert isinstance(to_service_error(JobNotFound("no job")), NotFound)
    import pickle

    err = pickle.loads(pickle.dumps(Unavailable("down", "f", 3.0)))
    assert (type(err), err.message, err.field, err.retry_after) == (Unavailable, "down", "f", 3.0)


def test_openapi_schemas_follow_the_protos():
    from sae_shared.proto.saev.v1 import sae_pb2
    from services.gateway.openapi import message_schemas

    schemas = message_schemas(sae_pb2.EditRequest.DESCRIPTOR)
    edit = schemas["saev.v1.EditRequest"]["properties"]
    assert edit["edits"] == {"type": "array", "items": {"$ref": "#/components/schemas/saev.v1.LatentEdit"}}
    assert "saev.v1.PatchBox" in schemas and "saev.v1.Tensor" in schemas
    assert schemas["saev.v1.LatentEdit"]["properties"]["op"]["enum"][1] == "EDIT_OP_SET"


def test_gateway_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import services.gateway.deployment, services.gateway.http, services.app; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _FlakyTransport:
    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def call(self, rpc, request, timeout):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    def close(self):
        pass


def test_client_retries_overload_and_unavailable_a_bounded_number_of_times():
    from sae_shared.client import Client, ClientError, RetryPolicy

    policy = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
    flaky = _FlakyTransport([ClientError("UNAVAILABLE", "down"), ClientError("RESOURCE_EXHAUSTED", "backpressure")])
    assert Client(flaky, retry=policy).call("ListSAEs", None) == "ok" and flaky.calls == 3
    http_503 = _FlakyTransport([ClientError("UNAVAILABLE", "x", 503)] * 5)
    with pytest.raises(ClientError):
        Client(http_503, retry=policy).call("ListSAEs", None)
    assert http_503.calls == 3
    for final in (ClientError("INVALID_ARGUMENT", "bad"), ClientError("RESOURCE_EXHAUSTED", "over the limit of 8"),
                  ClientError("RESOURCE_EXHAUSTED", "too big", 413)):
        once = _FlakyTransport([final])
        with pytest.raises(ClientError):
            Client(once, retry=policy).call("ListSAEs", None)
        assert once.calls == 1


def _run_python(code: str) -> list[str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_only_the_model_thread_runs_torch_with_several_threads():
    # a process of its own: compute_thread changes the process-wide thread count
    out = _run_python("""
import threading, torch
print(torch.get_num_threads())
from services.common.compute import compute_thread
pool = compute_thread(3)
seen = []
helper = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
helper.start(); helper.join()
print(pool.submit(torch.get_num_threads).result(), torch.get_num_threads(), seen[0])
print(compute_thread(0).submit(torch.get_num_threads).result(), torch.get_num_threads())
""")
    torch_default, model, caller, helper, default, caller_after = (int(v) for v in out)
    assert (model, caller, helper) == (3, 1, 1)
    # 0 asks for torch's own default, as it was before the first call set the process-wide count to one
    assert (default, caller_after) == (torch_default, 1)


def test_replicas_keep_freed_memory_on_glibc():
    import platform

    (applied,) = _run_python("from services.common.heap import keep_freed_memory; print(keep_freed_memory())")
    assert applied == ("True" if platform.libc_ver()[0] == "glibc" else "False")
