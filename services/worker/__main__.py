"""``python -m services.worker``: the same as ``saevctl worker``."""

from __future__ import annotations

import typer

from sae_shared.settings import get_settings
from sae_shared.telemetry import configure_logging
from services.worker.cli import worker_command


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    typer.run(worker_command)


if __name__ == "__main__":
    main()
