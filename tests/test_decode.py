"""The compiled one-token decode step gives the eager path's logits and leaves mlx-lm caches intact."""

from __future__ import annotations

import contextlib
import copy
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config, step_context
from gemma4_mlx.presets import preset_config


# float32 on a GPU: MLX's CUDA matmuls run in TF32 (10-bit mantissa), and the two paths compared
# multiply differently shaped matrices (the decode step joins q/k/v and gate/up), so their
# results differ by TF32 rounding, compounded over layers and steps: measured up to 3.4e-3 of
# the largest logit on an H200 (2026-11-28). A logic error (slot, window, mask) shows as O(1).
GPU_F32_TOL = 1e-2


def _assert_kernel_logits_close(on, off, truth, dtype, gpu):
    """Logits with kernels (``on``) against without (``off``): float32 within the tolerance (the
    GPU's), bfloat16 no further from the float32 ``truth`` than the MLX op sequence is (bf16
    rounding moves random-weight logits a lot either way)."""
    if dtype == mx.float32:
        tol = GPU_F32_TOL if gpu else 1e-4
        assert np.max(np.abs(on - off)) <= tol * np.max(np.abs(off)), np.max(np.abs(on - off))
    else:
        err_on, err_off = np.abs(on - truth).max(), np.abs(off - truth).max()
        assert err_on <= 1.5 * err_off + 1e-2, (err_on, err_off)


def _random_model(preset: str, seed: int = 0) -> Model:
    model = Model(parse_config(preset_config(preset)))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0)),
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def _greedy(model, prompt, steps, monkeypatch, compiled: bool, feed=None):
    """Greedy decoding; with ``feed`` (a token list per step) teacher-forced on those tokens."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1" if compiled else "0")
    cache = model.make_cache()
    logits = model(prompt, cache=cache)
    y = mx.argmax(logits[:, -1], axis=-1)
    tokens, rows = [], []
    for i in range(steps):
        if feed is not None:
            y = mx.array(feed[i - 1], dtype=y.dtype) if i else y
        logits = model(y[:, None], cache=cache)
        y = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(y.tolist())
        rows.append(np.array(logits[:, -1]))
    return tokens, np.stack(rows), cache


def _step_graph(model):
    """The primitives of one compiled decode step (after its trace) and its logits."""
    import collections
    import io
    import re

    cache = model.make_cache()
    prompt = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, 9)))
    mx.eval(model(prompt, cache=cache))
    mx.eval(model(mx.array([[3]]), cache=cache))
    out = model(mx.array([[4]]), cache=cache)
    dot = io.StringIO()
    mx.export_to_dot(dot, out, *[a for c in cache if getattr(c, "keys", None) is not None for a in (c.keys, c.values)])
    return collections.Counter(re.findall(r'label ="([A-Za-z_0-9]+)', dot.getvalue())), np.array(out)


ALL_KERNELS = ("mv,qmv,q_norm_rope,kv_norm_rope,attention,attention_prefix,ple_combine,ple_gate,residual_norm,"
               "ple_tail,scale,geglu,embed")


@pytest.mark.parametrize("kernel_path", [False, True], ids=["mlx", "kernels-falling-back"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_step_multiplies_by_evaluated_weight_transposes(preset, kernel_path, monkeypatch):
    """The compiled step multiplies by transposes evaluated before its trace: no Transpose (and
    for one row no Flatten/Unflatten) per projection in the graph it replays at every step, and
    the very same logits. Also where the matvec kernels are asked first and fall back (a GPU with
    ``mv`` off: here the backend is forced and every kernel switched off). On a GPU the first case
    switches the matvecs off (``mv`` is on there by default and reads the weights untransposed)."""
    import contextlib

    from gemma4_mlx.kernels import dispatch

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model(preset)
    with contextlib.ExitStack() as stack:
        if not kernel_path and dispatch.active_backend() is not None:
            default = dispatch.DEFAULT_DISABLED[dispatch.active_backend()]
            monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", default + ",mv,qmv")
        if kernel_path:
            monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", ALL_KERNELS)
            stack.enter_context(dispatch.force_backend("cuda"))
        ops_with, logits_with = _step_graph(model)
        monkeypatch.setenv("GEMMA4_MLX_TRANSPOSES", "0")  # the switch rebuilds the decoder without them
        ops_without, logits_without = _step_graph(model)
    dispatch.reset()
    assert np.array_equal(logits_with, logits_without)
    projections = 3 * len(model.layers) + 1  # at least q (or q/k/v), o, the MLP's in and out; the head
    for name in ("Transpose", "Flatten", "Unflatten"):
        assert ops_without[name] - ops_with[name] >= projections, name
    assert ops_with["Matmul"] == ops_without["Matmul"]


def test_step_gives_the_experts_gathers_their_batch_indices(monkeypatch):
    """In the compiled step the experts' three gathers a MoE layer take their batch indices as
    constants of the trace (ops.switch_glu): no Arange per product, the very same logits as the
    module's own SwitchGLU call."""
    from gemma4_mlx import ops

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny-moe")
    ops_with, logits_with = _step_graph(model)
    monkeypatch.setenv("GEMMA4_MLX_EXPERT_INDICES", "0")  # the switch rebuilds the step without them
    ops_without, logits_without = _step_graph(model)
    assert np.array_equal(logits_with, logits_without)
    n_moe = sum(p.moe for p in model.args.plan)
    assert n_moe > 0 and ops_without["Arange"] - ops_with["Arange"] == 3 * n_moe, (ops_with, ops_without)


def test_step_settings_follow_the_form_signatures_switch(monkeypatch):
    """The traced step's launches take their signatures from GEMMA4_MLX_FORM_SIGNATURES: a step
    traced under one value is not replayed under the other (the settings it is held against
    differ)."""
    from gemma4_mlx import decode

    monkeypatch.delenv("GEMMA4_MLX_FORM_SIGNATURES", raising=False)
    per_form = decode._switches()
    monkeypatch.setenv("GEMMA4_MLX_FORM_SIGNATURES", "0")
    assert decode._switches() != per_form


def test_step_writes_each_cache_buffer_by_a_scatter(monkeypatch):
    """Each cache the step writes takes its new key and value by a scatter along the position
    axis, not by MLX's DynamicSliceUpdate: on CUDA (MLX 0.32) that launches a thread per element
    of the whole buffer, ~23 us a write at a 512-slot window and more as the context grows."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny")
    ops, logits = _step_graph(model)
    own_kv = sum(1 for layer in model.layers if not layer.plan.is_kv_shared)
    assert ops["DynamicSliceUpdate"] == 0 and ops["SliceUpdate"] == 0, ops
    assert ops["ScatterAxis"] == 2 * own_kv, (ops["ScatterAxis"], own_kv)
    # the switch for ablations: the step is traced again, with the slice update, to the same logits
    monkeypatch.setenv("GEMMA4_MLX_KV_WRITE", "slice")
    ops_slice, logits_slice = _step_graph(model)
    assert ops_slice["ScatterAxis"] == 0 and ops_slice["DynamicSliceUpdate"] == 2 * own_kv, ops_slice
    assert np.array_equal(logits, logits_slice)


def test_one_trace_whatever_the_id_dtype(monkeypatch):
    """mlx-lm's generate feeds the prompt's last id (int32) to the first step and sampled ids
    (uint32) after it: one trace serves both (each dtype was its own trace, and on a fresh GPU
    machine its own MLX-compiled kernels), with the logits of the eager step."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny")
    prompt = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, size=(1, 12)), dtype=mx.int32)
    cache = model.make_cache()
    model(prompt[:, :-1], cache=cache)
    y = prompt[:, -1:]
    for dtype in (mx.int32, mx.uint32, mx.int64, mx.uint32):
        eager_cache = [copy.deepcopy(c) for c in cache]
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
        want = model(y.astype(dtype), cache=eager_cache)
        mx.eval(want)  # before the compiled step writes its cache buffers in place
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
        got = model(y.astype(dtype), cache=cache)
        assert np.allclose(np.array(got), np.array(want), atol=1e-4, rtol=0), dtype
        y = mx.argmax(got[:, -1:], axis=-1)
    assert model._decoder.counts["traces"] == 1


_STEP_WITH_SCALARS = """
import sys
import mlx.core as mx
import mlx.nn as nn
from gemma4_mlx import Model, parse_config
from gemma4_mlx.presets import preset_config
mx.set_default_device(mx.cpu)  # the CPU writes its fused kernels under TMPDIR (a GPU: elsewhere, with ours)
model = Model(parse_config(preset_config("tiny")))
mx.eval(model.parameters())
for i, layer in enumerate(model.layers):  # a real checkpoint's layer_scalar differs per layer
    layer.layer_scalar = mx.array([1.0 if sys.argv[1] == "ones" else 0.5 + 0.1 * i])
cache = model.make_cache()
mx.eval(model(mx.array([[5, 6, 7, 8]]), cache=cache))
for _ in range(2):
    mx.eval(model(mx.array([[9]], dtype=mx.uint32), cache=cache))
"""


