"""``gemma4-mlx generate``: one prompt in, a streamed reply out (stats on stderr).

The flags are ``mlx_lm.generate``'s, with the same names and meanings (``-m`` is
``--max-tokens``, as there); this package's older names stay as aliases (``--system``,
``--no-chat-template``, ``-n``). Options shared with ``chat`` are defined here once.
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from ..interrupts import raise_if_interrupted
from . import app, user_errors

MODEL_HELP = "Checkpoint folder or Hugging Face repo id (owner/name)."

# Options that `generate` and `chat` share, defined once.
MODEL_OPT = typer.Option(..., "--model", help=MODEL_HELP)
TEMP_OPT = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy).")
TOP_P_OPT = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1].")
TOP_K_OPT = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off).")
MIN_P_OPT = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability, in [0, 1].")
MIN_KEEP_OPT = typer.Option(1, "--min-tokens-to-keep", help="Tokens min-p sampling always keeps (>= 1).")
XTC_P_OPT = typer.Option(0.0, "--xtc-probability", help="Probability of applying XTC sampling at a step, in [0, 1].")
XTC_T_OPT = typer.Option(0.1, "--xtc-threshold", help="XTC removes tokens above this probability, in [0, 0.5].")
SEED_OPT = typer.Option(None, "--seed", help="Random seed for sampling, in [0, 2^64).")
SYSTEM_OPT = typer.Option(None, "--system-prompt", "--system", help="System prompt.")
THINK_OPT = typer.Option(False, "--think", help="Turn Gemma 4's thinking mode on (off by default).")
DEFAULT_TEMPLATE_OPT = typer.Option(
    False, "--use-default-chat-template",
    help="Use Gemma 4's built-in chat format, not the checkpoint's template.")
TEMPLATE_CONFIG_OPT = typer.Option(
    None, "--chat-template-config",
    help="JSON object of extra chat-template arguments, e.g. '{\"enable_thinking\": true}'.")
ADAPTER_OPT = typer.Option(None, "--adapter-path", help="Folder of LoRA/DoRA adapters (mlx_lm.lora's output).")
EXTRA_EOS_OPT = typer.Option(
    None, "--extra-eos-token",
    help="Another token (text or id) that ends generation; repeat it, or list several after one flag.")
PREFILL_STEP_OPT = typer.Option(2048, "--prefill-step-size", help="Prompt tokens processed per step (> 0).")
MAX_KV_OPT = typer.Option(None, "--max-kv-size", help="Most tokens each layer's KV cache keeps (a sliding window).")
KV_BITS_OPT = typer.Option(None, "--kv-bits", help="Quantize the KV cache to this many bits (2-8).")
KV_GROUP_OPT = typer.Option(None, "--kv-group-size", help="Group size of KV-cache quantization (with --kv-bits).")
KV_START_OPT = typer.Option(None, "--quantized-kv-start",
                            help="Quantize the KV cache from this many tokens on (with --kv-bits).")
DRAFT_OPT = typer.Option(None, "--draft-model",
                         help="A model for speculative decoding: a smaller Gemma 4, or Gemma 4's MTP drafter (a "
                              "gemma4_assistant checkpoint); folder or repo id.")
NUM_DRAFT_OPT = typer.Option(None, "--num-draft-tokens",
                             help="Tokens drafted per step (with --draft-model; default 3).")
TOOLS_OPT = typer.Option(None, "--tools", help="JSON file: a list of OpenAI-style function schemas.")
STRICT_MEMORY_OPT = typer.Option(False, "--strict-memory",
                                 help="Refuse to load when the weights need more memory than the device has.")

# Flags that take several values after one flag in mlx-lm (argparse nargs='+').
MULTI_VALUE_FLAGS = ("--extra-eos-token",)


def expand_multi_value_flags(argv: List[str]) -> List[str]:
    """``--extra-eos-token A B`` (mlx-lm's argparse form) as ``--extra-eos-token A --extra-eos-token B``.

    Only for ``generate`` and ``chat``: they have no positional arguments, so a bare word after
    such a flag can only be another of its values (``mlx-lm`` passes its arguments on as they are)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ("generate", "chat"):
        return list(argv)
    out: List[str] = []
    flag = None
    for a in argv:
        if a in MULTI_VALUE_FLAGS:
            flag = a
            out.append(a)
            continue
        if flag is not None and not a.startswith("-") and out[-1] != flag:
            out += [flag, a]
            continue
        if a.startswith("-"):
            flag = None
        out.append(a)
    return out


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def decode_input(data: bytes, what: str = "the prompt", utf16: bool = True) -> str:
    """Text from raw input bytes. UTF-8 (a byte-order mark is dropped); with ``utf16``, UTF-16
    when it starts with its byte-order mark; anything else is refused with one line."""
    if utf16 and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                             f"({e.reason} at byte {e.start})") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                         "to UTF-8, e.g. with iconv") from None
    if "\x00" in text:
        raise ValueError(f"{what} holds NUL bytes (UTF-16 without a byte-order mark?); convert it to UTF-8")
    return text


