"""What the quantized matvec compiles to for NVIDIA GPUs, checked without one (NVRTC builds the
exact source our CUDA path builds, cuobjdump reads its resources): at one row of x (decode) every
default layout keeps its registers in registers (no local memory: session 9 found a rolled loop
sending its word arrays there) and within 64 per thread where K is split over warps (31B's
products: 4 blocks of 256 threads per SM), 80 without (E4B's gate/up: 3 blocks, as at 72: registers
are given out 8 at a time). Fewer warps in flight read the weights slower: the two-steps variant
at 80 registers where K is split was slower on the H200."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

# the repository root, not bench/: a bench/ first on the path shadows packages by its file names (transformers
# 5.25 took bench/kernels.py, now kernel_bench.py, for Hugging Face's `kernels`, and every later test failed)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma4_mlx.kernels import mv, nvrtc, qmv  # noqa: E402

pytestmark = pytest.mark.skipif(not nvrtc.available(), reason="NVRTC (nvidia-cuda-nvrtc) is not installed")


@pytest.fixture(scope="module")
def sass():
    from bench import kernel_sass

    try:
        kernel_sass._cuobjdump()
    except SystemExit:
        pytest.skip("cuobjdump (nvidia-cuda-cuobjdump) is not installed")
    return kernel_sass


def _disassembly(sass, cubin: bytes) -> list:
    """A build's instructions (opcode and operands), in address order; never empty. Without nvdisasm beside
    cuobjdump, -sass prints no instruction, and the tests reading it would pass on nothing (they did, until
    session 45 added nvdisasm to the test extra): those tests skip then, the register tests still run."""
    if not (Path(sass._cuobjdump()).parent / "nvdisasm").exists():
        pytest.skip("nvdisasm (nvidia-cuda-nvdisasm) is not installed")
    text = sass._tool_output(cubin, "-sass")
    ops = [m.group(1).strip() for m in re.finditer(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?);", text, re.M)]
    assert ops, "no instruction in the disassembly"
    return ops


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("epi", [mv.PLAIN, mv.GEGLU, mv.GATE])
@pytest.mark.parametrize("K", [2560, 5376, 21504])
def test_qmv_default_layouts_fit_registers(sass, bits, epi, K):
    rows, split, wpl = qmv.quantized_layout(K, bits, 64, epi=epi)
    template = dict(T="bfloat16", BITS=bits, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=epi, PRO=0, HD=1, LOOP=1)
    res = sass.resources(sass.build("qmv", template))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["REG"] <= (64 if split > 1 else 80), res


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("epi", [mv.PLAIN, mv.GEGLU])
@pytest.mark.parametrize("K", [1536, 5376, 21504])
def test_qmv_packed_forms_keep_their_registers(sass, bits, epi, K):
    """The form over one buffer (QPACK, on by default on CUDA since session 38) as its launch builds it: no
    local memory, and within 80 registers. It takes more than the three-input form where K is split (74-80
    against 64: its row sizes come from K and it holds two more pointers), 3 blocks of 256 threads an SM
    where that form has 4; measured so on the H200 it was the faster (docs/benchmarks.md, session 38)."""
    rows, split, wpl = qmv.quantized_layout(K, bits, 64, epi=epi)
    template = dict(T="bfloat16", BITS=bits, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=epi, PRO=0, HD=1, LOOP=1)
    res = sass.resources(sass.build("qmv_packed", template))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["REG"] <= 80, res


@pytest.mark.parametrize("D,RT", [(256, 8), (512, 4)])  # Gemma 4's sliding and global layers, one query
def test_attention_partial_keeps_its_arrays_in_registers(sass, D, RT):
    """Pass 1's q rows, value tile and sums stay in registers (its first form kept its sums in
    local memory: a rolled loop over rows indexed them)."""
    res = sass.resources(sass.build("attention_partial", dict(T="bfloat16", D=D, RT=RT, QNR=0)))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res


@pytest.mark.parametrize("name", ["attention_fused", "attention_fused_scratch"])
@pytest.mark.parametrize("D,RT", [(256, 8), (512, 4)])
def test_attention_fused_builds_and_keeps_its_arrays_in_registers(sass, name, D, RT):
    """The fused form (pass 1 and the merge, attention_fused: on on CUDA since session 28; _scratch: its
    partials in a shared input it writes, GEMMA4_MLX_ATTN_SCRATCH) compiles for sm_90 as our CUDA path
    builds it, its atomics and fences included, with no local memory."""
    res = sass.resources(sass.build(name, dict(T="bfloat16", D=D, RT=RT, QNR=0)))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res


@pytest.mark.parametrize("name", ["attention_partial", "attention_fused", "attention_fused_scratch", "attention_fused_q",
                                  "attention_fused_q_scratch"])
@pytest.mark.parametrize("T", ["float32", "bfloat16"])
def test_attention_forms_build_at_the_tiny_models_head_dim(sass, name, T):
    """Every form of pass 1 builds for sm_90 at D 32 (the tests' tiny models: a lane holds one dim and
    no rotation pair). Session 45 sized two arrays DPL / 2 there; NVRTC refused them, and on the GPU
    the decode step fell back to the reference for every tiny model (strict mode: tests failed)."""
    assert sass.build(name, dict(T=T, D=32, RT=4, QNR=0))


@pytest.mark.parametrize("name", ["norm_rope", "norm_rope_qkv"])
@pytest.mark.parametrize("D", [256, 512])
def test_norm_rope_forms_keep_their_rows_in_registers(sass, name, D):
    """The q / k-v norm + RoPE launch and its one-launch form for q, k and v (qkv_norm_rope: the
    pointers chosen by the warp's row, the value norm under a branch) keep their rows in
    registers; the stack is the double precision cos / sin's slow path only."""
    res = sass.resources(sass.build(name, dict(T="bfloat16", D=D, H=8, HK=1)))
    assert res["STACK"] <= 40 and res["LOCAL"] == 0, res


@pytest.mark.parametrize("name", ["attention_partial", "attention_fused_q", "attention_fused_q_scratch"])
@pytest.mark.parametrize("D,RT", [(256, 8), (512, 4)])
def test_attention_with_the_q_norm_keeps_its_arrays_in_registers(sass, name, D, RT):
    """Pass 1 applying the q norm and RoPE itself (attention_prefix_q; fused: with the merge too)
    keeps its rows and the rotation's cos / sin in registers. Its 40 bytes of stack are the double
    precision cos / sin's slow path (arguments past ~1e5 rad), as in norm_rope; no local arrays."""
    res = sass.resources(sass.build(name, dict(T="bfloat16", D=D, RT=RT, QNR=1)))
    assert res["STACK"] <= 40 and res["LOCAL"] == 0, res
    assert res["REG"] <= 255, res


@pytest.mark.parametrize("packed_params", [False, True], ids=["apart", "cp"])
@pytest.mark.parametrize("quantized", [False, True], ids=["mv", "qmv"])
@pytest.mark.parametrize("CH", [1536, 2560, 2816])
def test_closing_forms_build_within_their_registers(sass, quantized, CH, packed_params):
    """The matvecs' closing forms (mv_close / qmv_close: the product, then the launch's last block
    closing the row) compile for sm_90 as our CUDA path builds them, counter atomics and coherent
    loads included, with no local memory, and within the registers mv.CLOSE_MAX_WIDTH was set by
    (bf16 mv 48-70 a thread at E2B's to 26B-A4B's widths, 4-bit qmv 73-78)."""
    assert CH <= mv.CLOSE_MAX_WIDTH
    if quantized:
        rows, split, wpl = qmv.quantized_layout(2048, 4, 64)
        template = dict(T="bfloat16", BITS=4, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=0, PRO=0, HD=1,
                        LOOP=1, CH=CH)
    else:
        rows, split = mv.layout(2048)
        template = dict(T="bfloat16", ROWS=rows, SPLIT=split, UNR=2, MM=1, EPI=0, PRO=0, HD=1, LOOP=1, CH=CH)
    name = ("qmv_close" if quantized else "mv_close") + ("_cp" if packed_params else "")  # cp: close_params.py
    res = sass.resources(sass.build(name, template))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res
    assert res["REG"] <= 80, res


@pytest.mark.parametrize("name", ["qmv_close_gate", "qmv_close_gate_packed", "qmv_close_gate_packed_cp"])
def test_close_with_the_ple_gate_builds_within_its_registers(sass, name):
    """qmv_close_gate at E2B's widths (4-bit down projection 6,144 -> 1,536, its 256-row gate) with its arrays
    apart and with the product's and the gate's each in one buffer (QPACK, GATE_QPACK; 77-80 registers since
    session 45's gate prefetch, no stack) within the closing forms' 80."""
    rows, split, wpl = qmv.quantized_layout(6144, 4, 64)
    template = dict(T="bfloat16", BITS=4, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=0, PRO=0, HD=1, LOOP=1,
                    CH=1536, GBITS=4, GGS=64)
    res = sass.resources(sass.build(name, template))
    assert res["LOCAL"] == 0 and res["REG"] <= 80, res
    if "packed" in name:
        assert res["STACK"] == 0, res


@pytest.mark.parametrize("name", ["qmv_close_gate", "qmv_close_gate_packed_cp"])
@pytest.mark.parametrize("gate_bits", [4, 8])
def test_close_with_the_ple_gate_converts_no_integer_to_float(sass, name, gate_bits):
    """Neither the product nor the closing block's gate converts a quantized value with I2F / I2FP (slower
    than the float pipe, and the gate runs on one SM): the gate's first form did, one a value (256 an unrolled
    batch of its loop). (Removing them alone did not shorten E2B's launch on the H200, session 45.)"""
    rows, split, wpl = qmv.quantized_layout(6144, 4, 64)
    template = dict(T="bfloat16", BITS=4, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=0, PRO=0, HD=1, LOOP=1,
                    CH=1536, GBITS=gate_bits, GGS=64)
    ops = _disassembly(sass, sass.build(name, template))
    conversions = [op for op in ops if re.match(r"(@!?U?P\w+\s+)?I2FP?\b", op)]
    assert not conversions, conversions[:4]


@pytest.mark.parametrize("name", ["qmv_close_gate", "qmv_close_gate_packed_cp"])
def test_close_with_the_ple_gate_prefetches_the_gate_into_l2(sass, name):
    """Every block asks L2 for its share of the gate's bytes before its product (close_gate_prefetch.inc): an
    L2 prefetch (CCTL.E.PF2) comes before the first load of the product's weights (LDG .128)."""
    rows, split, wpl = qmv.quantized_layout(6144, 4, 64)
    template = dict(T="bfloat16", BITS=4, GS=64, ROWS=rows, SPLIT=split, WPL=wpl, MM=1, EPI=0, PRO=0, HD=1, LOOP=1,
                    CH=1536, GBITS=4, GGS=64)
    ops = _disassembly(sass, sass.build(name, template))
    prefetch = next((i for i, op in enumerate(ops) if "CCTL.E.PF2" in op), None)
    first_wide_load = next(i for i, op in enumerate(ops) if "LDG" in op and ".128" in op)
    assert prefetch is not None and prefetch < first_wide_load, (prefetch, first_wide_load)


def test_moe_close_in_place_builds_without_local_memory(sass):
    """norm_pair's form with the layer's close (norm_pair_close, 26B-A4B's width, 8 experts mixed)
    compiles for sm_90 as our CUDA path builds it, the row in registers, no local memory."""
    res = sass.resources(sass.build("norm_pair_close", dict(T="bfloat16", W="bfloat16", HD=2816, FORM=2, KX=8)))
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res


def _loads_after_first_store(ops: list) -> list:
    """The global loads of a kernel's inputs that come after its first global store, in address
    order. Loads of 8 and 16 bytes are left out: these kernels read their inputs 2 or 4 bytes at a
    time, and the double sin/cos of RoPE read their reduction table that way on the slow path
    for large angles, which is not an input."""
    ops = [op for op in ops if "LDG" in op or "STG" in op]
    first = next((i for i, op in enumerate(ops) if "STG" in op), len(ops))
    return [op for op in ops[first:] if "LDG" in op and ".128" not in op and ".64" not in op]


@pytest.mark.parametrize("HD", [1536, 2560, 5376])
@pytest.mark.parametrize("nxt", [0, 1])
def test_residual_norm_loads_its_row_before_storing(sass, HD, nxt):
    """Every load comes before the first store: a load after a store it might alias waits for it,
    and session 15 found the fused norm issuing 13 serial load rounds a row that way (12.1 us a
    launch on the H200, 5.95 us once loaded first)."""
    ops = _disassembly(sass, sass.build("residual_norm", dict(T="bfloat16", HD=HD, NEXT=nxt)))
    assert _loads_after_first_store(ops) == []


@pytest.mark.parametrize("D,H", [(256, 1), (512, 1), (256, 8)])
def test_norm_rope_loads_its_row_before_storing(sass, D, H):
    ops = _disassembly(sass, sass.build("norm_rope", dict(T="bfloat16", D=D, H=H)))
    assert _loads_after_first_store(ops) == []


@pytest.mark.parametrize("P,NL", [(256, 35), (256, 42)])  # E2B's and E4B's per-layer inputs
def test_ple_combine_loads_its_row_before_storing(sass, P, NL):
    """(Its earlier form passed too: with no condition around the loads NVCC hoisted them over the
    restrict-qualified stores itself. Metal's kernels get no restrict, so the body loads first.)"""
    ops = _disassembly(sass, sass.build("ple_combine", dict(T="bfloat16", P=P, NL=NL)))
    assert _loads_after_first_store(ops) == []