def test_step_kernels_do_not_depend_on_the_layer_scalars(tmp_path):
    """MLX bakes a size-1 array the trace captured into the fused kernel's source and names the
    kernel after its value: a layer_scalar multiplied in the step's close made one kernel per
    distinct value, i.e. per layer with a real checkpoint (random ones have ones), each compiled
    by MLX's JIT on a fresh GPU machine. The CPU compiles the same fused kernels into a folder
    under TMPDIR, named the same way: per-layer values may add none."""
    import glob
    import os
    import subprocess

    def kernels_after(values: str) -> int:
        env = dict(os.environ, TMPDIR=str(tmp_path), GEMMA4_MLX_COMPILE="1")
        r = subprocess.run([sys.executable, "-c", _STEP_WITH_SCALARS, values], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return len(glob.glob(str(tmp_path / "mlx" / "*" / "cpu" / "*.so")))

    with_ones = kernels_after("ones")
    assert with_ones > 0  # the step compiled fused kernels (into this folder)
    assert kernels_after("per-layer") == with_ones


_PREFILL_THEN_STEP = """
import glob, json, os, sys
import mlx.core as mx
import mlx.nn as nn
from gemma4_mlx import Model, parse_config
from gemma4_mlx.presets import preset_config
def kernels():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(os.environ["TMPDIR"], "mlx", "*", "cpu", "*.so")))
mx.set_default_device(mx.cpu)  # the op path, as the CPU compiles it under TMPDIR (a GPU runs our kernels there)
model = Model(parse_config(preset_config("tiny")))
mx.eval(model.parameters())
cache = model.make_cache()
mx.eval(model(mx.array([[5, 6, 7, 8, 9, 10]]), cache=cache))
prefill = kernels()
for _ in range(2):
    mx.eval(model(mx.array([[9]], dtype=mx.uint32), cache=cache))
print(json.dumps({"prefill": prefill, "step": sorted(set(kernels()) - set(prefill))}))
"""


def test_step_reuses_the_prefills_geglu_and_softcap_kernels(tmp_path):
    """The GeGLU and the logit soft-cap are traced per shape (mlx-lm's are shapeless), so the
    prefill fuses them into the very kernels the decode step's trace makes: the step adds no
    kernel of its own for them, and its id clamp is a single minimum, fused with nothing (each
    was a JIT compile of 3-7 s on a fresh GPU machine). The CPU compiles the same fused kernels,
    named by their tapes, under TMPDIR."""
    import json
    import os
    import subprocess

    env = dict(os.environ, TMPDIR=str(tmp_path), GEMMA4_MLX_COMPILE="1")
    r = subprocess.run([sys.executable, "-c", _PREFILL_THEN_STEP], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    tanh = [k for k in seen["prefill"] if "Tanh" in k]
    assert any("Power" in k for k in tanh) and any("Divide" in k for k in tanh)  # the GeGLU, the soft-cap
    assert seen["step"] and not [k for k in seen["step"] if "Tanh" in k or "Minimum" in k], seen["step"]


@pytest.mark.parametrize("preset,shared", [("tiny", False), ("tiny-e4b", False), ("tiny-moe", False),
                                           ("tiny-31b", False), ("tiny", True), ("tiny-moe", True)])
def test_compiled_decode_matches_eager(preset, shared, monkeypatch):
    """``shared``: GEMMA4_MLX_SHARED_SLOTS=1, the caches of one shape and next slot take one slot
    index (off by default until a GPU has run this)."""
    monkeypatch.setenv("GEMMA4_MLX_SHARED_SLOTS", "1" if shared else "0")
    model = _random_model(preset)
    prompt = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, size=(2, 21)))
    # 260 steps: many wraps of the 8-token window and one growth of the full-attention buffer
    steps = 260
    eager_tokens, eager_rows, eager_cache = _greedy(model, prompt, steps, monkeypatch, compiled=False)
    assert model.__dict__.get("_decoder") is None
    # Fed the eager run's tokens, so a near-tie that rounds differently cannot derail the rest.
    tokens, rows, cache = _greedy(model, prompt, steps, monkeypatch, compiled=True, feed=eager_tokens)
    tol = 1e-4 if mx.default_device() == mx.cpu else GPU_F32_TOL
    assert np.max(np.abs(rows - eager_rows)) <= tol * np.max(np.abs(eager_rows))
    assert np.mean(np.array(tokens) == np.array(eager_tokens)) > 0.9
    # compiled steps ran: the first step at a new buffer shape is traced (the full-attention
    # buffer grew once), none ran uncompiled
    assert model._decoder.counts["traces"] == 2
    # caches are left as mlx-lm's own update_and_fetch leaves them
    for ours, theirs in zip(cache, eager_cache):
        assert type(ours) is type(theirs) and ours.offset == theirs.offset
        if ours.empty():  # a KV-shared layer's placeholder
            continue
        a, b = ours.state[0], theirs.state[0]
        assert a.shape == b.shape
        if mx.default_device() == mx.cpu:
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
        else:
            assert np.max(np.abs(np.array(a) - np.array(b))) <= GPU_F32_TOL * np.max(np.abs(np.array(b)))


@pytest.mark.parametrize("shared", [False, True], ids=["own slots", "shared slots"])
@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_decode_with_the_default_kernels_matches_eager(rows, shared, monkeypatch):
    """A model whose shapes every default kernel takes (head dims 64 / 128, PLE 64, a window of 16
    that the steps wrap), float32: its compiled steps against the eager model's, one and two rows,
    fed the same tokens. On a GPU the compiled step runs every default kernel and the eager one MLX's
    ops, so this compares the two paths as a user's generation meets them (session 23's views cut
    passed every kernel-against-kernel parity test and failed here, two rows, on the H200); on the
    CPU both are MLX's ops. ``shared``: GEMMA4_MLX_SHARED_SLOTS=1 (session 27, off by default)."""
    monkeypatch.setenv("GEMMA4_MLX_SHARED_SLOTS", "1" if shared else "0")
    model = _kernel_shaped_model(seed=12)
    prompt = mx.array(np.random.default_rng(13).integers(0, model.args.vocab_size, size=(rows, 11)))
    eager_tokens, eager_rows, _ = _greedy(model, prompt, 24, monkeypatch, compiled=False)
    _, compiled_rows, _ = _greedy(model, prompt, 24, monkeypatch, compiled=True, feed=eager_tokens)
    tol = 1e-4 if mx.default_device() == mx.cpu else GPU_F32_TOL
    err = np.abs(compiled_rows - eager_rows).max(axis=(1, 2))
    assert err.max() <= tol * np.max(np.abs(eager_rows)), err
    assert model._decoder.counts["traces"] >= 1


def test_prompt_cache_round_trip_after_compiled_decode(tmp_path, monkeypatch):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    model = _random_model("tiny")
    prompt = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    _, _, cache = _greedy(model, prompt, 12, monkeypatch, compiled=True)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    nxt = mx.array([[3]])
    a = model(nxt, cache=cache)
    b = model(nxt, cache=loaded)
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_long_run_matches_the_full_sequence(monkeypatch):
    """Thousands of tokens, hundreds of sliding-window wraps: the compiled cached decode gives
    the logits of one full-sequence pass (the reference) at every position."""
    model = _random_model("tiny", seed=3)
    n = 2000
    ids = mx.array(np.random.default_rng(5).integers(0, model.args.vocab_size, size=(1, n)))
    full = np.array(model(ids)[0])
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    cache = model.make_cache()
    rows = [np.array(model(ids[:, :16], cache=cache)[0])]
    for i in range(16, n):
        rows.append(np.array(model(ids[:, i : i + 1], cache=cache)[0]))
    stepped = np.concatenate(rows)
    assert np.isfinite(stepped).all()
    err = np.max(np.abs(stepped - full)) / np.max(np.abs(full))
    assert err < (1e-4 if mx.default_device() == mx.cpu else GPU_F32_TOL), err
    assert (stepped.argmax(-1) == full.argmax(-1)).mean() > 0.99


def test_no_nan_at_extreme_positions_and_logits():
    from gemma4_mlx import ops
    from gemma4_mlx.config import rope_inv_freq

    for rope_type, factor in (("default", 1.0), ("proportional", 0.25)):
        inv = rope_inv_freq(rope_type, 1e6, 64, factor)
        inv_a = mx.array(inv)
        freqs = mx.array(np.where(inv > 0, 1 / np.where(inv > 0, inv, 1), np.inf).astype(np.float32))
        q = mx.random.normal((1, 3, 2, 64))
        for offset in (0, 131072, 10**7, 2**31 - 8):
            out = ops.q_norm_rope(q, mx.ones((64,)), inv_a, freqs, offset, 1e-6)
            assert np.isfinite(np.array(out)).all(), (rope_type, offset)
    huge = mx.array([1e30, -1e30, 3e38, 0.0], dtype=mx.float32)
    capped = np.array(ops.softcap(huge, 30.0))
    assert np.isfinite(capped).all() and np.abs(capped).max() <= 30.0
    assert np.isfinite(np.array(ops.softcap(huge.astype(mx.bfloat16), 30.0).astype(mx.float32))).all()


def _kernel_shaped_model(seed=0):
    """A small model whose head dims (64 / 128) and PLE width (64) are ones the kernels take."""
    cfg = preset_config("tiny")
    cfg.update(hidden_size=128, head_dim=64, global_head_dim=128, hidden_size_per_layer_input=64,
               intermediate_size=256, sliding_window=16)
    model = Model(parse_config(cfg))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: (1.0 + 0.1 * mx.random.normal(p.shape)) if p.ndim == 1
                          else 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_logits_with_kernels_equal_logits_without(dtype, monkeypatch):
    """One switch sends every op to the kernels: prefill and compiled decode agree with
    ``GEMMA4_MLX_KERNELS=off``. On a GPU the kernels run; on the CPU the backend is forced, the
    kernels fail to build there and the dispatcher's references run (checking that path)."""
    import warnings

    from gemma4_mlx.kernels import dispatch

    model = _kernel_shaped_model()
    ids = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, size=(1, 40)))

    def run(mode):
        monkeypatch.setenv("GEMMA4_MLX_KERNELS", mode)
        monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", "")  # every kernel, mv included
        dispatch.reset()
        model.reset_compiled()
        cache = model.make_cache()
        out = [model(ids[:, :30], cache=cache)]
        out += [model(ids[:, i : i + 1], cache=cache) for i in range(30, 40)]
        return np.concatenate([np.array(o.astype(mx.float32)) for o in out], axis=1)

    truth = run("off")  # float32
    model.set_dtype(dtype)
    off = run("off")
    gpu = dispatch.active_backend() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if gpu:
            on = run("auto")
        else:
            with dispatch.force_backend("cuda"):
                on = run("auto")
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


def _counted(calls: dict, references: dict) -> dict:
    """Kernel overrides that run each name's reference and count its calls in ``calls``."""
    def counting(name, reference):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return reference(*args)
        return run

    return {name: counting(name, reference) for name, reference in references.items()}


