"""A least-recently-used cache of loaded models, bounded in bytes (not entries: an SAE can be 10 MB or 2 GB).

Defaults a replica loads at start are pinned (never evicted); others load on first use, in a worker thread so the
replica's event loop keeps answering, once per key even when many requests ask at the same time. When the bytes
held exceed the budget, the least recently used unpinned entries go; the entry just loaded always stays, even if
it alone is over the budget (the request that needed it must be served).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from services.common import metrics
from sae_shared.telemetry import get_logger

log = get_logger(__name__)

T = TypeVar("T")


class ModelCache(Generic[T]):
    """Models by key, LRU-evicted above ``budget_bytes``; ``size_of(model)`` gives a model's bytes."""

    def __init__(self, name: str, budget_bytes: int, size_of: Callable[[T], int]):
        self.name = name
        self.budget_bytes = int(budget_bytes)
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._pinned: set[Hashable] = set()
        self._loading: dict[Hashable, asyncio.Future] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def items(self) -> list[tuple[Hashable, T]]:
        return [(k, v) for k, (v, _) in self._entries.items()]

    def peek(self, key: Hashable) -> T | None:
        """The model if loaded (without touching its recency), else None."""
        entry = self._entries.get(key)
        return entry[0] if entry else None

    def put(self, key: Hashable, model: T, *, pinned: bool = False) -> T:
        self._entries[key] = (model, int(self._size_of(model)))
        self._entries.move_to_end(key)
        if pinned:
            self._pinned.add(key)
        self._evict(keep=key)
        return model

    def unpin_all(self) -> None:
        self._pinned.clear()
        self._evict(keep=None)

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._evict(keep=None)

    async def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The model under ``key``, loading it with ``load()`` (in a thread) on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            metrics.cache_events().inc(1, {"cache": self.name, "result": "hit"})
            return entry[0]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        metrics.cache_events().inc(1, {"cache": self.name, "result": "miss"})
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            model = await asyncio.to_thread(load)
            self.put(key, model)
            future.set_result(model)
            return model
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._loading[key]

    def _evict(self, keep: Hashable | None) -> None:
        total = self.bytes
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            if key in self._pinned or key == keep:
                continue
            _, size = self._entries.pop(key)
            total -= size
            metrics.cache_events().inc(1, {"cache": self.name, "result": "evict"})
            log.info("evicted %s from the %s cache (%d bytes)", key, self.name, size)
        metrics.cache_bytes().set(total, {"cache": self.name})


def module_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
