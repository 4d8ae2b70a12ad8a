"""A prompt chunk's experts (quantized or not) in blocks of one expert's rows (gemma4_mlx.expert_blocks):
the same outputs as mlx-lm's SwitchGLU (one row a pair) for any spread of the pairs over the
experts, the rule that picks the rows a block, and a whole model's prefill through it."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models import gemma4_text
from mlx_lm.models.switch_layers import SwitchGLU

from gemma4_mlx import Model, expert_blocks, parse_config
from gemma4_mlx.model import _GeGLU
from gemma4_mlx.presets import preset_config

ENV = expert_blocks.BLOCKS_ENV


def _quantized_glu(experts=16, hidden=128, width=64, seed=0):
    mx.random.seed(seed)
    glu = SwitchGLU(hidden, width, experts, activation=_GeGLU(), bias=False)
    nn.quantize(glu, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    return glu


def _spread(name, shape, experts, seed):
    """Expert ids of ``shape``: uniform; with empty experts and one crowded; all on one expert."""
    ids = mx.random.randint(0, experts, shape, key=mx.random.key(seed)).astype(mx.uint32)
    if name == "crowded":  # experts 0-4 get nothing, 5 their share too, the last one too
        ids = mx.where(ids < 5, mx.array(5, mx.uint32), ids)
    elif name == "one expert":
        ids = mx.full(shape, experts - 1, mx.uint32)
    return ids


@pytest.mark.parametrize("spread", ["uniform", "crowded", "one expert"])
@pytest.mark.parametrize("shape", [(1, 37, 4), (2, 50, 4), (1, 200, 2)])
def test_blocked_experts_equal_switch_glu(spread, shape):
    glu = _quantized_glu()
    x = mx.random.normal((*shape[:-1], 128), key=mx.random.key(1))
    idx = _spread(spread, shape, 16, 2)
    want = glu(x, idx)
    for rows in (8, 16, 64):
        got = expert_blocks.blocked_switch_glu(glu, x, idx, rows)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{spread} {shape} rows {rows}")


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_blocked_experts_other_quantizations(bits, group_size):
    mx.random.seed(3)
    glu = SwitchGLU(128, 64, 16, activation=_GeGLU(), bias=False)
    nn.quantize(glu, group_size=group_size, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    x = mx.random.normal((1, 45, 128), key=mx.random.key(4))
    idx = _spread("crowded", (1, 45, 4), 16, 5)
    np.testing.assert_allclose(np.array(expert_blocks.blocked_switch_glu(glu, x, idx, 16)), np.array(glu(x, idx)),
                               rtol=1e-5, atol=1e-6)


def test_the_rows_a_block(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    # auto: CUDA only, the pairs an expert gets up to the next power of two, 8 to 64, from 4 an expert
    assert expert_blocks.rows_per_block(16384, 128, "cuda") == 64  # 26B-A4B, a 2,048-position chunk
    assert expert_blocks.rows_per_block(6720, 128, "cuda") == 64  # 840 positions: 52.5 an expert
    assert expert_blocks.rows_per_block(4096, 128, "cuda") == 32  # exactly 32 an expert
    assert expert_blocks.rows_per_block(4097, 128, "cuda") == 64
    assert expert_blocks.rows_per_block(2048, 128, "cuda") == 16  # 256 positions
    assert expert_blocks.rows_per_block(1025, 128, "cuda") == 16
    assert expert_blocks.rows_per_block(1024, 128, "cuda") == 8
    assert expert_blocks.rows_per_block(512, 128, "cuda") == 8  # 64 positions: 4 an expert
    assert expert_blocks.rows_per_block(511, 128, "cuda") == 0
    assert expert_blocks.rows_per_block(10 ** 6, 128, "cuda") == 64
    for backend in ("metal", "cpu"):
        assert expert_blocks.rows_per_block(16384, 128, backend) == 0
    monkeypatch.setenv(ENV, "auto")
    assert expert_blocks.rows_per_block(16384, 128, "cuda") == 64
    monkeypatch.setenv(ENV, "0")
    assert expert_blocks.rows_per_block(16384, 128, "cuda") == 0
    monkeypatch.setenv(ENV, "16")
    assert expert_blocks.rows_per_block(10, 128, "metal") == 16
    for bad in ("12", "x", "-8"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            expert_blocks.rows_per_block(16384, 128, "cuda")


def test_which_experts_are_blocked(monkeypatch):
    """Quantized and unquantized experts by the rule; one position, a changed projection or biases
    never."""
    from mlx_lm.tuner.lora import LoRASwitchLinear

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(expert_blocks, "rows_per_block", lambda pairs, experts: 8)
    quantized, float_glu = _quantized_glu(), SwitchGLU(128, 64, 16, activation=_GeGLU(), bias=False)
    chunk, one = mx.zeros((1, 40, 4), mx.uint32), mx.zeros((1, 1, 4), mx.uint32)
    assert expert_blocks.rows_for(quantized, chunk) == 8
    assert expert_blocks.rows_for(quantized, one) == 0
    assert expert_blocks.rows_for(float_glu, chunk) == 8
    assert expert_blocks.rows_for(float_glu, one) == 0
    biased = SwitchGLU(128, 64, 16, activation=_GeGLU(), bias=True)
    adapted = _quantized_glu()
    adapted.up_proj = LoRASwitchLinear.from_base(adapted.up_proj, r=4)
    for glu in (biased, adapted):
        assert expert_blocks.rows_for(glu, chunk) == 0


def test_blocked_float_experts_equal_switch_glu():
    """The forced blocks over unquantized experts (float32: MLX's CPU gather_mm)."""
    mx.random.seed(6)
    glu = SwitchGLU(128, 64, 16, activation=_GeGLU(), bias=False)
    x = mx.random.normal((2, 30, 128), key=mx.random.key(7))
    idx = _spread("crowded", (2, 30, 4), 16, 8)
    np.testing.assert_allclose(np.array(expert_blocks.blocked_switch_glu(glu, x, idx, 8)), np.array(glu(x, idx)),
                               rtol=1e-5, atol=1e-5)


def _quantized_pair():
    config = preset_config("tiny-moe")
    ours = Model(parse_config(config))
    mx.random.seed(0)
    ours.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0),
                         ours.parameters()))
    stock = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    stock.update(ours.parameters())
    for m in (ours, stock):
        nn.quantize(m, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 32 == 0 and "experts" in p)
    mx.eval(ours.parameters(), stock.parameters())
    return ours, stock


def test_a_quantized_moe_prefill_through_blocks(monkeypatch):
    """A tiny MoE model's prompt chunk (float32, CPU) with its experts blocked gives stock's logits
    and the next step's; the blocked path was taken for every layer; a training forward (no cache) keeps
    mlx-lm's call."""
    ours, stock = _quantized_pair()
    prompt = mx.array([[(7 * i + 3) % 500 for i in range(60)]])
    calls = []
    blocked = expert_blocks.blocked_switch_glu
    monkeypatch.setattr(expert_blocks, "blocked_switch_glu", lambda *a: calls.append(a[-1]) or blocked(*a))
    monkeypatch.setenv(ENV, "8")
    ours_cache, stock_cache = ours.make_cache(), stock.make_cache()
    got, want = ours(prompt, cache=ours_cache), stock(prompt, cache=stock_cache)
    assert calls == [8] * len(ours.layers)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    step = mx.array([[11]])  # the caches it wrote: the next position's logits
    np.testing.assert_allclose(np.array(ours(step, cache=ours_cache)), np.array(stock(step, cache=stock_cache)),
                               rtol=1e-4, atol=1e-4)
    calls.clear()
    ours(prompt)
    assert calls == []
