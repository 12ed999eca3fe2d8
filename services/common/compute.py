"""Where model math runs inside a replica: one dedicated thread per replica, the only one with an OpenMP team.

Batches run one at a time (``services.common.batching``), off the replica's event loop, so the
replica keeps accepting requests, filling the next batch and answering health checks while a forward runs. torch's
intra-op thread count is set in that thread (``Settings.torch_threads``; replicas share the node's cores).

Every other thread of the replica (Ray's, the event loops, the helpers that decode images and build responses)
runs torch single-threaded. OpenMP (GNU libgomp, which torch's CPU wheels use) gives each thread that runs a
parallel op a team of its own, and once a process holds more team threads than the machine has cores, every
team's threads stop spinning between parallel regions and sleep at once, to be woken for the next one: measured
here, a one-image forward to layer 5 went from 36 to 39-44 ms after three other threads had run one parallel op
each, and inside the activations replica it took 51-60 ms against 40 ms in a plain process.
"""

from __future__ import annotations

import concurrent.futures

_TORCH_DEFAULT: int | None = None
"""torch's own intra-op thread count in this process, read on the first call (``torch_threads`` 0 asks for it)."""


def compute_thread(torch_threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """A started one-thread executor for model math with ``torch_threads`` intra-op threads (0: torch's default);
    the calling process's other threads are left at one."""
    import torch

    global _TORCH_DEFAULT
    if _TORCH_DEFAULT is None:  # before this function sets the process-wide count to one
        _TORCH_DEFAULT = torch.get_num_threads()
    threads = torch_threads if torch_threads > 0 else _TORCH_DEFAULT

    def init() -> None:
        torch.set_num_threads(threads)
        # torch sizes a thread's OpenMP team from the process-wide count on the thread's first parallel op; asking
        # for the count does that now, so the later reset to one below does not reach this thread
        torch.get_num_threads()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=init)
    pool.submit(lambda: None).result()
    # the process-wide count (what every other thread takes on its first parallel op) and this thread's own
    torch.set_num_threads(1)
    return pool
