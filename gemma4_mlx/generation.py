"""Text generation for Gemma 4, built on mlx-lm's generation machinery.

:func:`stream_generate` runs :func:`mlx_lm.generate.generate_step` (prefill in steps, async decode,
prompt caches), samples with :func:`mlx_lm.sample_utils.make_sampler`, and adds what Gemma 4
needs on top: its chat format, stopping on every end-of-turn id the checkpoint declares (the end
marker itself is never emitted), the reasoning channel split from the answer, per-token timings,
and a clear error when prompt + ``max_tokens`` would run past ``max_position_embeddings``.

:class:`ChatSession` keeps a conversation and its KV cache: each turn prefills only the new
turn's tokens.

The model also runs unchanged with ``mlx_lm.generate``, ``mlx_lm.stream_generate`` and
``mlx_lm.batch_generate``; :func:`serve` starts ``mlx_lm.server`` with this package's loader.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Union

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import make_prompt_cache
from .chat_format import (
    ReasoningParser,
    encode_text,
    format_prompt,
    has_chat_template,
    next_turn_text,
)
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
    "end_token_ids",
    "generate",
    "make_generation_sampler",
    "prepare_prompt",
    "serve",
    "stream_generate",
]


@dataclass
class GenerationResponse:
    """One step of :func:`stream_generate`.

    ``text`` is the answer piece and ``reasoning`` the reasoning piece this token made certain
    (either may be empty: text that could start a marker is held until it is decided). ``raw``
    is the detokenized piece as the model wrote it (markers included, end marker never).
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
    from_draft: bool = False  # speculative decoding: the draft model proposed this token


@dataclass
class GenerationResult:
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


def check_sampling(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   max_tokens: Optional[int] = None) -> None:
    """ValueError for settings outside their range (one line each)."""
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if temp is None or temp < 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")


