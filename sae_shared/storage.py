"""Object storage for artifacts: one interface, two backends.

- :class:`S3Store` talks to an S3 server (MinIO API) through the ``minio`` client, retrying transient failures
  (connection refused/reset, timeouts, 5xx, ``SlowDown``) with exponential backoff for at most ``retry_seconds``.
- :class:`FileStore` keeps the same keys as files under a local directory (``file://`` URLs), for laptops and tests.

Keys are ``/``-separated relative names such as ``saes/<sae_id>/cfg.json`` (see :func:`validate_key`). Prefixes in
:meth:`ObjectStore.list` and :meth:`ObjectStore.delete_prefix` are plain string prefixes, as in S3: ``"saes/ab"``
matches ``saes/ab/...`` *and* ``saes/abc``; end a prefix with ``/`` to mean one folder.

**Artifacts** are folders of objects that appear atomically: an :class:`ArtifactWriter` writes the files, then
:meth:`ArtifactWriter.commit` writes ``<prefix>/_manifest.json`` last, listing every file's size and sha256. Readers
go through :meth:`ObjectStore.open_artifact` / :meth:`ObjectStore.read_manifest`, which refuse a folder without a
manifest (:class:`IncompleteArtifact`), so a writer that crashed half-way is never read.

``minio`` and ``urllib3`` are imported only when an S3 store is created: importing this module and using
:class:`FileStore` needs neither.
"""

from __future__ import annotations

import abc
import hashlib
import http.client
import io
import json
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote, urlparse

from sae_shared.settings import ConfigError, Settings, get_settings
from sae_shared.telemetry import get_logger

if TYPE_CHECKING:
    import torch
    from minio import Minio

log = get_logger(__name__)

T = TypeVar("T")
BytesLike = bytes | bytearray | memoryview
"""What the put methods accept; a memoryview must be C-contiguous."""

MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes (the S3 limit)."""
MANIFEST_NAME = "_manifest.json"
"""The file an artifact's commit writes last; its presence is what makes the artifact complete."""
MANIFEST_SCHEMA = 1
PART_SIZE = 64 << 20
"""Multipart part size for S3 uploads; objects up to this size go in one PUT, sent from the caller's buffer without
a copy. On the local server part sizes from 5 to 128 MiB gave the same throughput (the server is the bottleneck),
while a 64 MiB object cost the client 45 ms of CPU in one PUT against 75-80 ms as 5 or 32 MiB parts
(docs/benchmarks.md). A multipart upload holds about ``PART_SIZE * (PARALLEL_UPLOADS + 1)`` = 256 MiB of part copies."""
PARALLEL_UPLOADS = 3
"""Parts in flight at once (each part is SigV4-hashed and sent by its own thread)."""
STREAM_CHUNK = 8 << 20
"""Read size when streaming an object into a file."""


# ----------------------------------------------------------------------------------------------------- errors


class StorageError(RuntimeError):
    """An object-store operation failed (after retries, for transient errors); the message names operation and key."""


class NotFound(StorageError, KeyError):
    """No object at this key. Also a ``KeyError``, so ``except KeyError`` works as for a dict."""

    def __init__(self, key: str, message: str | None = None):
        self.key = key
        super().__init__(message or f"no object at key {key!r}")

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message, adding quotes
        return str(self.args[0])


class InvalidKey(StorageError, ValueError):
    """A key or prefix that is not allowed; the message says what to change."""


class IncompleteArtifact(NotFound):
    """An artifact folder without a manifest: missing, or its writer has not committed (or crashed)."""

    def __init__(self, prefix: str, message: str | None = None):
        self.prefix = prefix
        super().__init__(
            manifest_key(prefix),
            message
            or f"artifact {prefix!r} is missing or incomplete: no {manifest_key(prefix)!r} "
            "(its writer has not committed, or failed before committing)",
        )


# ------------------------------------------------------------------------------------------------------- keys

