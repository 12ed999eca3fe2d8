"""Readers over a shard set: shuffled token batches for SAE training, and image-ordered rows for analysis.

:class:`ShuffledReader` streams the token vectors of one layer and token selection, every token exactly once per
epoch, in an order fixed by (seed, epoch):

1. the set is cut into chunks of ``chunk_rows`` consecutive rows;
2. chunks are visited in a seeded random order, fetched by a pool of ``prefetch`` threads that keeps up to
   ``2 * prefetch`` chunks fetched ahead (results are consumed in submission order, so thread timing never changes
   the output); each chunk is one ranged GET when its rows' selections are close enough (:meth:`ShardSet.read`);
3. fetched tokens collect in a shuffle window of about ``buffer_tokens``; a full window is permuted (seeded; each
   fetched block is scattered straight to its permuted places, one copy) and cut into batches; the remainder
   (< one batch) carries over, and the last batch of an epoch may be smaller.

:class:`OrderedReader` yields rows in recording order with each row's source image and view, for analysis and
experiments.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch

from sae_shared.shards import ShardSet


@dataclass(frozen=True)
class _Chunk:
    shard: int
    rows: range


class ShuffledReader:
    """Shuffled ``[batch, d_model]`` batches of one layer's selected tokens."""

    def __init__(
        self,
        shard_set: ShardSet,
        layer: int,
        tokens: str | Sequence[int] = "patches",
        batch_size: int = 4096,
        seed: int = 0,
        buffer_tokens: int = 1 << 18,
        chunk_rows: int = 32,
        prefetch: int = 4,
        dtype: torch.dtype | None = torch.float32,
    ):
        if batch_size <= 0 or buffer_tokens <= 0 or chunk_rows <= 0 or prefetch <= 0:
            raise ValueError("batch_size, buffer_tokens, chunk_rows and prefetch must be positive")
        self.shard_set, self.layer, self.tokens = shard_set, layer, tokens
        meta = shard_set.metadata
        meta.layer_position(layer)  # fails early, naming the recorded layers
        self.tokens_per_row = len(meta.token_layout.select(tokens))
        self.batch_size, self.seed, self.buffer_tokens = batch_size, seed, buffer_tokens
        self.prefetch, self.dtype = prefetch, dtype
        self.chunks = [
            _Chunk(s, range(r, min(r + chunk_rows, len(meta.shard_rows(s)))))
            for s in range(meta.n_shards)
            for r in range(0, len(meta.shard_rows(s)), chunk_rows)
        ]
        self._pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="loader")

    @property
    def n_tokens(self) -> int:
        """Tokens delivered per epoch."""
        return self.shard_set.metadata.n_rows * self.tokens_per_row

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_tokens // self.batch_size)

    def _fetch(self, chunk: _Chunk) -> torch.Tensor:
        """``[rows, tokens, d]`` of one chunk: a view over the downloaded bytes when the selection is a contiguous
        run of positions (no copy here; :meth:`epoch` scatters it into the shuffle window), else a copy."""
        block, positions, t0 = self.shard_set._read(chunk.shard, chunk.rows, self.layer, self.tokens, copy=False)
        if positions != list(range(t0, t0 + block.shape[1])):
            block = block[:, [p - t0 for p in positions]]
        return block

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The batches of one epoch; ``start_batch`` skips batches already consumed (resuming a training run).

        Skipping still reads the data before ``start_batch`` (the shuffle depends on it) but does not yield it.
        """
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.chunks), generator=gen).tolist()
        pending: deque[Future] = deque()
        window: list[torch.Tensor] = []
        window_size = 0
        carry: torch.Tensor | None = None
        produced = 0

        def emit(parts: list[torch.Tensor], final: bool) -> Iterator[torch.Tensor]:
            nonlocal carry, produced
            n = sum(part.shape[0] * (1 if part.dim() == 2 else part.shape[1]) for part in parts)
            perm = torch.randperm(n, generator=gen)
            # tokens_nd = torch.cat(parts)[perm], in one copy instead of two: scatter each part to its places
            where = torch.empty_like(perm)
            where[perm] = torch.arange(n)
            tokens_nd = torch.empty((n, parts[0].shape[-1]), dtype=parts[0].dtype)
            start = 0
            for part in parts:
                if part.dim() == 2:  # the carry-over from the previous window
                    tokens_nd.index_copy_(0, where[start:start + part.shape[0]], part)
                else:  # a fetched block [rows, tokens, d], possibly a strided view over the downloaded bytes
                    tokens_nd[where[start:start + part.shape[0] * part.shape[1]].view(part.shape[:2])] = part
                start += part.shape[0] * (1 if part.dim() == 2 else part.shape[1])
            n_full = tokens_nd.shape[0] // self.batch_size
            for b in range(n_full):
                if produced >= start_batch:
                    yield self._cast(tokens_nd[b * self.batch_size:(b + 1) * self.batch_size])
                produced += 1
            rest = tokens_nd[n_full * self.batch_size:]
            carry = None
            if rest.shape[0]:
                if final:
                    if produced >= start_batch:
                        yield self._cast(rest)
                    produced += 1
                else:
                    carry = rest

        next_chunk = 0
        while next_chunk < len(order) or pending:
            # up to `prefetch` fetches run while as many finished ones wait, so the threads keep fetching while
            # this thread shuffles a window or the consumer works on a batch
            while next_chunk < len(order) and len(pending) < 2 * self.prefetch:
                pending.append(self._pool.submit(self._fetch, self.chunks[order[next_chunk]]))
                next_chunk += 1
            block = pending.popleft().result()
            window.append(block)
            window_size += block.shape[0] * block.shape[1]
            if window_size >= self.buffer_tokens:
                parts = ([carry] if carry is not None else []) + window
                window, window_size = [], 0
                yield from emit(parts, final=False)
        parts = ([carry] if carry is not None else []) + window
        if parts:
            yield from emit(parts, final=True)

    def _cast(self, batch: torch.Tensor) -> torch.Tensor:
        return batch if self.dtype is None else batch.to(self.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OrderedBatch(NamedTuple):
    """Rows of a shard set in recording order."""

    acts: torch.Tensor
    """``[n_rows, n_selected_tokens, d_model]`` of the requested layer."""
    rows: list[dict]
    """Per row: ``row`` (global index), ``image_index``, ``image_id``, ``label``, ``view`` (crop, flip)."""


class OrderedReader:
    """Image-by-image reading with each row's provenance (analysis, experiments)."""

    def __init__(self, shard_set: ShardSet, layer: int, tokens: str | Sequence[int] = "all", batch_rows: int = 64):
        shard_set.metadata.layer_position(layer)
        self.shard_set, self.layer, self.tokens, self.batch_rows = shard_set, layer, tokens, batch_rows

    def __iter__(self) -> Iterator[OrderedBatch]:
        meta = self.shard_set.metadata
        for shard in range(meta.n_shards):
            records = self.shard_set.rows(shard)
            first = meta.shard_rows(shard).start
            for r in range(0, len(records), self.batch_rows):
                rows = range(r, min(r + self.batch_rows, len(records)))
                acts = self.shard_set.read(shard, rows, self.layer, self.tokens).to(torch.float32)
                yield OrderedBatch(acts, [{"row": first + i, **records[i]} for i in rows])
