"""Speculative decoding that gives the target's own tokens at every context length.

Each round a drafter proposes up to ``num_draft_tokens`` tokens, the target scores the last
token plus the proposals in one call, and the longest prefix of proposals that the target's
sampler agrees with is kept, plus the target's own token after it; the target's cache is then
trimmed back over the rejected proposals. The sampling follows
``mlx_lm.generate.speculative_generate_step`` (same yields: ``(token, logprobs, from_draft)``),
so with greedy sampling the output is the target's greedy output.

What mlx-lm's version gets wrong for Gemma 4 is the trim: a sliding-window cache that already
pushed positions out cannot take tokens back. The target's caches here are
:class:`~gemma4_mlx.cache.SlidingWindowCache` rings, exact after a verification call; a draft
model's rings get ``num_draft_tokens`` spare slots for its one-token steps.

Drafters (:func:`make_drafter`):

* :class:`ModelDrafter`: any causal LM with the target's vocabulary and its own KV cache (a
  smaller Gemma 4, or the target itself: then every proposal is accepted, the upper bound).
* :class:`AssistantDrafter`: Gemma 4's MTP drafter (``gemma4_assistant`` checkpoints, see
  :mod:`gemma4_mlx.assistant`), which reads the target's KV cache and last hidden state instead
  of keeping its own, so the target is called with ``return_hidden=True``.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache

from .assistant import AssistantModel, check_pair, load_assistant, target_contexts
from .cache import _WindowRing, make_prompt_cache
from .prompt_fill import fills_itself

DEFAULT_NUM_DRAFT_TOKENS = 3


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _make_cache(model, max_kv_size: Optional[int] = None, num_draft_tokens: int = 0) -> list:
    """The model's caches; ours get spare slots for taking back drafted tokens."""
    make = getattr(model, "make_cache", None)
    if make is not None:
        try:
            params = inspect.signature(make).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_draft_tokens" in params:
            return make(max_kv_size=max_kv_size, num_draft_tokens=num_draft_tokens)
    return make_prompt_cache(model, max_kv_size=max_kv_size)


def _trim(cache: list, n: int) -> None:
    # Every cache is asked, never skipped: ours raise when they cannot take the tokens back
    # exactly; others must say they can (mlx-lm's is_trimmable).
    if n > 0:
        for c in cache:
            if not isinstance(c, _WindowRing) and not c.is_trimmable():
                raise ValueError(f"speculative decoding needs caches that can take tokens back, not a "
                                 f"{type(c).__name__} (past its size)")
            c.trim(n)


class Drafter:
    """Proposes tokens; told after each round how many the target kept."""

    needs_hidden = False  # whether ``start``/``accept`` need the target's final hidden states

    def start(self, prompt: mx.array, target_cache: list, hidden: Optional[mx.array]) -> None:
        """Before the first round. ``prompt`` holds the new tokens before the first one drafted
        from; the target has just processed them; ``hidden`` is its hidden state at the last."""

    def propose(self, y: mx.array, n: int, sample: Callable[[mx.array, List[mx.array]], mx.array],
                target_cache: list) -> mx.array:
        """``n`` proposed tokens following ``y`` (the target's newest token, which it has not
        processed yet). ``sample(logits, drafted_so_far)`` picks a token."""
        raise NotImplementedError

    def accept(self, proposed: int, accepted: int, hidden: Optional[mx.array]) -> None:
        """The target kept ``accepted`` of the ``proposed`` tokens (``hidden``: its hidden state
        at the last kept position)."""

    def finish(self, tokens: List[int]) -> None:
        """Generation stopped; the target now holds ``tokens`` beyond what it held at ``start``."""


