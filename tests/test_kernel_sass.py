"""What the quantized matvec compiles to for NVIDIA GPUs, checked without one (NVRTC builds the
exact source our CUDA path builds, cuobjdump reads its resources): at one row of x (decode) every
default layout keeps its registers in registers (no local memory: session 9 found a rolled loop
sending its word arrays there) and within 64 per thread where K is split over warps (31B's
products: 4 blocks of 256 threads per SM), 80 without (E4B's gate/up: 3 blocks, as at 72: registers
are given out 8 at a time). Fewer warps in flight read the weights slower: the two-steps variant
at 80 registers where K is split was slower on the H200."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gemma4_mlx.kernels import mv, nvrtc, qmv  # noqa: E402

pytestmark = pytest.mark.skipif(not nvrtc.available(), reason="NVRTC (nvidia-cuda-nvrtc) is not installed")


@pytest.fixture(scope="module")
def sass():
    import kernel_sass

    try:
        kernel_sass._cuobjdump()
    except SystemExit:
        pytest.skip("cuobjdump (nvidia-cuda-cuobjdump) is not installed")
    return kernel_sass


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("epi", [mv.PLAIN, mv.GEGLU, mv.GATE])
@pytest.mark.parametrize("K", [2560, 5376, 21504])
def test_qmv_default_layouts_fit_registers(sass, bits, epi, K):
    rows, split, wpl = qmv.quantized_layout(K, bits, 64, epi=epi)
    template = dict(T="bfloat16", BITS=bits, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=epi, PRO=0, HD=1)
    res = sass.resources(sass.build("qmv", template))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["REG"] <= (64 if split > 1 else 80), res


@pytest.mark.parametrize("D,RT", [(256, 8), (512, 4)])  # Gemma 4's sliding and global layers, one query
def test_attention_partial_keeps_its_arrays_in_registers(sass, D, RT):
    """Pass 1's q rows, value tile and sums stay in registers (its first form kept its sums in
    local memory: a rolled loop over rows indexed them)."""
    res = sass.resources(sass.build("attention_partial", dict(T="bfloat16", D=D, RT=RT, QNR=0)))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
