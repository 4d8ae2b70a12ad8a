"""Every kernel body, in each launch shape and form of tests/kernel_cases.py, run on the emulator
under ThreadSanitizer: no two threads of a block touch the same threadgroup (or output) memory
without a barrier between them, with one of them writing.

The emulator's numerical tests cannot see a missing barrier (its OS threads rarely interleave
badly enough: session 19 found one between a matvec's turns that they passed); a GPU, or another
GPU, may. Metal runs these bodies on Macs that no test here reaches, so this is where their
synchronisation is checked."""
from __future__ import annotations

import mlx.core as mx
import pytest

import kernel_cases
from kernel_emulator import GXX, emulated_cuda, race_check_available, race_checked

from gemma4_mlx.kernels import dispatch

pytestmark = pytest.mark.skipif(GXX is None or not race_check_available(),
                                reason="g++ cannot build and run a ThreadSanitizer program here (libtsan)")

F32 = "mlx.core.float32"  # the synchronisation does not depend on the element type


@pytest.fixture
def emulated(monkeypatch):
    with emulated_cuda(monkeypatch):
        yield


def _rnd(shape, seed, scale=1.0):
    return scale * mx.random.normal(shape, key=mx.random.key(seed))


def _counting_cases():
    """The forms whose blocks count themselves (the last one merges or closes the launch's rows),
    which kernel_cases.py leaves to the decode step: the closing matvecs, the MoE pair's close,
    the fused attention over several splits. (The 4-bit close with the PLE gate, qmv_close_gate, is
    among kernel_cases.py's own: nothing else compiles it for the GPU in CI.)"""
    mv, qmv, moe, att = (kernel_cases.MODULES[n] for n in ("mv", "qmv", "moe", "attention"))
    x, w = _rnd((1, 1, 520), 41), _rnd((300, 520), 42, 0.05)
    res, nw, nn = _rnd((1, 1, 300), 43, 2.0), 1 + _rnd((300,), 44, 0.3), 1 + _rnd((300,), 45, 0.3)
    yield mv.matvec_close_kernel, (x, w, res, nw, mx.array([0.7]), 1e-6, nn)
    q, s, b = mx.quantize(_rnd((300, 576), 46, 0.05), group_size=64, bits=4)
    yield qmv.quantized_matvec_close_kernel, (_rnd((1, 1, 576), 47), q, s, b, 64, 4, res, nw, None, 1e-6, nn)
    yield moe.norm_pair_close_kernel, moe._probe_pair_close((F32, F32, F32, 512, 2, 4, True, True))
    qa = _rnd((1, 8, 1, 64), 34)
    kbuf, vbuf = _rnd((1, 1, 600, 64), 35, 0.5), _rnd((1, 1, 600, 64), 36)
    yield (lambda *a: att._attention_prefix_kernel(*a, fused=True)), (qa, kbuf, vbuf, mx.array([590], dtype=mx.int32))


RACE_KEYS = 120  # the attention probes' 300 keys cut to 120: 4 splits a group instead of 10, same tiles


def _fewer_keys(kernel, args):
    """An attention case over fewer keys (ThreadSanitizer's time goes as the blocks): still several
    splits, each of several keys, the window inside them."""
    att = kernel_cases.MODULES["attention"]
    if kernel is kernel_cases.K.attention_kernel:
        q, keys, values, *rest = args
        return kernel, (q, keys[:, :, :RACE_KEYS], values[:, :, :RACE_KEYS], *rest)
    if kernel is att._attention_prefix_q_kernel:
        raw, w, inv_freq, _, eps, keys, values, _, *rest = args
        filled = RACE_KEYS - 37
        return kernel, (raw, w, inv_freq, mx.array([filled - raw.shape[1]], dtype=mx.int32), eps,
                        keys[:, :, :RACE_KEYS], values[:, :, :RACE_KEYS], mx.array([filled], dtype=mx.int32), *rest)
    return kernel, args


def _all_cases():
    for kernel, args in kernel_cases.cases([F32]):
        yield _fewer_keys(kernel, args)
    yield from _counting_cases()


def test_no_kernel_body_races(emulated):
    with race_checked(launch=False):
        for kernel, args in _all_cases():
            kernel(*args)


def _looped_matvec_probe():
    """A prologue form whose blocks take three turns of rows, each split between warps."""
    mv = kernel_cases.MODULES["mv"]
    assert mv.layout(1536)[1] > 1
    return mv._residual_probe((F32, mv.layout(1536), 1, mv.GEGLU, 1, 1536, False, True))


# (file, the barrier's line as written, a case that reaches it): each barrier taken out is found
MUTANTS = [
    ("residual_norm_row.inc", "    k_barrier_after(loaded);\n",
     lambda: (kernel_cases.MODULES["residual"].residual_norm_kernel,
              kernel_cases.MODULES["residual"]._probe((F32, F32, 1536, True, True)))),
    ("mv.inc", "      K_BARRIER();  // the next turn's partial sums reuse split_part\n",
     lambda: (kernel_cases.MODULES["mv"].residual_matvec_kernel, _looped_matvec_probe())),
    ("attention_partial.inc", "    K_BARRIER();\n    // softmax over the tile, per row\n",
     lambda: (kernel_cases.K.attention_kernel, kernel_cases.MODULES["attention"]._probe_inputs((F32, 256, 8, 1, True)))),
]


@pytest.mark.parametrize("filename,barrier,case", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_barrier_taken_out_is_found(emulated, monkeypatch, filename, barrier, case):
    read = dispatch.read_source
    assert barrier in read(filename)
    monkeypatch.setattr(dispatch, "read_source",
                        lambda f: read(f).replace(barrier, "\n", 1) if f == filename else read(f))
    kernel, args = case()
    with pytest.raises(AssertionError, match="a data race between threads of a block"):
        with race_checked(launch=False):
            kernel(*args)
