"""KV caches for Gemma 4: sliding windows that can take tokens back, quantized or not.

Gemma 4's sliding-attention layers attend to the last ``sliding_window`` positions. mlx-lm's
``RotatingKVCache`` keeps exactly those, so once a token has pushed the oldest one out it cannot
be taken back: speculative decoding past the window (draft, verify, trim the rejected drafts)
then corrupts the window. :class:`SlidingWindowCache` masks attention to the true window by
position and can take back, exactly and at any context length: everything of its last
multi-token update (a verification step: what that update pushed out is kept until the next
one), up to ``reserve + 1`` tokens after one-token steps (``reserve`` spare slots beyond the
window), anything before the window first filled. A trim it cannot do exactly raises.

Position ``p`` always lives in slot ``p % (window + reserve)``. A one-token step writes its slot
and attends over the whole ring (a mask hides the slots outside the window); a multi-token step
attends over the last ``window - 1`` cached positions (gathered in time order) plus its own,
then writes them into the ring. With ``reserve=0`` the ring holds exactly the window and no mask
is needed for one-token steps (the compiled decode step and its prefix attention kernel apply).

:class:`QuantizedSlidingWindowCache` is the same ring with keys/values quantized like
``QuantizedKVCache`` (``kv_bits``); ``SlidingWindowCache.to_quantized`` makes one.

:func:`make_caches` builds a model's cache list: one entry per layer (mlx-lm slices cache lists
by ``len(model.layers)``), the KV-shared layers' entries being :class:`SharedLayerCache`
placeholders that the model never touches.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional

import mlx.core as mx
import mlx_lm.models.cache as mlx_cache
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchRotatingKVCache, KVCache, RotatingKVCache, _BaseCache

from .config import FULL, ModelArgs


class CacheTrimError(ValueError):
    """A trim that would need positions the cache has already evicted."""


def _slices(first_slot: int, count: int, size: int):
    """The (start, stop) slot ranges of ``count`` consecutive positions starting at ``first_slot``."""
    first_slot %= size
    if first_slot + count <= size:
        return [(first_slot, first_slot + count)]
    return [(first_slot, size), (0, first_slot + count - size)]


class _WindowRing(_BaseCache):
    """The ring and its bookkeeping, for plain and quantized storage."""

    def __init__(self, window: int, reserve: int = 0):
        if window < 1 or reserve < 0:
            raise ValueError(f"a sliding window needs window >= 1 and reserve >= 0, got {window}, {reserve}")
        self.window = int(window)
        self.reserve = int(reserve)
        self.keys = None
        self.values = None
        self.offset = 0

    # Positions below this are gone, whatever the ring's slots say (set by trims).
    _floor = 0
    # After a multi-token update: what its writes overwrote, so that a trim can put it back.
    _undo = None

    # -- storage (the quantized subclass stores (packed, scales, biases) tuples) -------------
    @property
    def max_size(self) -> int:
        """Slots in the ring."""
        return self.window + self.reserve

    def _encode(self, x: mx.array):
        return x

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        B, H, _, Dk = keys.shape
        shape = (B, H, self.max_size)
        self.keys = self._encode(mx.zeros((*shape, Dk), keys.dtype))
        self.values = self._encode(mx.zeros((*shape, values.shape[-1]), values.dtype))

    @staticmethod
    def _read(buf, first_slot: int, count: int, size: int):
        parts = _slices(first_slot, count, size)

        def read(b):
            pieces = [b[..., a:z, :] for a, z in parts]
            return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=2)

        return tree_map(read, buf)

    def _write(self, new_keys, new_values, first_position: int, count: int) -> None:
        """Write ``count`` consecutive positions (the trailing ``count`` of the arrays) to their slots."""
        size = self.max_size
        if count > size:
            raise AssertionError("write larger than the ring")
        for buf, new in ((self.keys, new_keys), (self.values, new_values)):
            at = 0
            for a, z in _slices(first_position, count, size):
                n = z - a

                def put(b, x, a=a, z=z, at=at, n=n):
                    b[..., a:z, :] = x[..., x.shape[2] - count + at: x.shape[2] - count + at + n, :]

                tree_map(put, buf, new)
                at += n

    # -- the cache protocol ------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self._allocate(keys, values)
        size, o, n = self.max_size, self.offset, keys.shape[2]
        keys, values = self._encode(keys), self._encode(values)
        oldest = self.oldest_position()
        self._undo = None
        if n == 1:
            self._write(keys, values, o, 1)
            self.offset += 1
            if self.offset < size:  # not wrapped yet: slot == position
                return tree_map(lambda b: b[..., : self.offset, :], (self.keys, self.values))
            return self.keys, self.values
        # A chunk attends to the window-1 positions before it, in time order, then to itself.
        kept = min(o, self.window - 1)
        old_keys = self._read(self.keys, o - kept, kept, size)
        old_values = self._read(self.values, o - kept, kept, size)
        stored = min(n, size)
        self._write(keys, values, o + n - stored, stored)
        self.offset += n
        # Verifying drafts is such a chunk; the positions it pushed out of the ring are the
        # ones a trim of the rejected drafts needs back: keep the gathered ones until then.
        self._undo = (o, n, kept, oldest, old_keys, old_values)
        if kept == 0:
            return keys, values
        cat = lambda a, b: mx.concatenate([a, b], axis=2)  # noqa: E731
        return tree_map(cat, old_keys, keys), tree_map(cat, old_values, values)

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        """The mask for ``N`` queries at the current offset, before ``update_and_fetch``."""
        w = self.window if window_size is None else min(self.window, window_size)
        o = self.offset
        if N > 1:
            kept = min(o, self.window - 1)
            if kept + N <= w and not return_array:
                return "causal"
            return create_causal_mask(N, kept, window_size=w)
        if o + 1 < self.max_size:  # keys are slots 0..o, one per position
            if o + 1 <= w:
                return None
            return mx.arange(o + 1) > o - w
        if self.max_size <= w:
            return None
        # Full ring: hide the slots further than w-1 positions behind the one being written.
        distance = mx.remainder(o - mx.arange(self.max_size), self.max_size)
        return distance < w

    def reserve_slot(self) -> tuple:
        """For the compiled decode step: (slot the next token goes to, slots valid after it)."""
        self._undo = None
        return self.offset % self.max_size, min(self.offset + 1, self.max_size)

    def oldest_position(self) -> int:
        """The oldest position whose keys/values the ring still holds."""
        return max(0, self._floor, self.offset - self.max_size)

    def slot_positions(self) -> mx.array:
        """The position each slot holds, -1 for an empty or stale slot (an int32 array)."""
        size, o = self.max_size, self.offset
        slots = mx.arange(size)
        positions = (o - 1) - mx.remainder(o - 1 - slots, size)
        return mx.where(positions >= self.oldest_position(), positions, -1)

    def is_trimmable(self) -> bool:
        # mlx-lm's meaning (its prompt-cache store trims by any amount): every trim is exact, i.e.
        # nothing was pushed out yet. Speculative decoding calls trim() directly: its trims are
        # exact much further (see trim), and one that is not raises.
        return self.oldest_position() == 0

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n <= 0:
            return 0
        size, left = self.max_size, self.offset - n
        undo = self._undo
        if undo is not None and undo[0] + undo[1] == self.offset:
            o, count, kept, oldest_before, old_keys, old_values = undo
            # held afterwards: the chunk's part of the ring, and the gathered positions before it
            oldest = max(oldest_before, o + count - size)
            if count <= size:
                oldest = min(oldest, o - kept)
        else:
            undo, oldest = None, self.oldest_position()
        if oldest > 0 and left - oldest < self.window - 1:
            raise CacheTrimError(
                f"cannot take back {n} tokens: this sliding-window cache ({self.window} positions + "
                f"{self.reserve} spare slots) no longer holds the positions that would be back in its "
                f"window; make the caches with model.make_cache(num_draft_tokens=N) for speculative decoding"
            )
        if undo is not None:
            # Put back the gathered positions whose slots the trimmed ones took.
            first, stop = max(o - kept, left - size), min(o, left)
            if stop > first:
                part = lambda b: b[..., first - (o - kept): stop - (o - kept), :]  # noqa: E731
                self._write(tree_map(part, old_keys), tree_map(part, old_values), first, stop - first)
        self._floor, self.offset, self._undo = oldest, left, None
        return n

    def temporal(self):
        """(keys, values) of the last ``min(offset, window)`` positions in time order."""
        count = self.size()
        return (self._read(self.keys, self.offset - count, count, self.max_size),
                self._read(self.values, self.offset - count, count, self.max_size))

    def ensure_reserve(self, reserve: int) -> None:
        """Grow the spare slots to ``reserve`` (the positions held are kept)."""
        if reserve <= self.reserve:
            return
        if self.keys is None:
            self.reserve = reserve
            return
        old_size, first = self.max_size, self.oldest_position()
        count = self.offset - first
        keys = self._read(self.keys, first, count, old_size)
        values = self._read(self.values, first, count, old_size)
        self.reserve = reserve
        grow = lambda b: mx.zeros((*b.shape[:2], self.max_size, *b.shape[3:]), b.dtype)  # noqa: E731
        self.keys, self.values = tree_map(grow, self.keys), tree_map(grow, self.values)
        self._write(keys, values, first, count)
        self._undo = None

    def size(self) -> int:
        return min(self.offset, self.window)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return tree_reduce(lambda a, x: a + x.nbytes, (self.keys, self.values), 0)

    @property
    def state(self):
        return self.keys, self.values, self.offset, self._floor, self.window, self.reserve

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self._floor, self.window, self.reserve = v


class SlidingWindowCache(_WindowRing):
    """The keys/values of the last ``window`` positions in a ring of ``window + reserve`` slots."""

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedSlidingWindowCache":
        q = QuantizedSlidingWindowCache(self.window, self.reserve, group_size=group_size, bits=bits)
        q.offset, q._floor = self.offset, self.oldest_position()
        if self.keys is not None:
            q.keys, q.values = q._encode(self.keys), q._encode(self.values)
        return q

    @classmethod
    def merge(cls, caches):
        """Batch these caches (``batch_generate``, the server) as mlx-lm's batched rotating cache."""
        stock = []
        for c in caches:
            r = RotatingKVCache(max_size=c.window)
            if c.keys is not None and c.offset > 0:
                r.keys, r.values = c.temporal()
                r._idx = r.keys.shape[2]
            r.offset = c.offset
            stock.append(r)
        return BatchRotatingKVCache.merge(stock)


