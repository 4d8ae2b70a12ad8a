"""The ``gemma4-mlx`` command line (typer). Each command lives in ``gemma4_mlx/commands/``."""

from __future__ import annotations

import importlib
import sys

from .commands import COMMAND_MODULES, app


def main(argv=None) -> None:
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
