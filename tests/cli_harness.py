"""The ``gemma4-mlx`` CLI run in the test's own process (typer's CliRunner)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import gemma4_mlx.commands as commands


def invoke(args, input=None):
    """Run ``gemma4-mlx ARGS`` in-process; the result has exit_code, stdout, stderr."""
    from gemma4_mlx.cli import app  # imports every command module, so every command is registered

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """Errors as users see them (one line), whatever GEMMA4_MLX_DEBUG says in the environment."""
    monkeypatch.setitem(commands._debug, "on", False)
