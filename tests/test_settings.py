"""Settings: environment > connection file written by `infra up` > defaults; missing values name the variable."""

from __future__ import annotations

import json

import pytest

from sae_shared.settings import ConfigError, Settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("SAEV_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SAEV_HOME", str(tmp_path))
    return monkeypatch


def test_missing_s3_values_name_the_variables(clean_env):
    s = Settings()
    with pytest.raises(ConfigError, match="SAEV_S3_ENDPOINT, SAEV_S3_ACCESS_KEY, SAEV_S3_SECRET_KEY"):
        s.require_s3()
    with pytest.raises(ConfigError, match="SAEV_REDIS_URL"):
        s.require_redis()
    with pytest.raises(ConfigError, match="SAEV_STORAGE_URL"):
        s.resolved_storage_url()


def test_connection_file_is_read_and_environment_wins(clean_env, tmp_path):
    (tmp_path / "connection.json").write_text(
        json.dumps({"redis_url": "redis://127.0.0.1:1/0", "s3_endpoint": "127.0.0.1:2", "s3_access_key": "a",
                    "s3_secret_key": "b", "base_port": 26300})
    )
    s = Settings()
    assert s.require_s3() == ("127.0.0.1:2", "a", "b")
    assert s.resolved_storage_url() == "s3://saev"
    clean_env.setenv("SAEV_REDIS_URL", "redis://127.0.0.1:9/1")
    assert Settings().require_redis() == "redis://127.0.0.1:9/1"


def test_values_are_validated(clean_env):
    clean_env.setenv("SAEV_S3_ENDPOINT", "http://127.0.0.1:9000")
    with pytest.raises(ValueError, match="without a scheme"):
        Settings()
    clean_env.delenv("SAEV_S3_ENDPOINT")
    clean_env.setenv("SAEV_TORCH_THREADS", "-1")
    with pytest.raises(ValueError):
        Settings()


def test_api_keys_from_a_comma_separated_variable_stay_secret(clean_env):
    clean_env.setenv("SAEV_API_KEYS", "k1, k2,")
    s = Settings()
    assert s.api_key_values() == {"k1", "k2"}
    assert "k1" not in repr(s)


def test_home_given_as_an_argument_selects_its_connection_file(clean_env, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "connection.json").write_text(json.dumps({"redis_url": "redis://127.0.0.1:7/0"}))
    assert Settings(home=other).require_redis() == "redis://127.0.0.1:7/0"
    with pytest.raises(ConfigError):
        Settings().require_redis()