# C0 and C1 control characters, DEL, and backslash (a path separator on some systems, and ambiguous in URLs).
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`InvalidKey` saying what to fix.

    A key is a non-empty ``/``-separated relative name of at most 1024 UTF-8 bytes, with no empty, ``.`` or ``..``
    segment, no control characters and no backslashes. These rules make every key a safe relative path too, which
    is how :class:`FileStore` stays inside its root.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"a key must be a str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("the key is empty: give a relative name such as 'saes/<id>/cfg.json'")
    if key.startswith("/"):
        raise InvalidKey(f"key {key[:80]!r} starts with '/': keys are relative, drop the leading '/'")
    bad = _BAD_CHARS.search(key)
    if bad:
        raise InvalidKey(
            f"key {key[:80]!r} contains {bad.group()!r} at position {bad.start()}: "
            "control characters and backslashes are not allowed (use '/' to separate folders)"
        )
    try:
        n_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"key {key[:80]!r} is not valid Unicode text ({exc.reason})") from None
    if n_bytes > MAX_KEY_BYTES:
        raise InvalidKey(f"key {key[:40]!r}... is {n_bytes} bytes in UTF-8; the limit is {MAX_KEY_BYTES}")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKey(f"key {key[:80]!r} has an empty segment ('//' or a trailing '/'): remove it")
        if segment in (".", ".."):
            raise InvalidKey(f"key {key[:80]!r} has a {segment!r} segment: give the plain path, without '.' or '..'")
    return key


def validate_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """Return ``prefix`` if it is a valid key prefix: ``""`` (everything, when allowed) or a key with an optional
    trailing ``/``."""
    if prefix == "" and allow_empty:
        return prefix
    if isinstance(prefix, str) and prefix.endswith("/") and not prefix.startswith("/"):
        validate_key(prefix[:-1] or prefix)
    else:
        validate_key(prefix)
    return prefix


def _artifact_prefix(prefix: str) -> str:
    """An artifact folder: a non-empty prefix, returned without its trailing ``/``."""
    return validate_prefix(prefix, allow_empty=False).rstrip("/")


def manifest_key(prefix: str) -> str:
    """The key of the manifest of the artifact at ``prefix``."""
    return f"{prefix.rstrip('/')}/{MANIFEST_NAME}"


# ----------------------------------------------------------------------------------------------- encodings


def encode_json(obj: Any) -> bytes:
    """The bytes :meth:`ObjectStore.put_json` stores: UTF-8 JSON, indented, keys in insertion order."""
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")


