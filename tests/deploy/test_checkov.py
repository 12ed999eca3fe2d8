"""checkov on the rendered overlays, offline (--skip-download), with the RayService's pod templates checked as the
Pods KubeRay creates from them. Every finding must be explained in checkov-skips.yaml, and every explanation must
still match a finding.

checkov pins packages that conflict with requirements/constraints.txt, so it runs from its own virtual environment,
``.venv/checkov`` (under .venv: ignored by git, removed by `make clean`), created on first use from
checkov-requirements.txt, the way CI does it. Only if that install fails (no package index) is the test skipped, with
pip's reason."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import OVERLAYS, REPO, ray_pods

HERE = Path(__file__).resolve().parent
VENV = REPO / ".venv" / "checkov"
REQUIREMENTS = HERE / "checkov-requirements.txt"
SKIPS = HERE / "checkov-skips.yaml"


@pytest.fixture(scope="session")
def checkov() -> str:
    exe = VENV / "bin" / "checkov"
    if exe.is_file():
        return str(exe)
    created = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
           "-r", str(REQUIREMENTS)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=900) if created.returncode == 0 else created
    if installed.returncode != 0 or not exe.is_file():
        shutil.rmtree(VENV, ignore_errors=True)
        pytest.skip(f"checkov could not be installed into {VENV} (pip: {installed.stderr.strip()[-600:]}); "
                    f"install it with: python -m venv {VENV} && {VENV}/bin/pip install -r {REQUIREMENTS}")
    return str(exe)


def _findings(checkov: str, rendered, tmp_path: Path) -> set[tuple[str, str, str]]:
    for name in OVERLAYS:
        docs = rendered[name] + ray_pods(rendered[name])
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--quiet",
                             "--compact", "-o", "json"], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    assert sum(r["summary"]["resource_count"] for r in reports) > 20, "checkov saw the manifests"
    found = set()
    for report in reports:
        for failed in report["results"]["failed_checks"]:
            found.add((Path(failed["file_path"]).stem, failed["check_id"], failed["resource"]))
    return found


def test_checkov_findings_are_all_explained(checkov, rendered, tmp_path):
    skips = yaml.safe_load(SKIPS.read_text())
    assert all(s.get("reason", "").strip() for s in skips), "every accepted finding has its reason"

    def explained_by(finding) -> list[int]:
        overlay, check, resource = finding
        return [i for i, s in enumerate(skips) if s["check"] == check and overlay in s["overlays"]
                and any(fnmatch.fnmatch(resource, p) for p in s["resources"])]

    findings = _findings(checkov, rendered, tmp_path)
    unexplained = sorted(f for f in findings if not explained_by(f))
    assert not unexplained, "checkov findings without a reason in checkov-skips.yaml:\n" + \
        "\n".join(f"{o}: {c} {r}" for o, c, r in unexplained)
    used = {i for f in findings for i in explained_by(f)}
    stale = [skips[i]["check"] for i in range(len(skips)) if i not in used]
    assert not stale, f"checkov-skips.yaml entries that match no finding any more (remove them): {stale}"
