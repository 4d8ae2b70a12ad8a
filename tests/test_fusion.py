"""Joined q/k/v and gate/up projections of the decode step: same logits, no extra memory, rebuilt
from the current modules whenever they change."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from gemma4_mlx import Model, ops, parse_config
from gemma4_mlx.presets import preset_config


def _model(preset: str, seed: int = 0) -> Model:
    model = Model(parse_config(preset_config(preset)))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0),
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def _decode_logits(model, monkeypatch, compiled=True, steps=6):
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1" if compiled else "0")
    cache = model.make_cache()
    model(mx.array([[3, 9, 4, 1, 7, 2, 8, 5, 6, 11]]), cache=cache)
    return np.concatenate([np.array(model(mx.array([[t]]), cache=cache)) for t in range(12, 12 + steps)])


def _fused_modules(model):
    """(owner module, joined projection) of the model's current decode state."""
    dec = model.__dict__.get("_decoder")
    if dec is None or not dec.current():
        return []
    return [(f.owner, f) for f in dec.joined.values()]



@pytest.mark.parametrize("preset", ["tiny", "tiny-e4b", "tiny-moe", "tiny-31b"])
def test_fused_projections_give_the_same_logits(preset, monkeypatch):
    plain = _model(preset)
    want = _decode_logits(plain, monkeypatch, compiled=False)
    fused = _model(preset)
    fused.fuse_projections()
    pairs = _fused_modules(fused)
    # every MLP and every attention with its own k (q/k/v, or q/k where k doubles as v)
    assert len(pairs) == sum(1 + (not p.is_kv_shared) for p in fused.args.plan)
    for compiled in (False, True):
        got = _decode_logits(fused, monkeypatch, compiled=compiled)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(f.holds() for _, f in _fused_modules(fused))


def test_members_become_views_of_one_matrix():
    model = _model("tiny")
    names = [k for k, _ in tree_flatten(model.parameters())]
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(model.parameters())
    mx.clear_cache()
    used = mx.get_active_memory()
    model.fuse_projections()
    mx.clear_cache()
    # the separate matrices are released: the joined ones replace them, not add to them
    assert mx.get_active_memory() <= used * 1.02
    after = dict(tree_flatten(model.parameters()))
    assert list(after) == names
    for k, v in after.items():
        np.testing.assert_array_equal(np.array(v), before[k])
    attn = model.layers[0].self_attn
    f = dict((id(m), j) for m, j in _fused_modules(model))[id(attn)]
    assert f.joint.weight.shape[0] == sum(attn[n].weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))


def test_saved_weights_are_unchanged_by_fusion(tmp_path):
    model = _model("tiny-e4b")
    model.fuse_projections()
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    loaded = mx.load(str(path))
    for k, v in tree_flatten(model.parameters()):
        assert mx.array_equal(loaded[k], v), k


def test_quantized_projections_fuse_only_when_formats_match(monkeypatch):
    plain, fused = _model("tiny-31b"), _model("tiny-31b")

    def bits(path, module):  # a mixed checkpoint: k at 8 bits in layer 0
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 32:
            return False
        return {"group_size": 32, "bits": 8 if path.endswith("layers.0.self_attn.k_proj") else 4}

    for m in (plain, fused):
        nn.quantize(m, class_predicate=bits)
    want = _decode_logits(plain, monkeypatch)
    fused.fuse_projections()
    joined = dict((id(m), j) for m, j in _fused_modules(fused))
    assert id(fused.layers[0].self_attn) not in joined  # 4-bit q, 8-bit k: left apart
    assert id(fused.layers[0].mlp) in joined
    assert isinstance(joined[id(fused.layers[1].self_attn)].joint, nn.QuantizedLinear)
    np.testing.assert_allclose(_decode_logits(fused, monkeypatch), want, rtol=1e-5, atol=1e-5)


def test_new_weights_undo_the_fusion(monkeypatch):
    model, other = _model("tiny"), _model("tiny", seed=3)
    model.fuse_projections()
    _decode_logits(model, monkeypatch)
    model.update(other.parameters())  # through the model: the joined copies no longer hold
    assert not _fused_modules(model)
    np.testing.assert_allclose(_decode_logits(model, monkeypatch), _decode_logits(other, monkeypatch),
                               rtol=1e-5, atol=1e-5)
    assert _fused_modules(model)  # joined again for the new trace
    # a weight assigned directly on a member, after the step was traced: seen at the next call
    q = model.layers[0].self_attn.q_proj
    q.weight = other.layers[0].self_attn.q_proj.weight * 2
    q2 = other.layers[0].self_attn.q_proj
    q2.weight = q2.weight * 2
    for compiled in (True, False):
        np.testing.assert_allclose(_decode_logits(model, monkeypatch, compiled=compiled),
                                   _decode_logits(other, monkeypatch, compiled=compiled), rtol=1e-5, atol=1e-5)


