"""gemma4_mlx/lanes.py: a lane stands for a slice of a packed output without cutting it; the kernels that
read lanes in place carry them in their class keys, their self-checks read lanes of a wider probe, and
everything else (references, fallbacks, kernels whose keys mark none) gets the slices."""
from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx import lanes
from gemma4_mlx.kernels import dispatch


def _rnd(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def test_a_lane_looks_like_its_slice_and_cuts_once():
    packed = _rnd((2, 1, 10), 1)
    h, n = lanes.split(packed, [6, 4])
    assert (h.shape, n.shape, n.ndim, n.size, n.dtype, n.row) == ((2, 1, 6), (2, 1, 4), 3, 8, packed.dtype, 10)
    assert mx.array_equal(n.array(), packed[..., 6:])
    assert n.array() is n.array()  # one Slice a lane, however many readers cut it
    assert lanes.array(packed) is packed and mx.array_equal(lanes.joined((h, n)), packed)
    assert lanes.base(n) is packed and lanes.base(packed) is packed and (n.start, n.row) == (6, 10)
    with pytest.raises(ValueError, match="do not fill"):
        lanes.split(packed, [6, 3])
    with pytest.raises(ValueError, match="outside"):
        lanes.Lane(packed, 8, 4)


def test_marks_say_where_each_lane_lies_and_which_share_a_base():
    packed, other = _rnd((1, 1, 12), 2), _rnd((1, 1, 8), 3)
    h, g = lanes.split(packed, [8, 4])
    (o,) = lanes.split(other, [8])
    assert lanes.mark(x=packed, res=other) == ()
    assert lanes.marked(None, x=g) is None and lanes.marked(("k",), x=packed) == ("k",)
    key = ("qmv_close", 4, 64, "close", 8, False, True, lanes.ROWS_MARK, *lanes.mark(x=g, res=h))
    base, rows, taken = lanes.unmark(key)
    assert base == key[:7] and rows and taken == {"x": (8, 4, 12, 0), "res": (0, 8, 12, 0)}  # one base: one group
    assert lanes.unmark(("mv", 1) + lanes.mark(x=g, res=o))[2] == {"x": (8, 4, 12, 0), "res": (0, 8, 8, 1)}
    assert lanes.unmark(("mv", 1)) == (("mv", 1), False, {})
    assert lanes.width({"x": (8, 4, 12, 0)}, "x", 99) == 4 and lanes.width({}, "x", 99) == 99


def test_a_launch_reads_a_lane_of_x_and_a_residual_in_x_own_rows():
    packed = _rnd((1, 1, 12), 4)
    h, g = lanes.split(packed, [8, 4])
    defines, variant, res_input = lanes.reading(g, h)
    assert defines == [("X_LANE_AT", 8), ("X_LANE_K", 4), ("RES_IN_X", 1), ("RES_LANE_AT", 0), ("RES_LANE_ROW", 12)]
    assert not res_input and variant == "_x8_4_rx0_12"
    defines, variant, res_input = lanes.reading(_rnd((1, 1, 8), 5), h)
    assert defines == [("RES_LANE_AT", 0), ("RES_LANE_ROW", 12)] and res_input and variant == "_r0_12"
    assert lanes.reading(packed) == ([], "", True)


def test_a_probe_puts_each_marked_input_in_a_wider_row_at_its_place():
    x, w, r = _rnd((2, 1, 4), 6), _rnd((3, 4), 7), _rnd((2, 1, 8), 8)
    taken = {"x": (8, 4, 12, 0), "res": (0, 8, 12, 0)}
    px, pw, pr = lanes.place((x, w, r), taken, {"x": 0, "res": 2}, dispatch.probe_normal)
    assert pw is w and isinstance(px, lanes.Lane) and px.base is pr.base and px.base.shape == (2, 1, 12)
    assert mx.array_equal(px.array(), x) and mx.array_equal(pr.array(), r)
    # a lane in the middle of its row: noise on both sides, the value itself in between
    (mid,) = lanes.place((x,), {"x": (3, 4, 10, 0)}, {"x": 0}, dispatch.probe_normal)
    assert mid.base.shape == (2, 1, 10) and mx.array_equal(mid.array(), x)
    assert not mx.array_equal(mid.base[..., :3], mx.zeros((2, 1, 3)))


def test_run_hands_lanes_to_a_kernel_only_where_its_key_marks_them(monkeypatch):
    """dispatch.run: a marked class key's kernel gets the lanes themselves, an unmarked one's their slices;
    the reference and the fallback get slices either way, inside the self-check too."""
    packed = _rnd((1, 1, 6), 9)
    h, n = lanes.split(packed, [3, 3])
    seen = {}

    def kernel(x, r):
        seen.setdefault("kernel", []).append((type(x), type(r)))
        return lanes.array(x) + lanes.array(r)

    def reference(x, r):
        seen.setdefault("reference", []).append((type(x), type(r)))
        return x + r

    monkeypatch.setattr(dispatch, "active_backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "launch_backend", lambda name, key: None if key is None else "cuda")

    def probe(key):
        _, _, taken = lanes.unmark(key)
        return lanes.place((_rnd((1, 1, 3), 10), _rnd((1, 1, 3), 11)), taken, {"x": 0, "res": 1}, dispatch.probe_normal)

    dispatch.reset()
    try:
        marked = lanes.marked(("lane test",), x=n, res=h)
        out = dispatch.run("lane_test", marked, reference, kernel, probe, n, h)
        assert mx.array_equal(out, packed[..., 3:] + packed[..., :3])
        assert set(seen["kernel"]) == {(lanes.Lane, lanes.Lane)}  # the self-check's and the call's
        assert set(seen["reference"]) == {(mx.array, mx.array)}
        seen.clear()
        dispatch.run("lane_test_plain", ("plain",), reference, kernel, probe, n, h)
        assert set(seen["kernel"]) == {(mx.array, mx.array)}
        seen.clear()
        fell_back = []
        dispatch.run("lane_test_none", None, reference, kernel, probe, n, h,
                     fallback=lambda x, r: fell_back.append((type(x), type(r))) or x)
        assert fell_back == [(mx.array, mx.array)] and "kernel" not in seen
    finally:
        dispatch.reset()


@pytest.mark.parametrize("raw,cuda,want", [("", True, True), ("", False, False), ("auto", True, True),
                                          ("0", True, False), ("1", False, True)])
def test_close_rows_are_on_by_default_on_cuda_alone(monkeypatch, raw, cuda, want):
    from gemma4_mlx.kernels import mv

    monkeypatch.setenv(mv.CLOSE_ROWS_ENV, raw)
    monkeypatch.setattr(dispatch, "on_cuda", lambda: cuda)
    assert mv.close_rows_enabled() is want
