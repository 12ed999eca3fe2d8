"""`saevctl --help` and every subcommand's `--help` work and say something useful."""

from __future__ import annotations

import subprocess
import sys

import typer.main
import typer.testing

from services.cli import app


def _command_paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in getattr(cmd, "commands", {}).items():
        paths += _command_paths(sub, prefix + (name,))
    return paths


def test_every_subcommand_has_working_help():
    root = typer.main.get_command(app)
    paths = _command_paths(root)
    assert ("infra", "up") in paths
    for path in paths:
        result = typer.testing.CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        # Every command documents itself (no bare usage line).
        cmd = root
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        assert (cmd.help or "").strip(), f"`saevctl {' '.join(path)}` has no help text"


def test_console_script_runs():
    exe = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert exe.returncode == 0 and "infra" in exe.stdout