def decode_json(data: bytes, key: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"object {key!r} is not valid JSON: {exc}") from exc


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes :meth:`ObjectStore.put_tensors` stores: the safetensors format (CPU, contiguous copies as needed)."""
    from safetensors.torch import save

    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return canonical_safetensors(save(prepared, metadata=metadata))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header in one canonical order (metadata keys sorted).

    ``safetensors`` writes the ``__metadata__`` map from a hash map whose order changes from one process to the
    next, so with two or more metadata keys the same tensors gave different bytes (and sha256) in different
    processes. The tensors' data and offsets are unchanged; the header is padded to 8 bytes as safetensors pads it.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def decode_tensors(data: bytes, key: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise StorageError(f"object {key!r} is not a valid safetensors file: {exc}") from exc


def _sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check_range(offset: int, length: int | None) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0 or None, got {length}")


# --------------------------------------------------------------------------------------------- the interface


class ObjectStore(abc.ABC):
    """Keys to bytes, with JSON, safetensors, file and artifact helpers on top of a few backend primitives.

    Reads of a missing key raise :class:`NotFound`; bad keys raise :class:`InvalidKey`; other failures raise
    :class:`StorageError`. Writes of one object are atomic: a reader sees the old object or the new one, never part.
    """

    # --- primitives each backend implements ---

    @abc.abstractmethod
    def put_bytes(self, key: str, data: BytesLike, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` at ``key``, replacing any object there."""

    @abc.abstractmethod
    def get_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the object (to its end when ``length`` is None).

        Like slicing ``data[offset:offset + length]``: a range running past the end is cut at the end, and an
        ``offset`` at or past the end gives ``b""``. A missing key raises :class:`NotFound` whatever the range.
        """

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file, streamed (multipart on S3), so its size is not limited by memory."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download an object to a local file, streamed; ``path`` appears only when complete (temp file + rename).
        Missing parent folders are created."""

    @abc.abstractmethod
    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Sorted keys that start with ``prefix``.

        Not recursive: keys directly under the prefix, plus one ``<folder>/`` entry per sub-folder (S3's delimiter
        listing), e.g. ``list("saes/", recursive=False) == ["saes/a/", "saes/b/", "saes/readme.txt"]``.
        """

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes; :class:`NotFound` when missing."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    # --- derived operations (backends may override for speed) ---

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object that :meth:`list` (recursive) returns for ``prefix``; returns how many.

        The prefix must not be empty (that would empty the whole store). It is a string prefix: pass a trailing
        ``/`` (``"jobs/42/"``) to remove one folder and not also ``jobs/421``.
        """
        validate_prefix(prefix, allow_empty=False)
        keys = self.list(prefix, recursive=True)
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, encode_json(obj), content_type="application/json")

    def get_json(self, key: str) -> Any:
        return decode_json(self.get_bytes(key), key)

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Store named tensors in the safetensors format (any dtype safetensors knows, bfloat16 included)."""
        self.put_bytes(key, encode_tensors(tensors, metadata))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Named CPU tensors from a safetensors object."""
        return decode_tensors(self.get_bytes(key), key)

    # --- artifacts ---

    def artifact(self, prefix: str, *, overwrite: bool = False) -> ArtifactWriter:
        """A writer for the artifact folder ``prefix``; nothing is visible to readers until its ``commit()``.

        A complete artifact already at ``prefix`` is an error unless ``overwrite`` is set; then its manifest is
        removed first, so readers never take the old manifest for the new files.
        """
        prefix = _artifact_prefix(prefix)
        if self.exists(manifest_key(prefix)):
            if not overwrite:
                raise StorageError(
                    f"artifact {prefix!r} is already committed; pass overwrite=True to replace it "
                    "(or write to a new prefix)"
                )
            self.delete(manifest_key(prefix))
        return ArtifactWriter(self, prefix)

    def is_complete(self, prefix: str) -> bool:
        """Whether the artifact at ``prefix`` has been committed (its manifest exists)."""
        return self.exists(manifest_key(_artifact_prefix(prefix)))

    def read_manifest(self, prefix: str) -> dict[str, Any]:
        """The manifest of a committed artifact; :class:`IncompleteArtifact` when there is none."""
        prefix = _artifact_prefix(prefix)
        try:
            manifest = self.get_json(manifest_key(prefix))
        except NotFound:
            raise IncompleteArtifact(prefix) from None
        if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(
            manifest.get("files"), dict
        ):
            raise StorageError(
                f"{manifest_key(prefix)!r} is not a schema-{MANIFEST_SCHEMA} manifest "
                f"(schema {manifest.get('schema') if isinstance(manifest, dict) else None!r})"
            )
        return manifest

    def open_artifact(self, prefix: str, *, verify: Literal["manifest", "size", "sha256"] = "size") -> dict[str, Any]:
        """The manifest of a committed artifact, after checking it: ``"manifest"`` only that it is committed (as
        :meth:`read_manifest`); ``"size"`` (default) also that every listed file is there with its recorded size
        (one stat per file); ``"sha256"`` also each file's hash (downloads every file).

        Raises :class:`IncompleteArtifact` without a manifest or when a listed file is missing, and
        :class:`StorageError` when a file's size or hash differs from the manifest.
        """
        if verify not in ("manifest", "size", "sha256"):
            raise ValueError(f"verify must be 'manifest', 'size' or 'sha256', got {verify!r}")
        prefix = _artifact_prefix(prefix)
        manifest = self.read_manifest(prefix)
        if verify == "manifest":
            return manifest
        for name, entry in manifest["files"].items():
            key = f"{prefix}/{name}"
            try:
                size = self.size(key)
            except NotFound:
                raise IncompleteArtifact(prefix, f"artifact {prefix!r} lists {name!r} but {key!r} is missing") from None
            if size != entry["size"]:
                raise StorageError(f"artifact {prefix!r}: {key!r} has {size} bytes, the manifest says {entry['size']}")
            if verify == "sha256" and hashlib.sha256(self.get_bytes(key)).hexdigest() != entry["sha256"]:
                raise StorageError(f"artifact {prefix!r}: {key!r} does not match the sha256 in its manifest")
        return manifest


