"""A Ctrl-C (SIGINT) that the running command has not handled itself.

Python's default handler turns SIGINT into a KeyboardInterrupt, and a dependency may swallow it
(an import with a bare except: CI once saw ``generate`` run all 2,000 tokens after a SIGINT at
0.8 s and exit 0) or turn it into another error (transformers' lazy modules make an interrupted
import "Could not import module ...", which the loader reports as "tokenizer could not be
loaded", exit 1), or raise it in a finalizer, where Python prints "Exception ignored in ..."
and a traceback and goes on (the ``regex`` package's ``__del__``, during ``load()``). So, while
:func:`recording_sigints` is in effect, a SIGINT is also written down, and a KeyboardInterrupt
that reaches Python's unraisable hook is not printed (it is that Ctrl-C: recorded already).
``cli.main`` ends the command if one was swallowed while its modules imported; the commands
check after loading a model (``raise_if_interrupted``) and when their body ends
(``commands.user_errors``); the error policy (``commands.user_errors``, ``cli.main``) reports an
error that follows one as ``interrupted`` (exit 130). Code that handles a Ctrl-C itself and goes
on calls :func:`sigint_handled`. A SIGINT that comes while a native library has it ignored never
reaches Python and cannot be recorded: glibc's ``system()`` ignores it in the caller while the
child runs, and MLX's CPU backend calls ``system("g++ --version")`` once per process (~7 ms).

Only ``cli.main`` records: a program that runs the typer app or the Python API keeps its own
SIGINT handling. Nothing heavy is imported here (not even typing): the recording starts before
the command's modules are imported, and a Ctrl-C before it is not recorded.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_unhandled = {"sigint": False}


def _record_sigint(signum, frame):
    _unhandled["sigint"] = True
    raise KeyboardInterrupt  # what Python's default handler does: every Ctrl-C path stays as it was


@contextlib.contextmanager
def recording_sigints():
    """Record every SIGINT until the block ends. Only Python's default handler is replaced, and
    only where a handler can be set (the main thread); elsewhere nothing is recorded."""
    previous = signal.getsignal(signal.SIGINT)
    if (previous is not signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    _unhandled["sigint"] = False
    previous_hook = sys.unraisablehook

    def unraisable(info):
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            return  # our handler's KeyboardInterrupt, raised in a finalizer: recorded, not printed
        previous_hook(info)

    signal.signal(signal.SIGINT, _record_sigint)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _unhandled["sigint"] = False  # a program that runs the CLI twice starts clean


def sigint_unhandled() -> bool:
    """Whether a SIGINT arrived that no code has handled: an error now is that Ctrl-C's doing."""
    return _unhandled["sigint"]


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a SIGINT arrived that no code handled (a dependency swallowed it)."""
    if _unhandled["sigint"]:
        raise KeyboardInterrupt


def sigint_handled() -> None:
    """The Ctrl-C was dealt with and the command goes on (chat stopped a reply): an error from
    now on is reported as itself."""
    _unhandled["sigint"] = False
