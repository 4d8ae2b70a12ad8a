"""The MLX model against HF transformers on tiny checkpoints of every Gemma 4 family member.

Each family (E2B-, E4B-, 26B-A4B-, 31B-like) is written by transformers as a text-only and a
multimodal-wrapper checkpoint, in both config dialects. For each: float32 logits of a full pass
match transformers, cached decoding matches the full pass far past the sliding window, and
stock mlx-lm agrees where it can load the checkpoint.
"""

from __future__ import annotations

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gemma4_mlx import load_model  # noqa: E402
from gemma4_mlx.validate import compare_models  # noqa: E402

from hf_checkpoints import VARIANTS, VOCAB, WINDOW, build_checkpoint  # noqa: E402

CASES = list(itertools.product(VARIANTS, ("text", "wrapper"), ("published", "per_layer")))
REL_TOL = 1e-4
SEQ = 5 * WINDOW  # several times the sliding window


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(variant, kind, dialect):
        key = (variant, kind, dialect)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{variant}-{kind}-{dialect}")
            ref = build_checkpoint(path, variant, wrapper=kind == "wrapper", dialect=dialect)
            built[key] = (path, ref)
        return built[key]

    return get


@pytest.mark.parametrize("variant,kind,dialect", CASES, ids=["-".join(c) for c in CASES])
def test_full_pass_matches_transformers(checkpoints, variant, kind, dialect):
    path, ref = checkpoints(variant, kind, dialect)
    model = load_model(path)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, SEQ))
    report = compare_models(model, ref, ids, tolerance=REL_TOL)
    assert report.ok, report.table()
    # every decoder layer was compared, with the sub-blocks this family has
    names = {r.name.split()[-1] for r in report.rows}
    assert {"input_norm", "attention", "mlp", "out", "logits"} <= names
    assert ("moe" in names) == (variant == "26b")
    assert ("ple" in names) == (variant in ("e2b", "e4b"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plan_matches_transformers(checkpoints, variant):
    """Head dims, KV heads, KV sharing and MLP widths of the plan are what transformers built."""
    path, ref = checkpoints(variant, "text", "published")
    plan = load_model(path, lazy=True).args.plan
    for p, layer in zip(plan, ref.model.layers):
        attn = layer.self_attn
        assert p.head_dim == attn.head_dim
        assert p.num_heads // p.num_kv_heads == attn.num_key_value_groups
        assert p.is_kv_shared == attn.is_kv_shared_layer
        assert p.mlp_width == layer.mlp.intermediate_size
        assert p.k_eq_v == (getattr(attn, "v_proj", None) is None and not attn.is_kv_shared_layer)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 5])
def test_cached_decoding_matches_full_pass(checkpoints, variant, chunk):
    path, _ = checkpoints(variant, "text", "published")
    model = load_model(path)
    ids = mx.array(np.random.default_rng(2).integers(0, VOCAB, size=(1, SEQ)))
    full = np.array(model(ids))
    cache = model.make_cache()
    steps = []
    start = 3  # a short prompt first, then `chunk` tokens at a time
    steps.append(model(ids[:, :start], cache=cache))
    for s in range(start, SEQ, chunk):
        steps.append(model(ids[:, s : s + chunk], cache=cache))
    stepped = np.concatenate([np.array(x) for x in steps], axis=1)
    assert stepped.shape == full.shape
    assert _rel(stepped, full) < REL_TOL
    assert cache[0].offset == SEQ


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_stock_mlx_lm(checkpoints, variant):
    """Stock mlx-lm reads the published text-only dialect; both must agree there."""
    from mlx_lm.utils import load_model as stock_load

    path, _ = checkpoints(variant, "text", "published")
    stock, _ = stock_load(path)
    ours = load_model(path)
    ids = mx.array(np.random.default_rng(3).integers(0, VOCAB, size=(1, 2 * WINDOW + 3)))
    a, b = np.array(ours(ids)), np.array(stock(ids))
    assert _rel(a, b) < REL_TOL


def test_wrapper_vocab_size_is_the_text_configs(checkpoints):
    path, _ = checkpoints("e2b", "wrapper", "per_layer")
    config = json.loads((path / "config.json").read_text())
    assert "vocab_size" not in config or config["vocab_size"] != VOCAB
    model = load_model(path)
    assert model.args.vocab_size == VOCAB
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, VOCAB)


def test_multimodal_towers_are_skipped(checkpoints, tmp_path):
    """Real wrapper checkpoints carry vision/audio towers; the text model ignores them."""
    import shutil

    src, _ = checkpoints("e4b", "wrapper", "published")
    dst = tmp_path / "with-towers"
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    weights.update({
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": mx.zeros((8, 8)),
        "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": mx.zeros((4, 1, 3, 3)),
        "model.embed_vision.embedding_projection.weight": mx.zeros((64, 8)),
        "model.embed_audio.embedding_projection.weight": mx.zeros((64, 8)),
    })
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_array_equal(np.array(load_model(dst)(ids)), np.array(load_model(src)(ids)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_stored_dtype_is_kept(tmp_path, dtype):
    from mlx.utils import tree_flatten

    from gemma4_mlx.checkpoint import write_random_checkpoint

    path = write_random_checkpoint("tiny", tmp_path / dtype, dtype=dtype)
    model = load_model(path)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {getattr(mx, dtype)}
    assert model(mx.array([[1, 2, 3]])).dtype == getattr(mx, dtype)


def test_validate_command(checkpoints):
    """`gemma4-mlx validate` prints the per-layer table and exits 1 past the tolerance."""
    import importlib

    from typer.testing import CliRunner

    from gemma4_mlx.commands import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma4_mlx.commands.{name}")
    path, _ = checkpoints("26b", "wrapper", "per_layer")
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "--model", str(path), "--length", "12"])
    assert ok.exit_code == 0, ok.output
    assert "layer  5 moe" in ok.stdout and "logits" in ok.stdout and "OK: worst relative error" in ok.stdout
    strict = runner.invoke(app, ["validate", "--model", str(path), "--length", "12", "--tolerance", "1e-12"])
    assert strict.exit_code == 1 and "FAIL" in strict.stderr
    missing = runner.invoke(app, ["validate", "--model", str(path / "nope")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error:")
