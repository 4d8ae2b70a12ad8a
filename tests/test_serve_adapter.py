"""`serve --adapter-path`: an mlx-lm LoRA adapter is applied at start and used by every
request (greedy output changes, and equals stock mlx-lm's on the same checkpoint + adapter)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from serve_harness import serving

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.server import model_loader

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def checkpoint_and_adapter(tmp_path_factory):
    """A tiny checkpoint and a trained-looking adapter (random, non-zero B matrices)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from gemma4_mlx import load

    root = tmp_path_factory.mktemp("adapter")
    path = write_random_checkpoint("tiny", root / "tiny", dtype="float32")
    model, tok = load(path)
    lora = {"rank": 4, "scale": 4.0, "dropout": 0.0, "keys": KEYS}
    model.freeze()  # as mlx_lm.lora does: only the LoRA matrices train
    linear_to_lora_layers(model, len(model.layers), lora)
    mx.random.seed(3)
    weights = {}
    for name, w in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            w = mx.random.normal(w.shape) * 0.5
        weights[name] = w
    assert any(k.endswith("lora_b") for k in weights)
    adapter = root / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": lora}))
    prompt = tok.encode("Hello model, tell me a story")  # BOS + text, as ids: both sides see the same
    no_end = {int(i): -100.0 for i in tok.eos_token_ids}
    return path, adapter, prompt, no_end


def _greedy(served, prompt, no_end, n=12):
    r = served.client.post("/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                               "logit_bias": {str(k): v for k, v in no_end.items()}})
    assert r.status == 200, r.body
    return r.json()["choices"][0]["text"]


def _stock(path, adapter, prompt, no_end, n=12):
    """Stock mlx-lm (its own gemma4_text) on the same checkpoint and adapter."""
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = mlx_lm.load(str(path), adapter_path=str(adapter))
    assert type(model).__module__ == "mlx_lm.models.gemma4_text"
    procs = make_logits_processors(logit_bias=no_end)
    return mlx_lm.generate(model, tok, prompt, max_tokens=n, logits_processors=procs)


def test_adapter_is_used_by_every_request(checkpoint_and_adapter):
    path, adapter, prompt, no_end = checkpoint_and_adapter
    with serving(model_loader(str(path))) as base:
        plain = _greedy(base, prompt, no_end)
    with serving(model_loader(str(path), adapter_path=str(adapter))) as tuned:
        adapted = _greedy(tuned, prompt, no_end)
        assert adapted == _greedy(tuned, prompt, no_end)  # every request, not just the first
        assert type(tuned.app.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    assert adapted != plain
    assert adapted == _stock(path, adapter, prompt, no_end)
