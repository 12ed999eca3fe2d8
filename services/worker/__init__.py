"""Job workers: run queued jobs (record, train, analyze, train-head, experiment) by type.

- :mod:`services.worker.runtime`: the worker process (slots, heartbeats, signals, publication sweeps).
- :mod:`services.worker.context`: the handler API (:class:`~services.worker.context.JobContext`) and fenced,
  staged artifact publication.
- :mod:`services.worker.registry`: job type -> handler.
- :mod:`services.worker.handlers`: built-in handlers (``count``, the queue's test and demo job).
- :mod:`services.worker.metrics`: Prometheus metrics.
- :mod:`services.worker.cli`: ``saevctl jobs ...`` and ``saevctl worker``.

``python -m services.worker [options]`` is the same as ``saevctl worker [options]``.
"""
