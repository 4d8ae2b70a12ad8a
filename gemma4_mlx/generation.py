"""Text generation for Gemma 4, built on mlx-lm's generation machinery.

:func:`stream_generate` runs :func:`mlx_lm.generate.generate_step` (through
:func:`gemma4_mlx.prompt_fill.generate_steps`: prefill in steps, async decode,
prompt caches), samples with :func:`mlx_lm.sample_utils.make_sampler`, and adds what Gemma 4
needs on top: its chat format (special-token text in caller content kept as text), stopping on
every end-of-turn id the checkpoint declares (the end marker itself is never emitted), the
reasoning channel split from the answer, tool calls parsed out of the answer, per-token timings,
and a clear error when prompt + ``max_tokens`` would run past ``max_position_embeddings``.

Thinking is off unless asked (``think=True`` or ``enable_thinking=True``), in every entry point.

:class:`ChatSession` keeps a conversation and its KV cache: each turn prefills only the new
turn's tokens (tool results included).

The model also runs unchanged with ``mlx_lm.generate``, ``mlx_lm.stream_generate`` and
``mlx_lm.batch_generate``; ``gemma4-mlx serve`` (:mod:`gemma4_mlx.server`) serves it over HTTP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import cuda_context
from .cache import make_prompt_cache
from .chat_format import (
    ReasoningParser,
    check_text,
    encode_next_turn,
    encode_prompt,
    encode_tool_results,
)
from .decode import reserve as reserve_decode
from .prompt_fill import generate_steps
from .tools import TOOL_RESPONSE_START, ToolCall, ToolCallParser, normalize_tools
from .speculative import (
    DEFAULT_NUM_DRAFT_TOKENS,
    check_vocab,
    make_session_caches,
    resolve_draft_model,
    speculative_generate_step,
)

__all__ = [
    "ChatSession",
    "GenerationResponse",
    "GenerationResult",
    "check_generation_options",
    "end_token_ids",
    "generate",
    "load_with_adapters",
    "make_generation_sampler",
    "prepare_prompt",
    "stream_generate",
]

SEED_LIMIT = 2 ** 64


@dataclass
class GenerationResponse:
    """One step of :func:`stream_generate` (mlx-lm's ``GenerationResponse`` fields, and more).

    ``text`` is the answer piece and ``reasoning`` the reasoning piece this token made certain
    (either may be empty: text that could start a marker is held until it is decided). ``raw``
    is the detokenized piece as the model wrote it (markers included, end marker never).
    ``tool_calls`` are the calls this token completed (with ``tools=``; their markup is kept out
    of ``text``). ``logprobs`` is the log-probability vector the token was sampled from, and
    ``from_draft`` whether a draft model proposed it (always ``False`` without one).
    ``token_time`` is the seconds this token took (the first one includes the prefill).
    ``finish_reason`` is ``None`` until the last response: ``"stop"`` (an end id was sampled; then
    ``token`` is that id and its text is not emitted) or ``"length"`` (``max_tokens`` reached).
    """

    text: str
    reasoning: str
    raw: str
    token: int
    token_time: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, mx.get_peak_memory()
    in_reasoning: bool = False
    finish_reason: Optional[str] = None
    logprobs: Optional[mx.array] = None
    from_draft: bool = False
    tool_calls: List[ToolCall] = field(default_factory=list)


@dataclass
class GenerationResult:
    """A whole reply. ``str(result)`` is the answer text (what ``mlx_lm.generate`` returns)."""

    text: str
    reasoning: str
    tokens: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    token_times: List[float] = field(default_factory=list)
    tool_calls: List[ToolCall] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def _wrap(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def _model_args(model):
    args = getattr(model, "args", None)
    if args is None and hasattr(model, "model"):
        args = getattr(model.model, "args", None)
    return args


def end_token_ids(model, tokenizer) -> Set[int]:
    """Every end-of-turn / end-of-sequence id: the tokenizer's (incl. generation_config's) and config's."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    args = _model_args(model)
    ids.update(getattr(args, "eos_token_id", None) or [])
    return ids


def max_positions(model) -> Optional[int]:
    args = _model_args(model)
    return getattr(args, "max_position_embeddings", None)


def make_generation_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                            greedy: bool = False):
    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if greedy:
        temp = 0.0
    return make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p)