class ArtifactWriter:
    """Writes the files of one artifact folder and records each one's size and sha256 for the manifest.

    Obtain one with :meth:`ObjectStore.artifact`. Names are keys relative to the folder (``"sae.safetensors"``,
    ``"shards/000001.safetensors"``).
    """

    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix
        self.files: dict[str, dict[str, Any]] = {}
        """name -> {"size": bytes, "sha256": hex digest} of every file written so far."""
        self.manifest: dict[str, Any] | None = None
        """The committed manifest, once :meth:`commit` has succeeded."""

    def _key(self, name: str) -> str:
        if self.manifest is not None:
            raise StorageError(f"artifact {self.prefix!r} is already committed; open a new writer to change it")
        validate_key(name)
        if name == MANIFEST_NAME:
            raise InvalidKey(f"{MANIFEST_NAME!r} is written by commit(); choose another file name")
        return validate_key(f"{self.prefix}/{name}")

    def put_bytes(self, name: str, data: BytesLike, content_type: str = "application/octet-stream") -> None:
        key = self._key(name)
        self.store.put_bytes(key, data, content_type=content_type)
        self.files[name] = {"size": memoryview(data).nbytes, "sha256": hashlib.sha256(data).hexdigest()}

    def put_json(self, name: str, obj: Any) -> None:
        self.put_bytes(name, encode_json(obj), content_type="application/json")

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        self.put_bytes(name, encode_tensors(tensors, metadata))

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        key = self._key(name)
        size, sha256 = _sha256_file(Path(path))
        self.store.put_file(key, path)
        self.files[name] = {"size": size, "sha256": sha256}

    def commit(self, extra: dict[str, Any] | None = None, fence: Callable[[], None] | None = None) -> dict[str, Any]:
        """Make the artifact visible: call ``fence()`` (which raises to refuse, e.g. when this worker's job lease
        is lost), then write the manifest, last. Returns the manifest."""
        if self.manifest is not None:
            raise StorageError(f"artifact {self.prefix!r} is already committed")
        if fence is not None:
            fence()
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "files": dict(sorted(self.files.items())),
            "extra": extra or {},
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.store.put_json(manifest_key(self.prefix), manifest)
        self.manifest = manifest
        return manifest


# ------------------------------------------------------------------------------------------------ FileStore

_TMP_DIR = ".saev-tmp"
"""Folder under a FileStore's root for files being written (same filesystem, so os.replace is atomic)."""


