"""API-key authentication shared by every gRPC servicer and HTTP route.

Keys travel as ``authorization: Bearer <key>`` (gRPC metadata or HTTP header). Deployments never hold the keys
themselves, only their SHA-256 digests (what a deployment is constructed with can show up in Ray's state APIs);
a presented key is hashed and compared with every digest in constant time, so neither which key matched nor how
much of it matched leaks through timing.

The local stack (``saevctl serve``) generates one key under ``$SAEV_HOME`` (mode 0600) that the CLI and the client
read back: :func:`ensure_local_key`, :func:`read_local_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable, Sequence

from services.common.errors import Unauthenticated

LOCAL_KEY_FILE = "api_key"
"""Name of the generated local key under ``$SAEV_HOME``."""


def key_digest(key: str) -> str:
    """Hex SHA-256 of a key: what deployments are configured with."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def digests_of(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({key_digest(k) for k in keys if k}))


def bearer_token(value: str | None) -> str | None:
    """The key in an ``authorization`` value ``Bearer <key>`` (scheme case-insensitive), or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyCheck:
    """Verifies presented keys against configured digests. No digests: authentication is off."""

    def __init__(self, digests: Sequence[str] = ()):
        self._digests = [bytes.fromhex(d) for d in digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def verify(self, key: str | None) -> bool:
        if not self.enabled:
            return True
        presented = hashlib.sha256((key or "").encode("utf-8")).digest()
        ok = False
        for digest in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(presented, digest)
        return ok and bool(key)

    def require(self, authorization: str | None) -> None:
        """Raise :class:`Unauthenticated` unless ``authorization`` carries a valid key (or auth is off)."""
        if not self.enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        if not self.verify(token):
            raise Unauthenticated("invalid API key")

    def require_grpc(self, grpc_context) -> None:
        """Check the ``authorization`` metadata of a gRPC call."""
        if not self.enabled:
            return
        value = None
        for key, val in grpc_context.invocation_metadata() or ():
            if key.lower() == "authorization":
                value = val.decode() if isinstance(val, bytes) else val
                break
        self.require(value)


def local_key_path(home: Path) -> Path:
    return Path(home) / LOCAL_KEY_FILE


def read_local_key(home: Path) -> str | None:
    """The generated local key, or None when there is none."""
    try:
        key = local_key_path(home).read_text().strip()
    except OSError:
        return None
    return key or None


def ensure_local_key(home: Path) -> str:
    """The local key under ``home``, generated (mode 0600) on first use."""
    existing = read_local_key(home)
    if existing:
        return existing
    path = local_key_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "saev_" + secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key
