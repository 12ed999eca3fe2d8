"""docs/jobs.md is generated from the job spec models and must match them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_job_reference_is_current():
    result = subprocess.run([sys.executable, "scripts/job_reference.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_spec_field_is_documented():
    """A field without a docstring would leave an empty cell in the reference."""
    from sae_shared.jobs import SPEC_MODELS

    missing = [f"{model.__name__}.{name}" for model in SPEC_MODELS.values()
               for name, info in model.model_fields.items() if name != "type" and not info.description]
    assert missing == []