def _logits_with_kernels(model, ids, prefill: int, monkeypatch, mode: str, disable: str, overrides: dict, gpu: bool):
    """Prefill ``ids[:, :prefill]``, then decode the rest one token at a time through the compiled
    step, with ``GEMMA4_MLX_KERNELS=mode``, ``..._DISABLE=disable`` and the kernels in
    ``overrides`` replaced (the backend forced to CUDA where there is no GPU): every logit."""
    import contextlib

    from gemma4_mlx.kernels import dispatch

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", mode)
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", disable)
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    dispatch.reset()
    model.reset_compiled()
    with contextlib.ExitStack() as stack:
        if not gpu:
            stack.enter_context(dispatch.force_backend("cuda"))
        for name, fn in overrides.items():
            stack.enter_context(dispatch.override_kernel(name, fn))
        cache = model.make_cache()
        out = [model(ids[:, :prefill], cache=cache)]
        out += [model(ids[:, i : i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
        return np.concatenate([np.array(o.astype(mx.float32)) for o in out], axis=1)


# the kernels a CPU wiring test switches off, leaving residual_norm (the closes) and scale
_ALL_BUT_CLOSES_AND_SCALES = ",mv,qmv,q_norm_rope,kv_norm_rope,attention,attention_prefix,ple_combine,ple_gate,geglu,embed"


def test_device_constants_are_made_once_off_the_trace_with_their_values(monkeypatch):
    """``dispatch.constant`` (GEMMA4_MLX_DEVICE_CONSTANTS=1, CUDA): the values, shape (n,) and dtype
    of ``mx.array``, rounded through ``via`` first; made once per values (the same array again) by
    the maker's thread, so a traced function can take one it has not seen; on by default; switched
    off (``0``) or off CUDA, a plain ``mx.array`` each time."""
    import threading

    from gemma4_mlx.kernels import dispatch

    made = []
    real = dispatch._make_constant

    def spy(*args):
        made.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(dispatch, "_make_constant", spy)
    monkeypatch.setattr(dispatch, "_constants", {})
    monkeypatch.setenv(dispatch.DEVICE_CONSTANTS_ENV, "0")
    with dispatch.force_backend("cuda"):
        assert not dispatch.device_constants()
        assert dispatch.constant(1e-6, mx.float32) is not dispatch.constant(1e-6, mx.float32) and not made
    monkeypatch.delenv(dispatch.DEVICE_CONSTANTS_ENV)
    assert dispatch.active_backend() == "cuda" or not dispatch.device_constants()  # CUDA only
    with dispatch.force_backend("metal"):
        assert not dispatch.device_constants()
    with dispatch.force_backend("cuda"):
        eps = dispatch.constant(1e-6, mx.float32)
        assert eps is dispatch.constant(1e-6, mx.float32) and made == ["gemma4-constants_0"]
        assert eps.shape == (1,) and eps.dtype == mx.float32 and eps.item() == np.float32(1e-6)
        params = dispatch.constant([512, 0, 32, 16, 1], mx.int32)
        assert params.shape == (5,) and params.tolist() == [512, 0, 32, 16, 1]
        third = dispatch.constant(1 / 3, mx.float32, via=mx.bfloat16)
        assert third.item() == mx.array(1 / 3, dtype=mx.bfloat16).astype(mx.float32).item() != np.float32(1 / 3)
        assert dispatch.unit(mx.bfloat16).dtype == mx.bfloat16 and dispatch.unit(mx.bfloat16).item() == 1.0
        scale = mx.compile(lambda x: x * dispatch.constant(0.25, mx.float32))  # first met inside the trace
        assert scale(mx.ones((3,))).tolist() == [0.25] * 3
        packed = mx.array([7, 1, 2, 40, 41], dtype=mx.int32)
        copied = dispatch.device_copy(packed)  # the step's integers: one launch into device memory
        assert copied.shape == (5,) and copied.dtype == mx.int32 and copied.tolist() == [7, 1, 2, 40, 41]
        assert len(made) == 6


def test_decode_with_device_constants_equals_decode_without(monkeypatch):
    """With GEMMA4_MLX_DEVICE_CONSTANTS on (the default) the compiled step takes its position, slots and fill levels
    as one packed array copied in the step, and its constants from ``dispatch.constant``: the same
    logits. On the CPU the backend is forced and the kernels are off but residual_norm (its
    reference) and the scale ops."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx import decode
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU (a GPU runs it in the kernels' parity run)")
    model = _kernel_shaped_model(seed=9)
    ids = mx.array(np.random.default_rng(10).integers(0, model.args.vocab_size, size=(1, 30)))
    disable = dispatch.DEFAULT_DISABLED["cuda"] + _ALL_BUT_CLOSES_AND_SCALES
    overrides = {"residual_norm": K.residual_norm_reference, "scale": K.scale_reference}
    monkeypatch.setattr(dispatch, "_constants", {})
    monkeypatch.setenv(dispatch.DEVICE_CONSTANTS_ENV, "0")
    want = _logits_with_kernels(model, ids, 12, monkeypatch, "strict", disable, overrides, False)
    assert not dispatch._constants
    packed = []
    real = decode.CompiledDecoder.step_args

    def spy(cache, inputs, packed_ints=False, shared=False):
        out = real(cache, inputs, packed_ints, shared)
        packed.append(out is not None and out[0][2] is None)
        return out

    monkeypatch.setattr(decode.CompiledDecoder, "step_args", staticmethod(spy))
    monkeypatch.delenv(dispatch.DEVICE_CONSTANTS_ENV)
    got = _logits_with_kernels(model, ids, 12, monkeypatch, "strict", disable, overrides, False)
    assert packed and all(packed), packed
    # the soft-cap's and the embedding's scale (the kernels' own constants: their parity run on a GPU)
    assert {(30.0,), (model.args.hidden_size**0.5,)} <= {k[0] for k in dispatch._constants}, list(dispatch._constants)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dispatch.reset()


def test_step_integers_advanced_on_the_device_are_the_hosts(monkeypatch):
    """With device constants on, each step computes the next token's position, slots and fill levels
    (step_ints) and the next step takes them where the host's own integers are those: a generation
    whose sliding rings wrap (the tiny 31B's window of 8) and whose full-attention buffers grow
    copies integers from the host only at its first step and where a buffer grew, and gives the
    logits of the steps that copy them at every token (``GEMMA4_MLX_INTS_AHEAD=0``). Two caches
    decoded in turn by one decoder never take each other's integers. The advance rule itself: slots
    wrap at their size, fill levels stop at it, on the host and in MLX alike."""
    from gemma4_mlx import step_ints
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU (a GPU runs it in the decode parity run)")
    limit, reset = step_ints.bounds((8, 40))
    packed = [100, 7, 39, 8, 12]
    want = [101, 0, 0, 8, 13]
    assert step_ints.advance(tuple(packed), limit, reset) == tuple(want)  # the host's form
    assert step_ints.advance(np.array(packed), np.array(limit), np.array(reset), np).tolist() == want
    assert step_ints.advance(mx.array(packed, dtype=mx.int32), mx.array(limit, dtype=mx.int32),
                             mx.array(reset, dtype=mx.int32), mx).tolist() == want

    model = _random_model("tiny-31b", seed=3)
    ids = mx.array(np.random.default_rng(11).integers(0, model.args.vocab_size, size=(2, 40)))
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "off")
    monkeypatch.setattr(dispatch, "_constants", {})
    handed = []
    real = step_ints.IntsAhead.device

    def device(self, ints, copy):  # every step's integers, as the step takes them, are the host's
        out = real(self, ints, copy)
        handed.append(tuple(out.tolist()) == ints)
        return out

    monkeypatch.setattr(step_ints.IntsAhead, "device", device)
    traced = []  # the rule traced into a step: only where the decoder takes its output
    real_advance = step_ints.advance

    def advance(packed, limit, reset, xp=None):
        traced.append(xp is mx)
        return real_advance(packed, limit, reset, xp)

    monkeypatch.setattr(step_ints, "advance", advance)

    def decode(rows, ahead: str):
        """Rows of ``ids`` decoded in turn, one token each, row r from a prompt of 4 + 3r tokens (so
        that no cache's integers are ever the other's next ones); full-attention buffers of 16 slots
        growing by 8."""
        monkeypatch.setenv(step_ints.ENV, ahead)
        model.reset_compiled()
        caches = []
        for r in rows:
            caches.append(model.make_cache())
            model(ids[r:r + 1, :4 + 3 * r], cache=caches[-1])
            for c in caches[-1]:
                if type(c).__name__ == "KVCache":
                    c.keys, c.values = c.keys[..., :16, :], c.values[..., :16, :]
                    c.step = 8
        out = {r: [] for r in rows}
        for i in range(4, ids.shape[1] - 3):
            for r, cache in zip(rows, caches):
                out[r].append(np.array(model(ids[r:r + 1, i + 3 * r:i + 3 * r + 1], cache=cache).astype(mx.float32)))
        return {r: np.concatenate(o, axis=1) for r, o in out.items()}, model._decoder

    with dispatch.force_backend("cuda"):
        assert dispatch.device_constants()
        copied, dec = decode([0], "0")
        assert dec.ints_ahead is None and dec.packed_ints and not any(traced)  # no launch for nothing
        got, dec = decode([0], "1")
        assert any(traced)
        # the first step, then each growth of the full-attention buffers (16 -> 24 -> 32 -> 40 slots)
        assert dec.ints_ahead.copies == 4, dec.ints_ahead.copies
        np.testing.assert_array_equal(got[0], copied[0])
        both, dec = decode([0, 1], "1")
        alone, _ = decode([1], "1")
        np.testing.assert_array_equal(both[0], copied[0])
        np.testing.assert_array_equal(both[1], alone[1])
        assert dec.ints_ahead.copies == 2 * 33, dec.ints_ahead.copies  # each token the other cache's
    assert len(handed) == 33 + 2 * 33 + 33 and all(handed), handed


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
@pytest.mark.parametrize("kernel", ["right", "wrong"])
def test_kernel_checks_started_at_load_run_on_a_thread_once(kernel, monkeypatch):
    """With ``GEMMA4_MLX_CHECK_AHEAD=1`` (off by default: it broke MLX's graph capture on the H200),
    ``decode.prepare`` (at load) self-checks the step's kernels on a thread
    (``dispatch.check_ahead``): the first step waits for them and checks none again, and a kernel
    that failed there is reported at the first step as any failed check is (``strict`` raises,
    ``auto`` takes the reference with the same logits). On the CPU the backend is forced, the
    closes' kernel is residual_norm's reference (or a wrong one) and the other kernels are off."""
    import threading

    import gemma4_mlx.kernels as K
    from gemma4_mlx import decode
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU")
    model = _kernel_shaped_model(seed=7)
    ids = mx.array(np.random.default_rng(8).integers(0, model.args.vocab_size, size=(1, 14)))
    disable = dispatch.DEFAULT_DISABLED["cuda"] + _ALL_BUT_CLOSES_AND_SCALES + ",scale"
    truth = _logits_with_kernels(model, ids, 10, monkeypatch, "off", "", {}, False)

    def broken(*args):
        return [o + 1.0 for o in K.residual_norm_reference(*args)]

    checks = []
    real = dispatch.self_check

    def counted(name, key, *rest):
        checks.append((key, threading.current_thread().name))
        return real(name, key, *rest)

    monkeypatch.setattr(dispatch, "self_check", counted)
    monkeypatch.setattr(dispatch, "ahead_when_forced", True)
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", disable)
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv(dispatch.CHECK_AHEAD_ENV, "1")
    for mode in ("auto", "strict"):
        monkeypatch.setenv("GEMMA4_MLX_KERNELS", mode)
        dispatch.reset()
        model.reset_compiled()
        checks.clear()
        impl = K.residual_norm_reference if kernel == "right" else broken
        with dispatch.force_backend("cuda"), dispatch.override_kernel("residual_norm", impl):
            decode.prepare(model)
            cache = model.make_cache()
            out = [model(ids[:, :10], cache=cache)]
            if kernel == "wrong" and mode == "strict":
                with pytest.raises(K.KernelCheckError, match="residual_norm"):
                    model(ids[:, 10:11], cache=cache)
                continue
            out += [model(ids[:, i:i + 1], cache=cache) for i in range(10, ids.shape[1])]
        got = np.concatenate([np.array(o.astype(mx.float32)) for o in out], axis=1)
        keys = [k for k, _ in checks]
        assert checks and all(t == "gemma4-kernel-checks" for _, t in checks), checks  # none at the first step
        assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {"residual_norm"}, keys
        assert all(ok == (kernel == "right") for k, (ok, _) in dispatch.verdicts().items() if k[0] == "residual_norm")
        np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-4)
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
def test_kernel_checks_wait_for_the_first_step_by_default(monkeypatch):
    """Without ``GEMMA4_MLX_CHECK_AHEAD`` no thread checks kernels at load (on the H200 one broke
    MLX's graph capture in the main thread): the first step checks them, in the main thread, and
    gives the logits of the reference."""
    import threading

    import gemma4_mlx.kernels as K
    from gemma4_mlx import decode
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU")
    model = _kernel_shaped_model(seed=7)
    ids = mx.array(np.random.default_rng(8).integers(0, model.args.vocab_size, size=(1, 12)))
    truth = _logits_with_kernels(model, ids, 10, monkeypatch, "off", "", {}, False)
    checks = []
    real = dispatch.check_all

    collected = []

    def counted(needed, fallbacks=()):
        checks.append(threading.current_thread().name)
        collected.extend(needed)
        return real(needed, fallbacks)

    monkeypatch.setattr(dispatch, "check_all", counted)
    monkeypatch.setattr(dispatch, "ahead_when_forced", True)
    monkeypatch.delenv(dispatch.CHECK_AHEAD_ENV, raising=False)
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", dispatch.DEFAULT_DISABLED["cuda"] + _ALL_BUT_CLOSES_AND_SCALES + ",scale")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "strict")
    dispatch.reset()
    model.reset_compiled()
    started = threading.active_count()
    with dispatch.force_backend("cuda"), dispatch.override_kernel("residual_norm", K.residual_norm_reference):
        decode.prepare(model)
        assert not dispatch._ahead and not dispatch.verdicts() and threading.active_count() <= started
        cache = model.make_cache()
        out = [model(ids[:, :10], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(10, 12)]
        verdicts = dispatch.verdicts()
    got = np.concatenate([np.array(o.astype(mx.float32)) for o in out], axis=1)
    assert checks == [threading.main_thread().name], checks  # the first step checked them
    # every layer calls residual_norm; the dry run hands each kernel and shape class over once (session 39: the
    # builds' prefetch made a probe for every call site, ~0.4 s of E2B 4-bit's first token on the H200)
    keys = [entry[1] for entry in collected]
    assert len(keys) == len(set(keys)) and 0 < sum(k[0] == "residual_norm" for k in keys) < len(model.layers), keys
    assert "residual_norm" in {k[0] for k in verdicts} and all(ok for ok, _ in verdicts.values()), verdicts
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-4)
    dispatch.reset()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_ple_tail_equals_decode_without(dtype, monkeypatch):
    """The one-launch PLE close (``ple_tail``, off by default) switched on gives the compiled decode
    step's logits with it off. On a GPU the kernel runs against the default kernel set
    (``GEMMA4_MLX_KERNELS_DISABLE=mv,qmv`` against ``mv,qmv,ple_tail``); on the CPU the backend is
    forced, every other kernel switched off and the kernel replaced by its reference, which checks
    the wiring (dry run, self-check, the traced step taking it for every PLE layer)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    others = "mv,qmv" if gpu else ("mv,qmv,q_norm_rope,kv_norm_rope,attention,attention_prefix,ple_combine,"
                                   "ple_gate,residual_norm")
    model = _kernel_shaped_model(seed=2)
    HD = model.args.hidden_size
    ids = mx.array(np.random.default_rng(3).integers(0, model.args.vocab_size, size=(1, 40)))
    calls = []

    def spy(*args):
        if tuple(args[0].shape) == (1, 1, HD):  # not the self-check's probe
            calls.append(1)
        return (K.ple_tail_kernel if gpu else K.ple_tail_reference)(*args)

    def run(mode, disable):
        return _logits_with_kernels(model, ids, 30, monkeypatch, mode, disable, {"ple_tail": spy}, gpu)

    truth = run("off", "")  # float32, MLX ops
    model.set_dtype(dtype)
    off = run("auto", others + ",ple_tail")
    assert calls == []
    on = run("auto", others)
    n_ple = sum(p.has_ple for p in model.args.plan)
    assert n_ple > 0 and len(calls) >= n_ple  # traced once: every PLE layer took the kernel
    assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] == "ple_tail")
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_the_moe_close_in_place_equals_decode_without(dtype, monkeypatch):
    """``norm_pair_close`` (on by default on CUDA since session 25): a MoE layer's feed-forward output
    and the layer's close in one launch. Every MoE layer of the traced step takes it (no
    residual_norm launch left after its experts), with the logits of the step without it. On the CPU
    the backend is forced and the kernels are their references (the wiring); on a GPU, CUDA's
    kernels, strict."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    if dtype != mx.float32 and not gpu:
        pytest.skip("MLX's CPU gather_mm (the experts' unquantized products) takes float32 only")
    model = _random_model("tiny-moe", seed=5)
    ids = mx.array(np.random.default_rng(6).integers(0, model.args.vocab_size, size=(1, 20)))
    default = dispatch.DEFAULT_DISABLED["cuda"]
    assert "norm_pair_close" not in default.split(",")
    calls = {"norm_pair_close": 0, "residual_norm": 0}
    overrides = {}
    if not gpu:
        default += ",mv,qmv,mv_close,qmv_close,q_norm_rope,kv_norm_rope,attention,attention_prefix,scale,geglu"
        overrides = _counted(calls, {"norm_pair_close": K.norm_pair_close_reference,
                                     "residual_norm": K.residual_norm_reference, "norm_pair": K.norm_pair_reference,
                                     "moe_topk": K.moe_topk_reference})
    mode = "strict" if gpu else "auto"
    truth = _logits_with_kernels(model, ids, 12, monkeypatch, "off", "", {}, True)
    model.set_dtype(dtype)
    off = _logits_with_kernels(model, ids, 12, monkeypatch, mode, default + ",norm_pair_close", overrides, gpu)
    before = dict(calls)
    on = _logits_with_kernels(model, ids, 12, monkeypatch, mode, default, overrides, gpu)
    if gpu:
        assert any(k[0] == "norm_pair_close" for k in dispatch.verdicts()), dispatch.verdicts()
    else:  # traced once: every MoE layer closed in place, none by residual_norm after its experts
        n_moe = sum(p.moe for p in model.args.plan)
        assert before["norm_pair_close"] == 0 and calls["norm_pair_close"] >= n_moe, calls
        assert calls["residual_norm"] - before["residual_norm"] <= before["residual_norm"] - n_moe, calls
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_the_moe_kernels_equals_decode_without(dtype, monkeypatch):
    """A MoE layer's small ops in the decode step, ``norm_pair`` (the router's and the experts'
    input norms; the experts' mixture, the dense and expert branches' closing norms and sum) and
    ``moe_topk`` (the router's choice), give the step's logits without them, and every MoE layer
    takes both forms of the one and the other. On a
    GPU the kernels run against the default set; on the CPU the backend is forced, the other
    kernels are off and these two are their references (the wiring: dry run, self-check, the
    traced step taking them in every MoE layer)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    if dtype != mx.float32 and not gpu:
        pytest.skip("MLX's CPU gather_mm (the experts' unquantized products) takes float32 only")
    # norm_pair's mixture form closes the layer itself where norm_pair_close is on (its own test below)
    base = dispatch.DEFAULT_DISABLED["cuda"] + ",norm_pair_close"
    others = base if gpu else (base + ",mv,qmv,q_norm_rope,kv_norm_rope,attention,attention_prefix,residual_norm,"
                               "scale,geglu")
    model = _random_model("tiny-moe", seed=3)
    HD = model.args.hidden_size
    ids = mx.array(np.random.default_rng(4).integers(0, model.args.vocab_size, size=(1, 20)))
    calls = {"norm_pair split": 0, "norm_pair mix": 0, "moe_topk": 0}

    def pair(x, x2, *rest):
        if tuple(x.shape) == (1, 1, HD):  # not the self-check's probe
            calls["norm_pair mix" if x2 is not None and rest[-1] is not None else "norm_pair split"] += 1
        return (K.norm_pair_kernel if gpu else K.norm_pair_reference)(x, x2, *rest)

    def topk(scores, *rest):
        if scores.shape[:2] == (1, 1):
            calls["moe_topk"] += 1
        return (K.moe_topk_kernel if gpu else K.moe_topk_reference)(scores, *rest)

    def run(mode, disable):
        return _logits_with_kernels(model, ids, 12, monkeypatch, mode, disable,
                                    {"norm_pair": pair, "moe_topk": topk}, gpu)

    truth = run("off", "")  # float32, MLX ops
    model.set_dtype(dtype)
    off = run("auto", others + ",norm_pair,moe_topk")
    assert not any(calls.values())
    on = run("auto", others)
    n_moe = sum(p.moe for p in model.args.plan)
    assert n_moe > 0 and all(n >= n_moe for n in calls.values()), calls  # traced once: every MoE layer
    assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] in ("norm_pair", "moe_topk"))
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.parametrize("form", ["bf16-mv", "bf16-mv-residual", "f32-mv", "f32-mv-residual", "bf16-qmv4",
                                  "f32-qmv4", "bf16-qmv4-residual", "f32-qmv4-residual"])
def test_decode_with_the_matvec_forms_equals_decode_without(form, monkeypatch):
    """The matvec kernels (``mv``; ``qmv`` for 4-bit) switched on, with their fused forms: every
    joined gate/up projection takes ``*_geglu`` (projection and GeGLU in one launch) and every PLE
    gate ``*_gate``; with residual_norm on too, both take ``*_residual`` instead (the norm ahead
    of them in the same launch), and so does every layer's first projection (the previous layer's
    close, ``ops.PendingClose``). The compiled step's logits stay those of the step without them.
    On a GPU the kernels run (against the default kernel set); on the CPU the backend is forced,
    the other kernels are off and each form is replaced by its reference (the wiring: dry run,
    self-check, the traced step taking it in every layer)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    dtype = mx.bfloat16 if form.startswith("bf16") else mx.float32
    bits = 4 if "qmv4" in form else 0
    prologue = form.endswith("residual")
    gpu = dispatch.active_backend() is not None
    family, other_family = ("qmv", "mv") if bits else ("mv", "qmv")
    others = ["ple_tail"] if gpu else ["q_norm_rope", "kv_norm_rope", "attention", "attention_prefix", "ple_combine",
                                       "ple_gate", "ple_tail"]
    if not prologue:
        others.append("residual_norm")
    else:  # the closes ahead of the products: not in the projections before them (mv_close / qmv_close)
        others += ["mv_close", "qmv_close"]
    model = _kernel_shaped_model(seed=4)
    ids = mx.array(np.random.default_rng(5).integers(0, model.args.vocab_size, size=(1, 24)))
    names = [family, f"{family}_geglu", f"{family}_gate"] + ([f"{family}_residual", "residual_norm"] if prologue else [])
    calls = {name: 0 for name in names}

    def spy(name):
        if name == "residual_norm":
            fn = K.residual_norm_kernel if gpu else K.residual_norm_reference
        elif name.endswith("_residual"):
            prefix = "quantized_residual_matvec" if bits else "residual_matvec"
            fn = getattr(K, f"{prefix}_{'kernel' if gpu else 'reference'}")
        else:
            prefix = "quantized_matvec" if bits else "matvec"
            form_ = name.split("_")[1] if "_" in name else ""
            fn = getattr(K, f"{prefix}{'_' + form_ if form_ else ''}_{'kernel' if gpu else 'reference'}")

        def run(*args):
            if args[0].shape[-1] == model.args.hidden_size and args[0].shape[0] == 1:  # not a probe
                calls[name] += 1
            return fn(*args)
        return run

    def run(mode, disable):
        return _logits_with_kernels(model, ids, 16, monkeypatch, mode, ",".join(disable),
                                    {name: spy(name) for name in calls}, gpu)

    if bits:  # the projections (not the embeddings) quantized, scales in float32 for the truth
        import mlx.nn as nn

        nn.quantize(model, group_size=64, bits=bits, class_predicate=lambda _p, m: isinstance(m, nn.Linear))
    truth = run("off", [])  # float32, MLX ops
    model.set_dtype(dtype)
    off = run("auto", others + [family, other_family])
    assert not any(calls[n] for n in names if n != "residual_norm")
    for n in calls:
        calls[n] = 0
    on = run("auto", others + [other_family])
    n_layers, n_ple = len(model.layers), sum(p.has_ple for p in model.args.plan)
    assert n_ple > 0
    if prologue:  # traced once: every layer's gate/up and every PLE gate took the norm ahead of them,
        # and every layer but the first its predecessor's close with its first projection
        assert calls[f"{family}_residual"] >= 2 * n_layers - 1 + n_ple, (calls, n_layers, n_ple)
        assert calls[f"{family}_geglu"] == calls[f"{family}_gate"] == 0
    else:  # every joined gate/up took *_geglu, every PLE gate *_gate
        assert calls[f"{family}_geglu"] >= n_layers and calls[f"{family}_gate"] >= n_ple
    assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] in calls)
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_the_fused_attention_equals_the_two_passes(dtype, monkeypatch):
    """``attention_fused`` (on by default on CUDA since session 28): the decode step's prefix attention in one launch, the
    last block of each group merging the splits, against the two passes, strict (a failed check
    raises); the fused classes are the ones checked and used, and every launch leaves the counters
    zero. GPU only: the emulator cannot run inside the compiled step (tests/test_kernel_emulator.py
    checks the body)."""
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() != "cuda":
        pytest.skip("the fused attention runs on CUDA (its body: test_kernel_emulator.py)")
    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    model = _kernel_shaped_model(seed=8)
    ids = mx.array(np.random.default_rng(9).integers(0, model.args.vocab_size, size=(1, 24)))
    truth = _logits_with_kernels(model, ids, 16, monkeypatch, "off", "", {}, True)
    model.set_dtype(dtype)
    default = dispatch.DEFAULT_DISABLED["cuda"]
    assert "attention_fused" not in default.split(",")

    def fused(key):  # a verdict's (name, backend, *class key): the fused prefix class (rows, True), whatever
        # geometry or scratch marker the class key carries (attention._key_args leaves them out)
        args = ATT._key_args(key[2:])
        return key[0] == "attention_prefix" and len(args) == 2 and args[-1] is True

    two = _logits_with_kernels(model, ids, 16, monkeypatch, "strict", default + ",attention_fused", {}, True)
    assert not any(fused(k) for k in dispatch.verdicts())
    one = _logits_with_kernels(model, ids, 16, monkeypatch, "strict", default, {}, True)
    used = [k for k in dispatch.verdicts() if fused(k)]
    assert used and all((("scratch",) in k) == ATT.scratch_enabled() for k in used)
    _assert_kernel_logits_close(one, two, truth, dtype, True)
    counters = [c for (owner, _), c in dispatch._block_counters.items() if owner == "attention"]
    assert counters and not any(np.array(c).any() for c in counters)
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_the_closing_matvecs_equals_decode_without(dtype, quantized, monkeypatch):
    """``mv_close`` / ``qmv_close``: the o, down and PLE projections each with its sublayer's close
    in one launch (the launch's last block closes the row), against the default kernel set without
    them, strict. Every such projection of the traced step takes the form (3 a PLE layer) and no
    residual_norm launch is left. On the CPU the backend is forced and the kernels are their
    references (the wiring; the bodies: test_kernel_emulator.py); on a GPU, CUDA's kernels (the
    counter left zero)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    if gpu and dispatch.active_backend() != "cuda":
        pytest.skip("the closing forms run on CUDA")
    model = _kernel_shaped_model(seed=10)
    ids = mx.array(np.random.default_rng(11).integers(0, model.args.vocab_size, size=(1, 24)))
    truth = _logits_with_kernels(model, ids, 16, monkeypatch, "off", "", {}, True)
    model.set_dtype(dtype)
    if quantized:
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
        monkeypatch.setenv("GEMMA4_MLX_QMV_MIN", "0")
    form = "qmv_close" if quantized else "mv_close"
    default = dispatch.DEFAULT_DISABLED["cuda"]
    assert form not in default.split(",")  # on by default since session 24: off against on below
    default += f",{form}"
    calls = {"residual_norm": 0, form: 0}
    overrides = {}
    if not gpu:  # the matvecs and closes as their references (counted), every other kernel off
        default += ",q_norm_rope,kv_norm_rope,attention,attention_prefix,ple_combine,ple_gate,scale,geglu"
        overrides = _counted(calls, {"residual_norm": K.residual_norm_reference, "mv_close": K.matvec_close_reference,
                                     "qmv_close": K.quantized_matvec_close_reference, "mv": K.matvec_reference,
                                     "mv_geglu": K.matvec_geglu_reference, "mv_gate": K.matvec_gate_reference,
                                     "qmv": K.quantized_matvec_reference,
                                     "qmv_geglu": K.quantized_matvec_geglu_reference,
                                     "qmv_gate": K.quantized_matvec_gate_reference})
    mode = "strict" if gpu else "auto"
    off = _logits_with_kernels(model, ids, 16, monkeypatch, mode, default, overrides, gpu)
    before = dict(calls)
    on = _logits_with_kernels(model, ids, 16, monkeypatch, mode,
                              ",".join(n for n in default.split(",") if n != form), overrides, gpu)
    if gpu:  # (overridden kernels have no self-check)
        assert any(k[0] == form for k in dispatch.verdicts()), dispatch.verdicts()
        assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] == form)
    else:  # traced once: three closes a PLE layer, all in a projection's launch
        n_ple = sum(p.has_ple for p in model.args.plan)
        closed_apart = calls["residual_norm"] - before["residual_norm"]  # the prompt's, in both runs
        assert calls[form] - before[form] >= 3 * n_ple and closed_apart + 3 * n_ple <= before["residual_norm"], calls
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    if gpu:
        counters = [c for (owner, _), c in dispatch._block_counters.items() if owner == "matvec_close"]
        assert counters and not any(np.array(c).any() for c in counters)
    dispatch.reset()


