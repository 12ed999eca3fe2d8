"""Logging and metrics helpers in a plain process (prometheus-client); Ray replicas are covered by service tests."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest

from sae_shared import telemetry


def test_json_log_lines_carry_extra_fields(capsys):
    telemetry.configure_logging("INFO", json_lines=True)
    telemetry.get_logger("saev.test").info("stored", extra={"key": "a/b", "bytes": 3})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    doc = json.loads(line)
    assert doc["msg"] == "stored" and doc["key"] == "a/b" and doc["bytes"] == 3 and doc["level"] == "INFO"
    telemetry.configure_logging("INFO")
    assert len([h for h in logging.getLogger().handlers if getattr(h, "_saev", False)]) == 1


def test_metrics_are_exported_and_checked():
    from services.infra import find_free_base

    port = find_free_base()
    jobs = telemetry.counter("saev_test_jobs_total", "Jobs seen by the test", ["state"])
    depth = telemetry.gauge("saev_test_depth", "Queue depth in the test")
    took = telemetry.histogram("saev_test_seconds", "Durations in the test", ["type"])
    assert telemetry.counter("saev_test_jobs_total", "again", ["state"]) is jobs
    jobs.inc(tags={"state": "done"})
    jobs.inc(2, tags={"state": "done"})
    depth.set(7)
    took.observe(0.3, tags={"type": "train"})
    with pytest.raises(ValueError, match="takes tags"):
        jobs.inc(tags={"wrong": "x"})
    with pytest.raises(TypeError):
        depth.inc()
    with pytest.raises(ValueError, match="already defined"):
        telemetry.gauge("saev_test_jobs_total", "clash")
    telemetry.start_metrics_server(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'saev_test_jobs_total{state="done"} 3.0' in body
    assert "saev_test_depth 7.0" in body
    assert 'saev_test_seconds_count{type="train"} 1.0' in body
