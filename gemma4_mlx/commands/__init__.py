"""Shared typer app and the one-line error policy of every ``gemma4-mlx`` command.

A command module registers itself with ``@app.command()`` and wraps its body in
:func:`user_errors`, so bad input ends with one line on stderr and a non-zero exit, and the
traceback only with ``--debug`` (or ``GEMMA4_MLX_DEBUG=1``).
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from ..interrupts import raise_if_interrupted, sigint_unhandled

# Modules imported by gemma4_mlx.cli; each adds its commands to ``app``.
COMMAND_MODULES = ("generate", "chat", "serve", "checkpoint", "info", "compare", "validate", "mlx_lm")

app = typer.Typer(
    help="Gemma 4 on MLX: generate, chat, convert, inspect, validate and benchmark against stock mlx-lm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_debug = {"on": os.environ.get("GEMMA4_MLX_DEBUG", "") not in ("", "0")}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        _debug["on"] = True


def debug_enabled() -> bool:
    return _debug["on"]


def interrupt_reported() -> bool:
    """Whether a command already printed ``interrupted`` for a Ctrl-C."""
    return _debug.get("interrupted", False)


def _interrupted() -> typer.Exit:
    """Say ``interrupted``; returns the exit (130) for the caller to raise."""
    print("interrupted", file=sys.stderr)
    _debug["interrupted"] = True
    return typer.Exit(130)


@contextlib.contextmanager
def user_errors():
    """Turn expected failures into ``error: <one line>`` and exit code 1 (2 for bad usage); Ctrl-C,
    and an error that follows a Ctrl-C no code handled, into ``interrupted`` and exit code 130."""
    from ..config import ConfigError
    from ..loading import LoadError

    try:
        yield
        raise_if_interrupted()  # a Ctrl-C that a dependency swallowed on the way is still one
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise _interrupted()
    except (ConfigError, LoadError, ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError,
            KeyError, RuntimeError) as e:
        if sigint_unhandled():  # a dependency turned the Ctrl-C into this error (interrupts.py)
            raise _interrupted()
        if debug_enabled():
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = msg.strip("'\"")
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(1)