class QuantizedSlidingWindowCache(_WindowRing):
    """:class:`SlidingWindowCache` with quantized keys/values (attention dispatches on ``bits``)."""

    def __init__(self, window: int, reserve: int = 0, group_size: int = 64, bits: int = 8):
        super().__init__(window, reserve)
        self.group_size = int(group_size)
        self.bits = int(bits)

    def _encode(self, x: mx.array):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @property
    def state(self):
        return (self.keys, self.values, self.offset, self._floor, self.window, self.reserve, self.group_size,
                self.bits)

    @state.setter
    def state(self, v):
        keys, values, self.offset, self._floor, self.window, self.reserve, self.group_size, self.bits = v
        # a loaded prompt-cache file gives lists
        self.keys = tuple(keys) if keys is not None else None
        self.values = tuple(values) if values is not None else None


class SharedLayerCache(_BaseCache):
    """The entry of a layer that reads an earlier layer's KV (Gemma 4's last layers): it holds
    nothing and the model never touches it; it keeps the list one entry per layer, through
    batching (it is its own batched form), trimming and prompt-cache files."""

    offset = 0

    @property
    def state(self):
        return (0,)  # a file needs one value per cache

    @state.setter
    def state(self, v):
        pass

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return 0

    @classmethod
    def merge(cls, caches):
        return cls()

    def extract(self, idx):
        return SharedLayerCache()

    def extend(self, other) -> None:
        pass

    def filter(self, batch_indices) -> None:
        pass

    def prepare(self, **kwargs) -> None:
        pass

    def finalize(self) -> None:
        pass