@pytest.mark.parametrize("fused", [False, True], ids=["two passes", "fused"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_attention_applying_the_q_norm_equals_decode_without(dtype, fused, monkeypatch):
    """``attention_prefix_q`` (the prefix attention applying q_norm_rope itself, one launch fewer
    per layer) against the two kernels it replaces: every layer on the prefix path takes it in the
    traced step, with the same logits; ``fused`` with ``attention_fused`` on too (the whole
    attention of a layer in one launch, the q norm included) against the prefix attention fused.
    On the CPU the backend is forced and the three kernels are their references (the wiring)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    # qkv_norm_rope off too: where it is on it makes the writing layers' q itself (on the CPU
    # kv_norm_rope's switch turns it off)
    others = "mv,qmv,ple_tail,qkv_norm_rope" if gpu else \
        "mv,qmv,kv_norm_rope,attention,ple_combine,ple_gate,residual_norm,ple_tail"
    others += "" if fused else ",attention_fused"
    model = _kernel_shaped_model(seed=6)
    ids = mx.array(np.random.default_rng(7).integers(0, model.args.vocab_size, size=(1, 24)))
    calls = {"attention_prefix_q": 0, "attention_prefix": 0, "q_norm_rope": 0}

    def spy(name):
        fn = getattr(K, f"{name}_reference") if not gpu else {
            "attention_prefix_q": sys.modules["gemma4_mlx.kernels.attention"]._attention_prefix_q_kernel,
            "attention_prefix": sys.modules["gemma4_mlx.kernels.attention"]._attention_prefix_kernel,
            "q_norm_rope": K.q_norm_rope_kernel}[name]

        def run(*args):
            ctx = step_context.active()
            if ctx is not None and ctx.tracing:  # the traced step itself (not a self-check's probe)
                calls[name] += 1
                if name == "attention_prefix_q":
                    forms.add(args[-1])  # its launch form: fused or the two passes
            return fn(*args)
        return run

    forms = set()

    def run(mode, disable):
        return _logits_with_kernels(model, ids, 16, monkeypatch, mode, disable, {n: spy(n) for n in calls}, gpu)

    truth = run("off", "")
    model.set_dtype(dtype)
    off = run("auto", others + ",attention_prefix_q")
    prefix_layers = calls["attention_prefix"]
    assert calls["attention_prefix_q"] == 0 and prefix_layers > 0 and calls["q_norm_rope"] == len(model.layers)
    for n in calls:
        calls[n] = 0
    on = run("auto", others)
    # each layer on the prefix path now takes the one kernel pair; the others keep q_norm_rope
    assert calls == {"attention_prefix_q": prefix_layers, "attention_prefix": 0,
                     "q_norm_rope": len(model.layers) - prefix_layers}, calls
    assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] in calls)
    assert forms == {fused}  # the launch form the step took: fused exactly when attention_fused is on
    _assert_kernel_logits_close(on, off, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_with_one_norm_launch_for_q_k_v_equals_decode_without(dtype, monkeypatch):
    """``qkv_norm_rope`` (on by default on CUDA since session 30): a cache-writing layer's q norm +
    RoPE and its k / v norms in one launch. In the traced step every cache-writing layer takes it, the KV-shared layers keep
    q_norm_rope, kv_norm_rope is not called, and the logits are the two launches'. On the CPU the
    backend is forced and the kernels are their references (the wiring)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    gpu = dispatch.active_backend() is not None
    # attention_prefix_q off too: where it is on the KV-shared layers' q norm goes into their
    # attention (on the CPU attention_prefix's switch turns it off)
    # qkv_joined off too: it takes the writing layers' launch where it is on (CUDA's default since session 39)
    others = "mv,qmv,ple_tail,attention_prefix_q,qkv_joined" if gpu else \
        "mv,qmv,attention,attention_prefix,ple_combine,ple_gate,residual_norm,ple_tail,qkv_joined"
    model = _kernel_shaped_model(seed=12)
    writing = sum(layer.self_attn.plan.kv_source == i for i, layer in enumerate(model.layers))
    assert 0 < writing < len(model.layers)
    ids = mx.array(np.random.default_rng(13).integers(0, model.args.vocab_size, size=(1, 24)))
    calls = {"qkv_norm_rope": 0, "q_norm_rope": 0, "kv_norm_rope": 0}

    def spy(name):
        fn = getattr(K, f"{name}_reference" if not gpu else f"{name}_kernel")

        def run(*args):
            ctx = step_context.active()
            if ctx is not None and ctx.tracing:
                calls[name] += 1
            return fn(*args)
        return run

    def run(disable):
        for n in calls:
            calls[n] = 0
        return _logits_with_kernels(model, ids, 16, monkeypatch, "auto", disable, {n: spy(n) for n in calls}, gpu)

    truth = run(others + ",q_norm_rope,kv_norm_rope,qkv_norm_rope")
    model.set_dtype(dtype)
    apart = run(others + ",qkv_norm_rope")
    assert calls == {"qkv_norm_rope": 0, "q_norm_rope": len(model.layers), "kv_norm_rope": writing}, calls
    one = run(others)
    assert calls == {"qkv_norm_rope": writing, "q_norm_rope": len(model.layers) - writing, "kv_norm_rope": 0}, calls
    assert all(ok for k, (ok, _) in dispatch.verdicts().items() if k[0] in calls)
    _assert_kernel_logits_close(one, apart, truth, dtype, gpu)
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")  # the kernels without a spy cannot build here
def test_kernels_run_only_in_the_compiled_step(monkeypatch):
    """Kernel launches cost Python time per call, and a kernel used before the first token would
    have to be built before it: prefill chunks and eager one-token steps take MLX's ops, the
    compiled decode step the kernels."""
    import contextlib

    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    model = _kernel_shaped_model()
    # the norm + RoPE family under its dispatch names: on CUDA's defaults the writing layers take
    # qkv_joined and the shared ones attention_prefix_q, which leaves q_norm_rope and kv_norm_rope
    # to their fallbacks (session 40's GPU run caught the test spying on those two alone)
    references = {"q_norm_rope": K.q_norm_rope_reference, "kv_norm_rope": K.kv_norm_rope_reference,
                  "qkv_norm_rope": K.qkv_norm_rope_reference, "qkv_joined": K.qkv_norm_rope_joined_reference}
    calls = dict.fromkeys(references, 0)

    def spy(name):
        ref = references[name]

        def run(*args):
            calls[name] += 1
            return ref(*args)
        return run

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    dispatch.reset()
    with contextlib.ExitStack() as stack:
        stack.enter_context(dispatch.force_backend("cuda"))
        for name in calls:
            stack.enter_context(dispatch.override_kernel(name, spy(name)))
        cache = model.make_cache()

        def count(fn):
            before = dict(calls)
            fn()
            return sum(calls[n] - before[n] for n in calls)

        assert count(lambda: mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))) == 0  # prefill
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
        assert count(lambda: mx.eval(model(mx.array([[5]]), cache=cache))) == 0  # eager one token
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
        assert count(lambda: mx.eval(model(mx.array([[6]]), cache=cache))) > 0, calls  # compiled step
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
def test_residual_norm_kernel_runs_in_decode_steps_not_over_prefill_chunks(monkeypatch):
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    model = _kernel_shaped_model()
    rows = []

    def spy(residual, *args):
        rows.append(residual.size // residual.shape[-1])
        return K.residual_norm_reference(residual, *args)

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    # Metal's default set (residual_norm on, as on CUDA)
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", dispatch.DEFAULT_DISABLED["metal"])
    dispatch.reset()
    with dispatch.force_backend("cuda"), dispatch.override_kernel("residual_norm", spy):
        cache = model.make_cache()
        mx.eval(model(mx.array([list(range(1, 41))]), cache=cache))  # a prefill chunk: no kernels
        assert rows == []
        before = len(rows)
        mx.eval(model(mx.array([[7]]), cache=cache))
        assert len(rows) > before
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
def test_attention_kernel_only_in_the_compiled_step(monkeypatch):
    """Short eager chunks take MLX's SDPA (the kernel measured slower there); the compiled step
    takes attention_prefix over the cache buffer."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    model = _kernel_shaped_model()
    calls = {"attention": 0, "attention_prefix": 0}

    def spy(name, ref):
        def run(*args):
            calls[name] += 1
            return ref(*args)
        return run

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    dispatch.reset()
    with dispatch.force_backend("cuda"), \
            dispatch.override_kernel("attention", spy("attention", K.attention_reference)), \
            dispatch.override_kernel("attention_prefix", spy("attention_prefix", K.attention_prefix_reference)):
        cache = model.make_cache()
        mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6]]), cache=cache))  # a 6-token chunk
        mx.eval(model(mx.array([[7, 8, 9]]), cache=cache))
        assert calls == {"attention": 0, "attention_prefix": 0}
        mx.eval(model(mx.array([[7]]), cache=cache))
        assert calls["attention"] == 0 and calls["attention_prefix"] > 0
    dispatch.reset()


def test_compiled_step_writes_the_new_key_value_in_place(monkeypatch):
    """The step's slice update of each cache buffer reuses the buffer (MLX donates it: the caches
    hold the only reference once the step is built), so a token costs no copy of the cache."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny")
    cache = model.make_cache()
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, size=(1, 3000))
    for i in range(0, 3000, 1000):
        model(mx.array(ids[:, i : i + 1000]), cache=cache)
        mx.eval([c.state for c in cache])
    for t in (5, 6):  # the first traces the step
        mx.eval(model(mx.array([[t]]), cache=cache), [c.state for c in cache])
    buffers = sum(c.nbytes for c in cache)
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    mx.eval(model(mx.array([[7]]), cache=cache), [c.state for c in cache])
    assert mx.get_peak_memory() - start < 0.25 * buffers, (mx.get_peak_memory() - start, buffers)


