"""Random checkpoints (HF layout), the synthesized tokenizer, and `init` / `convert`."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import load_model
from gemma4_mlx.checkpoint import CheckpointError, checkpoint_config, convert_checkpoint, write_random_checkpoint
from gemma4_mlx.checkpoint.random_weights import hf_tensor_specs
from gemma4_mlx.memory import estimate_memory
from gemma4_mlx.safetensors_io import read_safetensors_header
from gemma4_mlx.config import parse_config
from gemma4_mlx.tokenizer_synth import SPECIAL_TOKENS, synthesize_tokenizer
from cli_harness import invoke as _cli

TINY = ("tiny", "tiny-e4b", "tiny-moe", "tiny-31b")
PROMPT = [[2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]]




def _logits(model, ids=PROMPT) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def _no_temp_dirs(parent: Path):
    return not [p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


# --- tokenizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [512, 262144])
def test_tokenizer_loads_everywhere(tmp_path, vocab):
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    specials = synthesize_tokenizer(tmp_path, vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == vocab
    for t, i in specials.items():
        assert tok.convert_tokens_to_ids(t) == i == SPECIAL_TOKENS[t]
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    # as Gemma 4's published generation_config.json: <|tool_response> ends a turn that called a tool
    assert gen["eos_token_id"] == [specials["<eos>"], specials["<turn|>"], specials["<|tool_response>"]]
    assert ("<|image>" in specials) == (vocab > 255999)
    text = "Hello, world! The quick brown fox; x = 42 {\"a\": [1, 2]}\n\ttabs ~ `code`"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and max(ids) < vocab
    assert tok.decode(ids, skip_special_tokens=True) == text
    wrapped = load_tokenizer(tmp_path, eos_token_ids=gen["eos_token_id"])
    assert set(gen["eos_token_id"]) <= set(wrapped.eos_token_ids)
    assert wrapped.decode(wrapped.encode(text)[1:]) == text


def test_chat_template(tmp_path):
    from transformers import AutoTokenizer

    synthesize_tokenizer(tmp_path, 512)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
                 "<|turn>user\nQ<turn|>\n<|turn>model\n")
    s = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert s == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and 106 in ids

    plain = tmp_path / "plain"
    synthesize_tokenizer(plain, 512, chat_template=False)
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())


# --- random checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_random_checkpoint_loads_in_mlx_and_transformers(tmp_path, preset):
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    for dialect in ("published", "per_layer"):
        for wrapper in (False, True):
            out = tmp_path / f"{dialect}-{wrapper}"
            write_random_checkpoint(preset, out, dtype="float32", dialect=dialect, wrapper=wrapper)
            cfg = json.loads((out / "config.json").read_text())
            text = cfg["text_config"] if wrapper else cfg
            assert cfg["model_type"] == ("gemma4" if wrapper else "gemma4_text")
            assert ("per_layer_config" in text) == (dialect == "per_layer")
            assert ("global_head_dim" in text) == (dialect == "published")
            ours = _logits(load_model(out))
            assert np.isfinite(ours).all() and ours.std() > 0.5  # not degenerate
            cls = Gemma4ForConditionalGeneration if wrapper else Gemma4ForCausalLM
            hf, info = cls.from_pretrained(out, output_loading_info=True)
            assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            with torch.no_grad():
                theirs = hf(torch.tensor(PROMPT)).logits.float().numpy()
            np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_sharding_determinism_and_dtypes(tmp_path):
    a = write_random_checkpoint("tiny-moe", tmp_path / "a", dtype="bfloat16", seed=3, max_shard_bytes=100_000)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((a / f).is_file() for f in files)
    names = set()
    for f in files:
        header = read_safetensors_header(a / f)
        assert {t["dtype"] for t in header.values()} == {"BF16"}
        names |= set(header)
    assert names == set(index["weight_map"])
    assert "model.layers.0.experts.gate_up_proj" in names and "lm_head.weight" not in names
    assert estimate_memory(a) == index["metadata"]["total_size"]
    assert load_model(a).model.embed_tokens.weight.dtype == mx.bfloat16
    # (MLX's CPU GatherMM is float32-only, so logits of half-precision MoE are compared elsewhere.)
    a = write_random_checkpoint("tiny-31b", tmp_path / "a2", dtype="bfloat16", seed=3, max_shard_bytes=100_000)
    b = write_random_checkpoint("tiny-31b", tmp_path / "b", dtype="bfloat16", seed=3)
    c = write_random_checkpoint("tiny-31b", tmp_path / "c", dtype="bfloat16", seed=4)
    la, lb, lc = (_logits(load_model(p)) for p in (a, b, c))
    assert np.array_equal(la, lb) and not np.array_equal(la, lc)
    f16 = write_random_checkpoint("tiny-31b", tmp_path / "f16", dtype="float16", seed=3)
    assert load_model(f16).model.embed_tokens.weight.dtype == mx.float16


def test_shared_kv_layers_have_no_kv_weights():
    args = parse_config(checkpoint_config("e2b"))
    names = {n for n, _, _ in hf_tensor_specs(args)}
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    assert f"model.layers.{first_shared - 1}.self_attn.k_proj.weight" in names
    assert not any(f"layers.{i}.self_attn.k_proj" in n or f"layers.{i}.self_attn.v_proj" in n
                   for n in names for i in range(first_shared, args.num_hidden_layers))
    total = sum(int(np.prod(s)) for _, s, _ in hf_tensor_specs(args))
    assert 4.5e9 < total < 4.7e9  # E2B: 4.6B parameters with embeddings
    args = parse_config(checkpoint_config("31b"))
    names = {n for n, _, _ in hf_tensor_specs(args)}
    assert "model.layers.5.self_attn.v_proj.weight" not in names  # full layer, k_eq_v
    assert "model.layers.0.self_attn.v_proj.weight" in names


def test_write_is_atomic_and_refuses_overwrite(tmp_path, monkeypatch):
    out = write_random_checkpoint("tiny", tmp_path / "ck", dtype="float32", seed=1)
    before = _logits(load_model(out))
    with pytest.raises(CheckpointError, match="already exists"):
        write_random_checkpoint("tiny", out)
    # Interrupted forced rewrite: the old checkpoint survives, no temp folder is left.
    import gemma4_mlx.checkpoint.random_weights as ck

    real = ck._tensor_chunks
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ck, "_tensor_chunks", boom)
    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint("tiny", out, seed=2, force=True)
    monkeypatch.setattr(ck, "_tensor_chunks", real)
    assert np.array_equal(_logits(load_model(out)), before)
    assert _no_temp_dirs(tmp_path)
    write_random_checkpoint("tiny", out, dtype="float32", seed=2, force=True)
    assert not np.array_equal(_logits(load_model(out)), before)
    assert _no_temp_dirs(tmp_path)
    # An empty existing folder is fine without --force.
    (tmp_path / "empty").mkdir()
    write_random_checkpoint("tiny", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="unknown preset"):
        write_random_checkpoint("nope", tmp_path / "x")
    with pytest.raises(CheckpointError, match="dtype"):
        write_random_checkpoint("tiny", tmp_path / "x", dtype="int8")


# --- CLI: init / convert ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    r = _cli(["init", "--preset", "tiny", "--out", str(d / "tiny"), "--dtype", "float32", "--seed", "7"])
    assert r.exit_code == 0, r.output
    return d / "tiny"


def test_init_cli(source, tmp_path):
    assert (source / "model.safetensors").is_file() and (source / "tokenizer.json").is_file()
    r = _cli(["init", "--preset", "tiny", "--out", str(source)])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = _cli(["init", "--preset", "bogus", "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "unknown preset 'bogus'" in r.output
    assert not (tmp_path / "b").exists()


def test_convert_float_is_exact(source, tmp_path):
    out = tmp_path / "mlx"
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(out)])
    assert r.exit_code == 0, r.output
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        assert (out / f).is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and "quantization" not in cfg
    assert np.array_equal(_logits(load_model(out)), _logits(load_model(source)))
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(out), "--force", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert load_model(out).model.embed_tokens.weight.dtype == mx.bfloat16
    assert _no_temp_dirs(tmp_path)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
def test_convert_quantized_round_trip(source, tmp_path, bits, group):
    from gemma4_mlx.loading import load

    out = tmp_path / f"q{bits}"
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(out), "--quantize", "--q-bits", str(bits),
              "--q-group-size", str(group)])
    assert r.exit_code == 0, r.output
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (bits, group)
    model, tok = load(out)
    assert isinstance(model.model.layers[0].mlp.gate_proj, __import__("mlx.nn").nn.QuantizedLinear)
    ref = _logits(load_model(source))[0]
    got = _logits(model)[0]
    # Criterion: per-position cosine similarity of the logits; relative L2 error of the logits.
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    if bits == 8:
        # (per-layer layer scalars in the random checkpoint put one position at 0.986; mean ~0.998)
        assert cos.mean() > 0.99 and cos.min() > 0.97 and rel < 0.1 and (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8
    else:
        # Random weights are 4-bit's worst case (no outlier structure, errors compound over 6
        # layers): measured mean cosine ~0.84 here, vs ~0 between unrelated random models.
        assert cos.mean() > 0.75 and cos.min() > 0.4 and rel < 0.8
    # And it generates.
    from mlx_lm import generate

    text = generate(model, tok, prompt="Hello", max_tokens=5)
    assert isinstance(text, str)


def test_convert_moe_router_stays_8bit(tmp_path):
    src = write_random_checkpoint("tiny-moe", tmp_path / "src", dtype="float32")
    out = convert_checkpoint(src, tmp_path / "q", quantize=True, q_bits=4, q_group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    m = load_model(out)
    assert m.model.layers[0].router.proj.bits == 8 and m.model.layers[0].mlp.gate_proj.bits == 4
    assert np.isfinite(_logits(m)).all()
    with pytest.raises(Exception, match="already quantized"):
        convert_checkpoint(out, tmp_path / "qq", quantize=True)


@pytest.mark.parametrize("preset,dialect,wrapper,quantize", [
    ("tiny-31b", "per_layer", True, False), ("tiny", "published", False, False), ("tiny-moe", "published", False, True),
])
def test_stock_mlx_lm_loads_converted(tmp_path, preset, dialect, wrapper, quantize):
    from mlx_lm.utils import load as stock_load

    src = write_random_checkpoint(preset, tmp_path / "src", dtype="float32", dialect=dialect, wrapper=wrapper)
    out = convert_checkpoint(src, tmp_path / "mlx", quantize=quantize, q_group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and "global_head_dim" in cfg and "per_layer_config" not in cfg
    stock, _ = stock_load(str(out))
    np.testing.assert_allclose(_logits(stock), _logits(load_model(out)), atol=1e-4, rtol=0)


def test_interrupted_convert_leaves_target(source, tmp_path, monkeypatch):
    out = convert_checkpoint(source, tmp_path / "mlx")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(out), "--force", "--dtype", "float16"])
    assert r.exit_code == 1 and "No space left" in r.output and "Traceback" not in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _cli(["convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "new")])
    assert r.exit_code == 1 and not (tmp_path / "new").exists()
    assert _no_temp_dirs(tmp_path)
