"""The ``gemma4-mlx`` command line (typer). Each command lives in ``gemma4_mlx/commands/``."""

from __future__ import annotations

import importlib
import sys

from .commands import COMMAND_MODULES, app


def main(argv=None) -> None:
    from .commands import debug_enabled
    from .distributed import quiet_other_ranks

    # Under mlx.launch every process runs this command; only rank 0 talks to the terminal.
    quiet_other_ranks(verbose=debug_enabled() or "--debug" in (sys.argv[1:] if argv is None else argv))
    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma4_mlx.commands.{name}")
    try:
        app(args=argv, prog_name="gemma4-mlx", standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