def test_replacing_weights_or_quantizing_drops_the_compiled_step(monkeypatch):
    import mlx.nn as nn

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny-31b")
    prompt = mx.array([[5, 6, 7, 8, 9, 10]])

    def decode(m):
        cache = m.make_cache()
        m(prompt, cache=cache)
        return [np.array(m(mx.array([[t]]), cache=cache)) for t in (3, 4, 5)]

    decode(model)  # traces the step
    assert model._decoder.current()
    fresh = _random_model("tiny-31b", seed=7)
    model.update(fresh.parameters())
    assert not model._decoder.current()
    np.testing.assert_allclose(np.concatenate(decode(model)), np.concatenate(decode(fresh)), rtol=1e-5, atol=1e-5)
    pred = lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0  # noqa: E731
    nn.quantize(model, group_size=32, bits=4, class_predicate=pred)
    nn.quantize(fresh, group_size=32, bits=4, class_predicate=pred)
    np.testing.assert_allclose(np.concatenate(decode(model)), np.concatenate(decode(fresh)), rtol=1e-5, atol=1e-5)


def test_input_embeddings_are_refused_clearly():
    model = _random_model("tiny")
    with pytest.raises(ValueError, match="input_embeddings are not supported"):
        model(mx.array([[1, 2]]), input_embeddings=mx.zeros((1, 2, 64)))


