"""Where the model runs: inside the compiled decode step (traced, or dry-run), or not.

The model's ops ask :func:`active` whether they may launch custom kernels and use the step's
joined projections; :mod:`gemma4_mlx.decode` sets the context. Imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Optional

from . import switches

# Decode steps multiply few rows: one matmul over the joined weights beats several there (fewer
# launches, one longer weight stream). More rows than this use the member projections.
JOINED_MAX_ROWS = 8


class _Context:
    def __init__(self, joined: Dict[int, object], collect: Optional[list], tracing: bool,
                 transposed: Optional[object] = None, scalars: Optional[object] = None):
        self.joined = joined
        self.collect = collect  # a dry run: record the kernels met, launch none
        # the dry run's kernels met only inside the fallback of a kernel not known to fail (needed only if it
        # fails its check: dispatch.run), and how deep in such fallbacks the dry run is
        self.fallback_collect: list = []
        self.fallback_depth = 0
        self.tracing = tracing  # inside mx.compile's trace: nothing may be evaluated
        self.transposed = transposed  # the step's weight transposes (decode.TransposedWeights)
        self.scalars = scalars  # the step's size-1 parameters, stacked (decode.StepScalars)
        self.scalar_pieces: Dict[object, list] = {}  # this trace's one Split of each stack
        # this trace's constant index arrays: id clamp bounds (ops.clamp_ids), the experts' gathers'
        # batch indices (ops.switch_glu)
        self.index_constants: Dict[tuple, object] = {}


# Per thread, both the step stack and the cached-call depth: mx.compile traces on the calling
# thread, and while one thread traces its step or generates, another (a server's second model
# call) must keep running MLX's ops, not the step's kernels and joins.
_thread = threading.local()


def _stack() -> List[_Context]:
    stack = getattr(_thread, "steps", None)
    if stack is None:
        stack = _thread.steps = []
    return stack


@contextlib.contextmanager
def _context(joined, collect=None, tracing=False, transposed=None, scalars=None):
    stack = _stack()
    context = _Context(joined, collect, tracing, transposed, scalars)
    stack.append(context)
    try:
        yield context
    finally:
        stack.pop()


def kernel_scope():
    """Run ops as inside the decode step (custom kernels allowed, checked at first use), outside
    any trace: for tests and micro-benchmarks of single ops."""
    return _context({})


@contextlib.contextmanager
def cached_call():
    """A model call with a KV cache: inference (prefill, an eager step). Outside one (a training
    forward, whose graph may be differentiated) no custom kernel runs: they have no gradient.
    Inside, the environment switches are read once (:func:`switches.frozen`)."""
    _thread.cached_depth = getattr(_thread, "cached_depth", 0) + 1
    try:
        with switches.frozen():
            yield
    finally:
        _thread.cached_depth -= 1


def in_cached_call() -> bool:
    return getattr(_thread, "cached_depth", 0) > 0


def active() -> Optional[_Context]:
    """The decode step being traced (or dry-run), or None outside it (asked ~200 times a model
    call, hence no call of :func:`_stack` here)."""
    stack = getattr(_thread, "steps", None)
    return stack[-1] if stack else None


def joined(module, rows: int) -> Optional[object]:
    """``module``'s joined projection inside the decode step (None elsewhere or for many rows)."""
    ctx = active()
    if ctx is None or rows > JOINED_MAX_ROWS:
        return None
    return ctx.joined.get(id(module))


def transposed_matmul(module, x) -> Optional[object]:
    """Inside the decode step, ``x @ module.weight.T`` over the weight transposes the step holds
    (decode.TransposedWeights); None elsewhere, or when it holds none for ``module``."""
    ctx = active()
    if ctx is None or ctx.transposed is None:
        return None
    return ctx.transposed.matmul(module, x)


def scalar_input(array) -> Optional[object]:
    """Inside the decode step, ``array`` (a size-1 parameter of the model, e.g. a layer's
    ``layer_scalar``) as its piece of the step's one Split of the stacked scalars
    (decode.StepScalars); None elsewhere, or when the step holds none for it."""
    ctx = active()
    if ctx is None or ctx.scalars is None:
        return None
    return ctx.scalars.piece(array, ctx.scalar_pieces)
