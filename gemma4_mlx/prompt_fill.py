"""Generation steps whose prompt chunks build only what the KV cache needs.

mlx-lm's :func:`~mlx_lm.generate.generate_step` prefills every prompt token but the last in
chunks: it calls the model on a chunk, then evaluates only the caches. Lazy evaluation spares the
device the layers that write no cache (Gemma 4's KV-shared tail: 20 of E2B's 35 layers, 18 of
E4B's 42) and the head, but Python still builds their graph, and on a GPU the device has run out
of work while it does (docs/benchmarks.md, session 14: half of a 2,048-token E2B chunk's host
time). :func:`generate_steps` gives the same ``(token, logprobs)`` pairs, writing those chunks
with :meth:`gemma4_mlx.model.Model.fill_cache` (the cache-writing layers alone) and handing the
last prompt token to ``generate_step`` with the filled cache. Same caches, so the same tokens.

It keeps ``generate_step``'s own prefill where that would change what is computed or seen:
logits processors (they are shown the prompt's tokens as ``generate_step`` consumes them), a
quantized KV cache (``kv_bits``: ``generate_step`` quantizes between chunks, so later chunks
attend to quantized keys), input embeddings, and models without ``fill_cache`` (stock's, and
wrappers that only forward attributes to ours).
``GEMMA4_MLX_PROMPT_FILL=0`` keeps it everywhere (an opt-out, and the ablation). mlx-lm's own
commands run through ``gemma4-mlx mlx-lm`` get it too (:func:`in_mlx_lm`).
:func:`gemma4_mlx.speculative.speculative_generate_step` fills its target's prompt the same way
where its drafter does not read the target's hidden states (an MTP assistant does).
"""
import contextlib
from typing import Callable, Iterator, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream

from .cache import make_prompt_cache
from .switches import env_flag

PROMPT_FILL_ENV = "GEMMA4_MLX_PROMPT_FILL"


def has_fill_cache(model) -> bool:
    """Whether ``model``'s class defines ``fill_cache``. Looked up on the class: a wrapper that
    forwards attributes to a model (``__getattr__``) but does its own work in ``__call__`` must see
    every chunk, as under ``generate_step``."""
    return callable(getattr(type(model), "fill_cache", None))


def fills_itself(model, *, logits_processors=None, kv_bits: Optional[int] = None,
                 input_embeddings: Optional[mx.array] = None) -> bool:
    """Whether :func:`generate_steps` writes the prompt's chunks with ``model.fill_cache``."""
    return (has_fill_cache(model) and not logits_processors and kv_bits is None and input_embeddings is None
            and env_flag(PROMPT_FILL_ENV))


def generate_steps(prompt: mx.array, model, stream=generation_stream, *, prompt_cache: Optional[list] = None,
                   max_kv_size: Optional[int] = None, prefill_step_size: int = 2048,
                   prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
                   **kwargs) -> Iterator[Tuple[int, mx.array]]:
    """:func:`mlx_lm.generate.generate_step`'s yields and arguments (``prompt`` one-dimensional),
    the prompt's chunks but the last token written by ``model.fill_cache`` where
    :func:`fills_itself` allows. Nothing runs until the first token is asked for, as there."""
    kwargs.update(max_kv_size=max_kv_size, prefill_step_size=prefill_step_size)
    if not fills_itself(model, logits_processors=kwargs.get("logits_processors"), kv_bits=kwargs.get("kv_bits"),
                        input_embeddings=kwargs.get("input_embeddings")):
        yield from generate_step(prompt, model, stream, prompt_cache=prompt_cache,
                                 prompt_progress_callback=prompt_progress_callback, **kwargs)
        return
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    progress = prompt_progress_callback or (lambda *_: None)
    total = int(prompt.size)
    done = 0
    progress(done, total)
    with mx.stream(stream):
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            model.fill_cache(prompt[done:done + n][None], prompt_cache)
            mx.eval([c.state for c in prompt_cache])
            done += n
            progress(done, total)
            mx.clear_cache()

    def rest_progress(processed: int, of: int) -> None:
        # generate_step sees only the rest of the prompt; its opening (0, rest) was reported above
        if processed:
            progress(done + processed, done + of)

    yield from generate_step(prompt[done:], model, stream, prompt_cache=prompt_cache,
                             prompt_progress_callback=rest_progress, **kwargs)


@contextlib.contextmanager
def in_mlx_lm() -> Iterator[None]:
    """Within the block, ``mlx_lm.generate.generate_step`` (what mlx-lm's ``stream_generate`` and
    ``generate`` call) is :func:`generate_steps`: mlx-lm's commands run through
    ``gemma4-mlx mlx-lm`` fill our model's prompt as our own generation does (other models are
    :func:`generate_steps`' fallback: mlx-lm's own step). Modules that imported the function by
    name before (``mlx_lm.cache_prompt``) keep mlx-lm's."""
    import sys

    import mlx_lm.generate  # noqa: F401  (the package exports a function of the same name)

    module = sys.modules["mlx_lm.generate"]
    saved = module.generate_step
    module.generate_step = generate_steps
    try:
        yield
    finally:
        module.generate_step = saved