def test_step_reads_each_cache_slot_without_a_gather(monkeypatch):
    """The step hands every cache its slot and fill level through one Split each: the only Gathers
    left are the embedding lookups (token table, per-layer table), however many caches there are
    (an index per cache was a Gather launch, a Squeeze and a Slice)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    others = ALL_KERNELS.replace("attention_prefix,", "")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", others)
    model = _random_model("tiny")
    assert model.args.num_caches >= 3
    with dispatch.force_backend("cuda"), dispatch.override_kernel("attention_prefix", K.attention_prefix_reference):
        ops_graph, _ = _step_graph(model)
    dispatch.reset()
    assert ops_graph["Gather"] <= 2, ops_graph


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
def test_gpu_scale_ops_and_geglu_go_through_our_kernels(monkeypatch):
    """On CUDA the decode step's scale ops (the embedding's and the PLE projection's scales, each
    layer's close with its scalar, the soft-cap) and the GeGLU, a cached prefill's too, run in
    kernels of ours: as MLX's fused kernels each was a JIT compile of seconds on a fresh GPU
    machine (session 11's cold run), none of which stock has. Their outputs are the reference's.
    A call without a cache (a training forward: kernels have no gradient) and Metal's prefill
    keep MLX's ops."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    model = _random_model("tiny")
    seen = {"prefill": set(), "step": set()}
    phase = ["prefill"]

    def spy(name, ref):
        def run(*args):
            seen[phase[0]].add(name if name == "geglu" else f"scale {args[3]}")
            return ref(*args)
        return run

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", ALL_KERNELS.replace(",scale,geglu", ""))
    dispatch.reset()
    cache, reference = model.make_cache(), model.make_cache()
    prompt = mx.array([[5, 6, 7, 8, 9, 10]])
    with dispatch.force_backend("cuda"), dispatch.override_kernel("geglu", spy("geglu", K.ple_gate_reference)), \
            dispatch.override_kernel("geglu_joined", spy("geglu", K.geglu_joined_reference)), \
            dispatch.override_kernel("scale", spy("scale", K.scale_reference)):
        mx.eval(model(prompt))  # no cache: maybe a training forward; kernels have no gradient
        assert seen["prefill"] == set()
        logits = model(prompt, cache=cache)
        assert seen["prefill"] == {"geglu", "scale 2"}  # eager: the others are plain MLX ops
        phase[0] = "eager step"  # one position, uncompiled (batch_generate's): MLX's calls
        seen["eager step"] = set()
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
        mx.eval(model(mx.array([[4]]), cache=model.make_cache()))
        assert seen["eager step"] == set()
        monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
        phase[0] = "step"
        step = model(mx.array([[9]], dtype=mx.uint32), cache=cache)
        assert model._decoder.counts["traces"] == 1
        assert seen["step"] == {"geglu", "scale 0", "scale 1", "scale 2"}
    with dispatch.force_backend("metal"), dispatch.override_kernel("geglu", spy("geglu", K.ple_gate_reference)), \
            dispatch.override_kernel("scale", spy("scale", K.scale_reference)):
        phase[0] = "metal prefill"  # Metal JIT-compiles MLX's fused forms in milliseconds: kept
        seen["metal prefill"] = set()
        mx.eval(model(prompt, cache=model.make_cache()))
        assert seen["metal prefill"] == set()
    dispatch.reset()
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "off")
    want = model(prompt, cache=reference)
    np.testing.assert_allclose(np.array(logits), np.array(want), rtol=1e-5, atol=1e-5)
    want = model(mx.array([[9]], dtype=mx.uint32), cache=reference)
    np.testing.assert_allclose(np.array(step), np.array(want), rtol=1e-4, atol=1e-4)


