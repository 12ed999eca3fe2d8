"""Where model math runs inside a replica: one dedicated thread per replica.

Batches run one at a time (``services.common.batching``), off the replica's event loop, so the
replica keeps accepting requests, filling the next batch and answering health checks while a forward runs. torch's
intra-op thread count is set in that thread (``Settings.torch_threads``; replicas share the node's cores).
"""

from __future__ import annotations

import concurrent.futures


def compute_thread(torch_threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor for model math, with torch's intra-op thread count set in it."""

    def init() -> None:
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)

    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=init)