class ModelDrafter(Drafter):
    """A causal LM with its own KV cache, fed like ``mlx_lm.generate.speculative_generate_step``.

    Its cache holds the target's tokens: when generation stops it is brought level with the
    target's (so a conversation can keep both caches), trimming its rejected proposals."""

    def __init__(self, model: nn.Module, num_draft_tokens: int, *, prefill_step_size: int = 512,
                 max_kv_size: Optional[int] = None, cache: Optional[list] = None,
                 quantize_cache: Optional[Callable[[list], None]] = None, fill: bool = False):
        self.model = model
        # the fed tokens' chunks through model.fill_cache (prompt_fill): their logits are never read
        self.fill = fill
        if cache is None:
            cache = _make_cache(model, max_kv_size, num_draft_tokens)
        for c in cache:  # one-token steps then a trim: the rings need that many spare slots
            if isinstance(c, _WindowRing):
                c.ensure_reserve(num_draft_tokens)
        self.cache = cache
        self.prefill_step_size = prefill_step_size
        self.quantize_cache = quantize_cache or (lambda cache: None)
        self._pending: List[mx.array] = []  # kept by the target, not yet fed to this model
        self._fed: List[mx.array] = []  # what this model was fed since start, in order
        self._last: List[mx.array] = []

    def _feed(self, tokens: mx.array) -> None:
        while tokens.size > 0:
            n = min(self.prefill_step_size, tokens.size)
            if self.fill:
                self.model.fill_cache(tokens[:n][None], self.cache)
            else:
                self.model(tokens[:n][None], cache=self.cache)
            self.quantize_cache(self.cache)
            mx.eval([c.state for c in self.cache])
            tokens = tokens[n:]

    def start(self, prompt, target_cache, hidden):
        self._pending, self._fed = [], [prompt]
        self._feed(prompt)

    def propose(self, y, n, sample, target_cache):
        inputs = mx.concatenate([*self._pending, y])
        if n == 0:
            self._pending = [inputs]
            return mx.array([], mx.uint32)
        self._pending = []
        drafted: List[mx.array] = []
        for _ in range(n):
            logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
            self.quantize_cache(self.cache)
            self._fed.append(inputs)
            inputs = sample(logits, drafted).astype(mx.uint32)
            mx.async_eval(inputs)
            drafted.append(inputs)
        self._last = drafted
        return mx.concatenate(drafted)

    def accept(self, proposed, accepted, hidden):
        if proposed == 0:
            return
        if accepted == proposed:
            self._pending = [self._last[-1]]  # the last proposal was never fed
        else:
            rejected = proposed - 1 - accepted
            _trim(self.cache, rejected)
            if rejected:
                self._fed = self._fed[:-rejected]

    def finish(self, tokens):
        fed = mx.concatenate(self._fed).tolist() if self._fed else []
        same = 0
        for a, b in zip(fed, tokens):
            if a != b:
                break
            same += 1
        _trim(self.cache, len(fed) - same)
        self._feed(mx.array(tokens[same:], mx.uint32))
        self._pending, self._fed, self._last = [], [], []


class AssistantDrafter(Drafter):
    """Gemma 4's MTP drafter: reads the target's caches and hidden state, keeps none of its own."""

    needs_hidden = True

    def __init__(self, assistant: AssistantModel, target: nn.Module):
        args = getattr(target, "args", None)
        if args is None or not hasattr(args, "plan"):
            raise ValueError("Gemma 4's MTP drafter needs a gemma4_mlx target model")
        check_pair(assistant, args)
        self.assistant = assistant
        self.target = target
        self.target_args = args
        self.window = assistant.args.text.sliding_window
        self._hidden: Optional[mx.array] = None
        self._scale = mx.array(args.hidden_size**0.5)

    def start(self, prompt, target_cache, hidden):
        self._hidden = hidden

    def propose(self, y, n, sample, target_cache):
        if self._hidden is None or n == 0:
            return mx.array([], mx.uint32)
        position = target_cache[0].offset  # y's position: the target holds everything before it
        contexts = target_contexts(self.target_args, target_cache, position, self.window)
        embed = self.target.model.embed_tokens
        token, hidden = y[-1:], self._hidden
        drafted: List[mx.array] = []
        for _ in range(n):
            e = embed(token[None])
            e = e * self._scale.astype(e.dtype)
            hidden, logits = self.assistant(mx.concatenate([e, hidden.astype(e.dtype)], axis=-1), contexts, position)
            token = sample(logits[:, -1, :], drafted)
            mx.async_eval(token)
            drafted.append(token)
        return mx.concatenate(drafted)

    def accept(self, proposed, accepted, hidden):
        self._hidden = hidden


def make_drafter(draft_model: Any, target: nn.Module, num_draft_tokens: int, *, prefill_step_size: int = 512,
                 max_kv_size: Optional[int] = None, cache: Optional[list] = None,
                 quantize_cache: Optional[Callable[[list], None]] = None, fill: bool = False) -> Drafter:
    """A :class:`Drafter` for a draft model object (or one already made); ``fill``: a draft model
    writes the tokens it is fed with ``fill_cache`` (:class:`ModelDrafter`)."""
    if isinstance(draft_model, Drafter):
        return draft_model
    if isinstance(draft_model, AssistantModel):
        return AssistantDrafter(draft_model, target)
    return ModelDrafter(draft_model, num_draft_tokens, prefill_step_size=prefill_step_size,
                        max_kv_size=max_kv_size, cache=cache, quantize_cache=quantize_cache, fill=fill)


def make_draft_cache(draft_model: Any, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
                     max_kv_size: Optional[int] = None) -> Optional[list]:
    """A cache for a draft model (with ``num_draft_tokens`` spare slots); None for drafters that
    keep none (Gemma 4's MTP assistant)."""
    if isinstance(draft_model, (AssistantModel, Drafter)):
        return None
    return _make_cache(draft_model, max_kv_size, num_draft_tokens)


