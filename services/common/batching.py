"""Continuous batching for a replica's model thread: what arrives while a batch computes forms the next batch.

``@serve.batch`` closes a batch as soon as its wait ends and only then queues it for the model thread; with no wait
(the latency-friendly setting) every batch under sustained load holds one request, and the requests queue one by one
behind each other (measured: ~1.0 request per backbone batch under 16 clients). :class:`Batcher` takes the next
batch when the model thread is free instead: everything that arrived meanwhile, up to ``max_batch_size``. A lone
request still starts at once (or after ``wait_s``, when set, for company).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from typing import Any, Callable

from services.common import metrics


class Batcher:
    """``await batcher.submit(item)`` -> this item's entry of ``run([items...])``, computed on ``pool``.

    ``run`` gets a list of items and returns one result per item, in order; it may return an exception in an item's
    place (the caller decides what to do with it). An exception raised by ``run`` itself becomes every item's result.
    Batches run one at a time, on the event loop that submits.
    """

    def __init__(self, run: Callable[[list[Any]], list[Any]], pool: concurrent.futures.Executor, op: str,
                 max_batch_size: int = 8, wait_s: float = 0.0):
        self.run, self.pool, self.op = run, pool, op
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._worker: asyncio.Task | None = None

    def configure(self, max_batch_size: int, wait_s: float) -> None:
        """New limits (``reconfigure``); they apply from the next batch."""
        self.max_batch_size, self.wait_s = max_batch_size, wait_s

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
            await asyncio.sleep(self.wait_s)
        while self._pending:
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                item, future = self._pending.popleft()
                if not future.done():  # a caller that gave up (deadline, disconnect) is not computed
                    batch.append((item, future))
            if not batch:
                continue
            metrics.batch_size().observe(len(batch), {"op": self.op})
            try:
                results = await loop.run_in_executor(self.pool, self.run, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch, which maps it
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