def test_a_cached_call_is_its_threads_alone():
    """A server's generation (a cached call, where eager kernels may run) does not open the way
    for another thread's uncached, maybe differentiated, forward."""
    import threading

    seen = []
    with step_context.cached_call():
        other = threading.Thread(target=lambda: seen.append(step_context.in_cached_call()))
        other.start()
        other.join()
        seen.append(step_context.in_cached_call())
    seen.append(step_context.in_cached_call())
    assert seen == [False, True, False]


def test_a_traced_step_is_its_threads_alone():
    """While one thread traces its decode step, another thread's model call sees no step: it runs
    MLX's ops, without the step's kernels, joins or scalar pieces."""
    import threading

    seen = []
    with step_context.kernel_scope():
        other = threading.Thread(target=lambda: seen.append(step_context.active()))
        other.start()
        other.join()
        seen.append(step_context.active() is not None)
    seen.append(step_context.active())
    assert seen == [None, True, None]


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "4-bit"])
def test_gpu_step_scales_every_scalar_in_our_kernel(quantized, monkeypatch):
    """Every scale op of the decode step goes to the scale kernel on CUDA, the 4-bit model's PLE
    too (a quantized table takes the PLE combine's op path: its table scale and its 2^-0.5 were
    two more fused kernels for MLX's JIT, session 11's 4-bit e2e). Counted at the trace: the
    embedding's and the projection's scales (and the quantized table's), each layer's close (and
    the quantized combine's), the soft-cap."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch
    from gemma4_mlx.kernels import scalar as K_scalar

    model = _kernel_shaped_model()  # a PLE width the combine kernel takes
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    if quantized:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda _p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % 32 == 0)
        assert isinstance(model.model.embed_tokens_per_layer, nn.QuantizedEmbedding)
    mx.eval(model.parameters())
    forms = []

    def spy(*args):
        if tuple(args[0].shape) != K_scalar.PROBE_SHAPE:  # not the self-check's probe
            forms.append(args[3])
        return K.scale_reference(*args)

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    # the PLE combine's kernel on (its reference standing in): a plain table takes it; a quantized
    # one takes the op path (ple_combine_q off: on a GPU it would build and read the table itself)
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE",
                       ALL_KERNELS.replace(",scale", "").replace("ple_combine,", "") + ",ple_combine_q")
    dispatch.reset()
    with dispatch.force_backend("cuda"), dispatch.override_kernel("scale", spy), \
            dispatch.override_kernel("ple_combine", K.ple_combine_reference):
        cache = model.make_cache()
        mx.eval(model(mx.array([[5, 6, 7, 8]]), cache=cache))
        forms.clear()
        mx.eval(model(mx.array([[9]], dtype=mx.uint32), cache=cache))
    dispatch.reset()
    layers = len(model.layers)
    assert forms.count(0) == 2 + quantized and forms.count(1) == layers + quantized and forms.count(2) == 1, forms


def _step_without_and_with(model, prompt, token, monkeypatch, enabled: str, overrides: dict):
    """One decode step's logits after ``prompt`` with every kernel off, then with only
    ``enabled`` (a name in ALL_KERNELS) on, on a pretended CUDA backend whose kernels are
    ``overrides`` (name -> function), the step traced again for it: ``(want, got)``."""
    from gemma4_mlx import decode
    from gemma4_mlx.kernels import dispatch

    def step():
        cache = model.make_cache()
        model(prompt, cache=cache)
        out = model(mx.array([[token]], dtype=mx.uint32), cache=cache)
        mx.eval(out)
        return out

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "off")
    dispatch.reset()
    want = step()
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", ",".join(n for n in ALL_KERNELS.split(",") if n != enabled))
    dispatch.reset()
    decode.release(model)  # the step traced again, now on the kernel path
    with contextlib.ExitStack() as stack:
        stack.enter_context(dispatch.force_backend("cuda"))
        for name, fn in overrides.items():
            stack.enter_context(dispatch.override_kernel(name, fn))
        got = step()
    dispatch.reset()
    return want, got


def test_step_geglu_reads_the_joined_gate_up_product(monkeypatch):
    """In the decode step on a GPU the MLP's GeGLU takes the joined gate/up product whole (one
    kernel reads both halves: no Split primitive replayed at every token), once a layer, and the
    step's logits are those of MLX's ops."""
    import gemma4_mlx.kernels as K

    model = _random_model("tiny")
    widths = []

    def spy(joined):
        widths.append(joined.shape)
        return K.geglu_joined_reference(joined)

    # (the prefill's eager GeGLU takes the "geglu" kernel: its reference here)
    want, got = _step_without_and_with(model, mx.array([[5, 6, 7, 8, 9, 10]]), 9, monkeypatch, "geglu",
                                       {"geglu_joined": spy, "geglu": K.ple_gate_reference})
    step = [w for w in widths if w[:2] == (1, 1)]  # not the self-check's probe
    assert [w[-1] for w in step] == [2 * p.mlp_width for p in model.args.plan]
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=1e-5, atol=1e-5)


def test_step_attention_writes_the_output_projections_layout(monkeypatch):
    """In the decode step the attention kernel writes one query's output as (B, 1, H * D), the
    output projection's input (no Reshape primitive after it at every token); the step's logits
    are those of MLX's ops."""
    import gemma4_mlx.kernels as K

    model = _kernel_shaped_model()
    seen = []

    def spy(*args):
        out = K.attention_prefix_reference(*args)
        ctx = step_context.active()
        if ctx is not None and ctx.tracing:
            seen.append((args[5], tuple(out.shape), args[0].shape))
        return out

    want, got = _step_without_and_with(model, mx.array([[1, 2, 3, 4, 5, 6]]), 7, monkeypatch, "attention_prefix",
                                       {"attention_prefix": spy})
    assert seen and all(rows for rows, _, _ in seen)
    assert all(out == (q[0], 1, q[1] * q[3]) for _, out, q in seen)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=1e-5, atol=1e-5)


