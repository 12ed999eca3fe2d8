"""Fixtures of the fault tests: buckets, stores, queues and worker processes on the session's servers (tests that kill
or stop a server start their own private pair: see ``test_server_outages.py``)."""

from __future__ import annotations

import secrets

import pytest


def make_bucket(settings) -> str:
    """A new bucket on the S3 server of ``settings``."""
    from minio import Minio

    endpoint, access, secret = settings.require_s3()
    name = "r-" + secrets.token_hex(6)
    Minio(endpoint, access_key=access, secret_key=secret, secure=False).make_bucket(name)
    return name


def open_bucket(settings, bucket: str):
    """The object store of ``bucket`` on the S3 server of ``settings``."""
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store

    return open_store(Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"}))


def drop_namespace(queue) -> None:
    try:
        keys = list(queue.client.scan_iter(f"{queue.namespace}:*", count=1000))
        if keys:
            queue.client.delete(*keys)
    except Exception:  # noqa: BLE001 - the test may have left Redis down
        pass


@pytest.fixture
def namespace() -> str:
    return "r" + secrets.token_hex(4)
