"""bench/step_inputs.py counts the inputs and outputs of each launch in the GPU's decode step on the CPU,
and leaves dispatch as it found it; and the layers that share one RoPE take one pair of frequency
arrays (session 40: E2B's step took 35 copies, each a distinct input to MLX's host)."""
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import step_inputs  # noqa: E402

from gemma4_mlx.config import parse_config  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.model import Model  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402


def test_counts_each_launch_of_the_gpu_step_and_restores_dispatch(monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv("GEMMA4_MLX_CLOSE_PACK", "0")  # the closes' norm weights apart (cw below)
    before = (dispatch.get_kernel, dispatch.self_check)
    rec = step_inputs.record("tiny", True)
    assert (dispatch.get_kernel, dispatch.self_check) == before
    rows = step_inputs.classify(rec)
    graph = step_inputs.graph_inputs(rec.dot)
    # the Python-side record and MLX's graph see the same launches and inputs
    assert graph["launches"] == len(rows) > 0
    assert graph["inputs"] == sum(len(k) for _, k, _ in rows)
    assert 0 < graph["constants"] < graph["inputs"] and graph["distinct"] + graph["shared"] == graph["constants"]
    forms = {form for form, _, _ in rows}
    assert any(f.startswith("qmv/close") for f in forms) and any(f.startswith("attention_partial") for f in forms)
    kinds = {kind for _, k, _ in rows for _, kind, _ in k}
    assert kinds == {"activation", "weight", "small", "counter"}
    # a closing launch: its product's input is the step's, its norm weights constants
    close = next(k for form, k, _ in rows if form.startswith("qmv/close"))
    named = {n: kind for n, kind, _ in close}
    assert named["x"] == "activation" and named["w"] == "weight" and named["cw"] == "small"
    assert named["counter"] == "counter"
    text = step_inputs.report(rows, graph)
    assert "in MLX's graph" in text and "qmv/close" in text and "H200 prices" in text
    # the host estimate: its parts add up, every launch costs at least a launch, a closing launch's second
    # output and extra inputs more
    est = step_inputs.host_estimate(rows)
    assert abs(est["total"] - est["launches"] - est["inputs"] - est["outputs"]) < 1e-6
    assert est["launches"] == step_inputs.PRICES["launch"] * len(rows)
    assert all(v >= step_inputs.PRICES["launch"] for v in est["by form"].values())
    close_form = next(form for form, _, _ in rows if form.startswith("qmv/close"))
    assert est["by form"][close_form] > step_inputs.PRICES["launch"] + step_inputs.PRICES["output"]


def test_layers_with_one_rope_share_its_arrays():
    model = Model(parse_config(preset_config("tiny")))
    attns = [layer.self_attn for layer in model.model.layers]
    by_rope = {}
    for a in attns:
        by_rope.setdefault(a.plan.rope, []).append(a)
    assert len(by_rope) >= 2  # sliding and full layers: two RoPEs
    for group in by_rope.values():
        assert all(a._inv_freq is group[0]._inv_freq and a._freqs is group[0]._freqs for a in group)
    first, other = (g[0] for g in list(by_rope.values())[:2])
    assert first._inv_freq is not other._inv_freq
    assert mx.array_equal(first._inv_freq, mx.array(first.plan.rope.inv_freq))


def test_the_traced_step_takes_attentions_shared_scratch_when_switched_on(monkeypatch):
    """GEMMA4_MLX_ATTN_SCRATCH=1 (CUDA's default): the traced decode step's attention launches take the fused form's scratch
    as an input (made and evaluated at the trace, as the counters are) and write one output; off, the
    scratch is each launch's own output."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")

    def attention_forms():
        rows = step_inputs.classify(step_inputs.record("tiny", True))
        return [(form, [n for n, _, _ in k], outs) for form, k, outs in rows if form.startswith("attention_partial")]

    monkeypatch.setenv("GEMMA4_MLX_ATTN_SCRATCH", "0")
    off = attention_forms()
    assert off and all("ws" not in names and outs == 2 for _, names, outs in off)
    monkeypatch.setenv("GEMMA4_MLX_ATTN_SCRATCH", "1")
    monkeypatch.setattr(dispatch, "_block_counters", {})  # no scratch of an earlier test's
    on = attention_forms()
    assert len(on) == len(off)
    assert all(form.endswith("_scratch") and names[-1] == "ws" and outs == 1 for form, names, outs in on)


def test_the_traced_steps_closes_take_their_norms_scalar_and_eps_as_one_input_when_switched_on(monkeypatch):
    """GEMMA4_MLX_CLOSE_PACK=1: every closing launch of the traced decode step (mv / qmv's close forms) takes
    ``cp`` where it took ``cw``, ``ls``, ``cn`` and ``eps``, a buffer evaluated at the trace (a constant of the step), so
    the step has as many launches and fewer inputs; off, the three apart."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")

    def closes():
        rows = step_inputs.classify(step_inputs.record("tiny", True))
        return [(form, [n for n, _, _ in k]) for form, k, _ in rows if form.startswith(("qmv/close", "mv/close"))], \
            sum(len(k) for _, k, _ in rows), len(rows)

    monkeypatch.setenv("GEMMA4_MLX_CLOSE_PACK", "0")
    apart, inputs_apart, launches = closes()
    assert apart and all("cw" in names and "cp" not in names for _, names in apart)
    monkeypatch.setenv("GEMMA4_MLX_CLOSE_PACK", "1")
    packed, inputs_packed, launches_packed = closes()
    assert len(packed) == len(apart) and launches_packed == launches
    parts = {"cw", "ls", "cn", "eps"}
    assert all("_cp" in form and "cp" in names and not parts & set(names) for form, names in packed)
    assert inputs_packed == inputs_apart - sum(len(parts & set(names)) - 1 for _, names in apart)


def test_the_traced_steps_closes_give_packed_rows_when_switched_on(monkeypatch):
    """GEMMA4_MLX_CLOSE_ROWS=1 (CUDA's default since session 42): in the traced decode step every closing launch
    gives one output where it gave two (the new residual and the next norm or PLE gate, packed rows), with as
    many launches; its readers take the packed array itself, so a PLE projection's close reads its residual from
    its x (no ``res`` input) and the projections that read a norm's lane read the packed output (an activation
    twice as wide). Off, the closes with a next norm or a gate give two outputs and each reads its own ``res``."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")

    def step(rows):
        monkeypatch.setenv("GEMMA4_MLX_CLOSE_ROWS", rows)
        found = step_inputs.classify(step_inputs.record("tiny", True))
        closes = [(form, [n for n, _, _ in k], outs) for form, k, outs in found if "/close" in form]
        return found, closes

    apart, closes_apart = step("0")
    packed, closes_packed = step("1")
    assert len(packed) == len(apart) and len(closes_packed) == len(closes_apart)
    assert any(outs == 2 for _, _, outs in closes_apart) and all("res" in names for _, names, _ in closes_apart)
    assert all(outs == 1 for _, _, outs in closes_packed)
    assert all("_rows" in form for form, _, outs in closes_packed if "close_out" not in form or "_gate" in form)
    ple_closes = [names for form, names, _ in closes_packed if "_rx" in form]
    assert ple_closes and all("res" not in names for names in ple_closes)
    outputs = lambda rows: sum(outs for _, _, outs in rows)  # noqa: E731
    assert outputs(packed) == outputs(apart) - sum(outs - 1 for _, _, outs in closes_apart)
    assert any("_x" in form for form, _, _ in packed if form.startswith(("qmv/bare", "mv/bare")))
