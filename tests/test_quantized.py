"""mlx-community style quantized checkpoints (made by stock mlx-lm's quantizer) load and agree."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import load_model as stock_load  # noqa: E402
from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model  # noqa: E402

from gemma4_mlx import load_model  # noqa: E402

from hf_checkpoints import VOCAB, WINDOW, build_checkpoint  # noqa: E402


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _stock_quantized(src: Path, out: Path, bits: int, group_size: int):
    model, config = stock_load(src)
    model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    save_model(out, model)
    save_config(config, out / "config.json")
    return model, config


def _as_wrapper(text_dir: Path, out: Path) -> None:
    """Re-pack a quantized text checkpoint the way mlx-community ships the multimodal ones."""
    out.mkdir()
    config = json.loads((text_dir / "config.json").read_text())
    quant = config.pop("quantization")
    config.pop("quantization_config", None)
    renamed = {("language_model." + k if isinstance(v, dict) or v is False else k): v for k, v in quant.items()}
    wrapper = {"model_type": "gemma4", "text_config": config, "quantization": renamed,
               "vision_config": None, "audio_config": None}
    (out / "config.json").write_text(json.dumps(wrapper))
    weights = mx.load(str(text_dir / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"),
                        {"language_model." + k: v for k, v in weights.items()}, metadata={"format": "mlx"})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = {}
    for variant in ("e2b", "26b"):
        path = tmp_path_factory.mktemp(f"hf-{variant}")
        build_checkpoint(path, variant, wrapper=False, dialect="published")
        out[variant] = path
    return out


@pytest.mark.parametrize("variant", ["e2b", "26b"])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_mlx_community_quantized_checkpoint(sources, tmp_path, variant, bits, group_size):
    src = sources[variant]
    qdir = tmp_path / "q"
    stock_q, config = _stock_quantized(src, qdir, bits, group_size)

    ours = load_model(qdir)
    quantized = [k for k, m in ours.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized, "nothing was loaded quantized"
    assert any("embed_tokens" in k for k in quantized)
    if variant == "26b":
        # stock keeps the router at 8 bits through a per-layer entry; we must honour it
        router = ours.model.layers[0].router.proj
        assert isinstance(router, nn.QuantizedLinear) and router.bits == 8
        assert any(k.endswith("router.proj") for k in config["quantization"])

    ids = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(1, 3 * WINDOW)))
    q_logits = np.array(ours(ids))
    # identical quantized weights -> the same numbers as stock
    assert _rel(q_logits, np.array(stock_q(ids))) < 1e-4
    # The quantized model computes exactly with its rounded weights: dequantizing them into a
    # float model gives the same logits ...
    deq = dequantize_model(load_model(qdir))
    assert _rel(np.array(deq(ids)), q_logits) < 1e-3
    # ... and those weights stay close to the float checkpoint's (affine rounding error only).
    float_params = dict(tree_flatten(load_model(src).parameters()))
    limit = 0.12 if bits == 4 else 0.01
    for name, w in tree_flatten(deq.parameters()):
        ref = float_params[name]
        err = float(mx.linalg.norm((w - ref).flatten()) / mx.linalg.norm(ref.flatten()))
        assert err < limit, (name, err)

    # the multimodal-wrapper packing of the same weights loads to the same model
    wdir = tmp_path / "w"
    _as_wrapper(qdir, wdir)
    wrapped = load_model(wdir)
    assert _rel(np.array(wrapped(ids)), q_logits) < 1e-6
    assert {k for k, _ in tree_flatten(wrapped.parameters())} == {k for k, _ in tree_flatten(ours.parameters())}


def test_layers_of_one_quantization_group_skip_mlx_quantized_matmul(monkeypatch):
    """On CUDA, a quantized layer whose input is one group wide (a small MoE's 8-bit router: K 64,
    group 64) multiplies by its dequantized weight: MLX 0.32.4's CUDA quantized_matmul gives
    wrong, varying values there from 2 rows on (bench/quant_shapes.py --focus). Wider layers, and
    every layer on other backends, keep MLX's op (here: the CUDA backend pretended on the CPU)."""
    from gemma4_mlx import ops
    from gemma4_mlx.kernels import dispatch

    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x = mx.random.normal((10, 64), key=mx.random.key(0))
    router = nn.QuantizedLinear.from_linear(nn.Linear(64, 8, bias=False), group_size=64, bits=8)
    head = nn.QuantizedEmbedding.from_embedding(nn.Embedding(40, 64), group_size=64, bits=4)
    wide = nn.QuantizedLinear.from_linear(nn.Linear(64, 8, bias=True), group_size=32, bits=4)
    with dispatch.force_backend("cuda"):
        for got, module in ((ops.linear(router, x), router), (ops.tied_head(head, x), head)):
            w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
            np.testing.assert_allclose(np.array(got), np.array(x @ w.T), rtol=1e-5, atol=1e-5)
        assert calls == []
        np.testing.assert_allclose(np.array(ops.linear(wide, x)), np.array(wide(x)), rtol=1e-6)
        assert len(calls) == 2  # ours and the module's own call
    np.testing.assert_array_equal(np.array(ops.linear(router, x)), np.array(router(x)))  # CPU: MLX's op
    assert len(calls) == 4