def test_shared_slots_group_the_caches_that_take_the_same_slot(monkeypatch):
    """GEMMA4_MLX_SHARED_SLOTS=1: the step's argument packing gives the caches of one buffer shape,
    dtype, ring and (slot, fill level) one group, and the step one slot index a group (the grouping,
    a static argument of the trace, is part of the kernels' check signature too); off, each cache
    is its own group, as before."""
    from gemma4_mlx import decode

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model("tiny")
    cache = model.make_cache()
    mx.eval(model(mx.array([[1, 2, 3, 4, 5]]), cache=cache))
    live = cache[: model.args.num_caches]
    args, reserved = decode.CompiledDecoder.step_args(live, mx.array([[3]]), False, True)
    groups = args[6]
    keys = [(c.keys.shape, c.keys.dtype, w, r) for c, w, r in zip(live, args[5], reserved)]
    assert len(set(groups)) == len(set(keys)) < len(live)  # fewer groups than caches
    assert all((groups[i] == groups[j]) == (keys[i] == keys[j]) for i in range(len(live)) for j in range(len(live)))
    assert args[2].size == len(set(groups))  # one slot a group
    own, _ = decode.CompiledDecoder.step_args(live, mx.array([[3]]), False, False)
    assert own[6] == tuple(range(len(live))) and own[2].size == len(live)


def test_packed_quantized_weights_in_the_compiled_step(monkeypatch):
    """GEMMA4_MLX_QPACK=1 (on by default on CUDA): the decoder puts every 4-bit projection's words,
    scales and biases in one buffer (a join's too) and leaves the modules views of it. The greedy
    tokens and logits are those of the unpacked step, the views are what the modules held, the
    buffers cost no second copy of the weights, a later decoder reuses them, and a replaced weight
    is packed again from the new arrays (the step computes with the new weights)."""
    import gc

    import mlx.nn as nn

    from gemma4_mlx import decode
    from gemma4_mlx.kernels import qmv

    model = _kernel_shaped_model(seed=11)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    mx.eval(model.parameters())
    prompt = mx.array([[3, 17, 29, 4, 80, 11, 5, 9]])
    monkeypatch.setenv("GEMMA4_MLX_QPACK", "0")
    want_tokens, want_rows, _ = _greedy(model, prompt, 6, monkeypatch, compiled=True)
    o_proj = model.layers[0].self_attn.o_proj
    before = {k: np.array(o_proj[k]) for k in ("weight", "scales", "biases")}
    decode.release(model)
    gc.collect()
    memory = mx.get_active_memory()
    monkeypatch.setenv("GEMMA4_MLX_QPACK", "1")
    decode.decoder_for(model)  # packs the projections: no second copy of them once it is built
    gc.collect()
    packed_bytes = sum(m[k].nbytes for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)
                       for k in ("weight", "scales", "biases"))
    # a second copy would be all of packed_bytes more; the decoder's own small state (its scalars' stack, ...) is not
    assert mx.get_active_memory() - memory < 0.25 * packed_bytes, (mx.get_active_memory() - memory, packed_bytes)
    tokens, rows, _ = _greedy(model, prompt, 6, monkeypatch, compiled=True)
    assert tokens == want_tokens
    np.testing.assert_array_equal(rows, want_rows)
    dec = decode.decoder_for(model)
    assert dec.counts["traces"] == 1
    packed = {id(m) for _, m in model.named_modules()
              if qmv.packed_buffer(m.get("weight"), m.get("scales"), m.get("biases")) is not None}
    # o / down / PLE projections of every layer (q/k/v and gate/up: their joins' buffers), the PLE gate among them
    # (qmv_close_gate takes its buffer too: GATE_QPACK)
    assert id(o_proj) in packed and id(model.layers[0].mlp.down_proj) in packed
    assert id(model.layers[0].per_layer_input_gate) in packed
    joins = [j for j in dec.joined.values() if j.packed]
    assert joins and all(qmv.packed_buffer(j.joint["weight"], j.joint["scales"], j.joint["biases"]) is not None
                         for j in joins)
    for k, v in before.items():
        np.testing.assert_array_equal(np.array(o_proj[k]), v)
    # a new decoder (a switch changed and back) keeps the packed arrays as they are
    views = (o_proj["weight"], o_proj["scales"], o_proj["biases"])
    monkeypatch.setenv("GEMMA4_MLX_KV_WRITE", "slice")
    _greedy(model, prompt, 2, monkeypatch, compiled=True)
    assert all(o_proj[k] is v for k, v in zip(("weight", "scales", "biases"), views))
    monkeypatch.delenv("GEMMA4_MLX_KV_WRITE")
    # a replaced weight: packed again, the step computes with it (as the unpacked step does)
    w, s, b = mx.quantize(0.05 * mx.random.normal((o_proj["weight"].shape[0], 64 * o_proj["scales"].shape[1]),
                                                  key=mx.random.key(3)), group_size=64, bits=4)
    o_proj.update({"weight": w, "scales": s, "biases": b})
    tokens, rows, _ = _greedy(model, prompt, 6, monkeypatch, compiled=True)
    assert o_proj["weight"] is not w and qmv.packed_buffer(o_proj["weight"], o_proj["scales"], o_proj["biases"]) is not None
    monkeypatch.setenv("GEMMA4_MLX_QPACK", "0")
    want_tokens, want_rows, _ = _greedy(model, prompt, 6, monkeypatch, compiled=True)
    assert tokens == want_tokens
    np.testing.assert_array_equal(rows, want_rows)


def test_qkv_joined_reads_the_joined_projection_in_the_compiled_step(monkeypatch):
    """qkv_joined (on by default on CUDA since session 39): each cache-writing layer's norms and RoPE take its joined q/k/v product
    in heads as one input, no split views; the compiled step's logits are those of qkv_norm_rope over the
    split views. On the CPU the backend is forced and the references run (counted); a GPU runs the kernel
    in the parity run."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU (a GPU runs it in the kernels' parity run)")
    model = _kernel_shaped_model(seed=12)
    ids = mx.array(np.random.default_rng(13).integers(0, model.args.vocab_size, size=(1, 24)))
    calls: dict = {}
    overrides = _counted(calls, {"qkv_norm_rope": K.qkv_norm_rope_reference,
                                 "qkv_joined": K.qkv_norm_rope_joined_reference,
                                 "q_norm_rope": K.q_norm_rope_reference, "kv_norm_rope": K.kv_norm_rope_reference,
                                 "residual_norm": K.residual_norm_reference, "scale": K.scale_reference})
    others = ",mv,qmv,attention,attention_prefix,ple_combine,ple_gate,geglu,embed"
    default = dispatch.DEFAULT_DISABLED["cuda"].split(",")
    assert "qkv_joined" not in default
    want = _logits_with_kernels(model, ids, 12, monkeypatch, "strict", ",".join(default) + others + ",qkv_joined",
                                overrides, False)
    assert calls.get("qkv_norm_rope") and not calls.get("qkv_joined"), calls
    calls.clear()
    got = _logits_with_kernels(model, ids, 12, monkeypatch, "strict", ",".join(default) + others, overrides, False)
    # the trace's call in every writing layer (and its self-check's; the dry run's fallback checks qkv_norm_rope too)
    assert calls.get("qkv_joined", 0) > sum(1 for p in model.args.plan if not p.is_kv_shared), calls
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dispatch.reset()


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
@pytest.mark.parametrize("joined", ["passes", "fails"])
def test_the_first_step_checks_a_fallback_only_where_its_kernel_fails(joined, monkeypatch):
    """The dry run before the first step meets a fused kernel's fallback too (qkv_joined's: qkv_norm_rope over
    the split views): its kernels are self-checked only where the fused one fails its check, since only then
    does the traced step run them (sessions 36 and 38 checked them always, at the first token's cost). The
    logits are the reference's either way. On the CPU the backend is forced and the references run."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    if dispatch.active_backend() is not None:
        pytest.skip("the wiring, on the CPU")
    model = _kernel_shaped_model(seed=12)
    ids = mx.array(np.random.default_rng(13).integers(0, model.args.vocab_size, size=(1, 20)))
    truth = _logits_with_kernels(model, ids, 12, monkeypatch, "off", "", {}, False)

    def broken(*args):
        return [o + 1.0 for o in K.qkv_norm_rope_joined_reference(*args)]

    calls: dict = {}
    overrides = _counted(calls, {"qkv_norm_rope": K.qkv_norm_rope_reference,
                                 "qkv_joined": K.qkv_norm_rope_joined_reference if joined == "passes" else broken,
                                 "q_norm_rope": K.q_norm_rope_reference, "kv_norm_rope": K.kv_norm_rope_reference,
                                 "residual_norm": K.residual_norm_reference, "scale": K.scale_reference})
    disable = dispatch.DEFAULT_DISABLED["cuda"] + ",mv,qmv,attention,attention_prefix,ple_combine,ple_gate,geglu,embed"
    got = _logits_with_kernels(model, ids, 12, monkeypatch, "auto", disable, overrides, False)
    # a kernel the trace meets unchecked raises there (dispatch.run), so the fallback's was checked first
    # where the step runs it; where it does not, it was neither checked nor run (no call at all)
    assert calls.get("qkv_joined", 0) > 0 and calls.get("q_norm_rope", 0) > 0, calls
    assert bool(calls.get("qkv_norm_rope")) == (joined == "fails"), calls
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-4)
    dispatch.reset()
