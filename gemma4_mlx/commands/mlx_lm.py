"""``gemma4-mlx mlx-lm <command> [args]``: any mlx-lm command on this package's Gemma 4 model."""

from __future__ import annotations

import sys
from typing import List

import typer

from ..interrupts import sigint_handled
from . import app, user_errors


@app.command("mlx-lm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})
def mlx_lm_command(ctx: typer.Context) -> None:
    """Run an mlx-lm command (generate, chat, server, lora, fuse, cache_prompt, evaluate, ...) with
    this package's Gemma 4 model instead of mlx-lm's stock one. Arguments are mlx-lm's:
    `gemma4-mlx mlx-lm lora --model M --train --data D`; `gemma4-mlx mlx-lm <command> --help`."""
    args: List[str] = list(ctx.args)
    with user_errors():
        from ..mlx_lm_shim import commands, run

        if not args or args[0] in ("-h", "--help"):
            print("usage: gemma4-mlx mlx-lm <command> [mlx-lm's arguments]\n"
                  f"commands: {', '.join(commands())}\n"
                  "Each runs mlx-lm's own command line with gemma4-mlx's Gemma 4 model; "
                  "`gemma4-mlx mlx-lm <command> --help` lists its arguments.")
            if not args:
                raise typer.Exit(2)
            return
        if args[0].startswith("-") and args[0] != "--version":
            print(f"error: expected an mlx-lm command first, got {args[0]!r}", file=sys.stderr)
            raise typer.Exit(2)
        run(args)
        sigint_handled()  # a Ctrl-C that mlx-lm's command handled and returned from (its server): its exit, not ours