def test_loading_joins_the_projections_without_a_second_copy(tmp_path, monkeypatch):
    """At load (where the compiled step runs) the joined matrices are read from the files while
    the weights are still lazy: the peak is the model's size, not the model plus a joined copy."""
    import gc

    from gemma4_mlx import load_model
    from gemma4_mlx.checkpoint import write_random_checkpoint

    path = write_random_checkpoint("tiny-31b", tmp_path / "m", dtype="float32", seed=1)
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    gc.collect()
    mx.clear_cache()
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    from gemma4_mlx import decode

    evaluations = []
    real = decode._evaluate
    monkeypatch.setattr(decode, "_evaluate", lambda group: (evaluations.append(len(group)), real(group)))
    from gemma4_mlx.kernels import dispatch

    constants_before = set(dispatch._constants)
    model = load_model(path)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    joined = sum(f.joint.weight.nbytes for _, f in _fused_modules(model))
    assert joined > 0.5 * weights  # q/k/v and gate/up are most of the model
    # on CUDA the kernels' device constants made at load: a buffer each, and the making's two
    # temporaries (a cost per distinct value, whatever the weights' size)
    made = len(set(dispatch._constants) - constants_before)
    extra = (made + 2) * dispatch.CONSTANT_BYTES if made else 0
    assert mx.get_peak_memory() - start < weights + 0.25 * joined + extra, (
        mx.get_peak_memory() - start, weights, joined, made)
    # every joint evaluated once, in groups of about an eighth of the joined bytes (this small
    # model's 8 joints: one each; E2B's 70: 8 or 9 groups)
    assert sum(evaluations) == len(_fused_modules(model)) and len(evaluations) <= decode.JOIN_GROUPS + 1


def test_joints_are_evaluated_a_group_at_a_time(tmp_path, monkeypatch):
    """Not one evaluation per module (each a round trip to the files at load): groups by bytes."""
    from gemma4_mlx import decode, load_model
    from gemma4_mlx.checkpoint import write_random_checkpoint

    path = write_random_checkpoint("tiny-31b", tmp_path / "m", dtype="float32", seed=1)
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setattr(decode, "JOIN_GROUPS", 2)
    evaluations = []
    real = decode._evaluate
    monkeypatch.setattr(decode, "_evaluate", lambda group: (evaluations.append(len(group)), real(group)))
    model = load_model(path)
    assert sum(evaluations) == len(_fused_modules(model)) == 8 and len(evaluations) <= 3, evaluations
    for _, joined in _fused_modules(model):
        assert joined.holds()  # every member a view of its evaluated joint


def test_quantized_joins_keep_mlx_cuda_matvec(monkeypatch, qmv_size_rule):
    """On an sm90 GPU MLX runs a one-row quantized matmul with its matrix-vector kernel only up to
    16,384 outputs and inputs: where MLX's kernel would run the joint (8-bit below qmv's size rule,
    or qmv off), members that each fit are not joined past that (E2B's double-wide gate/up, 31B's
    global q/k), members already past it or a joint within it still are; a joint our qmv takes is
    joined (every 4-bit one on CUDA since session 22); elsewhere (Metal, other GPUs, the CPU) every
    compatible set is joined."""
    from gemma4_mlx import decode

    def quantized(rows, cols=256, bits=8):
        layer = nn.QuantizedLinear(cols, rows, bias=False, group_size=64, bits=bits)
        mx.eval(layer.parameters())
        return layer

    double_wide = [quantized(12288), quantized(12288)]  # 24,576 joined
    small = [quantized(8192), quantized(4096), quantized(4096)]  # 16,384 joined: still in
    past = [quantized(21504), quantized(21504)]  # each already past the line
    monkeypatch.setattr(decode, "_sm90_quantized_dispatch", lambda: True)
    monkeypatch.setattr("gemma4_mlx.kernels.qmv.MIN_VALUES", qmv_size_rule)  # the package's own
    for big in ([quantized(10240, cols=2560, bits=4), quantized(10240, cols=2560, bits=4)],  # E4B's gate/up
                [quantized(12288, bits=4), quantized(12288, bits=4)]):  # E2B's 4-bit double-wide gate/up
        assert decode.JoinedProjection.compatible(big)  # our qmv takes the joint
        monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", "qmv")  # MLX's kernels then: the line holds
        assert not decode.JoinedProjection.compatible(big)
        monkeypatch.delenv("GEMMA4_MLX_KERNELS_DISABLE")
    assert not decode.JoinedProjection.compatible(double_wide)
    assert decode.JoinedProjection.compatible(small)
    assert decode.JoinedProjection.compatible(past)
    assert not decode.JoinedProjection.compatible([quantized(8192), quantized(10240)])  # 18,432
    wide_inputs = [quantized(4096, cols=21504), quantized(4096, cols=21504)]  # K past the line
    assert decode.JoinedProjection.compatible(wide_inputs)
    monkeypatch.setattr(decode, "_sm90_quantized_dispatch", lambda: False)
    assert decode.JoinedProjection.compatible(double_wide)
    assert decode.JoinedProjection.compatible([quantized(8192), quantized(10240)])
