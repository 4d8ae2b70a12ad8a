"""``gemma4-mlx generate``: one prompt in, a streamed reply out (stats on stderr).
Also ``gemma4-mlx serve``: mlx-lm's OpenAI-compatible server running this package's model."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from . import app, user_errors

MODEL_HELP = "Checkpoint folder or Hugging Face repo id (owner/name)."

# Options that `generate` and `chat` share, defined once.
MODEL_OPT = typer.Option(..., "--model", "-m", help=MODEL_HELP)
TEMP_OPT = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy).")
TOP_P_OPT = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1].")
TOP_K_OPT = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off).")
MIN_P_OPT = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability, in [0, 1].")
SEED_OPT = typer.Option(None, "--seed", help="Random seed for sampling.")
SYSTEM_OPT = typer.Option(None, "--system", help="System prompt.")
THINK_OPT = typer.Option(False, "--think", help="Turn Gemma 4's thinking mode on.")
STRICT_MEMORY_OPT = typer.Option(False, "--strict-memory",
                                 help="Refuse to load when the weights need more memory than the device has.")
DRAFT_MODEL_OPT = typer.Option(None, "--draft-model",
                               help="A model for speculative decoding: a smaller Gemma 4, or Gemma 4's MTP "
                                    "drafter (a gemma4_assistant checkpoint); folder or repo id.")
NUM_DRAFT_OPT = typer.Option(3, "--num-draft-tokens",
                             help="Number of tokens to draft when using speculative decoding.")


def draft_options_check(draft_model: Optional[str], num_draft_tokens: int) -> None:
    if draft_model is not None and num_draft_tokens < 1:
        print(f"error: --num-draft-tokens must be >= 1, got {num_draft_tokens}", file=sys.stderr)
        raise typer.Exit(2)


def load_draft(draft_model: Optional[str]):
    if draft_model is None:
        return None
    from ..speculative import load_draft_model

    return load_draft_model(draft_model)


def sampling_options_check(max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float) -> None:
    """Bad values end as a usage error (exit 2) with one line."""
    from ..generation import check_sampling

    try:
        check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)


def read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            print("error: no prompt: pass --prompt TEXT, or pipe it on stdin (--prompt -)", file=sys.stderr)
            raise typer.Exit(2)
        prompt = sys.stdin.read()
    if not prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        raise typer.Exit(2)
    return prompt


def print_stats(last, file=None) -> None:
    if last is None:
        return
    file = file or sys.stderr
    print(
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"peak memory: {last.peak_memory:.3f} GB | finish: {last.finish_reason}",
        file=file,
    )


def write_piece(r, show_thinking: bool, state: dict, out=None) -> None:
    """Stream a response to stdout: the answer; with show_thinking the reasoning too, marked."""
    out = out or sys.stdout
    if show_thinking and r.reasoning:
        if not state.get("thinking"):
            out.write("[thinking]\n")
            state["thinking"] = True
        out.write(r.reasoning)
    if r.text:
        if state.get("thinking"):
            out.write("\n[/thinking]\n")
            state["thinking"] = False
        out.write(r.text)
    out.flush()


@app.command()
def generate(
    model: str = MODEL_OPT,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="The prompt; '-' or omitted (with piped input) reads stdin."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate (> 0)."),
    temp: float = TEMP_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    min_p: float = MIN_P_OPT,
    seed: Optional[int] = SEED_OPT,
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (ignores --temp/--top-*)."),
    system: Optional[str] = SYSTEM_OPT,
    think: bool = THINK_OPT,
    show_thinking: bool = typer.Option(False, "--show-thinking", help="Print the reasoning too (hidden by default)."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template",
                                          help="Send the prompt as raw text (no chat turns)."),
    strict_memory: bool = STRICT_MEMORY_OPT,
    draft_model: Optional[str] = DRAFT_MODEL_OPT,
    num_draft_tokens: int = NUM_DRAFT_OPT,
) -> None:
    """Generate a reply to one prompt, streaming it to stdout; speed and memory go to stderr."""
    sampling_options_check(max_tokens, temp, top_p, top_k, min_p)
    draft_options_check(draft_model, num_draft_tokens)
    text = read_prompt(prompt)
    with user_errors():
        from ..generation import stream_generate
        from ..loading import load

        m, tok = load(model, strict_memory=strict_memory)
        draft = load_draft(draft_model)
        state: dict = {}
        last = None
        try:
            for r in stream_generate(m, tok, text, max_tokens=max_tokens, temp=0.0 if greedy else temp,
                                     top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, system=system,
                                     think=think, chat=not no_chat_template, draft_model=draft,
                                     num_draft_tokens=num_draft_tokens):
                write_piece(r, show_thinking, state)
                last = r
        finally:
            if state.get("thinking"):
                sys.stdout.write("\n[/thinking]\n")
            sys.stdout.write("\n")
            sys.stdout.flush()
        print_stats(last)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """OpenAI-compatible HTTP server: mlx_lm.server with this package's Gemma 4 model.

    Every option is mlx_lm.server's (--model, --host, --port, ...); see `gemma4-mlx serve --help-server`.
    """
    args: List[str] = list(ctx.args)
    if "--help-server" in args:
        args = ["--help"]
    with user_errors():
        from ..generation import serve as run_server

        run_server(args)
