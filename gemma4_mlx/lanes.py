"""Lanes: a sublayer's close gives its new residual and the next input (its next norm, or a PLE layer's gate)
as one kernel output, each row of it the two side by side, and the kernels that read them take that output
and read their part in place (``GEMMA4_MLX_CLOSE_ROWS``, :func:`gemma4_mlx.kernels.mv.close_rows_enabled`).

MLX's host records every output of a custom-kernel launch past its first at ~2.7 us a launch (session 41's
``iocost``, bench/input_cost.py), and E2B 4-bit's closes give 105 such outputs a decode step. Two outputs
cut from one by a Split cost the host more than the two outputs did, so the readers do not cut:
a :class:`Lane` is a Python stand-in for ``base[..., start:start + width]`` that a lane-reading kernel
(the matvecs' x, the closing forms' residual) takes as ``base`` plus the two offsets, and that anything
else turns into that slice (:func:`array`). A lane-reading launch's class key carries the lanes it takes
(:func:`mark`), and its self-check reads lanes of a wider probe (:func:`place`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import mlx.core as mx


class Lane:
    """``base[..., start:start + width]``, not yet cut: shape, dtype, size and ndim are the slice's."""

    __slots__ = ("base", "start", "width", "_cut")

    def __init__(self, base: mx.array, start: int, width: int):
        if not 0 <= start <= base.shape[-1] - width or width <= 0:
            raise ValueError(f"lane [{start}, {start + width}) outside a row of {base.shape[-1]}")
        self.base, self.start, self.width, self._cut = base, start, width, None

    @property
    def shape(self) -> tuple:
        return (*self.base.shape[:-1], self.width)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def size(self) -> int:
        return self.base.size // self.base.shape[-1] * self.width

    @property
    def row(self) -> int:
        """The base's row length (a lane's rows are that far apart)."""
        return self.base.shape[-1]

    def array(self) -> mx.array:
        """The slice itself (one Slice view, made once a lane)."""
        if self._cut is None:
            self._cut = self.base[..., self.start: self.start + self.width]
        return self._cut

    def __repr__(self) -> str:
        return f"Lane({tuple(self.base.shape)} {self.base.dtype}, [{self.start}:{self.start + self.width}])"


def array(x):
    """``x`` as an array (a :class:`Lane` cut; anything else as it is)."""
    return x.array() if isinstance(x, Lane) else x


def arrays(args: Sequence) -> tuple:
    return tuple(array(a) for a in args)


def any_lane(args: Sequence) -> bool:
    return any(isinstance(a, Lane) for a in args)


def reading_arrays(fn: Callable) -> Callable:
    """``fn`` called with its lane arguments cut into arrays (a reference's, a fallback's)."""

    def with_arrays(*args):
        return fn(*arrays(args))

    return with_arrays


def split(packed: mx.array, widths: Sequence[int]) -> tuple:
    """The lanes of ``packed``'s rows, ``widths`` side by side (they fill the row)."""
    if sum(widths) != packed.shape[-1]:
        raise ValueError(f"lanes of {list(widths)} do not fill a row of {packed.shape[-1]}")
    out, start = [], 0
    for w in widths:
        out.append(Lane(packed, start, w))
        start += w
    return tuple(out)


def joined(parts: Sequence[mx.array]) -> mx.array:
    """The packed rows of ``parts`` side by side (what a closing launch gives as one output)."""
    return mx.concatenate([array(p) for p in parts], axis=-1)


def mark(**named) -> tuple:
    """A class key's lane mark: ``("lanes", (name, start, width, row, group), ...)`` for each named input
    that is a lane (``group``: lanes of one base share it), () where none is (the key stays as it was)."""
    bases, taken = [], []
    for n, a in named.items():
        if isinstance(a, Lane):
            group = next((i for i, b in enumerate(bases) if b is a.base), None)
            if group is None:
                bases.append(a.base)
                group = len(bases) - 1
            taken.append((n, a.start, a.width, a.row, group))
    return ("lanes", *taken) if taken else ()


def marked(key: Optional[tuple], **named) -> Optional[tuple]:
    """``key`` with :func:`mark`'s lane mark last (None stays None)."""
    return None if key is None else (*key, *mark(**named))


ROWS_MARK = "packed rows"  # a closing form's class-key mark: it gives its outputs as packed rows (CLOSE_ROWS)
MARKS = (ROWS_MARK, "lanes")


def rows_mark(rows: bool) -> tuple:
    """A closing form's class-key mark for its packed rows: its own kernel, its own check."""
    return (ROWS_MARK,) if rows else ()


def unmark(key: tuple) -> tuple:
    """(the class key without its marks, whether it gives packed rows (:data:`ROWS_MARK`), {name: (start, width,
    row, group)} of its lanes)."""
    for i, part in enumerate(key):
        if isinstance(part, str) and part in MARKS:
            rest = key[i:]
            rows = ROWS_MARK in rest
            taken = {}
            if "lanes" in rest:
                taken = {e[0]: tuple(e[1:]) for e in rest[rest.index("lanes") + 1:]}
            return key[:i], rows, taken
    return key, False, {}


def width(taken: dict, name: str, default: int) -> int:
    """A lane's width from a class key's mark (its real width: the kernel's defines are the model's), else
    ``default`` (a probe's own)."""
    return taken[name][1] if name in taken else default


def place(args: tuple, taken: dict, positions: dict, noise: Callable) -> tuple:
    """A self-check's arguments with each marked input (``positions``: name -> its place among ``args``)
    made a lane of a wider row of ``noise(shape, seed, dtype)`` at its mark's place; the lanes of one group
    share one row."""
    args = list(args)
    groups: dict = {}
    for n, (start, w, row, group) in taken.items():
        groups.setdefault(group, []).append((start, w, row, positions[n]))
    for g, members in groups.items():
        members.sort()
        first = args[members[0][3]]
        lead, dtype, row = first.shape[:-1], first.dtype, members[0][2]
        pieces, at = [], 0
        for start, w, _, i in members:
            if start > at:
                pieces.append(noise((*lead, start - at), 61 + g + at, dtype))
            pieces.append(args[i])
            at = start + w
        if row > at:
            pieces.append(noise((*lead, row - at), 71 + g, dtype))
        wide = mx.concatenate(pieces, axis=-1)
        mx.eval(wide)
        for start, w, _, i in members:
            args[i] = Lane(wide, start, w)
    return tuple(args)


def reading(x, res=None) -> tuple:
    """(defines, variant suffix, whether ``res`` is an input of its own) of a launch that reads ``x`` and (a
    closing form) ``res`` as they are, arrays or lanes (matvec_inputs.inc): a lane's place is compiled in."""
    defines, suffix = [], ""
    if isinstance(x, Lane):
        defines += [("X_LANE_AT", x.start), ("X_LANE_K", x.width)]
        suffix += f"_x{x.start}_{x.width}"
    res_input = True
    if isinstance(res, Lane):
        res_input = not (isinstance(x, Lane) and x.base is res.base)
        defines += [*([] if res_input else [("RES_IN_X", 1)]), ("RES_LANE_AT", res.start), ("RES_LANE_ROW", res.row)]
        suffix += f"_{'r' if res_input else 'rx'}{res.start}_{res.row}"
    return defines, suffix, res_input


def base(x):
    """What a lane-reading launch takes for ``x``: a lane's base, an array itself."""
    return x.base if isinstance(x, Lane) else x
