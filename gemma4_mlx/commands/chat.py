"""``gemma4-mlx chat``: an interactive conversation that keeps its KV cache between turns."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from ..interrupts import sigint_handled
from . import app, user_errors
from .generate import (
    ADAPTER_OPT, DRAFT_OPT, EXTRA_EOS_OPT, KV_BITS_OPT, KV_GROUP_OPT, KV_START_OPT,
    MAX_KV_OPT, MIN_KEEP_OPT, MIN_P_OPT, MODEL_OPT, NUM_DRAFT_OPT, PREFILL_STEP_OPT, SEED_OPT, STRICT_MEMORY_OPT,
    SYSTEM_OPT, TEMPLATE_CONFIG_OPT, THINK_OPT, TEMP_OPT, TOOLS_OPT, TOP_K_OPT, TOP_P_OPT, XTC_P_OPT, XTC_T_OPT,
    argv_text, common_checks, decode_input, format_tool_call, load_draft, load_for_cli, parse_template_config,
    print_stats,
    read_tools, usage_error, write_piece,
)

HELP_TEXT = "commands: /reset (new conversation), /exit (quit), /help; Ctrl-C stops a reply."


def read_line(prompt: str) -> Optional[str]:
    """One line of input (None at end of input). Bytes that are not UTF-8 are reported on one
    line and the line is read again: a bad line never ends the chat."""
    stream = getattr(sys.stdin, "buffer", None)
    while True:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        raw = stream.readline() if stream is not None else sys.stdin.readline().encode("utf-8", "surrogateescape")
        if not raw:
            return None
        try:
            # UTF-8 only: a line split out of UTF-16 input is not text anyway
            return decode_input(raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw, "that line", utf16=False)
        except ValueError as e:
            print(f"error: {e}; nothing was sent", file=sys.stderr)


def stream_reply(replies, show_thinking: bool, stats: bool) -> list:
    """Print one reply as it streams; returns the tool calls it made. Ctrl-C stops the reply."""
    state: dict = {}
    last = None
    calls: list = []
    try:
        for r in replies:
            write_piece(r, show_thinking, state)
            calls.extend(r.tool_calls)
            last = r
    except KeyboardInterrupt:
        sigint_handled()  # the chat goes on: a later error is that error, not this Ctrl-C
        replies.close()
        print("\n(reply stopped)", file=sys.stderr)
        calls = []
    except ValueError as e:  # e.g. the conversation no longer fits: keep the session alive
        print(f"\nerror: {e}", file=sys.stderr)
        calls = []
    finally:
        if state.get("thinking"):
            sys.stdout.write("\n[/thinking]")
        sys.stdout.write("\n")
        sys.stdout.flush()
    if stats:
        print_stats(last)
    return calls


@app.command()
def chat(
    model: str = MODEL_OPT,
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", "-n", help="Most tokens per reply (> 0)."),
    temp: float = TEMP_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    min_p: float = MIN_P_OPT,
    min_tokens_to_keep: int = MIN_KEEP_OPT,
    xtc_probability: float = XTC_P_OPT,
    xtc_threshold: float = XTC_T_OPT,
    seed: Optional[int] = SEED_OPT,
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding."),
    system: Optional[str] = SYSTEM_OPT,
    think: bool = THINK_OPT,
    show_thinking: bool = typer.Option(False, "--show-thinking", help="Print the reasoning too."),
    use_default_chat_template: bool = typer.Option(
        False, "--use-default-chat-template", "--no-chat-template",
        help="Use Gemma 4's built-in chat format, not the checkpoint's template."),
    chat_template_config: Optional[str] = TEMPLATE_CONFIG_OPT,
    tools_file: Optional[str] = TOOLS_OPT,
    adapter_path: Optional[str] = ADAPTER_OPT,
    extra_eos_token: Optional[List[str]] = EXTRA_EOS_OPT,
    prefill_step_size: int = PREFILL_STEP_OPT,
    max_kv_size: Optional[int] = MAX_KV_OPT,
    kv_bits: Optional[int] = KV_BITS_OPT,
    kv_group_size: Optional[int] = KV_GROUP_OPT,
    quantized_kv_start: Optional[int] = KV_START_OPT,
    draft_model: Optional[str] = DRAFT_OPT,
    num_draft_tokens: Optional[int] = NUM_DRAFT_OPT,
    stats: bool = typer.Option(False, "--stats", help="Print speed and memory after each reply (stderr)."),
    strict_memory: bool = STRICT_MEMORY_OPT,
) -> None:
    """Chat with the model: type a message per line; /reset starts over, /exit (or EOF) quits.

    Only each new turn's tokens are prefilled: the KV cache of the conversation so far (the
    model's replies included) is kept and extended. With --tools, each call the model makes is
    printed and its result is read as the next line (a JSON object or plain text). Flags follow
    mlx_lm.chat (-m is --max-tokens); thinking is off unless --think.
    """
    common_checks(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                  min_tokens_to_keep=min_tokens_to_keep, xtc_probability=xtc_probability,
                  xtc_threshold=xtc_threshold, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size,
                  kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                  draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    template_kwargs = parse_template_config(chat_template_config)
    tools = read_tools(tools_file)
    try:
        system = argv_text(system, "--system-prompt")
    except ValueError as e:
        usage_error(str(e))
    with user_errors():
        import mlx.core as mx

        from ..generation import ChatSession

        m, tok = load_for_cli(model, adapter_path, strict_memory, extra_eos_token)
        draft = load_draft(draft_model, tok)
        if seed is not None:
            mx.random.seed(seed)
        session = ChatSession(m, tok, system=system, think=think, use_template=not use_default_chat_template,
                              tools=tools, template_kwargs=template_kwargs, max_tokens=max_tokens,
                              temp=0.0 if greedy else temp, top_p=top_p, top_k=top_k, min_p=min_p,
                              min_tokens_to_keep=min_tokens_to_keep, xtc_probability=xtc_probability,
                              xtc_threshold=xtc_threshold, prefill_step_size=prefill_step_size,
                              max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                              quantized_kv_start=quantized_kv_start, draft_model=draft,
                              num_draft_tokens=num_draft_tokens)
        print(f"chat with {model}; {HELP_TEXT}", file=sys.stderr)
        while True:
            try:
                line = read_line(">> ")
            except KeyboardInterrupt:  # ends the chat as end of input does (exit 0)
                sigint_handled()
                sys.stdout.write("\n")
                break
            if line is None:  # EOF
                sys.stdout.write("\n")
                break
            cmd = line.strip()
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
            try:
                calls = stream_reply(session.send(line), show_thinking, stats)
            except ValueError as e:  # the message itself was refused: say so, keep the chat
                print(f"error: {e}", file=sys.stderr)
                continue
            if not run_tool_rounds(session, calls, show_thinking, stats):
                break


def run_tool_rounds(session, calls, show_thinking: bool, stats: bool) -> bool:
    """While the model calls tools: print each call, read its result as the next line, and let
    the model go on. False when input ended or /exit was typed."""
    import json

    while calls:
        results = []
        for call in calls:
            print(format_tool_call(call))
            try:
                line = read_line(f"result of {call.name}>> ")
            except KeyboardInterrupt:  # ends the chat as end of input does (exit 0)
                sigint_handled()
                sys.stdout.write("\n")
                return False
            if line is None or line.strip() in ("/exit", "/quit"):
                return False
            if line.strip() == "/reset":
                session.reset()
                print("(conversation reset)")
                return True
            try:
                value = json.loads(line)
                results.append(value if isinstance(value, dict) else line)
            except json.JSONDecodeError:
                results.append(line)
        try:
            calls = stream_reply(session.send_tool_results(results), show_thinking, stats)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return True
    return True
