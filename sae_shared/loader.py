"""Readers over a shard set: shuffled token batches for SAE training, and image-ordered rows for analysis.

:class:`ShuffledReader` streams the token vectors of one layer and token selection, every token exactly once per
epoch, in an order fixed by (seed, epoch):

1. the set is cut into chunks of ``chunk_rows`` consecutive rows;
2. chunks are visited in a seeded random order, fetched by a pool of ``prefetch`` threads that keeps up to
   ``2 * prefetch`` chunks fetched ahead (results are consumed in submission order, so thread timing never changes
   the output); each chunk is one ranged GET when its rows' selections are close enough (:meth:`ShardSet.read`);
3. fetched tokens collect in a shuffle window of about ``buffer_tokens`` (one buffer, reused); a full window is
   permuted (seeded) and its batches gathered out of it as they are asked for; the remainder (< one batch) carries
   over to the next window, and the last batch of an epoch may be smaller. Batches are fresh tensors (copies),
   never views of the window.

:class:`OrderedReader` yields rows in recording order with each row's source image and view, for analysis and
experiments.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from sae_shared.shards import ShardSet


_NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
"""numpy dtype holding each storage dtype's values (bfloat16, unknown to numpy, as its 16 bits)."""


def _as_numpy(block: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 as int16 bits), strides kept, nothing copied."""
    return (block.view(torch.int16) if block.dtype == torch.bfloat16 else block).numpy()


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
        self.max_chunk_tokens = max((len(c.rows) for c in self.chunks), default=0) * self.tokens_per_row
        self._pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="loader")
        self._window: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens delivered per epoch."""
        return self.shard_set.metadata.n_rows * self.tokens_per_row

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.n_tokens // self.batch_size)

    def _fetch(self, chunk: _Chunk) -> torch.Tensor:
        """``[rows, tokens, d]`` of one chunk: a view over the downloaded bytes when the selection is a contiguous
        run of positions (no copy here; :meth:`epoch` copies it into the shuffle window), else a copy."""
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
        # The shuffle window: one buffer reused for every window (fresh memory would cost a page fault per 4 KB on
        # first touch). Fetched blocks are copied in as they arrive, straight from strided views over the
        # downloaded bytes; batches are gathered out of it (a memcpy per token) into small allocations that the
        # allocator recycles. Batches are copies, so the window is refilled once its batches are out. The copies
        # run in numpy, single-threaded and without the GIL: torch's intra-op threads spin-wait between parallel
        # regions, and on a machine whose cores also run the fetch threads (and, locally, the S3 server) that
        # spinning cost ~4x the CPU of the copies themselves (docs/benchmarks.md).
        window = self._window_buffer()
        filled = 0
        produced = 0

        def emit(final: bool) -> Iterator[torch.Tensor]:
            nonlocal filled, produced
            n = filled
            perm = torch.randperm(n, generator=gen).numpy()  # batch b = window[perm[b * bs:(b + 1) * bs]]
            n_full = n // self.batch_size
            for b in range(n_full):
                if produced >= start_batch:
                    yield self._gather(window, perm[b * self.batch_size:(b + 1) * self.batch_size])
                produced += 1
            rest = perm[n_full * self.batch_size:]
            filled = 0
            if len(rest):
                if final:
                    if produced >= start_batch:
                        yield self._gather(window, rest)
                    produced += 1
                else:  # carried over to the head of the next window
                    window[:len(rest)] = np.take(window, rest, axis=0)
                    filled = len(rest)

        next_chunk = 0
        window_blocks = 0  # tokens fetched into this window (not counting the carry)
        while next_chunk < len(order) or pending:
            # up to `prefetch` fetches run while as many finished ones wait, so the threads keep fetching while
            # this thread shuffles a window or the consumer works on a batch
            while next_chunk < len(order) and len(pending) < 2 * self.prefetch:
                pending.append(self._pool.submit(self._fetch, self.chunks[order[next_chunk]]))
                next_chunk += 1
            block = _as_numpy(pending.popleft().result())
            k = block.shape[0] * block.shape[1]
            np.copyto(window[filled:filled + k].reshape(block.shape), block)
            filled += k
            window_blocks += k
            if window_blocks >= self.buffer_tokens:
                window_blocks = 0
                yield from emit(final=False)
        if filled:
            yield from emit(final=True)

    def _window_buffer(self) -> np.ndarray:
        """The shuffle window (numpy, storage dtype's bits), allocated once per reader."""
        if self._window is None:
            meta = self.shard_set.metadata
            capacity = min(self.buffer_tokens + self.batch_size + self.max_chunk_tokens, self.n_tokens)
            self._window = np.empty((capacity, meta.d_model), dtype=_NUMPY_BITS[meta.torch_dtype])
        return self._window

    def _gather(self, window: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """``window[rows]`` as a torch tensor in the requested dtype (conversions to float32 done in numpy)."""
        stored = self.shard_set.metadata.torch_dtype
        out = np.take(window, rows, axis=0)
        if self.dtype == torch.float32 and stored == torch.bfloat16:  # bf16 is the top half of a float32
            return torch.from_numpy(np.left_shift(out.view(np.uint16), 16, dtype=np.uint32).view(np.float32))
        if self.dtype == torch.float32 and stored == torch.float16:
            return torch.from_numpy(out.astype(np.float32))
        batch = torch.from_numpy(out)
        if stored == torch.bfloat16:
            batch = batch.view(torch.bfloat16)
        return self._cast(batch)

    def _cast(self, batch: torch.Tensor) -> torch.Tensor:
        return batch if self.dtype is None else batch.to(self.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._window = None


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