def prepare_prompt(tokenizer, prompt: Union[str, Sequence[Dict[str, Any]], Sequence[int], mx.array],
                   system: Optional[str] = None, think: bool = False, chat: bool = True) -> List[int]:
    """Token ids for a prompt.

    * ``str`` with ``chat=True``: one user turn (plus ``system``) in the chat format;
      with ``chat=False``: the raw text, with BOS prepended as the tokenizer does.
    * a list of ``{"role", "content"}`` messages: the chat format.
    * token ids (list or ``mx.array``): used as they are.
    """
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.tolist()]
    if isinstance(prompt, str):
        if not chat:
            return list(tokenizer.encode(prompt))
        return encode_text(tokenizer, format_prompt(tokenizer, prompt, system=system, think=think))
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return encode_text(tokenizer, format_prompt(tokenizer, prompt, system=system, think=think))
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
    seed: Optional[int] = None,
    sampler=None,
    logits_processors: Optional[list] = None,
    repetition_penalty: Optional[float] = None,
    system: Optional[str] = None,
    think: bool = False,
    chat: bool = True,
    prompt_cache: Optional[list] = None,
    stop_ids: Optional[Sequence[int]] = None,
    prefill_step_size: int = 2048,
    draft_model=None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    draft_cache: Optional[list] = None,
    **step_kwargs,
) -> Iterator[GenerationResponse]:
    """Stream a reply token by token (see :class:`GenerationResponse`).

    ``prompt_cache`` (from ``model.make_cache()``) is extended in place: after the call it holds
    the prompt and every generated token, the end id included. ``sampler``/``logits_processors``
    override ``temp``/``top_p``/``top_k``/``min_p``/``repetition_penalty``; ``seed`` seeds MLX's
    random generator first. ``step_kwargs`` go to :func:`mlx_lm.generate.generate_step`
    (``max_kv_size``, ``kv_bits``, ``kv_group_size``, ``quantized_kv_start``, ...).

    ``draft_model`` (a model, a Gemma 4 MTP assistant, or a path to either) turns on speculative
    decoding (:mod:`gemma4_mlx.speculative`): up to ``num_draft_tokens`` proposals per step,
    the same tokens as without it under greedy sampling; ``draft_cache`` (from
    :func:`~gemma4_mlx.speculative.make_draft_cache`) is the draft model's, kept level with
    ``prompt_cache``.
    """
    tokenizer = _wrap(tokenizer)
    check_sampling(temp, top_p, top_k, min_p, max_tokens=max_tokens)
    tokens = prepare_prompt(tokenizer, prompt, system=system, think=think, chat=chat)
    if not tokens:
        raise ValueError("the prompt is empty")
    check_token_ids(model, tokens)
    cached = _cache_offset(prompt_cache)
    check_context(model, len(tokens), max_tokens, cached)
    if seed is not None:
        mx.random.seed(seed)
    if sampler is None:
        sampler = make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if logits_processors is None and repetition_penalty:
        logits_processors = make_logits_processors(repetition_penalty=repetition_penalty)
    max_kv_size = step_kwargs.pop("max_kv_size", None)
    if draft_model is not None:
        draft_model = resolve_draft_model(draft_model)
        check_vocab(model, draft_model)
    if prompt_cache is None and draft_model is None:
        prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    ends = set(stop_ids) if stop_ids is not None else end_token_ids(model, tokenizer)

    detok = tokenizer.detokenizer
    detok.reset()
    parser = ReasoningParser()
    n_prompt = len(tokens)
    if draft_model is None:
        steps = ((token, logprobs, False) for token, logprobs in generate_step(
            mx.array(tokens), model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
            prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, **step_kwargs))
    else:
        steps = speculative_generate_step(
            mx.array(tokens), model, draft_model, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
            sampler=sampler, logits_processors=logits_processors, prompt_cache=prompt_cache,
            draft_cache=draft_cache, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size, **step_kwargs)
    tic = start = time.perf_counter()
    prompt_tps = 0.0
    decode_start = start
    for n, (token, _logprobs, from_draft) in enumerate(steps):
        now = time.perf_counter()
        token_time, tic = now - tic, now
        if n == 0:
            prompt_tps = n_prompt / max(token_time, 1e-9)
            decode_start = now
        generated = n + 1
        gen_tps = (generated - 1) / max(now - decode_start, 1e-9) if generated > 1 else 0.0

        def response(text, reasoning, raw, finish=None):
            return GenerationResponse(
                text=text, reasoning=reasoning, raw=raw, token=int(token), token_time=token_time,
                prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=generated,
                generation_tps=gen_tps, peak_memory=mx.get_peak_memory() / 1e9,
                in_reasoning=parser.in_reasoning, finish_reason=finish, from_draft=from_draft,
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
            yield response(a + a2, r + r2, raw, finish)
            return
        raw = detok.last_segment
        a, r = parser.feed(raw)
        yield response(a, r, raw)


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> GenerationResult:
    """Generate a whole reply: :class:`GenerationResult` (``str()`` of it is the answer text)."""
    text, reasoning, toks, times = [], [], [], []
    last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        text.append(r.text)
        reasoning.append(r.reasoning)
        toks.append(r.token)
        times.append(r.token_time)
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
        generation_tps=last.generation_tps, peak_memory=last.peak_memory, token_times=times,
    )


