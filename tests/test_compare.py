"""The head-to-head harness (gemma4_mlx.bench, `gemma4-mlx compare`, `python -m bench.compare`).

Structure and correctness only: no timing is asserted.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from gemma4_mlx.bench import environment
from gemma4_mlx.bench.measure import METRICS, SIDES, greedy_tokens, make_prompt, token_check
from gemma4_mlx.bench.pair import build_pair, stock_model_for
from gemma4_mlx.bench.reference import transformers_reference
from gemma4_mlx.bench.report import format_table, markdown_table
from gemma4_mlx.bench.run import run_benchmark
from gemma4_mlx.bench.settings import CPU_PROMPT_LENGTHS, BenchmarkError, BenchSettings, on_gpu

FAST = dict(preset="tiny", dtype="float32", prompt_lengths=[8, 16], runs=1, decode_tokens=4, check_tokens=12, warmup=1)


def _spy(model: nn.Module) -> nn.Module:
    """Count forward calls (and ours' prompt chunks written by fill_cache) by swapping in a subclass whose
    __call__ counts (nn.Module looks it up on the type)."""
    cls = type(model)

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return cls.__call__(self, *args, **kwargs)

    def fill_cache(self, *args, **kwargs):  # ours writes a prompt chunk this way: one call
        type(self).calls += 1
        return cls.fill_cache(self, *args, **kwargs)

    members = {"__call__": __call__, "calls": 0}
    if hasattr(cls, "fill_cache"):
        members["fill_cache"] = fill_cache
    model.__class__ = type(f"Spy{cls.__name__}", (cls,), members)
    return model


@pytest.fixture(scope="module")
def tiny_pair():
    ours, stock, meta = build_pair(BenchSettings(**FAST).resolve())
    return ours, stock, meta


def test_models_share_identical_weights(tiny_pair):
    from gemma4_mlx.model import Model
    from mlx_lm.models import gemma4_text

    ours, stock, _ = tiny_pair
    assert isinstance(ours, Model) and isinstance(stock, gemma4_text.Model)
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(stock.parameters()))
    assert a.keys() == b.keys()
    assert all(a[k] is b[k] for k in a)  # the very same arrays
    assert all(bool(mx.all(mx.isfinite(v)).item()) for v in a.values())


def test_harness_structure_and_both_sides_ran(tiny_pair):
    ours, stock, meta = tiny_pair
    ours, stock = _spy(ours), _spy(stock)
    logs = []
    res = run_benchmark(BenchSettings(**FAST), pair=(ours, stock), meta=meta, log=logs.append)

    for key in ("settings", "environment", "model", "token_check", "runs", "medians", "ratios", "forward_calls"):
        assert key in res
    env = res["environment"]
    for key in ("device", "mlx", "mlx_lm", "date", "git_commit", "source_digest", "command", "kernels"):
        assert key in env
    assert env["mlx"] and env["mlx_lm"]
    # the code that ran, by content (the GPU machine's git metadata may be stale)
    assert len(env["source_digest"]) == 16 and env["source_digest"] == environment.source_digest()

    # both models really ran, the same number of times (same loop for both)
    assert type(ours).calls > 0 and type(ours).calls == type(stock).calls
    assert res["forward_calls"]["ours"] == res["forward_calls"]["stock"] > 0

    for side in SIDES:
        assert set(res["runs"][side]) == {"8", "16"}
        for L, runs in res["runs"][side].items():
            assert len(runs) == 1
            for r in runs:
                assert r["ttft_s"] > 0 and r["prefill_tps"] > 0 and r["decode_tps"] > 0
                assert r["peak_memory_bytes"] > 0 and r["decode_tokens"] == 4
                assert math.isclose(r["prefill_tps"], int(L) / r["ttft_s"])
    for L in ("8", "16"):
        for key, *_ in METRICS:
            o, s = res["medians"]["ours"][L][key], res["medians"]["stock"][L][key]
            assert o > 0 and s > 0
            assert math.isclose(res["ratios"][L][key], o / s)

    chk = res["token_check"]
    assert chk["exact_required"] and chk["match"] and chk["passed"], chk
    assert chk["first_divergence"] is None and len(chk["ours_tokens"]) == 12
    assert chk["ours_tokens"] == chk["stock_tokens"]

    table = format_table(res)
    assert "prefill tok/s @8" in table and "decode tok/s @16" in table and "ours/stock" in table
    md = markdown_table(res)
    assert "| metric | ours | stock | ours/stock |" in md


class _Biased:
    """Delegates to a model but pushes every logit row towards one token."""

    def __init__(self, model, token):
        self.model, self.token = model, token

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        bias = mx.zeros((logits.shape[-1],), logits.dtype).at[self.token].add(1e4)
        return logits + bias

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_token_check_reports_first_divergence(tiny_pair):
    ours, stock, _ = tiny_pair
    prompt = make_prompt(8, ours.args.vocab_size, 0)
    ref = greedy_tokens(ours, prompt, 6)
    forced = (ref[0] + 1) % ours.args.vocab_size
    chk = token_check(ours, _Biased(stock, forced), prompt, 6, "float32")
    assert not chk["match"] and not chk["passed"]
    assert chk["first_divergence"] == {"position": 0, "ours": ref[0], "stock": forced}
    # in bfloat16 a divergence is reported but does not fail
    chk = token_check(ours, _Biased(stock, forced), prompt, 6, "bfloat16")
    assert not chk["match"] and chk["passed"]


def test_quantized_pair_is_quantized_identically():
    ours, stock, meta = build_pair(BenchSettings(preset="tiny-moe", dtype="float32", quantize=4).resolve())
    q = lambda m: {p: (x.bits, x.group_size) for p, x in m.named_modules() if hasattr(x, "bits")}
    assert q(ours) and q(ours) == q(stock)
    assert any(p.endswith("router.proj") and spec == (8, 64) for p, spec in q(ours).items())
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(stock.parameters()))
    assert a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    assert meta["quantization"]["bits"] == 4


def test_settings_defaults_and_errors():
    s = BenchSettings().resolve()
    if not on_gpu():
        assert s.preset == "e2b-mini" and s.dtype == "float32"
        assert s.prompt_lengths == CPU_PROMPT_LENGTHS and s.runs == 3
    assert BenchSettings(long=True, prompt_lengths=[128]).resolve().prompt_lengths == [128, 32768]
    for bad in (dict(quantize=3), dict(dtype="int8"), dict(decode_tokens=1), dict(preset="tiny", model="x")):
        with pytest.raises(BenchmarkError):
            BenchSettings(**bad).resolve()


def test_stock_refuses_per_layer_config_dialect_clearly():
    from gemma4_mlx.presets import preset_config

    cfg = preset_config("tiny")
    cfg["per_layer_config"] = {"2": {"head_dim": 64}}
    with pytest.raises(BenchmarkError, match="per_layer_config"):
        stock_model_for(cfg)


def test_cli_writes_json_md_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bench.compare import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "-L", "8,16", "--runs", "1", "--decode-tokens", "4", "--check-tokens", "8",
              "--dtype", "float32", "--out", str(tmp_path)])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "ours/stock" in out and "wrote" in out
    data = json.loads((tmp_path / "compare-tiny-float32.json").read_text())
    assert data["token_check"]["match"] is True
    assert set(data["medians"]) == {"ours", "stock"} and data["forward_calls"]["stock"] > 0
    assert "| metric | ours | stock |" in (tmp_path / "compare-tiny-float32.md").read_text()
    assert (tmp_path / "compare-tiny-float32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


RUN_KEYS = ("decode_s", "decode_tps", "peak_memory_bytes", "peak_over_start_bytes", "prefill_tps", "ttft_s")
# Every key of a compare JSON file (a preset run without --with-transformers), as dotted paths:
# "<L>" stands for a prompt length, "[]" for list items. The device's own info and the kernel
# switches are not pinned (they differ by machine).
COMPARE_JSON_KEYS = {
    "schema", "elapsed_s", "settings", "environment", "model", "token_check", "metrics", "runs", "medians",
    "ratios", "forward_calls", "forward_calls.ours", "forward_calls.stock",
    *(f"settings.{k}" for k in ("check_tokens", "decode_tokens", "dtype", "long", "model", "prefill_step_size",
                                "preset", "prompt_lengths", "quantize", "runs", "seed", "warmup",
                                "with_transformers")),
    *(f"environment.{k}" for k in ("command", "cpu", "cpu_count", "date", "device", "device_info", "gemma4_mlx",
                                   "git_commit", "gpu_name", "kernels", "mlx", "mlx_lm", "platform", "python",
                                   "source_digest")),
    *(f"model.{k}" for k in ("hidden_size", "num_hidden_layers", "parameter_bytes", "parameter_tensors",
                             "parameters", "preset", "quantization", "source", "vocab_size", "weight_dtypes",
                             "weights")),
    *(f"token_check.{k}" for k in ("exact_required", "first_divergence", "logits_finite", "match",
                                   "max_abs_logit_diff_last_prompt_position", "ours_tokens", "passed",
                                   "prompt_length", "stock_tokens", "tokens")),
    *(f"metrics[].{k}" for k in ("better", "key", "label", "scale")),
    *(f"{part}.{side}" for part in ("runs", "medians") for side in ("ours", "stock")),
    *(f"{part}.{side}.<L>" for part in ("runs", "medians") for side in ("ours", "stock")),
    *(f"runs.{side}.<L>[].{k}" for side in ("ours", "stock") for k in RUN_KEYS + ("decode_tokens",)),
    *(f"medians.{side}.<L>.{k}" for side in ("ours", "stock") for k in RUN_KEYS),
    "ratios.<L>", *(f"ratios.<L>.{k}" for k in RUN_KEYS),
}


def _key_paths(obj, prefix=""):
    paths = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = ".".join(filter(None, (prefix, "<L>" if key.isdigit() else key)))
            paths.add(path)
            if path not in ("environment.device_info", "environment.kernels"):
                paths |= _key_paths(value, path)
    elif isinstance(obj, list):
        for value in obj:
            paths |= _key_paths(value, prefix + "[]")
    return paths


def test_gemma4_mlx_compare_command(tmp_path):
    from typer.testing import CliRunner

    import gemma4_mlx.commands.compare  # noqa: F401
    from gemma4_mlx.commands import app

    r = CliRunner().invoke(app, ["compare", "--preset", "tiny", "-L", "8", "-r", "1", "-n", "2",
                                 "--check-tokens", "4", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "o" / "compare-tiny-float32.json").read_text())
    assert _key_paths(data) == COMPARE_JSON_KEYS
    r = CliRunner().invoke(app, ["compare", "--preset", "no-such-preset"])
    assert r.exit_code == 1 and "unknown preset" in r.output


def test_transformers_reference_same_tokens(tiny_pair):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ours, _, _ = tiny_pair
    s = BenchSettings(**{**FAST, "prompt_lengths": [8]}).resolve()
    ref = greedy_tokens(ours, make_prompt(8, ours.args.vocab_size, 0), 8)
    res = transformers_reference(ours, s, ours.args.vocab_size, lambda *_: None, ref)
    assert "skipped" not in res and "error" not in res, res
    assert res["medians"]["8"]["prefill_tps"] > 0 and res["medians"]["8"]["decode_tps"] > 0
    assert res["tokens_match_ours"] is True


def test_checkpoint_pair_and_per_layer_dialect(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_checkpoints import build_checkpoint

    published = tmp_path / "published"
    build_checkpoint(published, "e2b", True, "published")
    res = run_benchmark(BenchSettings(model=str(published), prompt_lengths=[8], runs=1, decode_tokens=2,
                                            check_tokens=8, warmup=0), log=lambda *_: None)
    assert res["settings"]["dtype"] == "float32" and res["token_check"]["match"] is True
    assert res["forward_calls"]["ours"] == res["forward_calls"]["stock"] > 0

    per_layer = tmp_path / "per_layer"
    build_checkpoint(per_layer, "e2b", False, "per_layer")
    with pytest.raises(BenchmarkError, match="per_layer_config"):
        build_pair(BenchSettings(model=str(per_layer)).resolve())


def test_source_digest_follows_the_package_code(monkeypatch, tmp_path):
    """The digest names the code by content: another file's bytes give another digest."""
    import shutil
    from pathlib import Path

    package = Path(environment.__file__).resolve().parents[1]
    copy = tmp_path / "gemma4_mlx"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(environment, "__file__", str(copy / "bench" / "environment.py"))
    same = environment.source_digest()
    assert same == environment.source_digest()
    kernel = next(copy.rglob("*.inc"))
    kernel.write_text(kernel.read_text() + "\n// changed\n")
    assert environment.source_digest() != same
