"""Every way of changing a loaded model shows in decode as in prefill, as in stock mlx-lm.

Decode steps (compiled, and eager) must agree with a prefill of the same tokens as closely as
stock mlx-lm's do after the same change, on the same weights: mlx-lm's LoRA and DoRA layers,
``load_adapters``, ``nn.quantize``, ``update_modules``, ``load_weights``, ``set_dtype``, a layer
replaced by hand, each made after the compiled step was traced. Replaced weights are freed.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import gemma4_text
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from gemma4_mlx import Model, decode, parse_config
from gemma4_mlx.model import MLP
from gemma4_mlx.presets import preset_config

PROMPT = [3, 9, 4, 1, 7, 2, 8, 5, 6, 11, 13, 10]
STEPS = [12, 17, 21, 30, 5, 8]
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}


def _pair(preset: str = "tiny"):
    """Ours and stock's gemma4_text holding the very same random weight arrays."""
    config = preset_config(preset)
    ours = Model(parse_config(config))
    mx.random.seed(0)
    ours.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0),
                         ours.parameters()))
    mx.eval(ours.parameters())
    stock = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    stock.update(ours.parameters())
    return ours, stock


def _gap(model) -> tuple[float, np.ndarray]:
    """Largest |decode-step logits - prefill logits| over STEPS, and the prefill logits."""
    full = np.array(model(mx.array([PROMPT + STEPS])).astype(mx.float32))[0, len(PROMPT) - 1 : -1]
    cache = model.make_cache()
    rows = [np.array(model(mx.array([PROMPT]), cache=cache)[0, -1].astype(mx.float32))]
    for t in STEPS[:-1]:
        rows.append(np.array(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)))
    return float(np.max(np.abs(np.stack(rows) - full))), full


def _trace(model, monkeypatch):
    """Run (and so trace) the compiled step before the change under test."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    _gap(model)
    assert model._decoder is not None and model._decoder.counts["traces"] >= 1


def _check(ours, stock, monkeypatch, tol=1e-4):
    """Ours, compiled and eager: decode agrees with prefill as closely as stock's do (or within
    ``tol`` of the logit scale), and ours' prefill equals stock's."""
    stock_gap, stock_full = _gap(stock)
    scale = float(np.max(np.abs(stock_full)))
    for compiled in ("1", "0"):
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
        gap, full = _gap(ours)
        assert gap <= max(2 * stock_gap, tol * scale), (compiled, gap, stock_gap)
        np.testing.assert_allclose(full, stock_full, rtol=tol, atol=tol * scale)


def _nonzero_lora(model, seed=5):
    """Give every LoRA B matrix (zero at init, so adapters would do nothing) random values;
    return every adapter parameter (A, B, DoRA's m) to copy into the other model."""
    mx.random.seed(seed)
    updates = [(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())
               if k.endswith("lora_b")]
    model.load_weights(updates, strict=False)
    return [(k, v) for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_layers_after_tracing(use_dora, monkeypatch):
    ours, stock = _pair()
    _trace(ours, monkeypatch)
    for m in (ours, stock):
        linear_to_lora_layers(m, 2, LORA, use_dora=use_dora)
    updates = _nonzero_lora(ours)
    stock.load_weights(updates, strict=False)
    assert sum(k.endswith("lora_b") for k, _ in tree_flatten(ours.parameters())) > 4
    _check(ours, stock, monkeypatch)
    # the adapted layers take their own path in the decode step, the others stay joined
    joined = {id(f.owner) for f in ours._decoder.joined.values()}
    assert id(ours.layers[-1].self_attn) not in joined and id(ours.layers[0].self_attn) in joined


def test_adapters_from_a_folder(tmp_path, monkeypatch):
    ours, stock = _pair()
    _trace(ours, monkeypatch)
    # an adapter as mlx_lm.lora writes it: its config and the trained A/B matrices
    trainer, _ = _pair()
    linear_to_lora_layers(trainer, 3, LORA)
    _nonzero_lora(trainer, seed=9)
    adapters = {k: v for k, v in tree_flatten(trainer.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), adapters)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": LORA}))
    for m in (ours, stock):
        load_adapters(m, str(tmp_path))
    _check(ours, stock, monkeypatch)
    # greedy continuation differs from the base model's: the adapter is used in decode
    base, _ = _pair()
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    assert not np.allclose(_gap(base)[1], _gap(ours)[1], atol=1e-3)


def test_quantize_in_place_after_tracing_frees_the_float_weights(monkeypatch):
    ours, stock = _pair("tiny-e4b")
    float_weights = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    _trace(ours, monkeypatch)
    for m in (ours, stock):
        nn.quantize(m, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 32 == 0)
    _check(ours, stock, monkeypatch, tol=1e-3)
    del stock, m
    # after a decode call the old decode state is gone: what the model holds is its quantized
    # weights (measured as the memory its deletion frees: other tests' models share the process)
    import gc

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    _gap(ours)
    weights = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    gc.collect()
    mx.clear_cache()
    with_model = mx.get_active_memory()
    del ours
    gc.collect()
    mx.clear_cache()
    held = with_model - mx.get_active_memory()
    # (the float model was 4.9x the quantized one; RoPE tables and the trace's constants remain)
    assert weights * 0.9 <= held < weights + 0.1 * float_weights, (held, weights, float_weights)


def test_update_modules_and_a_layer_replaced_by_hand(monkeypatch):
    ours, stock = _pair()
    _trace(ours, monkeypatch)
    mx.random.seed(11)
    hidden, width = ours.args.hidden_size, ours.args.plan[1].mlp_width
    new_mlp = MLP(hidden, width)
    new_mlp.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, new_mlp.parameters()))
    ours.model.layers[1].update_modules({"mlp": new_mlp})
    stock.model.layers[1].mlp.update(new_mlp.parameters())
    o_proj = nn.Linear(*reversed(ours.layers[2].self_attn.o_proj.weight.shape), bias=False)
    o_proj.weight = mx.random.normal(o_proj.weight.shape) * 0.05
    ours.layers[2].self_attn.o_proj = o_proj  # plain attribute assignment on a submodule
    stock.layers[2].self_attn.o_proj.weight = o_proj.weight
    mx.eval(ours.parameters(), stock.parameters())
    _check(ours, stock, monkeypatch)


