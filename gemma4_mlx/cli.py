"""The ``gemma4-mlx`` command line (typer). Each command lives in ``gemma4_mlx/commands/``.

Nothing heavy is imported before :func:`main` runs, so Ctrl-C at any time (the first second and
a half goes to importing typer, MLX and mlx-lm) ends with ``interrupted`` and exit code 130, no
traceback.
"""

import os
import sys


def _interrupted(report: bool = True) -> None:
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while leaving: no traceback
    except ValueError:  # not the main thread: nothing to set there
        pass
    if report:
        print("interrupted", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing left to say
            pass
    # Not sys.exit: a Ctrl-C that lands inside a native import (PyTorch, under transformers) can
    # leave the interpreter to re-raise SIGINT while it shuts down (exit -2 instead of 130).
    os._exit(130)


# Commands that never use PyTorch: transformers is told it is absent (lean_imports). Decided here,
# at the process's entry, not in the commands: a program or a test that runs the typer app in its
# own process keeps its transformers as it is.
_TORCH_FREE_COMMANDS = ("generate", "chat", "serve")


def main(argv=None) -> None:
    from .interrupts import recording_sigints

    # Every Ctrl-C during the command is also recorded (interrupts.py says why): one that a
    # start-up import swallows still ends the command, and an error that follows one is reported
    # as `interrupted` (in _run_command and commands.user_errors).
    with recording_sigints():
        _run_command(argv)


def _run_command(argv) -> None:
    from .interrupts import raise_if_interrupted, sigint_unhandled

    try:
        import importlib

        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        if words and words[0] in _TORCH_FREE_COMMANDS:
            from .lean_imports import keep_torch_out

            keep_torch_out()

        from .commands import COMMAND_MODULES, app, debug_enabled, interrupt_reported
        from .commands.generate import expand_multi_value_flags
        from .distributed import quiet_other_ranks

        # Under mlx.launch every process runs this command; only rank 0 talks to the terminal.
        quiet_other_ranks(verbose=debug_enabled() or "--debug" in (sys.argv[1:] if argv is None else argv))

        for name in COMMAND_MODULES:
            importlib.import_module(f"gemma4_mlx.commands.{name}")
        raise_if_interrupted()  # an import swallowed the KeyboardInterrupt
        args = expand_multi_value_flags(list(sys.argv[1:] if argv is None else argv))
        try:
            app(args=args, prog_name="gemma4-mlx", standalone_mode=True)
        except SystemExit as e:
            # typer turns a Ctrl-C outside a command's error handling into a silent exit 130; a
            # command that reported its Ctrl-C itself leaves by os._exit too (a plain exit could
            # still end as -2 for the reason in _interrupted: seen once in CI)
            if e.code == 130:
                _interrupted(report=not interrupt_reported())
            raise
        except Exception:
            if sigint_unhandled():  # an error that escaped the commands' error policy, made of a Ctrl-C
                _interrupted()
            raise
    except KeyboardInterrupt:
        _interrupted()


def __getattr__(name):
    # ``from gemma4_mlx.cli import app, COMMAND_MODULES`` still works; the import happens here,
    # on first use, not when this module loads.
    if name in ("app", "COMMAND_MODULES"):
        import importlib

        from . import commands

        for module in commands.COMMAND_MODULES:
            importlib.import_module(f"gemma4_mlx.commands.{module}")
        return getattr(commands, name)
    raise AttributeError(f"module 'gemma4_mlx.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