def argv_text(value: Optional[str], what: str) -> Optional[str]:
    """An argv string as valid text: bytes that are not UTF-8 (Python keeps them as lone
    surrogates) end with one line naming the first bad byte."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid text (it holds a lone UTF-16 surrogate)") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            usage_error("no prompt: pass --prompt TEXT, or pipe it on stdin (--prompt -)")
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        try:
            prompt = decode_input(data)
        except ValueError as e:
            usage_error(str(e))
    else:
        try:
            prompt = argv_text(prompt, "the prompt")
        except ValueError as e:
            usage_error(str(e))
    if not prompt.strip():
        usage_error("the prompt is empty")
    return prompt


def parse_bool(value: str, flag: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "t", "1", "yes", "y"):
        return True
    if v in ("false", "f", "0", "no", "n"):
        return False
    usage_error(f"{flag} takes True or False, got {value!r}")
    return False  # pragma: no cover - usage_error exits


def parse_template_config(text: Optional[str]) -> Dict[str, Any]:
    if text is None:
        return {}
    try:
        config = json.loads(argv_text(text, "--chat-template-config"))
    except (json.JSONDecodeError, ValueError) as e:
        usage_error(f"--chat-template-config is not valid JSON ({e})")
    if not isinstance(config, dict):
        usage_error("--chat-template-config must be a JSON object, e.g. '{\"enable_thinking\": true}'")
    return config


def read_tools(path: Optional[str]) -> Optional[List[Dict[str, Any]]]:
    """The ``--tools`` file: a JSON list of OpenAI-style function schemas, checked."""
    if path is None:
        return None
    from ..tools import normalize_tools

    p = Path(path)
    try:
        data = json.loads(decode_input(p.read_bytes(), f"{p}"))
    except FileNotFoundError:
        usage_error(f"{p}: no such tools file")
    except (OSError, ValueError) as e:
        usage_error(f"{p}: not a JSON tools file ({str(e).splitlines()[0]})")
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    try:
        return normalize_tools(data)
    except ValueError as e:
        usage_error(f"{p}: {e}")
    return None  # pragma: no cover


def common_checks(*, max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float, seed: Optional[int],
                  min_tokens_to_keep: int = 1, xtc_probability: float = 0.0, xtc_threshold: float = 0.0,
                  prefill_step_size: int = 2048, max_kv_size=None, kv_bits=None, kv_group_size=None,
                  quantized_kv_start=None, draft_model=None, num_draft_tokens=None) -> None:
    """Every value checked before anything loads; bad ones end as a usage error (exit 2) with one line."""
    from ..generation import check_generation_options, check_sampling

    try:
        check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens, seed=seed,
                       min_tokens_to_keep=min_tokens_to_keep, xtc_probability=xtc_probability,
                       xtc_threshold=xtc_threshold)
        if prefill_step_size <= 0:
            raise ValueError(f"--prefill-step-size must be > 0, got {prefill_step_size}")
        check_generation_options(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                                 quantized_kv_start=quantized_kv_start, draft_model=draft_model,
                                 num_draft_tokens=num_draft_tokens)
    except ValueError as e:
        usage_error(str(e))


def load_for_cli(model: str, adapter_path: Optional[str] = None, strict_memory: bool = False,
                 extra_eos_tokens: Optional[List[str]] = None):
    """(model, tokenizer), with ``--adapter-path``'s adapters applied and ``--extra-eos-token`` added."""
    from ..generation import add_end_tokens, load_with_adapters

    m, tok = load_with_adapters(model, adapter_path, strict_memory=strict_memory)
    raise_if_interrupted()  # a Ctrl-C that the loading's imports swallowed: not a whole generation later
    if extra_eos_tokens:
        add_end_tokens(tok, extra_eos_tokens)
    return m, tok


