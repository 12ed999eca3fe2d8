"""Fixtures of the deployment tests: the overlays rendered once per session (kubectl kustomize, offline)."""

from __future__ import annotations

import pytest

from tests.deploy.support import OVERLAYS, REPO, kustomize


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """overlay name -> its rendered documents."""
    return {name: kustomize(REPO / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request, rendered) -> tuple[str, list[dict]]:
    """(overlay name, its rendered documents), once per overlay."""
    return request.param, rendered[request.param]


def pytest_configure(config):
    # Ray Serve's own pydantic models emit deprecation warnings on import; they are not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::pydantic.warnings.PydanticDeprecatedSince20")