class FileStore(ObjectStore):
    """Objects as files under ``root``: key ``a/b.json`` is ``root/a/b.json``.

    Writes go to a temporary file under ``root/.saev-tmp`` which is fsynced and renamed into place, so readers see
    whole objects only. Unlike S3, a key cannot be both an object and a folder (``a`` and ``a/b``): writing the second
    raises :class:`StorageError`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == _TMP_DIR:
            raise InvalidKey(f"key {key!r}: the top-level folder {_TMP_DIR!r} is reserved by the file store")
        # validate_key excludes '', '.', '..' segments, absolute keys and backslashes, so this stays under root.
        return self.root.joinpath(*key.split("/"))

    def _write_atomic(self, key: str, target: Path, write: Callable[[io.BufferedWriter], None]) -> None:
        tmp_dir = self.root / _TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / secrets.token_hex(8)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(3):  # a concurrent delete may remove the empty parent between mkdir and replace
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, target)
                    return
                except FileNotFoundError:
                    continue
                except (NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
                    raise StorageError(
                        f"cannot write {key!r}: part of its path is an object, or the key is a folder "
                        f"({exc.strerror})"
                    ) from exc
            raise StorageError(f"cannot write {key!r}: its folder keeps disappearing")
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: BytesLike, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        self._write_atomic(key, target, lambda f: f.write(data))

    def get_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        _check_range(offset, length)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read(-1 if length is None else length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        target = self._path(key)
        with open(path, "rb") as src:
            self._write_atomic(key, target, lambda f: shutil.copyfileobj(src, f, STREAM_CHUNK))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        source = self._path(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            try:
                shutil.copyfile(source, tmp)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                if not source.is_file():
                    raise NotFound(key) from None
                raise
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the string prefix as S3 does.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if rel == "":
                dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
            for name in filenames:
                key = rel + name
                if not key.startswith(prefix):
                    continue
                if not recursive:
                    slash = key.find("/", len(prefix))
                    if slash >= 0:
                        key = key[: slash + 1]
                keys.add(key)
        return sorted(keys)

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        if not path.is_file():
            raise NotFound(key)
        return st.st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        # Remove folders left empty, so they do not block a later object of the same name.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


# -------------------------------------------------------------------------------------------------- S3Store

# S3 error codes worth retrying whatever their status (servers differ in the status they send).
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "OperationAborted",
        "XMinioServerNotInitialized",
    }
)


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed: the server is unreachable, overloaded or restarting."""
    import urllib3.exceptions as ue
    from minio.error import InvalidResponseError, S3Error, ServerError

    def retryable_status(status: int) -> bool:
        return status >= 500 or status in (408, 429)

    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_S3_CODES or retryable_status(getattr(exc.response, "status", 0) or 0)
    if isinstance(exc, ServerError):
        return retryable_status(exc.status_code)
    if isinstance(exc, InvalidResponseError):
        return retryable_status(getattr(exc, "_code", 0) or 0)
    if isinstance(exc, ue.MaxRetryError):
        return not isinstance(exc.reason, ue.SSLError)  # a TLS misconfiguration will not fix itself
    if isinstance(exc, ue.SSLError):
        return False
    if isinstance(exc, (ue.ProtocolError, ue.TimeoutError, ue.NewConnectionError, ue.IncompleteRead)):
        return True
    # Built-in ConnectionError covers refused, reset, aborted and broken pipe.
    return isinstance(exc, (ConnectionError, TimeoutError, http.client.IncompleteRead))


def make_minio_client(
    endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    secure: bool = False,
    region: str | None = None,
    connect_timeout: float = 3.0,
    read_timeout: float = 60.0,
    max_connections: int = 16,
) -> Minio:
    """A ``Minio`` client whose HTTP pool fails fast and does not retry on its own, so that :class:`S3Store`'s
    retry loop alone decides how long an operation may take.

    ``read_timeout`` bounds each socket read (not a whole transfer); ``max_connections`` must cover the parallel
    multipart uploads of every thread sharing the client.
    """
    import urllib3
    from minio import Minio

    http_client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        maxsize=max_connections,
        block=False,
        retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0, raise_on_status=False),
        cert_reqs="CERT_REQUIRED",  # with the system's CA store (OpenSSL honours SSL_CERT_FILE / SSL_CERT_DIR)
    )
    return Minio(
        endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http_client
    )


