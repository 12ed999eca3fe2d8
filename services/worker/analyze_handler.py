"""The ``analyze`` job: :func:`sae_shared.analysis.analyze` driven by the queue.

- **Resume**: the streaming pass's whole state (running top-k with heatmaps, counts, reverse index so far, position)
  is one checkpoint, ``analyze.state`` (safetensors bytes), written (fenced) every ``checkpoint_seconds``, at the
  end of the pass, and when the worker is stopping. A later attempt resumes from it exactly: the rows are read in
  the same batches and the merge is a stable sort, so an interrupted job publishes the same bytes as an
  undisturbed one. A checkpoint of other inputs (or unreadable) is ignored with a warning.
- **Publication**: ``saes/<sae_id>/analysis/`` is staged through ``ctx.artifact`` and becomes visible only if this
  attempt's completion wins (complete or invisible). Its ``analysis_id`` is a hash of the inputs (the SAE's weights,
  shard set, layer, k, n, tile settings): when the published analysis has the same id the job returns at once
  (``reused``) unless ``force``.
- **Progress**: fraction, ``rows``, ``rows_per_s`` and ``tokens_per_s`` every half second; ``check_cancelled``
  after every batch.

Bad input (missing SAE or shard set, a shard set of another backbone or layer, a dataset that does not match the
recording) fails the job at once (:class:`~services.worker.context.PermanentError`); other failures are retried.
"""

from __future__ import annotations

from typing import Any

from services.worker.context import JobContext, PermanentError

CHECKPOINT = "analyze.state"


def options_from_spec(spec: Any):
    """The library's :class:`~sae_shared.analysis.AnalyzeOptions` for an ``analyze`` spec."""
    from sae_shared.analysis import AnalyzeOptions

    names = ("top_k", "reverse_n", "layer", "max_rows", "batch_rows", "dataset", "tiles", "max_tiles",
             "tiles_per_latent", "device", "force", "checkpoint_seconds")
    return AnalyzeOptions(**{n: getattr(spec, n) for n in names if hasattr(spec, n)})


def run_analyze(ctx: JobContext) -> dict[str, Any]:
    from sae_shared.analysis import AnalysisError, analyze
    from sae_shared.datasets import DatasetError
    from sae_shared.sae import ContractMismatch, InvalidSAEFile
    from sae_shared.shards import ShardSetError
    from sae_shared.storage import IncompleteArtifact

    spec = ctx.spec
    ctx.progress(0.0, "loading the SAE and the shard set")
    try:
        return analyze(
            ctx.store, spec.sae_id, spec.acts_id, options_from_spec(spec),
            artifact=lambda prefix: ctx.artifact(prefix, overwrite=True),
            resume=ctx.checkpoint_get(CHECKPOINT),
            checkpoint=lambda data: ctx.checkpoint_put(CHECKPOINT, data),
            stopping=lambda: ctx.stopping,
            check=ctx.check_cancelled,
            on_progress=lambda fraction, message, metrics: ctx.progress(fraction, message, **metrics),
            log=ctx.log,
        )
    except (AnalysisError, ShardSetError, ContractMismatch, InvalidSAEFile, DatasetError) as exc:
        raise PermanentError(str(exc)) from exc
    except IncompleteArtifact as exc:  # the SAE (or a dataset upload) does not exist
        raise PermanentError(str(exc)) from exc
