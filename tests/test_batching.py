"""The replicas' continuous batching (services.common.batching), without Ray: what arrives while a batch computes
forms the next batch; a lone request starts at once; callers that gave up are not computed; a failing batch fails
each of its callers, not the batcher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from services.common.batching import Batcher


def test_requests_arriving_during_a_batch_form_the_next_batch():
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)  # the first batch computes until every other request is queued
        return [i * 10 for i in items]

    async def main():
        batcher = Batcher(run, concurrent.futures.ThreadPoolExecutor(1), "test", max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the lone request started at once, without waiting for company
        assert calls == [[0]]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == 0 and rest == [10, 20, 30, 40, 50, 60]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]  # queued while busy: batches up to max_batch_size, in order


def test_a_caller_that_gave_up_is_skipped_and_a_failing_batch_fails_its_callers_only():
    seen: list[list[str]] = []

    def run(items):
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("model failed")
        time.sleep(0.05)
        return [s.upper() for s in items]

    async def main():
        batcher = Batcher(run, concurrent.futures.ThreadPoolExecutor(1), "test", max_batch_size=8)
        busy = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("b"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await busy == "A" and await kept == "B"
        failed = await batcher.submit("boom")
        assert isinstance(failed, RuntimeError)
        return await batcher.submit("c")  # the batcher still works

    assert asyncio.run(main()) == "C"
    assert ["gone"] not in seen and all("gone" not in batch for batch in seen)


def test_a_wait_lets_a_lone_request_gather_company():
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        return list(items)

    async def main():
        batcher = Batcher(run, concurrent.futures.ThreadPoolExecutor(1), "test", max_batch_size=8, wait_s=0.05)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, batcher.submit(2))

    assert asyncio.run(main()) == [1, 2]
    assert calls == [[1, 2]]


@pytest.mark.parametrize("size", [1, 3])
def test_configure_changes_the_batch_size(size):
    calls: list[list[int]] = []
    gate = threading.Event()

    def run(items):
        calls.append(list(items))
        gate.wait(5)
        return list(items)

    async def main():
        batcher = Batcher(run, concurrent.futures.ThreadPoolExecutor(1), "test")
        batcher.configure(size, 0.0)
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*futures)

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert max(len(c) for c in calls) == size
