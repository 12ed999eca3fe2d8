"""Settings: the only module that reads the environment.

Every value comes, in order of precedence, from keyword arguments, ``SAEV_*`` environment variables, the connection
file that ``saevctl infra up`` writes (``$SAEV_HOME/connection.json``), then the defaults below. Components ask for
what they need with ``require_*`` methods, which fail at start-up naming the variable to set.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "SAEV_"
CONNECTION_FILE = "connection.json"


class ConfigError(RuntimeError):
    """A required setting is missing or invalid; the message names the variable to set."""


def default_home() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}HOME", ".saev")).expanduser()


class _ConnectionFileSource(PydanticBaseSettingsSource):
    """Values written by ``saevctl infra up`` for local runs (lower precedence than the environment)."""

    def __init__(self, settings_cls: type[BaseSettings], home: Path | str | None = None):
        super().__init__(settings_cls)
        path = (Path(home).expanduser() if home else default_home()) / CONNECTION_FILE
        try:
            self._values: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._values = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


SERVICES_URL = r"^((grpc|https?)://)?[A-Za-z0-9.\[\]:-]+:[0-9]{1,5}(/[A-Za-z0-9._/-]*)?$"
"""``grpc://host:port`` (or ``host:port``) or ``http(s)://host:port[/path]``."""


class Settings(BaseSettings):
    """Configuration of the whole platform. Environment variables are ``SAEV_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    home: Path = Field(default_factory=default_home)
    """Directory that holds local state: infra servers' data, logs, pid files, the connection file."""

    # --- object store ---
    storage_url: str | None = None
    """Where artifacts live: ``s3://<bucket>`` (with the s3_* settings) or ``file:///abs/path``.
    Unset: ``s3://<s3_bucket>`` when an S3 endpoint is known, else an error naming this variable."""
    s3_endpoint: str | None = None
    """S3 endpoint as ``host:port`` (no scheme), e.g. ``127.0.0.1:28333`` or ``minio:9000``."""
    s3_access_key: str | None = None
    """S3 access key id."""
    s3_secret_key: SecretStr | None = None
    """S3 secret key (kept out of logs and reprs)."""
    s3_bucket: str = "saev"
    """Bucket that holds every artifact."""
    s3_secure: bool = False
    """Use TLS to reach the S3 endpoint."""
    s3_region: str | None = None
    """S3 region, where the server needs one."""
    s3_retry_seconds: float = 60.0
    """Total time an object-store operation keeps retrying transient errors before giving up."""

    # --- services, as the job workers reach them ---
    services_url: str | None = Field(None, pattern=SERVICES_URL)
    """Where workers call the model services for experiments with ``via='services'``: ``grpc://host:port`` or
    ``http(s)://host:port[/path]``. Unset: the local stack ``saevctl serve`` started. Deliberately not a job-spec
    field: a job submitter must not be able to send the worker (and its API key) to another host."""

    # --- job queue ---
    redis_url: str | None = None
    """Redis URL for the job queue, e.g. ``redis://127.0.0.1:26379/0``."""

    # --- compute ---
    device: str = "cpu"
    """torch device for models: ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (cuda when available)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype for backbone forwards (autocast); SAE math and interventions stay in float32."""
    torch_threads: int = Field(default=0, ge=0)
    """torch intra-op threads per process; 0 leaves torch's default."""

    # --- services ---
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Accepted API keys (comma-separated in the environment). Empty: authentication off."""
    max_request_bytes: int = Field(default=64 << 20, gt=0)
    """Largest request body or tensor payload a service accepts."""
    max_batch_images: int = Field(default=64, gt=0)
    """Most images one request may carry."""
    max_tensor_elements: int = Field(default=256 << 20, gt=0)
    """Most elements one decoded tensor may have."""
    dataset_roots: Annotated[list[Path] | None, NoDecode] = None
    """Local folders that ``imagefolder:<dir>`` / ``ade20k:<dir>`` datasets must lie under (comma-separated). Unset:
    any folder the process can read (a laptop). Set it in shared deployments: a job spec names the folder and the
    services later serve its images to API-key holders."""

    # --- metrics ---
    metrics_host: str = "127.0.0.1"
    """Address the Prometheus endpoint of a plain process (``saevctl worker --metrics-port``) listens on; ``0.0.0.0``
    in a container or pod, where Prometheus scrapes it from another address."""

    # --- logging ---
    log_level: str = "INFO"
    """Least severe log level printed: DEBUG, INFO, WARNING, ERROR."""
    log_json: bool = False
    """Emit one JSON object per log line (for collectors) instead of human-readable lines."""

    @field_validator("api_keys", "dataset_roots", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_no_scheme(cls, value: str | None) -> str | None:
        if value and "://" in value:
            raise ValueError(
                f"SAEV_S3_ENDPOINT must be host:port without a scheme (got {value!r}); use SAEV_S3_SECURE=1 for TLS"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The connection file of the home given as an argument, else of $SAEV_HOME (or .saev/).
        home = getattr(init_settings, "init_kwargs", {}).get("home")
        return (init_settings, env_settings, _ConnectionFileSource(settings_cls, home))

    # --- requirements, checked where a component starts ---

    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        if self.s3_endpoint:
            return f"s3://{self.s3_bucket}"
        raise ConfigError(
            "no object store configured: set SAEV_STORAGE_URL (s3://bucket or file:///path) or SAEV_S3_ENDPOINT, "
            "or run `saevctl infra up` to start local servers"
        )

    def require_s3(self) -> tuple[str, str, str]:
        """Return (endpoint, access key, secret key) or fail naming the missing variable."""
        missing = [
            name
            for name, value in (
                ("SAEV_S3_ENDPOINT", self.s3_endpoint),
                ("SAEV_S3_ACCESS_KEY", self.s3_access_key),
                ("SAEV_S3_SECRET_KEY", self.s3_secret_key),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"S3 storage needs {', '.join(missing)} (or run `saevctl infra up`)")
        assert self.s3_endpoint and self.s3_access_key and self.s3_secret_key
        return self.s3_endpoint, self.s3_access_key, self.s3_secret_key.get_secret_value()

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError("the job queue needs SAEV_REDIS_URL (or run `saevctl infra up`)")
        return self.redis_url

    def api_key_values(self) -> set[str]:
        return {k.get_secret_value() for k in self.api_keys}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