def test_load_weights_and_set_dtype_after_tracing(monkeypatch):
    ours, stock = _pair()
    _trace(ours, monkeypatch)
    mx.random.seed(21)
    fresh = [(k, mx.random.normal(v.shape) * 0.05 + (1.0 if v.ndim == 1 else 0.0))
             for k, v in tree_flatten(ours.parameters())]
    ours.load_weights(fresh)
    stock.load_weights(fresh)
    _check(ours, stock, monkeypatch)
    _trace(ours, monkeypatch)
    for m in (ours, stock):
        m.set_dtype(mx.bfloat16)
    # bf16 logits of random weights move by rounding: ours must stay as close as stock's own gap
    stock_gap, stock_full = _gap(stock)
    for compiled in ("1", "0"):
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
        gap, full = _gap(ours)
        assert gap <= 2 * stock_gap + 0.05 * np.max(np.abs(stock_full)), (compiled, gap, stock_gap)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(ours.parameters()))


def test_a_switch_changed_after_tracing_rebuilds_the_step(monkeypatch):
    ours, _ = _pair()
    _trace(ours, monkeypatch)
    first = ours._decoder
    monkeypatch.setenv("GEMMA4_MLX_FUSE", "0")
    _gap(ours)
    assert ours._decoder is not first and not ours._decoder.joined
    monkeypatch.setenv("GEMMA4_MLX_FUSE", "1")
    _gap(ours)
    assert ours._decoder.joined


@pytest.mark.parametrize("switch,value", [("GEMMA4_MLX_PROLOGUE_BLOCKS", "7"), ("GEMMA4_MLX_QMV_MIN", "0"),
                                          ("GEMMA4_MLX_EXPERT_INDICES", "0"), ("GEMMA4_MLX_QMV_ROWS", "4"),
                                          ("GEMMA4_MLX_ATTN_SPLIT_KEYS", "16"), ("GEMMA4_MLX_ATTN_TILE_ROWS", "2"),
                                          ("GEMMA4_MLX_ATTN_BLOCKS", "132"), ("GEMMA4_MLX_ATTN_COMBINE_TILES", "1"),
                                          ("GEMMA4_MLX_ATTN_SPLIT_MAJOR", "1"), ("GEMMA4_MLX_QMV_SPLIT", "4"),
                                          ("GEMMA4_MLX_QMV_WPL", "1"), ("GEMMA4_MLX_CLOSE_PACK", "flip"),
                                          ("GEMMA4_MLX_ATTN_SCRATCH", "flip"), ("GEMMA4_MLX_CLOSE_ROWS", "flip")])