def _number(name: str, value, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_seed(seed) -> None:
    if seed is None:
        return
    _number("seed", seed, integer=True)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")


def check_sampling(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   max_tokens: Optional[int] = None, *, seed: Optional[int] = None,
                   repetition_penalty: Optional[float] = None, repetition_context_size: int = 20,
                   xtc_probability: float = 0.0, xtc_threshold: float = 0.0, min_tokens_to_keep: int = 1) -> None:
    """ValueError for settings outside their range, NaN and infinity included (one line each)."""
    if max_tokens is not None:
        _number("max_tokens", max_tokens, integer=True)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if temp is None or _number("temperature", temp) < 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not (0.0 < _number("top_p", top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if _number("top_k", top_k, integer=True) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not (0.0 <= _number("min_p", min_p) <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if _number("min_tokens_to_keep", min_tokens_to_keep, integer=True) < 1:
        raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep}")
    if not (0.0 <= _number("xtc_probability", xtc_probability) <= 1.0):
        raise ValueError(f"xtc_probability must be in [0, 1], got {xtc_probability}")
    if not (0.0 <= _number("xtc_threshold", xtc_threshold) <= 0.5):
        raise ValueError(f"xtc_threshold must be in [0, 0.5], got {xtc_threshold}")
    if repetition_penalty is not None and _number("repetition_penalty", repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if _number("repetition_context_size", repetition_context_size, integer=True) <= 0:
        raise ValueError(f"repetition_context_size must be > 0, got {repetition_context_size}")
    check_seed(seed)


def check_generation_options(*, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                             kv_group_size: Optional[int] = None, quantized_kv_start: Optional[int] = None,
                             draft_model=None, num_draft_tokens: Optional[int] = None) -> None:
    """The KV-cache and speculative-decoding options (mlx-lm's ``generate_step`` names): values in
    range, and no option without the one it modifies. The CLI calls this before loading."""
    for name, value, low in (("max_kv_size", max_kv_size, 1), ("kv_group_size", kv_group_size, 1),
                             ("quantized_kv_start", quantized_kv_start, 0), ("num_draft_tokens", num_draft_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")
    if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in (2, 3, 4, 5, 6, 8)):
        raise ValueError(f"kv_bits (--kv-bits) must be one of 2, 3, 4, 5, 6, 8, got {kv_bits!r}")
    if kv_bits is None and (kv_group_size is not None or quantized_kv_start is not None):
        raise ValueError("kv_group_size / quantized_kv_start (--kv-group-size / --quantized-kv-start) only apply "
                         "with kv_bits (--kv-bits)")
    if draft_model is None and num_draft_tokens is not None:
        raise ValueError("num_draft_tokens (--num-draft-tokens) only applies with draft_model (--draft-model)")


def prepare_prompt(tokenizer, prompt: Union[str, Sequence[Dict[str, Any]], Sequence[int], mx.array],
                   system: Optional[str] = None, think: bool = False, chat: bool = True,
                   tools: Optional[Sequence[Any]] = None, template_kwargs: Optional[Mapping[str, Any]] = None,
                   prefill: Optional[str] = None, use_template: bool = True) -> List[int]:
    """Token ids for a prompt.

    * ``str`` with ``chat=True``: one user turn (plus ``system``) in the chat format;
      with ``chat=False``: the raw text, with BOS prepended as the tokenizer does (special-token
      text in it *is* read as special tokens: the caller writes the whole format).
    * a list of ``{"role", "content"}`` messages (``tool_calls`` / ``tool`` messages included):
      the chat format.
    * token ids (list or ``mx.array``): used as they are.

    In the chat format, special-token text inside any message, the system prompt, the tools or
    ``prefill`` is tokenized as plain text: control tokens come only from the template.
    """
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.tolist()]
    chat_opts = dict(system=system, think=think, tools=tools, template_kwargs=template_kwargs, prefill=prefill,
                     use_template=use_template)
    if isinstance(prompt, str):
        if not chat:
            if tools or prefill is not None or template_kwargs or system is not None or think:
                raise ValueError("system, think, tools, prefill_response and chat template options need the chat "
                                 "format (chat=True)")
            check_text(prompt)
            return list(tokenizer.encode(prompt))
        return encode_prompt(tokenizer, prompt, **chat_opts)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return encode_prompt(tokenizer, prompt, **chat_opts)
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"a prompt given as a list holds token ids (int) or messages (dict), got {t!r}")
    return [int(t) for t in prompt]


def check_token_ids(model, tokens: Sequence[int]) -> None:
    """Token ids must index the embedding table (MLX does not bounds-check gathers)."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is None:
        return
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
                         + (f", and {len(bad) - 1} more" if len(bad) > 1 else ""))


def _cache_offset(cache) -> int:
    if not cache:
        return 0
    return int(getattr(cache[0], "offset", 0) or 0)


def check_context(model, n_prompt: int, max_tokens: int, cached: int = 0) -> None:
    limit = max_positions(model)
    if limit is None:
        return
    total = cached + n_prompt + max_tokens
    if total > limit:
        have = f"{cached} cached + " if cached else ""
        raise ValueError(
            f"prompt ({have}{n_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
            f"max_position_embeddings ({limit}); shorten the prompt or lower --max-tokens"
        )


def load_with_adapters(path_or_repo, adapter_path=None, *, strict_memory: bool = False):
    """(model, tokenizer) with the LoRA / DoRA / full fine-tune adapters of ``adapter_path``
    (``mlx_lm.lora``'s output folder) applied by mlx-lm's ``load_adapters``.

    The decode state (joined q/k/v and gate/up projections, kernel builds) is prepared after the
    adapters are in place (it would be rebuilt anyway: it follows the module tree)."""
    from .loading import LoadError, load

    if adapter_path is None:
        return load(path_or_repo, strict_memory=strict_memory)
    from pathlib import Path

    from mlx_lm.tuner.utils import load_adapters

    folder = Path(adapter_path)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (folder / name).is_file():
            raise LoadError(f"{folder}: no {name} (an adapter folder holds what mlx_lm.lora writes)")
    model, tokenizer = load(path_or_repo, lazy=True, strict_memory=strict_memory)
    try:
        load_adapters(model, str(folder))
        mx.eval(model.parameters())
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = "; ".join(lines[:2]) if lines else type(e).__name__
        raise LoadError(f"{folder}: the adapters do not fit this model ({why})") from e
    from .decode import prepare

    prepare(model)
    return model, tokenizer


def add_end_tokens(tokenizer, tokens: Sequence[str]) -> None:
    """More end ids (``--extra-eos-token``): each a token's text or its id, checked against the vocabulary."""
    vocab = tokenizer.get_vocab()
    for t in tokens:
        if t in vocab:
            tid = vocab[t]
        elif t.lstrip("-").isdigit():
            tid = int(t)
            if not 0 <= tid < len(tokenizer):
                raise ValueError(f"extra end token id {tid} is outside the vocabulary (0..{len(tokenizer) - 1})")
        else:
            raise ValueError(f"extra end token {t!r} is not a token of this tokenizer")
        tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) | {tid}


def _token_id(tokenizer, text: str) -> Optional[int]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return vocab.get(text)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[Dict[str, Any]], Sequence[int], mx.array],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.0,
    seed: Optional[int] = None,
    sampler=None,
    logits_processors: Optional[list] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    system: Optional[str] = None,
    think: bool = False,
    enable_thinking: Optional[bool] = None,
    chat: bool = True,
    use_template: bool = True,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
    tools: Optional[Sequence[Any]] = None,
    prefill_response: Optional[str] = None,
    prompt_cache: Optional[list] = None,
    stop_ids: Optional[Sequence[int]] = None,
    prefill_step_size: int = 2048,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    quantized_kv_start: Optional[int] = None,
    draft_model=None,
    num_draft_tokens: Optional[int] = None,
    draft_cache: Optional[list] = None,
    **step_kwargs,
) -> Iterator[GenerationResponse]:
    """Stream a reply token by token (see :class:`GenerationResponse`).

    Thinking is off unless ``think=True`` (or ``enable_thinking=True``, mlx-lm's template name).
    ``tools`` (OpenAI-style function schemas) are declared to the model and its calls come back
    in ``GenerationResponse.tool_calls``; answer them with ``tool`` messages in the next call.
    ``prefill_response`` starts the reply with that text. ``use_template=False`` uses Gemma 4's
    built-in format even when the checkpoint has a template; ``chat_template_kwargs`` go to the
    checkpoint's template.

    ``prompt_cache`` (from ``model.make_cache()``) is extended in place: after the call it holds
    the prompt and every generated token, the end id included. ``sampler``/``logits_processors``
    override ``temp``/``top_p``/``top_k``/``min_p``/``xtc_*``/``repetition_penalty``; ``seed``
    (in [0, 2^64)) seeds MLX's random generator first. ``max_kv_size`` caps every layer's KV to
    that many positions; ``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start`` quantize the KV
    caches (mlx-lm's names and meanings, :mod:`gemma4_mlx.cache`). Other ``step_kwargs`` go to
    :func:`mlx_lm.generate.generate_step`.

    ``draft_model`` (a model, a Gemma 4 MTP assistant, or a path to either) turns on speculative
    decoding (:mod:`gemma4_mlx.speculative`): up to ``num_draft_tokens`` (default 3) proposals per
    step, the same tokens as without it under greedy sampling; ``draft_cache`` (from
    :func:`~gemma4_mlx.speculative.make_draft_cache`) is the draft model's, kept level with
    ``prompt_cache``.
    """
    tokenizer = _wrap(tokenizer)
    check_generation_options(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                             quantized_kv_start=quantized_kv_start, draft_model=draft_model,
                             num_draft_tokens=num_draft_tokens)
    check_sampling(temp, top_p, top_k, min_p, max_tokens=max_tokens, seed=seed,
                   repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
                   xtc_probability=xtc_probability, xtc_threshold=xtc_threshold,
                   min_tokens_to_keep=min_tokens_to_keep)
    if enable_thinking is not None:
        think = bool(enable_thinking)
    tools = normalize_tools(tools)
    tokens = prepare_prompt(tokenizer, prompt, system=system, think=think, chat=chat, tools=tools,
                            template_kwargs=chat_template_kwargs, prefill=prefill_response, use_template=use_template)
    if not tokens:
        raise ValueError("the prompt is empty")
    check_token_ids(model, tokens)
    cached = _cache_offset(prompt_cache)
    check_context(model, len(tokens), max_tokens, cached)
    if seed is not None:
        mx.random.seed(seed)
    if sampler is None:
        # XTC never cuts the newline or the end ids (as mlx-lm's CLI sets it up).
        keep = (tokenizer.encode("\n", add_special_tokens=False) + sorted(end_token_ids(model, tokenizer))
                if xtc_probability > 0 else None)
        sampler = make_sampler(temp, top_p=top_p, min_p=min_p, min_tokens_to_keep=min_tokens_to_keep, top_k=top_k,
                               xtc_probability=xtc_probability, xtc_threshold=xtc_threshold, xtc_special_tokens=keep)
    if logits_processors is None and repetition_penalty:
        logits_processors = make_logits_processors(repetition_penalty=repetition_penalty,
                                                   repetition_context_size=repetition_context_size)
    if draft_model is not None:
        draft_model = resolve_draft_model(draft_model)
        check_vocab(model, draft_model)
    if prompt_cache is None and draft_model is None:
        prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    if prompt_cache is not None:
        # One buffer size for the whole generation: the decode step is traced once, never mid-way.
        reserve_decode(prompt_cache, cached + len(tokens), max_tokens)
    kv_options = {k: v for k, v in (("kv_bits", kv_bits), ("kv_group_size", kv_group_size),
                                    ("quantized_kv_start", quantized_kv_start)) if v is not None}
    ends = set(stop_ids) if stop_ids is not None else end_token_ids(model, tokenizer)
    if tools and stop_ids is None:
        handover = _token_id(tokenizer, TOOL_RESPONSE_START)  # the model hands over to the host here
        if handover is not None:
            ends.add(handover)

    detok = tokenizer.detokenizer
    detok.reset()
    parser = ReasoningParser()
    calls_parser = ToolCallParser() if tools else None
    n_prompt = len(tokens)
    cuda_context.ensure_current()  # before the prompt's array is made: see cuda_context
    if draft_model is None:
        steps = ((token, logprobs, False) for token, logprobs in generate_steps(
            mx.array(tokens), model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
            prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, **kv_options, **step_kwargs))
    else:
        steps = speculative_generate_step(
            mx.array(tokens), model, draft_model, num_draft_tokens=num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS,
            max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors, prompt_cache=prompt_cache,
            draft_cache=draft_cache, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size, **kv_options,
            **step_kwargs)
    tic = start = time.perf_counter()
    prompt_tps = 0.0
    decode_start = start
    for n, (token, logprobs, from_draft) in enumerate(steps):
        now = time.perf_counter()
        token_time, tic = now - tic, now
        if n == 0:
            prompt_tps = n_prompt / max(token_time, 1e-9)
            decode_start = now
        generated = n + 1
        gen_tps = (generated - 1) / max(now - decode_start, 1e-9) if generated > 1 else 0.0

        def response(answer, reasoning, raw, finish=None, final=False):
            calls: List[ToolCall] = []
            if calls_parser is not None:
                answer, calls = calls_parser.feed(answer)
                if final:
                    rest, more = calls_parser.finish()
                    answer, calls = answer + rest, calls + more
            return GenerationResponse(
                text=answer, reasoning=reasoning, raw=raw, token=int(token), token_time=token_time,
                prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=generated,
                generation_tps=gen_tps, peak_memory=mx.get_peak_memory() / 1e9,
                in_reasoning=parser.in_reasoning, finish_reason=finish, logprobs=logprobs, from_draft=from_draft,
                tool_calls=calls,
            )

        finish = "stop" if token in ends else None
        if finish is None:  # an end id's text is never emitted
            detok.add_token(token)
            if generated >= max_tokens:
                finish = "length"
        if finish is not None:
            detok.finalize()
            raw = detok.last_segment
            a, r = parser.feed(raw)
            a2, r2 = parser.finish()
            yield response(a + a2, r + r2, raw, finish, final=True)
            return
        raw = detok.last_segment
        a, r = parser.feed(raw)
        yield response(a, r, raw)


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> GenerationResult:
    """Generate a whole reply: :class:`GenerationResult` (``str()`` of it is the answer text).

    Takes :func:`stream_generate`'s arguments (``tools=`` included: the calls are in
    ``result.tool_calls``)."""
    text, reasoning, toks, times, calls = [], [], [], [], []
    last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        text.append(r.text)
        reasoning.append(r.reasoning)
        toks.append(r.token)
        times.append(r.token_time)
        calls.extend(r.tool_calls)
        if verbose:
            print(r.text, end="", flush=True)
        last = r
    if verbose:
        print()
    if last is None:  # pragma: no cover - stream_generate always yields once
        raise RuntimeError("generation produced nothing")
    if last.finish_reason == "stop":
        toks = toks[:-1]  # the end id is not part of the output
    return GenerationResult(
        text="".join(text), reasoning="".join(reasoning), tokens=toks, finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens, prompt_tps=last.prompt_tps, generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps, peak_memory=last.peak_memory, token_times=times, tool_calls=calls,
    )


class ChatSession:
    """A conversation that keeps its KV cache between turns.

    The first turn is rendered with :func:`~gemma4_mlx.chat_format.format_prompt` (the checkpoint's
    template, or Gemma 4's format). Later turns extend the cache: only
    ``<turn|>``-close (if the reply did not end with it) + ``\\n<|turn>user\\n...<turn|>\\n<|turn>model\\n``
    is prefilled, the cached reply (reasoning included) stays as generated. With ``tools``, a
    reply's calls are in :attr:`pending_calls`; :meth:`send_tool_results` answers them and the
    model goes on in the same turn (only the response blocks are prefilled). After an
    interrupted reply, or when the cache would overflow, the next turn re-prefills the history
    from scratch.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, think: bool = False,
                 use_template: bool = True, tools: Optional[Sequence[Any]] = None,
                 template_kwargs: Optional[Mapping[str, Any]] = None, **gen_kwargs):
        self.model = model
        self.tokenizer = _wrap(tokenizer)
        self.system = system
        self.think = think
        self.use_template = use_template
        self.tools = normalize_tools(tools)
        self.template_kwargs = dict(template_kwargs or {})
        if gen_kwargs.get("draft_model") is not None:  # load a path once, not every turn
            gen_kwargs["draft_model"] = resolve_draft_model(gen_kwargs["draft_model"])
        self.gen_kwargs = gen_kwargs
        self.turn_end_ids = self._ids("<turn|>")
        self.handover_ids = self._ids(TOOL_RESPONSE_START)
        self.reset()

    def _ids(self, text: str) -> Set[int]:
        tid = _token_id(self.tokenizer, text)
        return {tid} if tid is not None else set()

    def reset(self) -> None:
        self.messages: List[Dict[str, Any]] = []
        self.cache = None
        self.draft_cache = None  # a draft model's, kept level with ``cache``
        self._closed = True
        self._handed_over = False
        self.pending_calls: List[ToolCall] = []
        self.last_prefill_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return _cache_offset(self.cache)

    def _history_tokens(self) -> List[int]:
        return encode_prompt(self.tokenizer, self.messages, system=self.system, think=self.think,
                             use_template=self.use_template, tools=self.tools, template_kwargs=self.template_kwargs)

    def _fits(self, tokens: List[int], max_tokens: int) -> bool:
        limit = max_positions(self.model)
        return limit is None or self.cached_tokens + len(tokens) + max_tokens <= limit

    def send(self, user: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to ``user``. Closing the iterator early (or Ctrl-C) keeps the session usable."""
        if not user.strip():
            raise ValueError("empty message")
        check_text(user, "the message")
        opts = dict(self.gen_kwargs)
        opts.update(kwargs)
        tokens = None
        if self.pending_calls:  # calls left unanswered: let the template write the history
            self.cache = None
            self.pending_calls = []
        if self.cache is not None:
            tokens = encode_next_turn(self.tokenizer, user, self._closed)
            if not self._fits(tokens, opts.get("max_tokens", 256)):
                self.cache = None  # too long to extend: start over from the (answer-only) history
        return self._run([{"role": "user", "content": user}], tokens, opts)

    def send_tool_results(self, results: Sequence[Any], **kwargs) -> Iterator[GenerationResponse]:
        """Answer :attr:`pending_calls` and stream the rest of the reply.

        ``results``: one per pending call, in order: the result (str, or a JSON-like dict), or a
        ``tool`` message (``{"role": "tool", "tool_call_id", "content"}``, as ``ToolCall.result``
        builds).
        """
        if not self.pending_calls:
            raise ValueError("no tool calls are waiting for results")
        if len(results) != len(self.pending_calls):
            raise ValueError(f"{len(self.pending_calls)} tool call(s) wait for results, got {len(results)}")
        messages = []
        for call, res in zip(self.pending_calls, results):
            messages.append(res if isinstance(res, Mapping) and res.get("role") == "tool" else call.result(res))
        opts = dict(self.gen_kwargs)
        opts.update(kwargs)
        tokens = None
        if self.cache is not None and self._handed_over:
            pairs = [(c.name, m.get("content")) for c, m in zip(self.pending_calls, messages)]
            tokens = encode_tool_results(self.tokenizer, pairs, opened=True)
            if not self._fits(tokens, opts.get("max_tokens", 256)):
                self.cache = None
        else:
            self.cache = None  # the reply did not hand over at <|tool_response>: let the template write it
        self.pending_calls = []
        return self._run(messages, tokens, opts)

    def _run(self, new_messages: List[Dict[str, Any]], tokens: Optional[List[int]], opts) -> Iterator[GenerationResponse]:
        added = len(new_messages)
        self.messages.extend(new_messages)
        if self.cache is None:
            try:
                tokens = self._history_tokens()
            except BaseException:
                del self.messages[-added:]
                raise
            self.cache, self.draft_cache = make_session_caches(
                self.model, opts.get("draft_model"), opts.get("num_draft_tokens") or DEFAULT_NUM_DRAFT_TOKENS,
                opts.get("max_kv_size"))
        self.last_prefill_tokens = len(tokens)
        return self._stream(tokens, added, opts)

    def _stream(self, tokens, added: int, opts) -> Iterator[GenerationResponse]:
        reply: List[str] = []
        calls: List[ToolCall] = []
        done = False
        try:
            for r in stream_generate(self.model, self.tokenizer, tokens, prompt_cache=self.cache,
                                     tools=self.tools, draft_cache=self.draft_cache, **opts):
                reply.append(r.text)
                calls.extend(r.tool_calls)
                if r.finish_reason is not None:
                    done = True
                    self._closed = r.finish_reason == "stop" and r.token in self.turn_end_ids
                    self._handed_over = r.finish_reason == "stop" and r.token in self.handover_ids
                yield r
        except BaseException:  # Ctrl-C, an early close, an error: drop this turn
            del self.messages[-added:]
            self.cache = self.draft_cache = None  # state unknown mid-step: rebuild from the history next turn
            raise
        if done:
            message: Dict[str, Any] = {"role": "assistant", "content": "".join(reply)}
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
            self.messages.append(message)
            self.pending_calls = calls