class _BufferReader:
    """A read-only file over a bytes-like object for ``Minio.put_object``: each ``read(n)`` copies just that part
    (``io.BytesIO`` would first copy a whole ``bytearray``/``memoryview``), and a ``bytes`` object read whole in one
    call is returned as is, without a copy."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self._data = data
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if size is None or size < 0 else min(len(self._view), start + size)
        self._pos = end
        if start == 0 and end == len(self._view) and type(self._data) is bytes:
            return self._data
        return bytes(self._view[start:end])


class _RetryWindow:
    """When to stop retrying one operation, and how long to wait between attempts.

    The budget of ``retry_seconds`` runs from the *first failure*, not from the start of the operation, so a long
    transfer that breaks late still gets the whole window. Waits grow exponentially with jitter and never run past
    the end of the window; the last attempt starts at its end.
    """

    def __init__(self, retry_seconds: float, initial_backoff: float, max_backoff: float):
        self.retry_seconds = retry_seconds
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.first_failure: float | None = None

    def _left(self, retry_state: Any) -> float:
        now = retry_state.outcome_timestamp or time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        return self.retry_seconds - (now - self.first_failure)

    def stop(self, retry_state: Any) -> bool:
        return self._left(retry_state) <= 0

    def wait(self, retry_state: Any) -> float:
        delay = min(self.max_backoff, self.initial_backoff * 2 ** (retry_state.attempt_number - 1))
        return max(0.0, min(delay * random.uniform(0.5, 1.0), self._left(retry_state)))


class S3Store(ObjectStore):
    """Objects in one bucket of an S3 server, through a ``minio.Minio`` client.

    Transient failures are retried with exponential backoff and jitter for at most ``retry_seconds`` from the first
    failure (plus the duration of the last attempt; build the client with :func:`make_minio_client` so that one
    attempt fails fast), then raise :class:`StorageError` naming the operation and key. Missing keys
    (:class:`NotFound`) and other 4xx answers are not retried. Reads that stream an object retry as a whole: the
    GET is issued again. Uploads retry as a whole too (a multipart upload is aborted and started again).
    """

    def __init__(
        self,
        client: Minio,
        bucket: str,
        retry_seconds: float = 60.0,
        *,
        part_size: int = PART_SIZE,
        parallel_uploads: int = PARALLEL_UPLOADS,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
    ):
        if retry_seconds < 0:
            raise ValueError(f"retry_seconds must be >= 0, got {retry_seconds}")
        if part_size < 5 << 20:
            raise ValueError(f"part_size must be at least 5 MiB (the S3 minimum), got {part_size}")
        self.client = client
        self.bucket = bucket
        self.retry_seconds = float(retry_seconds)
        self.part_size = part_size
        self.parallel_uploads = parallel_uploads
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r})"

    # --- retry and error translation ---

    def _log_retry(self, op: str, key: str) -> Callable[[Any], None]:
        def before_sleep(retry_state: Any) -> None:
            exc = retry_state.outcome.exception()
            log.warning(
                "retrying %s after a transient error",
                op,
                extra={
                    "key": key,
                    "bucket": self.bucket,
                    "attempt": retry_state.attempt_number,
                    "sleep_s": round(retry_state.next_action.sleep, 3),
                    "elapsed_s": round(retry_state.seconds_since_start, 2),
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                },
            )

        return before_sleep

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one complete request, including reading its body), retrying transient failures."""
        from minio.error import MinioException, S3Error
        from tenacity import Retrying, retry_if_exception

        window = _RetryWindow(self.retry_seconds, self.initial_backoff, self.max_backoff)
        retrying = Retrying(
            stop=window.stop,
            wait=window.wait,
            retry=retry_if_exception(_is_transient),
            before_sleep=self._log_retry(op, key),
            reraise=True,
        )
        try:
            return retrying(fn)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise NotFound(key) from None
            if not _is_transient(exc):
                raise self._error(op, key, f"{exc.code}: {exc.message}", exc) from exc
            raise self._gave_up(op, key, retrying, exc) from exc
        except (StorageError, ValueError):
            raise
        except Exception as exc:
            if _is_transient(exc):
                raise self._gave_up(op, key, retrying, exc) from exc
            if isinstance(exc, MinioException):
                raise self._error(op, key, str(exc), exc) from exc
            raise

    def _error(self, op: str, key: str, detail: str, exc: BaseException) -> StorageError:
        hint = ""
        code = getattr(exc, "code", "")
        if code == "NoSuchBucket":
            hint = " (create the bucket, or check SAEV_STORAGE_URL / SAEV_S3_BUCKET)"
        elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = " (check SAEV_S3_ACCESS_KEY / SAEV_S3_SECRET_KEY)"
        return StorageError(f"{op} {key!r} in bucket {self.bucket!r} failed: {detail}{hint}")

    def _gave_up(self, op: str, key: str, retrying: Any, exc: BaseException) -> StorageError:
        attempts = retrying.statistics.get("attempt_number", 1)
        elapsed = retrying.statistics.get("delay_since_first_attempt", 0.0)
        return StorageError(
            f"{op} {key!r} in bucket {self.bucket!r} failed after {attempts} attempt(s) in {elapsed:.1f}s "
            f"(retry budget {self.retry_seconds:g}s): {type(exc).__name__}: {str(exc)[:300]}"
        )

    # --- bucket ---

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (several processes may race to do it)."""
        from minio.error import S3Error

        def create() -> None:
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create bucket", self.bucket, create)

    # --- primitives ---

    def put_bytes(self, key: str, data: BytesLike, content_type: str = "application/octet-stream") -> None:
        validate_key(key)
        length = memoryview(data).nbytes

        def put() -> None:
            self.client.put_object(
                self.bucket,
                key,
                _BufferReader(data),
                length,
                content_type=content_type,
                part_size=self.part_size,
                num_parallel_uploads=self.parallel_uploads,
            )

        self._call("put", key, put)

    def get_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        validate_key(key)
        _check_range(offset, length)
        if length == 0:  # no HTTP range means "zero bytes"; still report a missing key
            self.size(key)
            return b""
        from minio.error import S3Error

        def get() -> bytes:
            try:
                response = self.client.get_object(self.bucket, key, offset=offset, length=length or 0)
            except S3Error as exc:
                if exc.code == "InvalidRange":  # offset at or past the end (or an empty object)
                    self.size(key)  # NotFound if the object went away meanwhile
                    return b""
                raise
            try:
                data = response.read()
            finally:
                response.close()
                response.release_conn()
            if response.status == 200 and (offset or length is not None):  # a server that ignored the Range header
                data = data[offset : None if length is None else offset + length]
            return data

        return self._call("get", key, get)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        validate_key(key)
        path = os.fspath(path)

        def put() -> None:
            self.client.fput_object(
                self.bucket, key, path, part_size=self.part_size, num_parallel_uploads=self.parallel_uploads
            )

        self._call("put file", key, put)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        validate_key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")

        def get() -> None:
            response = self.client.get_object(self.bucket, key)
            try:
                with open(tmp, "wb") as f:  # truncates what a failed attempt left
                    for chunk in response.stream(STREAM_CHUNK):
                        f.write(chunk)
            finally:
                response.close()
                response.release_conn()

        try:
            self._call("get file", key, get)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        validate_prefix(prefix)

        def list_all() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=recursive)
            return sorted(obj.object_name for obj in objects)

        return self._call("list", prefix, list_all)

    def size(self, key: str) -> int:
        validate_key(key)
        return self._call("stat", key, lambda: self.client.stat_object(self.bucket, key).size)

    def delete(self, key: str) -> None:
        validate_key(key)
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        """Batch delete (1000 keys per request); see :meth:`ObjectStore.delete_prefix`."""
        from minio.deleteobjects import DeleteObject

        validate_prefix(prefix, allow_empty=False)
        keys = self.list(prefix, recursive=True)

        def delete_batch(batch: list[str]) -> None:
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in batch]))
            failed = [e for e in errors if e.code != "NoSuchKey"]
            if failed:
                raise StorageError(f"delete {prefix!r}*: could not remove {len(failed)} object(s), e.g. {failed[0]}")

        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            self._call("delete prefix", prefix, lambda batch=batch: delete_batch(batch))
        return len(keys)


# ------------------------------------------------------------------------------------------------- factory


def open_store(settings: Settings | None = None) -> ObjectStore:
    """The store that ``settings.resolved_storage_url()`` names: ``s3://<bucket>`` (created if missing, reached
    with the ``s3_*`` settings) or ``file:///absolute/path``."""
    settings = settings or get_settings()
    url = settings.resolved_storage_url()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigError(f"SAEV_STORAGE_URL {url!r}: a file store needs an absolute path, e.g. file:///data/saev")
        return FileStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if len(bucket) < 3 or parsed.path.strip("/") or parsed.query:
            raise ConfigError(
                f"SAEV_STORAGE_URL {url!r}: expected s3://<bucket> with a bucket name of 3+ characters and no path"
            )
        endpoint, access_key, secret_key = settings.require_s3()
        client = make_minio_client(
            endpoint, access_key, secret_key, secure=settings.s3_secure, region=settings.s3_region
        )
        store = S3Store(client, bucket, retry_seconds=settings.s3_retry_seconds)
        store.ensure_bucket()
        return store
    raise ConfigError(f"SAEV_STORAGE_URL {url!r}: the scheme must be s3:// or file://")
