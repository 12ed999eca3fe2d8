"""Structured logging and metrics used everywhere.

Logging: stdlib ``logging`` with one formatter; ``extra={...}`` fields are printed as ``key=value`` (or as JSON
fields with ``json=True``), so every component logs the same way.

Metrics: :func:`counter`, :func:`gauge` and :func:`histogram` return one small object whatever the process is.
Inside a Ray Serve replica they are ``ray.serve.metrics`` instruments (exported by Ray with its ``ray_`` prefix and
application/deployment/replica tags); in a plain process (job workers, CLI) they are prometheus-client instruments
exposed with :func:`start_metrics_server`. Neither library is imported until a metric is created.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Sequence

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


class KeyValueFormatter(logging.Formatter):
    """``2026-01-01T00:00:00Z INFO sae_shared.storage: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        line = f"{ts} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Set the root handler once per process (idempotent)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    for old in [h for h in root.handlers if getattr(h, "_saev", False)]:
        root.removeHandler(old)
    handler._saev = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


# --------------------------------------------------------------------------------------------------- metrics

_METRICS: dict[str, "Metric"] = {}


def _in_ray_replica() -> bool:
    """True inside a Ray Serve replica, where Ray's metrics API is the one that gets exported."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not in a replica"
        return False


class Metric:
    """A counter, gauge or histogram with fixed tag keys, backed by Ray or prometheus-client."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: Sequence[str], buckets: Sequence[float] | None):
        self.kind, self.name, self.tag_keys = kind, name, tuple(tag_keys)
        if _in_ray_replica():
            from ray.serve import metrics as rm

            cls = {"counter": rm.Counter, "gauge": rm.Gauge, "histogram": rm.Histogram}[kind]
            kwargs: dict[str, Any] = {"description": description, "tag_keys": self.tag_keys}
            if kind == "histogram":
                kwargs["boundaries"] = list(buckets or DEFAULT_BUCKETS)
            self._ray = cls(name, **kwargs)
            self._prom = None
        else:
            import prometheus_client as pc

            cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[kind]
            kwargs = {"labelnames": self.tag_keys}
            if kind == "histogram":
                kwargs["buckets"] = list(buckets or DEFAULT_BUCKETS)
            self._prom = cls(name, description, **kwargs)
            self._ray = None

    def _check(self, tags: dict[str, str] | None) -> dict[str, str]:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"metric {self.name} takes tags {self.tag_keys}, got {tuple(tags)}")
        return tags

    def _prom_child(self, tags: dict[str, str]) -> Any:
        assert self._prom is not None
        return self._prom.labels(**tags) if self.tag_keys else self._prom

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if self.kind != "counter":
            raise TypeError(f"{self.name} is a {self.kind}, not a counter")
        tags = self._check(tags)
        if self._ray is not None:
            self._ray.inc(value, tags=tags)
        else:
            self._prom_child(tags).inc(value)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self.kind != "gauge":
            raise TypeError(f"{self.name} is a {self.kind}, not a gauge")
        tags = self._check(tags)
        if self._ray is not None:
            self._ray.set(value, tags=tags)
        else:
            self._prom_child(tags).set(value)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self.kind != "histogram":
            raise TypeError(f"{self.name} is a {self.kind}, not a histogram")
        tags = self._check(tags)
        if self._ray is not None:
            self._ray.observe(value, tags=tags)
        else:
            self._prom_child(tags).observe(value)


DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def _metric(kind: str, name: str, description: str, tag_keys: Sequence[str], buckets=None) -> Metric:
    """Metrics are process-wide singletons by name (prometheus-client refuses duplicates)."""
    existing = _METRICS.get(name)
    if existing is not None:
        if existing.kind != kind or existing.tag_keys != tuple(tag_keys):
            raise ValueError(f"metric {name} already defined as a {existing.kind} with tags {existing.tag_keys}")
        return existing
    metric = _METRICS[name] = Metric(kind, name, description, tag_keys, buckets)
    return metric


def counter(name: str, description: str, tag_keys: Sequence[str] = ()) -> Metric:
    return _metric("counter", name, description, tag_keys)


def gauge(name: str, description: str, tag_keys: Sequence[str] = ()) -> Metric:
    return _metric("gauge", name, description, tag_keys)


def histogram(name: str, description: str, tag_keys: Sequence[str] = (), buckets: Sequence[float] | None = None) -> Metric:
    return _metric("histogram", name, description, tag_keys, buckets)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Expose this process's prometheus-client metrics at ``http://host:port/metrics`` (plain processes only)."""
    import prometheus_client as pc

    pc.start_http_server(port, addr=host)