def make_caches(args: ModelArgs, max_kv_size: Optional[int] = None, num_draft_tokens: int = 0) -> List[Any]:
    """One cache per layer for a Gemma 4 model.

    Full-attention layers get a ``KVCache`` (with ``max_kv_size``: a :class:`SlidingWindowCache` of
    that many positions), sliding layers a :class:`SlidingWindowCache` of the sliding window (or
    ``max_kv_size`` if smaller). ``num_draft_tokens`` spare slots let speculative decoding take
    back that many tokens past the window. KV-shared layers get :class:`SharedLayerCache` placeholders.
    """
    if max_kv_size is not None and max_kv_size < 1:
        raise ValueError(f"max_kv_size must be >= 1, got {max_kv_size}")
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    caches: List[Any] = []
    for p in args.plan:
        if p.cache_index is None:
            continue
        if p.layer_type == FULL:
            caches.append(KVCache() if max_kv_size is None else SlidingWindowCache(max_kv_size, num_draft_tokens))
        else:
            window = args.sliding_window if max_kv_size is None else min(args.sliding_window, max_kv_size)
            caches.append(SlidingWindowCache(window, num_draft_tokens))
    # mlx-lm splits [target caches + draft caches] at len(model.layers): one entry per layer.
    caches += [SharedLayerCache() for _ in range(args.num_hidden_layers - len(caches))]
    return caches


def _register_with_mlx_lm() -> None:
    """mlx-lm's ``load_prompt_cache`` finds cache classes by name in its own module; make
    ``make_prompt_cache(model, max_kv_size)`` pass ``max_kv_size`` to models whose ``make_cache``
    takes it (stock calls ``model.make_cache()`` without it)."""
    for cls in (SlidingWindowCache, QuantizedSlidingWindowCache, SharedLayerCache):
        setattr(mlx_cache, cls.__name__, cls)
    stock = mlx_cache.make_prompt_cache
    if getattr(stock, "_gemma4_mlx", False):
        return

    def make_prompt_cache(model, max_kv_size: Optional[int] = None):
        make = getattr(model, "make_cache", None)
        if max_kv_size is not None and make is not None:
            try:
                takes = "max_kv_size" in inspect.signature(make).parameters
            except (TypeError, ValueError):
                takes = False
            if takes:
                return make(max_kv_size=max_kv_size)
        return stock(model, max_kv_size)

    make_prompt_cache._gemma4_mlx = True
    make_prompt_cache.__doc__ = stock.__doc__
    mlx_cache.make_prompt_cache = make_prompt_cache
    # Modules that imported the function by name before this ran.
    import sys

    for name in ("mlx_lm.generate", "mlx_lm.server", "mlx_lm.chat", "mlx_lm.cache_prompt", "mlx_lm.evaluate"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "make_prompt_cache", None) is stock:
            module.make_prompt_cache = make_prompt_cache


_register_with_mlx_lm()
# mlx-lm's make_prompt_cache, passing max_kv_size on to our models.
make_prompt_cache = mlx_cache.make_prompt_cache