def make_session_caches(model: nn.Module, draft_model: Any = None,
                        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS, max_kv_size: Optional[int] = None):
    """(target cache, draft cache) to reuse across prompts, as :func:`speculative_generate_step`
    would make them; without a draft model (the target's usual cache, None)."""
    if draft_model is None:
        return make_prompt_cache(model, max_kv_size=max_kv_size), None
    # The MTP drafter reads one position more than the window: spare slots keep it there.
    mtp = isinstance(draft_model, (AssistantModel, AssistantDrafter))
    target_cache = _make_cache(model, max_kv_size, num_draft_tokens + 2 if mtp else 0)
    return target_cache, make_draft_cache(draft_model, num_draft_tokens, max_kv_size)


def resolve_draft_model(draft_model: Any):
    """A draft model object: loaded (:func:`load_draft_model`) when given as a path or repo id."""
    if isinstance(draft_model, (str, Path)):
        return load_draft_model(draft_model)
    return draft_model


def load_draft_model(path: Union[str, Path], revision: Optional[str] = None):
    """A draft model from a checkpoint folder or Hub repo id: Gemma 4's MTP drafter for a
    ``gemma4_assistant`` config, otherwise a Gemma 4 model (this package's)."""
    from .assistant import is_assistant_config
    from .loading import load_model, read_config, resolve_model_path

    model_path = resolve_model_path(path, revision)
    if is_assistant_config(read_config(model_path)):
        return load_assistant(model_path)
    return load_model(model_path)