def load_draft(path: Optional[str], tokenizer=None):
    """``--draft-model``: a Gemma 4 model or an MTP assistant (its vocabulary is checked against
    the target's when generation starts)."""
    if path is None:
        return None
    from ..speculative import load_draft_model

    return load_draft_model(path)


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


def format_tool_call(call) -> str:
    return f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}"


def load_prompt_cache_file(path: str, model: Optional[str]):
    """(cache, model path) from ``--prompt-cache-file`` (``mlx-lm cache_prompt``'s output)."""
    from mlx_lm.models.cache import load_prompt_cache

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such prompt cache file")
    try:
        cache, metadata = load_prompt_cache(str(p), return_metadata=True)
    except Exception as e:
        raise ValueError(f"{p}: not a prompt cache file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    cached_model = metadata.get("model") if isinstance(metadata, dict) else None
    if model is None:
        if not cached_model:
            raise ValueError(f"{p}: the cache does not name its model; pass --model")
        model = cached_model
    elif cached_model and model != cached_model and Path(model).resolve() != Path(cached_model).resolve():
        raise ValueError(f"--model {model} is not the model the prompt cache was made with ({cached_model})")
    return cache, model


def check_cache_fits(cache, model) -> None:
    fresh = model.make_cache()
    if len(cache) != len(fresh) or any(type(a) is not type(b) for a, b in zip(cache, fresh)):
        raise ValueError("the prompt cache file was made for another model or implementation (make it with "
                         "`gemma4-mlx mlx-lm cache_prompt`)")


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " May be left out with --prompt-cache-file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="The prompt; '-' or omitted (with piped input) reads stdin."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", "-n", help="Most tokens to generate (> 0)."),
    temp: float = TEMP_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    min_p: float = MIN_P_OPT,
    min_tokens_to_keep: int = MIN_KEEP_OPT,
    xtc_probability: float = XTC_P_OPT,
    xtc_threshold: float = XTC_T_OPT,
    seed: Optional[int] = SEED_OPT,
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (ignores --temp/--top-*)."),
    system: Optional[str] = SYSTEM_OPT,
    think: bool = THINK_OPT,
    show_thinking: bool = typer.Option(False, "--show-thinking", help="Print the reasoning too (hidden by default)."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template", "--no-chat-template",
                                              help="Send the prompt as raw text (no chat turns)."),
    use_default_chat_template: bool = DEFAULT_TEMPLATE_OPT,
    chat_template_config: Optional[str] = TEMPLATE_CONFIG_OPT,
    prefill_response: Optional[str] = typer.Option(None, "--prefill-response",
                                                   help="Start the model's reply with this text."),
    tools_file: Optional[str] = TOOLS_OPT,
    adapter_path: Optional[str] = ADAPTER_OPT,
    extra_eos_token: Optional[List[str]] = EXTRA_EOS_OPT,
    prompt_cache_file: Optional[str] = typer.Option(
        None, "--prompt-cache-file", help="Saved prompt cache (gemma4-mlx mlx-lm cache_prompt); the prompt continues it."),
    prefill_step_size: int = PREFILL_STEP_OPT,
    verbose: str = typer.Option("True", "--verbose", metavar="BOOL",
                                help="False: print only the reply, no stats line."),
    max_kv_size: Optional[int] = MAX_KV_OPT,
    kv_bits: Optional[int] = KV_BITS_OPT,
    kv_group_size: Optional[int] = KV_GROUP_OPT,
    quantized_kv_start: Optional[int] = KV_START_OPT,
    draft_model: Optional[str] = DRAFT_OPT,
    num_draft_tokens: Optional[int] = NUM_DRAFT_OPT,
    strict_memory: bool = STRICT_MEMORY_OPT,
) -> None:
    """Generate a reply to one prompt, streaming it to stdout; speed and memory go to stderr.

    Flags follow mlx_lm.generate (-m is --max-tokens). Thinking is off unless --think (or
    --chat-template-config '{"enable_thinking": true}').
    """
    common_checks(max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                  min_tokens_to_keep=min_tokens_to_keep, xtc_probability=xtc_probability,
                  xtc_threshold=xtc_threshold, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size,
                  kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                  draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    show_stats = parse_bool(verbose, "--verbose")
    template_kwargs = parse_template_config(chat_template_config)
    tools = read_tools(tools_file)
    try:
        system = argv_text(system, "--system-prompt")
        prefill_response = argv_text(prefill_response, "--prefill-response")
    except ValueError as e:
        usage_error(str(e))
    chat = not ignore_chat_template
    if not chat and (system is not None or think or tools or prefill_response is not None or template_kwargs
                     or use_default_chat_template):
        usage_error("--system-prompt, --think, --tools, --prefill-response and chat template options need the "
                    "chat format: drop --ignore-chat-template")
    if model is None and prompt_cache_file is None:
        usage_error("--model is required (a checkpoint folder or Hub repo id)")
    text = read_prompt(prompt)
    with user_errors():
        from ..chat_format import encode_prompt
        from ..generation import stream_generate

        cache = None
        if prompt_cache_file is not None:
            cache, model = load_prompt_cache_file(prompt_cache_file, model)
        m, tok = load_for_cli(model, adapter_path, strict_memory, extra_eos_token)
        draft = load_draft(draft_model, tok)
        source = text
        if cache is not None:
            check_cache_fits(cache, m)
            # The cache holds the chat prefix up to the user's text: continue from the text on.
            source = (encode_prompt(tok, text, system=system, think=think, use_template=not use_default_chat_template,
                                    tools=tools, template_kwargs=template_kwargs, prefill=prefill_response,
                                    after_cached_prefix=True)
                      if chat else list(tok.encode(text, add_special_tokens=False)))
        state: dict = {}
        last = None
        calls = []
        try:
            for r in stream_generate(m, tok, source, max_tokens=max_tokens, temp=0.0 if greedy else temp,
                                     top_p=top_p, top_k=top_k, min_p=min_p, min_tokens_to_keep=min_tokens_to_keep,
                                     xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, seed=seed,
                                     system=system, think=think, chat=chat, use_template=not use_default_chat_template,
                                     chat_template_kwargs=template_kwargs, tools=tools,
                                     prefill_response=prefill_response, prompt_cache=cache,
                                     prefill_step_size=prefill_step_size, max_kv_size=max_kv_size, kv_bits=kv_bits,
                                     kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                                     draft_model=draft, num_draft_tokens=num_draft_tokens):
                write_piece(r, show_thinking, state)
                calls.extend(r.tool_calls)
                last = r
        finally:
            if state.get("thinking"):
                sys.stdout.write("\n[/thinking]\n")
            sys.stdout.write("\n")
            for call in calls:
                sys.stdout.write(format_tool_call(call) + "\n")
            sys.stdout.flush()
        if show_stats:
            print_stats(last)