class ChatSession:
    """A conversation that keeps its KV cache between turns.

    The first turn is rendered with :func:`~gemma4_mlx.chat_format.format_prompt` (the checkpoint's
    template, or Gemma 4's format). Later turns extend the cache: only
    ``<turn|>``-close (if the reply did not end with it) + ``\\n<|turn>user\\n...<turn|>\\n<|turn>model\\n``
    is prefilled, the cached reply (reasoning included) stays as generated. After an interrupted
    reply, or when the cache would overflow, the next turn re-prefills the history from scratch.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, think: bool = False,
                 use_template: bool = True, **gen_kwargs):
        self.model = model
        self.tokenizer = _wrap(tokenizer)
        self.system = system
        self.think = think
        self.use_template = use_template
        if gen_kwargs.get("draft_model") is not None:  # load a path once, not every turn
            gen_kwargs["draft_model"] = resolve_draft_model(gen_kwargs["draft_model"])
        self.gen_kwargs = gen_kwargs
        self.turn_end_ids = self._turn_end_ids()
        self.reset()

    def _turn_end_ids(self) -> Set[int]:
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        tid = vocab.get("<turn|>")
        return {tid} if tid is not None else set()

    def reset(self) -> None:
        self.messages: List[Dict[str, str]] = []
        self.cache = None
        self.draft_cache = None  # a draft model's, kept level with ``cache``
        self._closed = True
        self.last_prefill_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return _cache_offset(self.cache)

    def _history_prompt(self) -> str:
        return format_prompt(self.tokenizer, self.messages, system=self.system, think=self.think,
                             use_template=self.use_template)

    def send(self, user: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to ``user``. Closing the iterator early (or Ctrl-C) keeps the session usable."""
        if not user.strip():
            raise ValueError("empty message")
        opts = dict(self.gen_kwargs)
        opts.update(kwargs)
        max_tokens = opts.get("max_tokens", 256)
        self.messages.append({"role": "user", "content": user})
        if self.cache is not None:
            tokens = encode_text(self.tokenizer, next_turn_text(user, self._closed))
            limit = max_positions(self.model)
            if limit is not None and self.cached_tokens + len(tokens) + max_tokens > limit:
                self.cache = None  # too long to extend: start over from the (answer-only) history
        if self.cache is None:
            tokens = encode_text(self.tokenizer, self._history_prompt())
            self.cache, self.draft_cache = make_session_caches(
                self.model, opts.get("draft_model"), opts.get("num_draft_tokens", DEFAULT_NUM_DRAFT_TOKENS),
                opts.get("max_kv_size"))
        self.last_prefill_tokens = len(tokens)
        reply, done = [], False
        try:
            for r in stream_generate(self.model, self.tokenizer, tokens, prompt_cache=self.cache,
                                     draft_cache=self.draft_cache, **opts):
                reply.append(r.text)
                if r.finish_reason is not None:
                    done = True
                    self._closed = r.finish_reason == "stop" and r.token in self.turn_end_ids
                yield r
        except BaseException:  # Ctrl-C, an early close, an error: drop this turn
            self.messages.pop()
            self.cache = self.draft_cache = None  # state unknown mid-step: rebuild from the history next turn
            raise
        if done:
            self.messages.append({"role": "assistant", "content": "".join(reply)})


def serve(argv: Optional[List[str]] = None) -> None:
    """``mlx_lm.server`` (OpenAI-compatible HTTP API) serving Gemma 4 through this package's model.

    mlx-lm's server picks the model class from ``config.json``'s ``model_type`` in its own
    registry (which has a stock ``gemma4_text``); to serve *this* implementation, the server's
    ``load`` is replaced by :func:`server_load`. All arguments are ``mlx_lm.server``'s.
    """
    import mlx_lm.server as server

    install_server_loader(server)
    old = sys.argv
    sys.argv = ["gemma4-mlx serve"] + list(sys.argv[1:] if argv is None else argv)
    try:
        server.main()
    finally:
        sys.argv = old


def server_load(path_or_hf_repo, tokenizer_config=None, model_config=None, adapter_path=None, lazy=False,
                return_config=False, revision=None, trust_remote_code=False):
    """Drop-in for ``mlx_lm.utils.load`` that builds :class:`gemma4_mlx.Model`."""
    from .loading import load_model, load_tokenizer, read_config, resolve_model_path

    if adapter_path is not None:
        raise ValueError("gemma4-mlx serve does not support LoRA adapters")
    model_path = resolve_model_path(path_or_hf_repo, revision)
    model = load_model(model_path, lazy=lazy)
    tokenizer = load_tokenizer(model_path, model.args.eos_token_id)
    if tokenizer_config and tokenizer_config.get("chat_template"):
        tokenizer._tokenizer.chat_template = tokenizer_config["chat_template"]
        tokenizer.has_chat_template = True
    if not has_chat_template(tokenizer):
        # Without a template the server would send raw text: give it Gemma 4's format.
        tokenizer._tokenizer.chat_template = GEMMA4_JINJA
        tokenizer.has_chat_template = True
    if return_config:
        return model, tokenizer, read_config(model_path)
    return model, tokenizer


# A minimal Jinja rendering of gemma4_prompt(), for servers that only speak templates.
GEMMA4_JINJA = (
    "{{ bos_token }}"
    "{%- set think = enable_thinking | default(false) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|turn>system\\n' + ('<|think|>' if think else '') + messages[0]['content'] | trim + '<turn|>\\n' }}"
    "{%- set msgs = messages[1:] -%}"
    "{%- else -%}"
    "{%- if think -%}{{ '<|turn>system\\n<|think|><turn|>\\n' }}{%- endif -%}"
    "{%- set msgs = messages -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] | trim + '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)


def install_server_loader(server_module=None) -> None:
    """Make ``mlx_lm.server.ModelProvider`` load models with :func:`server_load`."""
    if server_module is None:
        import mlx_lm.server as server_module
    server_module.load = server_load