def test_the_kernel_launch_switches_rebuild_the_step(switch, value, monkeypatch):
    """Switches read while the step is traced (a prologue launch's block cap, the quantized
    matvec's size rule and rows a warp group, the attention's geometry, the experts' batch indices)
    are part of its settings: a new value traces a new step instead of replaying the old one (the
    matvec's rows and the attention's geometry joined in session 33, a session after them). "flip": an
    auto switch (on on CUDA, off elsewhere) set to what this backend does not do by default (the GPU's
    run of session 42 set the attention's scratch to 1, its CUDA default, and nothing changed)."""
    from gemma4_mlx.kernels import close_params, mv
    from gemma4_mlx.kernels.attention import scratch_enabled

    ours, _ = _pair()
    _trace(ours, monkeypatch)
    first = ours._decoder
    if value == "flip":
        resolved = {"GEMMA4_MLX_CLOSE_PACK": close_params.enabled, "GEMMA4_MLX_ATTN_SCRATCH": scratch_enabled,
                    "GEMMA4_MLX_CLOSE_ROWS": mv.close_rows_enabled}[switch]
        value = "0" if resolved() else "1"
    monkeypatch.setenv(switch, value)
    _gap(ours)
    assert ours._decoder is not first


def test_token_ids_outside_the_vocabulary_read_nothing_past_the_tables(monkeypatch):
    """Through the drop-in path (mlx_lm.generate and friends take any ids) an id outside the
    vocabulary gives the clamped id's result, eager and compiled, never a read past the table."""
    from mlx_lm.generate import generate_step

    ours, _ = _pair()
    last = ours.args.vocab_size - 1
    for compiled in ("1", "0"):
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", compiled)
        want = np.array(ours(mx.array([[5, last, 0, 7]])))
        got = np.array(ours(mx.array([[5, 2**31 - 1, -3, 7]])))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        cache = ours.make_cache()
        ours(mx.array([[5, 6, 7]]), cache=cache)
        step = np.array(ours(mx.array([[2**31 - 1]]), cache=cache))
        assert np.isfinite(step).all()
    # mlx-lm's own loop, as mlx_lm.generate runs it
    tokens = [t for t, _ in zip(generate_step(mx.array([5, 2**31 - 1, 9]), ours, max_tokens=3), range(3))]
    assert len(tokens) == 3


def test_a_lora_scale_edited_in_place_after_tracing(monkeypatch):
    """A plain setting of a layer from outside this package (mlx-lm's LoRA ``scale``) edited in
    place changes what the model computes: the next decode step sees it, as stock does."""
    ours, stock = _pair()
    for m in (ours, stock):
        linear_to_lora_layers(m, 2, LORA, use_dora=False)
    stock.load_weights(_nonzero_lora(ours), strict=False)
    _trace(ours, monkeypatch)
    for m in (ours, stock):
        for layer in m.layers[-2:]:
            layer.self_attn.q_proj.scale = 7.5
    _check(ours, stock, monkeypatch)
    # an unchanged model keeps its decoder: asking again does not rebuild
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    decoder = decode.decoder_for(ours)
    assert decode.decoder_for(ours) is decoder


def test_moe_experts_adapted_or_quantized_after_tracing(monkeypatch):
    """The decode step reproduces mlx-lm's SwitchGLU call itself (ops.switch_glu: the gathers'
    batch indices as constants of the trace) only for its own projections: LoRA'd experts keep
    their module's call, and quantized ones the quantized product, each after the step was traced."""
    from mlx_lm.tuner.lora import LoRASwitchLinear

    ours, stock = _pair("tiny-moe")
    _trace(ours, monkeypatch)
    for m in (ours, stock):
        m.layers[-1].experts.switch_glu.up_proj = LoRASwitchLinear.from_base(
            m.layers[-1].experts.switch_glu.up_proj, r=4, scale=2.0)
    stock.load_weights(_nonzero_lora(ours), strict=False)
    _check(ours, stock, monkeypatch)
    for m in (ours, stock):
        nn.quantize(m, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 32 == 0 and "experts" in p)
    assert type(ours.layers[0].experts.switch_glu.gate_proj).__name__ == "QuantizedSwitchLinear"
    _check(ours, stock, monkeypatch, tol=1e-3)
