"""`gemma4-mlx convert` takes mlx_lm.convert's flags: --q-mode, --quant-predicate, --dtype, --upload-repo.

Each output loads in our model and in stock mlx-lm with the same logits. No network: the upload is
checked against a stand-in for huggingface_hub's HfApi.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import load_model
from gemma4_mlx.checkpoint import write_random_checkpoint
from cli_harness import invoke as _cli, no_debug  # noqa: F401  (no_debug: autouse fixture)

IDS = [[2, 10, 20, 30, 40, 50, 60, 70]]


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    """MoE (a router kept at 8 bits), k_eq_v, float32. Its MLP width (96) is not a multiple of 64,
    so affine group 64 leaves the MLP in float, as mlx-lm's quantizer does."""
    return write_random_checkpoint("tiny-moe", tmp_path_factory.mktemp("src") / "moe", dtype="float32")


def _convert(src: Path, out: Path, *flags) -> Path:
    r = _cli(["convert", "--model", src, "--mlx-path", out, "--quiet", *flags])
    assert r.exit_code == 0, r.output
    return out


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def _same_as_stock(out: Path) -> None:
    from mlx_lm.utils import load as stock_load

    stock, _ = stock_load(str(out))
    np.testing.assert_allclose(_logits(stock), _logits(load_model(out)), atol=1e-4, rtol=0)


def _refused(args, needle, out: Path) -> None:
    r = _cli(args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("mode,bits,group,scales", [
    ("affine", 4, 64, "float32"), ("mxfp4", 4, 32, "uint8"), ("nvfp4", 4, 16, "uint8"), ("mxfp8", 8, 32, "uint8"),
])
def test_q_mode(moe, tmp_path, mode, bits, group, scales):
    """Every mode mlx_lm.convert offers, with mlx-lm's default bits and group size; all run on MLX's CPU."""
    out = _convert(moe, tmp_path / mode, "-q", "--q-mode", mode)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == (mode, bits, group)
    assert q["model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    weights = mx.load(str(out / "model.safetensors"))
    proj = "model.layers.0.self_attn.o_proj"
    assert weights[f"{proj}.weight"].dtype == mx.uint32 and str(weights[f"{proj}.scales"].dtype).endswith(scales)
    assert (f"{proj}.biases" in weights) == (mode == "affine")
    model = load_model(out)
    layer = model.model.layers[0]
    assert (layer.self_attn.o_proj.mode, layer.self_attn.o_proj.bits) == (mode, bits) and layer.router.proj.bits == 8
    assert np.isfinite(_logits(model)).all()
    _same_as_stock(out)


@pytest.mark.parametrize("recipe,low,high", [("mixed_2_6", 2, 6), ("mixed_3_4", 3, 4), ("mixed_3_6", 3, 6),
                                             ("mixed_4_6", 4, 6)])
def test_quant_predicate(moe, tmp_path, recipe, low, high):
    """mlx-lm's mixed-bit recipes; the router stays at 8 bits whatever the recipe."""
    out = _convert(moe, tmp_path / recipe, "-q", "--quant-predicate", recipe)
    q = json.loads((out / "config.json").read_text())["quantization"]
    per_layer = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert all(v["bits"] == 8 for k, v in per_layer.items() if k.endswith("router.proj"))
    widths = collections.Counter(v["bits"] for k, v in per_layer.items() if not k.endswith("router.proj"))
    assert set(widths) == {low, high} and widths[low] > widths[high], widths
    assert any(k.endswith(("down_proj", "v_proj")) and v["bits"] == high for k, v in per_layer.items())
    _same_as_stock(out)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """Dense (MLX's CPU backend runs the MoE experts' gather-matmul in float32 only)."""
    return write_random_checkpoint("tiny-31b", tmp_path_factory.mktemp("src") / "dense", dtype="float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(dense, tmp_path, dtype):
    out = _convert(dense, tmp_path / dtype, "--dtype", dtype)
    assert {str(v.dtype) for v in mx.load(str(out / "model.safetensors")).values()} == {f"mlx.core.{dtype}"}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    quantized = _convert(dense, tmp_path / f"{dtype}-q4", "--dtype", dtype, "-q")
    weights = mx.load(str(quantized / "model.safetensors"))
    assert str(weights["model.layers.0.self_attn.o_proj.scales"].dtype) == f"mlx.core.{dtype}"
    assert str(weights["model.norm.weight"].dtype) == f"mlx.core.{dtype}"
    _same_as_stock(quantized)


@pytest.mark.parametrize("flags,needle", [
    (["-q", "--q-mode", "mxfp4", "--quant-predicate", "mixed_2_6"], "recipes quantize with --q-mode affine only"),
    (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "--q-bits must be 4 with --q-mode mxfp4"),
    (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"], "--q-group-size must be 16 with --q-mode nvfp4"),
    (["-q", "--q-mode", "mxfp8", "--q-bits", "4"], "--q-bits must be 8 with --q-mode mxfp8"),
    (["-q", "--q-bits", "7"], "--q-bits must be 2 or 3 or 4 or 5 or 6 or 8 with --q-mode affine"),
    (["-q", "--q-mode", "int4"], "--q-mode must be one of affine, mxfp4, nvfp4, mxfp8"),
    (["-q", "--quant-predicate", "mixed_9_9"], "--quant-predicate must be one of mixed_2_6"),
    (["--q-mode", "mxfp4"], "add --quantize (-q)"),
    (["--quant-predicate", "mixed_2_6"], "add --quantize (-q)"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--upload-repo", "not a repo"], "--upload-repo 'not a repo': not a Hugging Face repo id"),
])
def test_bad_flags_are_refused_in_one_line(moe, tmp_path, flags, needle):
    out = tmp_path / "out"
    _refused(["convert", "--hf-path", moe, "--mlx-path", out, "--quiet", *flags], needle, out)


class _FakeHub:
    """Records what HfApi is asked to do; ``fail`` makes the upload raise as a network error would."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, *args, **kwargs):
        return self

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}))
        if self.fail:
            raise ConnectionError("Failed to resolve 'huggingface.co'")


def test_upload_repo(moe, tmp_path, monkeypatch):
    import huggingface_hub

    hub = _FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    out = tmp_path / "up"
    r = _cli(["convert", "--model", moe, "--mlx-path", out, "-q", "--upload-repo", "me/tiny-moe-4bit", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "uploaded to https://huggingface.co/me/tiny-moe-4bit" in r.output
    (create, created), (upload, uploaded) = hub.calls
    assert create == "create_repo" and created["repo_id"] == "me/tiny-moe-4bit" and created["exist_ok"] is True
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/tiny-moe-4bit"
    assert Path(uploaded["folder_path"]) == out.resolve() and uploaded["repo_type"] == "model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(uploaded["files"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card and "me/tiny-moe-4bit" in card
    load_model(out)


def test_upload_failure_keeps_the_checkpoint_and_says_so(moe, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub(fail=True))
    out = tmp_path / "up"
    r = _cli(["convert", "--model", moe, "--mlx-path", out, "--upload-repo", "me/x", "--quiet"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "written, but the upload to me/x failed (ConnectionError" in lines[0] and "hf upload me/x" in lines[0]
    load_model(out)


def test_mlx_lm_defaults(moe, tmp_path, monkeypatch):
    """--model is --hf-path, and the output folder defaults to ./mlx_model, as in mlx_lm.convert."""
    monkeypatch.chdir(tmp_path)
    r = _cli(["convert", "--model", moe, "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "mlx_model").args.num_hidden_layers == 4
