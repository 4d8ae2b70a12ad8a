"""``gemma4-mlx chat``: an interactive conversation that keeps its KV cache between turns."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from . import app, user_errors
from .generate import (
    DRAFT_MODEL_OPT, MIN_P_OPT, MODEL_OPT, NUM_DRAFT_OPT, SEED_OPT, STRICT_MEMORY_OPT, SYSTEM_OPT, THINK_OPT,
    TEMP_OPT, TOP_K_OPT, TOP_P_OPT, draft_options_check, load_draft, print_stats, sampling_options_check,
    write_piece,
)

HELP_TEXT = "commands: /reset (new conversation), /exit (quit), /help; Ctrl-C stops a reply."


@app.command()
def chat(
    model: str = MODEL_OPT,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply (> 0)."),
    temp: float = TEMP_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    min_p: float = MIN_P_OPT,
    seed: Optional[int] = SEED_OPT,
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding."),
    system: Optional[str] = SYSTEM_OPT,
    think: bool = THINK_OPT,
    show_thinking: bool = typer.Option(False, "--show-thinking", help="Print the reasoning too."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template",
                                          help="Use Gemma 4's built-in format, not the checkpoint's template."),
    stats: bool = typer.Option(False, "--stats", help="Print speed and memory after each reply (stderr)."),
    strict_memory: bool = STRICT_MEMORY_OPT,
    draft_model: Optional[str] = DRAFT_MODEL_OPT,
    num_draft_tokens: int = NUM_DRAFT_OPT,
) -> None:
    """Chat with the model: type a message per line; /reset starts over, /exit (or EOF) quits.

    Only each new turn's tokens are prefilled: the KV cache of the conversation so far (the
    model's replies included) is kept and extended.
    """
    sampling_options_check(max_tokens, temp, top_p, top_k, min_p)
    draft_options_check(draft_model, num_draft_tokens)
    with user_errors():
        import mlx.core as mx

        from ..generation import ChatSession
        from ..loading import load

        m, tok = load(model, strict_memory=strict_memory)
        if seed is not None:
            mx.random.seed(seed)
        session = ChatSession(m, tok, system=system, think=think, use_template=not no_chat_template,
                              max_tokens=max_tokens, temp=0.0 if greedy else temp, top_p=top_p, top_k=top_k,
                              min_p=min_p, draft_model=load_draft(draft_model), num_draft_tokens=num_draft_tokens)
        print(f"chat with {model}; {HELP_TEXT}", file=sys.stderr)
        while True:
            try:
                sys.stdout.write(">> ")
                sys.stdout.flush()
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                break
            if not line:  # EOF
                sys.stdout.write("\n")
                break
            message = line.rstrip("\n")
            cmd = message.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                print("(conversation reset)")
                continue
            if cmd == "/help":
                print(HELP_TEXT)
                continue
            state: dict = {}
            last = None
            replies = session.send(message)
            try:
                for r in replies:
                    write_piece(r, show_thinking, state)
                    last = r
            except KeyboardInterrupt:
                replies.close()
                print("\n(reply stopped)", file=sys.stderr)
            except ValueError as e:  # e.g. the conversation no longer fits: keep the session alive
                print(f"\nerror: {e}", file=sys.stderr)
            finally:
                if state.get("thinking"):
                    sys.stdout.write("\n[/thinking]")
                sys.stdout.write("\n")
                sys.stdout.flush()
            if stats:
                print_stats(last)