def check_vocab(target: nn.Module, draft_model: Any) -> None:
    """ValueError when the draft model cannot propose the target's token ids."""
    def vocab(m):
        args = getattr(m, "args", None)
        text = getattr(args, "text", None)
        return getattr(text, "vocab_size", None) or getattr(args, "vocab_size", None)

    a, b = vocab(target), vocab(draft_model)
    if a is not None and b is not None and a != b:
        raise ValueError(f"the draft model's vocabulary ({b} ids) differs from the target's ({a})")


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    draft_model: Any,
    *,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
    prompt_cache: Optional[list] = None,
    draft_cache: Optional[list] = None,
    prefill_step_size: int = 512,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)`` for ``prompt`` (token ids) like mlx-lm's function.

    ``draft_model``: a model (our Gemma 4, any mlx-lm model with the same vocabulary, or an
    :class:`~gemma4_mlx.assistant.AssistantModel`) or a :class:`Drafter`. ``prompt_cache`` (the
    target's, from ``model.make_cache()``) is extended in place: afterwards it holds the prompt
    and every token yielded. ``draft_cache`` (a draft model's, from :func:`make_draft_cache`;
    by default a new one) is kept level with it, so both can be reused for a next prompt.
    """
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    prompt = prompt.astype(mx.uint32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    check_vocab(model, draft_model)
    sampler = sampler or _greedy
    processors = list(logits_processors or [])
    quantize = functools.partial(maybe_quantize_kv_cache, quantized_kv_start=quantized_kv_start,
                                 kv_group_size=kv_group_size, kv_bits=kv_bits)
    drafter = make_drafter(draft_model, model, num_draft_tokens, prefill_step_size=prefill_step_size,
                           max_kv_size=max_kv_size, cache=draft_cache, quantize_cache=quantize,
                           fill=fills_itself(draft_model, kv_bits=kv_bits))
    needs_hidden = drafter.needs_hidden
    if prompt_cache is None:
        prompt_cache = make_session_caches(model, draft_model, num_draft_tokens, max_kv_size)[0]
    elif needs_hidden:
        for c in prompt_cache:  # the MTP drafter reads one position more than the window
            if isinstance(c, _WindowRing):
                c.ensure_reserve(num_draft_tokens + 2)
    cache = prompt_cache

    def target(tokens: mx.array):
        out = model(tokens[None], cache=cache, return_hidden=True) if needs_hidden else (
            model(tokens[None], cache=cache), None)
        quantize(cache)
        return out

    history = prompt  # every token so far (logits processors see it)

    def pick(logits: mx.array, context: mx.array) -> Tuple[mx.array, mx.array]:
        for proc in processors:
            logits = proc(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    # Prefill every prompt token but the last, in steps; the last starts the first round. Where
    # no drafter reads the target's hidden states, the chunks build only the cache-writing layers
    # (prompt_fill; a quantized KV cache keeps the full call, quantized between chunks).
    fill = not needs_hidden and fills_itself(model, kv_bits=kv_bits)
    total = int(prompt.size)
    hidden = None
    done = 0
    while total - done > 1:
        n = min(prefill_step_size, total - 1 - done)
        if fill:
            model.fill_cache(prompt[done : done + n][None], cache)
            h = None
        else:
            _, h = target(prompt[done : done + n])
        mx.eval([c.state for c in cache])
        if h is not None:
            hidden = h[:, -1:, :]
        done += n
        if prompt_progress_callback is not None:
            prompt_progress_callback(done, total)
    drafter.start(prompt[:-1], cache, hidden)
    if prompt_progress_callback is not None:
        prompt_progress_callback(total, total)

    y = prompt[-1:]
    ntoks = 0
    while ntoks < max_tokens:
        # Proposals beyond what max_tokens leaves room for would only be thrown away.
        k = min(max_tokens - ntoks - 1, num_draft_tokens)
        drafted = drafter.propose(y, k, lambda lg, so_far: pick(
            lg, mx.concatenate([history, *so_far]) if so_far else history)[0], cache)
        k = int(drafted.size)
        logits, hidden = target(mx.concatenate([y, drafted.astype(mx.uint32)]))
        tokens, logprobs = [], []
        for i in range(k + 1):
            t, lp = pick(logits[:, i, :], mx.concatenate([history, drafted[:i]]) if i else history)
            tokens.append(t)
            logprobs.append(lp)
        tokens_l = mx.concatenate(tokens).tolist()
        drafted_l = drafted.tolist()
        accepted = 0
        while accepted < k and tokens_l[accepted] == drafted_l[accepted]:
            accepted += 1
        emitted, going_on = 0, False
        try:
            while emitted <= accepted and ntoks < max_tokens:
                ntoks += 1
                emitted += 1
                yield tokens_l[emitted - 1], logprobs[emitted - 1][0], emitted - 1 < accepted
            going_on = ntoks < max_tokens
        finally:
            if not going_on:
                # Stopping (closed, or max_tokens): like mlx-lm's generate_step, leave the cache
                # holding exactly the prompt and every token yielded.
                if emitted <= accepted:
                    _trim(cache, k - emitted)
                else:
                    _trim(cache, k - accepted)
                    target(mx.array(tokens_l[accepted : accepted + 1], mx.uint32))
                drafter.finish(history.tolist() + tokens_l[:emitted])
        if not going_on:
            break
        _trim(cache, k - accepted)
        drafter.accept(k, accepted, None if hidden is None else hidden[:, accepted : accepted + 1, :])
        history = mx.concatenate([history, mx.array(tokens_l[: accepted + 1], mx.uint32)])
        y = mx.array(tokens_l[accepted : accepted + 1], mx.uint32)


def _mlx_lm_speculative_generate_step(prompt, model, draft_model, stream=None, *, prompt_cache=None, **kwargs):
    """``mlx_lm.generate.speculative_generate_step`` for a gemma4_mlx model: this module's exact
    step (``prompt_cache`` is mlx-lm's target + draft list, split at ``len(model.layers)``)."""
    draft_cache = None
    if prompt_cache is not None:
        n = len(model.layers)
        prompt_cache, draft_cache = prompt_cache[:n], prompt_cache[n:] or None
    if stream is not None:
        with mx.stream(stream):
            yield from speculative_generate_step(prompt, model, draft_model, prompt_cache=prompt_cache,
                                                 draft_cache=draft_cache, **kwargs)
    else:
        yield from speculative_generate_step(prompt, model, draft_model, prompt_cache=prompt_cache,
                                             draft_cache=draft_cache, **kwargs)


def install_mlx_lm_speculative() -> None:
    """Make ``mlx_lm.generate.speculative_generate_step`` (which ``mlx_lm.stream_generate``,
    ``mlx_lm.generate`` and ``mlx_lm.server`` call for a draft model) run this module's exact step
    when the target is a gemma4_mlx model; other models keep mlx-lm's own. Done on import."""
    import sys

    import mlx_lm.generate  # noqa: F401  (the package exports a function of the same name)

    g = sys.modules["mlx_lm.generate"]
    stock = g.speculative_generate_step
    if getattr(stock, "_gemma4_mlx", False):
        return

    def speculative(prompt, model, draft_model, stream=None, **kwargs):
        if _is_ours(model):
            return _mlx_lm_speculative_generate_step(prompt, model, draft_model, stream, **kwargs)
        return stock(prompt, model, draft_model, *(() if stream is None else (stream,)), **kwargs)

    speculative._gemma4_mlx = True
    speculative.stock = stock
    speculative.__doc__ = stock.__doc__
    g.speculative_generate_step = speculative


def _is_ours(model) -> bool:
    from .model import Model

    return isinstance(model, Model)


install_mlx_lm_speculative()
