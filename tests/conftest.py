"""Shared fixtures: real servers started once per test session and shared by every test that needs them.

- ``infra``: a real Redis server and a real S3 server (SeaweedFS) on loopback, in a temporary ``SAEV_HOME``.
- ``settings``: a :class:`Settings` pointing at them.
- ``bucket``: a fresh, empty bucket name per test (so tests sharing the servers never see each other's objects).
"""

from __future__ import annotations

import os
import secrets
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _subnormals_back_on():
    """CPU SAE training and the job handlers flush subnormal floats process-wide (``torch.set_flush_denormal``, for
    speed); each test starts with IEEE floats again, as hypothesis needs (it refuses to run with subnormals off)."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def infra(tmp_path_factory):
    from services.infra import LocalInfra, find_free_base

    local = LocalInfra(tmp_path_factory.mktemp("saev-home"), base_port=find_free_base(), grace_seconds=10.0)
    local.up()
    yield local
    local.down()


@pytest.fixture(scope="session")
def settings(infra):
    from sae_shared.settings import Settings

    return Settings(home=infra.home, **infra.connection().as_settings())


@pytest.fixture
def bucket(settings):
    """A new bucket on the shared S3 server, removed with its objects after the test."""
    from minio import Minio

    endpoint, access, secret = settings.require_s3()
    client = Minio(endpoint, access_key=access, secret_key=secret, secure=False)
    name = "t-" + secrets.token_hex(6)
    client.make_bucket(name)
    yield name
    try:
        for obj in client.list_objects(name, recursive=True):
            client.remove_object(name, obj.object_name)
        client.remove_bucket(name)
    except Exception:  # noqa: BLE001 - the test may have stopped the server; the session teardown cleans up
        pass


def pytest_configure(config):
    # The machines are shared and noisy: property tests have no wall-clock deadline.
    from hypothesis import settings as hsettings

    hsettings.register_profile("saev", deadline=None, print_blob=True)
    hsettings.load_profile("saev")
