"""Head-to-head benchmark: this package's Gemma 4 against stock mlx-lm's ``gemma4_text``.

Both models live in one process with *identical* weights (the same ``mx.array`` objects: stock's
parameters are replaced by ours with ``Module.update``), go through the same generation loop
(mlx-lm's :func:`mlx_lm.generate.generate_step`, greedy, with its async-eval pipelining), and are
measured alternately, run by run (ours, stock, ours, stock ...), after a warm-up of both.

Per prompt length the harness reports the medians of

* time to first token (TTFT: prefill of the prompt plus the first sampled token) and prefill
  tokens/s (= prompt length / TTFT, mlx-lm's ``prompt_tps``),
* decode tokens/s of ``decode_tokens`` tokens generated after that prompt (mlx-lm's
  ``generation_tps``: tokens after the first / time after the first),
* peak memory (``mx.get_peak_memory``, reset before each run; the shared weights are resident for
  both sides, so the difference between the sides is activations, caches and temporaries),

and the ratio ours/stock (>1 is better for tok/s, <1 is better for TTFT and memory).

Before timing, a greedy token check generates ``check_tokens`` tokens with each model from the
same prompt and reports the first divergence (float32 should match exactly; bf16/fp16 may drift).

Used by ``gemma4-mlx compare`` and ``python -m bench.compare``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
GPU_PROMPT_LENGTHS = [128, 841, 4096]
GPU_LONG_LENGTH = 32768
CPU_PROMPT_LENGTHS = [64, 256]  # MLX on a 2-core CPU: ~10-30 tok/s prefill for e2b-mini
DEFAULT_PRESET = "e2b-mini"
WEIGHT_STD = 0.02
QUANT_GROUP_SIZE = 64
SIDES = ("ours", "stock")


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run as asked (one line, shown to the user)."""


# ----------------------------------------------------------------------------------------------
# settings


@dataclass
class BenchSettings:
    preset: Optional[str] = None  # DEFAULT_PRESET when neither preset nor model is given
    model: Optional[str] = None  # checkpoint folder or Hub repo id
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU (checkpoints: as stored)
    quantize: Optional[int] = None  # 4 or 8 (group 64; router at 8 bits)
    prompt_lengths: Optional[List[int]] = None  # None: device default
    long: bool = False  # add 32768 (GPU)
    decode_tokens: Optional[int] = None  # None: 128 on GPU, 16 on CPU
    runs: Optional[int] = None  # None: 5 on GPU, 3 on CPU
    warmup: int = 1  # warm-up runs per side and prompt length
    check_tokens: int = 32
    seed: int = 0
    prefill_step_size: int = 2048  # mlx-lm's generate_step default
    with_transformers: bool = False

    def resolve(self) -> "BenchSettings":
        s = BenchSettings(**asdict(self))
        gpu = on_gpu()
        if s.model is None and s.preset is None:
            s.preset = DEFAULT_PRESET
        if s.model is not None and s.preset is not None:
            raise BenchmarkError("give either --model or --preset, not both")
        if s.dtype not in ("auto", *DTYPES):
            raise BenchmarkError(f"unknown dtype {s.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        if s.dtype == "auto" and s.model is None:
            s.dtype = "bfloat16" if gpu else "float32"
        if s.quantize not in (None, 4, 8):
            raise BenchmarkError(f"--quantize must be 4 or 8, got {s.quantize}")
        if s.prompt_lengths is None:
            s.prompt_lengths = list(GPU_PROMPT_LENGTHS if gpu else CPU_PROMPT_LENGTHS)
        s.prompt_lengths = [int(x) for x in s.prompt_lengths]
        if s.long and GPU_LONG_LENGTH not in s.prompt_lengths:
            s.prompt_lengths.append(GPU_LONG_LENGTH)
        if not s.prompt_lengths or min(s.prompt_lengths) < 2:
            raise BenchmarkError("prompt lengths must be at least 2 tokens")
        if s.decode_tokens is None:
            s.decode_tokens = 128 if gpu else 16
        if s.decode_tokens < 2:
            raise BenchmarkError("--decode-tokens must be at least 2 (decode speed is timed after the first token)")
        if s.runs is None:
            s.runs = 5 if gpu else 3
        if s.runs < 1 or s.warmup < 0 or s.check_tokens < 0:
            raise BenchmarkError("--runs must be >= 1, --warmup and --check-tokens >= 0")
        return s


# ----------------------------------------------------------------------------------------------
# environment


def on_gpu() -> bool:
    return mx.default_device().type == mx.gpu


def _run_text(cmd: List[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def gpu_name() -> Optional[str]:
    try:
        if mx.metal.is_available():
            info = mx.metal.device_info()
            return str(info.get("device_name") or info.get("architecture"))
    except Exception:
        pass
    try:
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            if shutil.which("nvidia-smi"):
                out = _run_text(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
                if out:
                    return out.splitlines()[0].strip()
            info = mx.device_info() if hasattr(mx, "device_info") else {}
            return str(info.get("device_name", "CUDA GPU"))
    except Exception:
        pass
    return None


def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    sha = _run_text(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    if sha is None:
        return None
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return sha + ("-dirty" if dirty else "")


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        try:
            return getattr(__import__(mod), "__version__", None)
        except Exception:
            return None


def _command_line() -> Optional[str]:
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if not argv:
        return None
    if len(argv) > 1 and Path(argv[1]).name == "gemma4-mlx":  # python /venv/bin/gemma4-mlx ...
        argv = argv[1:]
    argv[0] = Path(argv[0]).name
    return " ".join(argv)


def kernels_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"env": os.environ.get("GEMMA4_MLX_KERNELS")}
    try:
        from .kernels import dispatch

        info["mode"] = dispatch.get_mode()
        info["backend"] = dispatch.active_backend()
        info["enabled"] = bool(dispatch.kernels_enabled())
    except Exception as e:  # the kernels are optional and may be mid-change
        info["unavailable"] = f"{type(e).__name__}: {e}"
    return info


def environment() -> Dict[str, Any]:
    try:
        dev_info = mx.device_info() if hasattr(mx, "device_info") else {}
        dev_info = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dev_info.items()}
    except Exception:
        dev_info = {}
    return {
        "device": str(mx.default_device()),
        "gpu_name": gpu_name(),
        "device_info": dev_info,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm") or _version("mlx_lm"),
        "gemma4_mlx": _version("gemma4-mlx"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": _command_line(),
        "kernels": kernels_info(),
    }


# ----------------------------------------------------------------------------------------------
# models with identical weights


def random_weights(model: nn.Module, dtype: mx.Dtype, seed: int, std: float = WEIGHT_STD,
                   evaluate: bool = True) -> List[Tuple[str, mx.array]]:
    """Fixed-seed weights: N(0, std) for matrices (projections, embeddings, experts), the module's
    own init (ones) for norms, scales and layer scalars. Evaluated one tensor at a time, or left
    lazy (``evaluate=False``) for a caller that quantizes them first."""
    out = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if p.ndim >= 2:
            w = mx.random.normal(p.shape, dtype=dtype, scale=std, key=mx.random.key(seed * 100_003 + i))
        else:
            w = p.astype(dtype)
        if evaluate:
            mx.eval(w)
        out.append((name, w))
    return out


def quantize_model(model: nn.Module, bits: int, group_size: int = QUANT_GROUP_SIZE) -> None:
    from .checkpoint import quantize_model as quantize

    quantize(model, group_size, bits)


def _quant_specs(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    specs = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size") and hasattr(m, "scales"):
            specs[path] = {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
    return specs


def share_weights(ours: nn.Module, stock: nn.Module) -> int:
    """Quantize stock exactly as ours is (if it is), then give it ours' parameter arrays."""
    specs = _quant_specs(ours)
    if specs:
        nn.quantize(stock, class_predicate=lambda path, m: specs.get(path, False))
    theirs = dict(tree_flatten(stock.parameters()))
    mine = dict(tree_flatten(ours.parameters()))
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    bad = [k for k in mine if k in theirs and tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"stock has {len(missing)} parameter(s) ours lacks ({', '.join(missing[:3])})")
        if extra:
            parts.append(f"ours has {len(extra)} parameter(s) stock lacks ({', '.join(extra[:3])})")
        if bad:
            parts.append("shape mismatch: " + ", ".join(f"{k} ours {tuple(mine[k].shape)} stock {tuple(theirs[k].shape)}"
                                                        for k in bad[:3]))
        raise BenchmarkError("the two models' parameters differ, so they cannot share weights: " + "; ".join(parts))
    stock.update(tree_unflatten(list(mine.items())))
    # Every stock parameter must now be the very array ours holds.
    now = dict(tree_flatten(stock.parameters()))
    assert all(now[k] is mine[k] for k in mine), "weight sharing failed"
    return len(mine)


def stock_model_for(config: Dict[str, Any]) -> nn.Module:
    """Stock mlx-lm's gemma4_text Model for a config dict (either model_type)."""
    from mlx_lm.models import gemma4_text

    from .config import text_config_of

    text, _ = text_config_of(config)
    if text.get("per_layer_config"):
        raise BenchmarkError(
            "stock mlx-lm's gemma4_text cannot parse this config: it is in the transformers >= 5.2 "
            "'per_layer_config' dialect (stock reads the published one: global_head_dim / "
            "num_global_key_value_heads); use a published checkpoint or a --preset")
    try:
        return gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text))
    except Exception as e:
        raise BenchmarkError(f"stock mlx-lm cannot build a model from this config: {type(e).__name__}: {e}") from e


def _param_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def build_pair(s: BenchSettings) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """(ours, stock, metadata) with identical weights, as the settings ask."""
    from .config import parse_config
    from .model import Model

    meta: Dict[str, Any] = {}
    if s.model is not None:
        from .loading import load_model, read_config

        ours = load_model(s.model)
        config = read_config(ours.model_path)
        meta.update(source="checkpoint", model=str(s.model), model_path=str(ours.model_path))
        if s.dtype != "auto":
            dt = DTYPES[s.dtype]
            ours.update(tree_unflatten([(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v)
                                        for k, v in tree_flatten(ours.parameters())]))
        if s.quantize and not _quant_specs(ours):
            quantize_model(ours, s.quantize)
        elif s.quantize:
            meta["note"] = "checkpoint is already quantized; --quantize ignored"
    else:
        from .presets import preset_config

        try:
            config = preset_config(s.preset)
        except KeyError as e:
            raise BenchmarkError(str(e).strip("'\"")) from e
        ours = Model(parse_config(config))
        # Quantized: the full-precision weights are made and quantized one layer at a time, so the
        # 26B/31B presets never hold the whole model in bf16 next to its 4-bit copy.
        ours.update(tree_unflatten(random_weights(ours, DTYPES[s.dtype], s.seed, evaluate=not s.quantize)))
        meta.update(source="preset", preset=s.preset, weights=f"random N(0, {WEIGHT_STD}) for matrices, ones for "
                    f"norms/scales, seed {s.seed}")
        if s.quantize:
            quantize_model(ours, s.quantize)
            for layer in ours.layers:
                mx.eval(layer.parameters())
    mx.eval(ours.parameters())
    ours.fuse_projections()  # before sharing: stock then holds the same (sliced) arrays
    stock = stock_model_for(config)
    n = share_weights(ours, stock)
    ours.eval()
    stock.eval()
    float_dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(ours.parameters())
                           if mx.issubdtype(v.dtype, mx.floating)})
    meta.update(
        parameters=_param_count(ours) if not s.quantize and not _quant_specs(ours) else None,
        parameter_bytes=_param_bytes(ours),
        parameter_tensors=n,
        weight_dtypes=float_dtypes,
        quantization=({"bits": s.quantize, "group_size": QUANT_GROUP_SIZE, "router_bits": 8} if s.quantize
                      else (ours.args.quantization or None)),
        vocab_size=ours.args.vocab_size,
        num_hidden_layers=ours.args.num_hidden_layers,
        hidden_size=ours.args.hidden_size,
    )
    return ours, stock, meta


# ----------------------------------------------------------------------------------------------
# measurement


class Counted:
    """Delegating wrapper that counts forward calls (proof that a side really ran)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def make_prompt(length: int, vocab_size: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed + length)
    low = 3 if vocab_size > 16 else 0  # skip pad / eos / bos of real vocabularies
    return mx.array(rng.integers(low, vocab_size, size=length, dtype=np.int64).astype(np.int32))


def greedy_tokens(model, prompt: mx.array, n: int, prefill_step_size: int = 2048) -> List[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, prefill_step_size=prefill_step_size)]


def token_check(ours, stock, prompt: mx.array, n: int, dtype_name: str, prefill_step_size: int = 2048) -> Dict[str, Any]:
    """Greedy tokens of both from the same prompt, first divergence, and last-position logits gap."""
    if n <= 0:
        return {"skipped": True, "passed": None}
    a = greedy_tokens(ours, prompt, n, prefill_step_size)
    b = greedy_tokens(stock, prompt, n, prefill_step_size)
    la = ours(prompt[None])[:, -1].astype(mx.float32)
    lb = stock(prompt[None])[:, -1].astype(mx.float32)
    diff = float(mx.max(mx.abs(la - lb)).item())
    finite = bool(mx.all(mx.isfinite(la)).item()) and bool(mx.all(mx.isfinite(lb)).item())
    div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    res = {
        "prompt_length": int(prompt.size),
        "tokens": n,
        "ours_tokens": a,
        "stock_tokens": b,
        "match": div is None,
        "first_divergence": None if div is None else {"position": div, "ours": a[div], "stock": b[div]},
        "max_abs_logit_diff_last_prompt_position": diff,
        "logits_finite": finite,
        "exact_required": dtype_name == "float32",
    }
    res["passed"] = bool(finite and (res["match"] or not res["exact_required"]))
    return res


def one_run(model, prompt: mx.array, decode_tokens: int, prefill_step_size: int = 2048) -> Dict[str, float]:
    """Prefill ``prompt`` and greedily decode ``decode_tokens`` tokens with mlx-lm's generate_step."""
    from mlx_lm.generate import generate_step

    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    gen = generate_step(prompt, model, max_tokens=decode_tokens, prefill_step_size=prefill_step_size)
    t0 = time.perf_counter()
    first, _ = next(gen)
    t1 = time.perf_counter()
    n = 1
    for _tok, _ in gen:
        n += 1
    t2 = time.perf_counter()
    mx.synchronize()
    peak = mx.get_peak_memory()
    ttft = t1 - t0
    return {
        "ttft_s": ttft,
        "prefill_tps": prompt.size / ttft,
        "decode_s": t2 - t1,
        "decode_tokens": n,
        "decode_tps": (n - 1) / (t2 - t1) if t2 > t1 and n > 1 else float("nan"),
        "peak_memory_bytes": int(peak),
        "peak_over_start_bytes": int(peak - base),
    }


METRICS = [
    # key, label, unit scale, better
    ("prefill_tps", "prefill tok/s", 1.0, "higher"),
    ("ttft_s", "TTFT ms", 1e3, "lower"),
    ("decode_tps", "decode tok/s", 1.0, "higher"),
    ("peak_memory_bytes", "peak memory MB", 1e-6, "lower"),
]


def _median(xs: List[float]) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def run_benchmark(settings: Optional[BenchSettings] = None, pair: Optional[Tuple[Any, Any]] = None,
                  meta: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the whole comparison and return the results dict (see ``write_outputs``).

    ``pair`` (ours, stock) skips model building (tests pass spies here); ``meta`` describes it.
    """
    s = (settings or BenchSettings()).resolve()
    t_start = time.perf_counter()
    if pair is None:
        what = f"preset {s.preset}" if s.model is None else s.model
        log(f"building ours and stock ({what}, {s.dtype}{', %d-bit' % s.quantize if s.quantize else ''}) ...")
        ours, stock, meta = build_pair(s)
        if s.dtype == "auto" and len(meta.get("weight_dtypes") or []) == 1:
            s.dtype = meta["weight_dtypes"][0]  # a checkpoint's stored dtype
    else:
        ours, stock = pair
        meta = dict(meta or {"source": "given"})
    sides = {"ours": Counted(ours), "stock": Counted(stock)}
    vocab = meta.get("vocab_size") or ours.args.vocab_size
    env = environment()
    log(f"device {env['device']}{' (' + env['gpu_name'] + ')' if env['gpu_name'] else ''}, "
        f"mlx {env['mlx']}, mlx-lm {env['mlx_lm']}")

    check = token_check(sides["ours"], sides["stock"], make_prompt(min(s.prompt_lengths), vocab, s.seed),
                        s.check_tokens, s.dtype, s.prefill_step_size)
    if check.get("skipped"):
        log("token check skipped")
    elif check["match"]:
        log(f"token check: {check['tokens']} greedy tokens identical "
            f"(max |logit diff| {check['max_abs_logit_diff_last_prompt_position']:.3g})")
    else:
        d = check["first_divergence"]
        level = "MISMATCH (float32 should match exactly)" if check["exact_required"] else "differs (expected drift)"
        log(f"token check: {level}: first divergence at position {d['position']}: ours {d['ours']} stock {d['stock']}")
    if not check.get("skipped") and not check["logits_finite"]:
        log("token check: non-finite logits!")

    runs: Dict[str, Dict[str, List[Dict[str, float]]]] = {side: {} for side in SIDES}
    for L in s.prompt_lengths:
        prompt = make_prompt(L, vocab, s.seed)
        for _ in range(s.warmup):
            for side in SIDES:
                one_run(sides[side], prompt, min(s.decode_tokens, 4), s.prefill_step_size)
        for side in SIDES:
            runs[side][str(L)] = []
        for r in range(s.runs):
            for side in SIDES:  # alternate: ours, stock, ours, stock ...
                res = one_run(sides[side], prompt, s.decode_tokens, s.prefill_step_size)
                runs[side][str(L)].append(res)
        o = _median([x["prefill_tps"] for x in runs["ours"][str(L)]])
        t = _median([x["prefill_tps"] for x in runs["stock"][str(L)]])
        od = _median([x["decode_tps"] for x in runs["ours"][str(L)]])
        td = _median([x["decode_tps"] for x in runs["stock"][str(L)]])
        log(f"  prompt {L:>6}: prefill {o:,.0f} vs {t:,.0f} tok/s, decode {od:,.1f} vs {td:,.1f} tok/s (ours vs stock)")

    medians: Dict[str, Dict[str, Dict[str, float]]] = {side: {} for side in SIDES}
    ratios: Dict[str, Dict[str, float]] = {}
    for L in map(str, s.prompt_lengths):
        ratios[L] = {}
        for key, *_ in METRICS + [("decode_s", None, None, None), ("peak_over_start_bytes", None, None, None)]:
            for side in SIDES:
                medians[side].setdefault(L, {})[key] = _median([x[key] for x in runs[side][L]])
            t = medians["stock"][L][key]
            ratios[L][key] = medians["ours"][L][key] / t if t else float("nan")

    results: Dict[str, Any] = {
        "schema": "gemma4-mlx-compare/1",
        "settings": asdict(s),
        "environment": env,
        "model": meta,
        "token_check": check,
        "metrics": [{"key": k, "label": lab, "scale": sc, "better": b} for k, lab, sc, b in METRICS],
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
        "forward_calls": {side: sides[side].calls for side in SIDES},
    }
    if s.with_transformers:
        results["transformers"] = transformers_reference(ours, s, vocab, log, check.get("ours_tokens"))
    results["elapsed_s"] = time.perf_counter() - t_start
    return results


# ----------------------------------------------------------------------------------------------
# HF transformers (PyTorch) reference line


def _hf_state_dict(ours: nn.Module):
    """Our parameters under HF Gemma4ForCausalLM names, as float32 numpy arrays (one at a time)."""
    params = dict(tree_flatten(ours.parameters()))
    f32 = lambda v: np.array(v.astype(mx.float32))
    for k, v in params.items():
        if k.endswith(".switch_glu.gate_proj.weight"):
            base = k[: -len(".switch_glu.gate_proj.weight")]
            up = params[base + ".switch_glu.up_proj.weight"]
            yield base + ".gate_up_proj", np.concatenate([f32(v), f32(up)], axis=-2)
        elif k.endswith(".switch_glu.up_proj.weight"):
            continue
        elif k.endswith(".switch_glu.down_proj.weight"):
            yield k[: -len(".switch_glu.down_proj.weight")] + ".down_proj", f32(v)
        else:
            yield k, f32(v)


def hf_config_kwargs(args) -> Dict[str, Any]:
    """Gemma4TextConfig kwargs for our resolved ModelArgs (published dialect; transformers reads it)."""
    return dict(
        vocab_size=args.vocab_size, vocab_size_per_layer_input=args.vocab_size_per_layer_input or args.vocab_size,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim, global_head_dim=args.global_head_dim,
        num_global_key_value_heads=args.num_global_key_value_heads, rms_norm_eps=args.rms_norm_eps,
        sliding_window=args.sliding_window, layer_types=list(args.layer_types),
        rope_parameters=args.rope_parameters, max_position_embeddings=args.max_position_embeddings,
        final_logit_softcapping=args.final_logit_softcapping, tie_word_embeddings=args.tie_word_embeddings,
        hidden_size_per_layer_input=args.hidden_size_per_layer_input, num_kv_shared_layers=args.num_kv_shared_layers,
        use_double_wide_mlp=args.use_double_wide_mlp, attention_k_eq_v=args.attention_k_eq_v,
        enable_moe_block=args.enable_moe_block, num_experts=args.num_experts, top_k_experts=args.top_k_experts,
        moe_intermediate_size=args.moe_intermediate_size, hidden_activation=args.hidden_activation,
        eos_token_id=args.eos_token_id, bos_token_id=args.bos_token_id, pad_token_id=args.pad_token_id,
    )


def _prefix_match(a: List[int], b: Optional[List[int]]):
    if not b:
        return None
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def transformers_reference(ours: nn.Module, s: BenchSettings, vocab: int, log: Callable[[str], None],
                           check_tokens: Optional[List[int]] = None) -> Dict[str, Any]:
    """Prefill and decode tok/s of HF Gemma4ForCausalLM with the same weights (PyTorch)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        log(f"transformers reference skipped: {e.name or e} is not installed")
        return {"skipped": f"{e.name or e} not installed"}
    if _quant_specs(ours):
        log("transformers reference skipped: quantized MLX weights have no transformers equivalent here")
        return {"skipped": "quantized weights"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        s.dtype if s.dtype != "auto" else "bfloat16")
    log(f"transformers reference: HF Gemma4ForCausalLM on {dev} ({tdtype}) ...")
    try:
        cfg = transformers.Gemma4TextConfig(**hf_config_kwargs(ours.args))
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:
            pass
        with torch.device(dev):
            hf = transformers.Gemma4ForCausalLM(cfg)
        hf = hf.to(dtype=tdtype)
        sd = {k: torch.from_numpy(v).to(device=dev, dtype=tdtype) for k, v in _hf_state_dict(ours)}
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        real_missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if real_missing or unexpected:
            raise RuntimeError(f"weight names differ: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
        hf = hf.to(device=dev, dtype=tdtype).eval()
    except Exception as e:
        log(f"transformers reference skipped: could not build the model: {type(e).__name__}: {e}")
        return {"skipped": f"build failed: {type(e).__name__}: {e}"}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    import inspect

    # transformers >= 5.3x renamed past_key_values to cache
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def _hf_cache(out):
        return getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values

    def run(L: int, n: int) -> Dict[str, Any]:
        """Greedy loop with HF's KV cache: one forward over the prompt, then one per token."""
        ids = torch.from_numpy(np.array(make_prompt(L, vocab, s.seed)).astype(np.int64))[None].to(dev)
        toks = []
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt.item()))
            t1 = time.perf_counter()
            past = _hf_cache(out)
            for _ in range(n - 1):
                out = hf(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past = _hf_cache(out)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(nxt.item()))
            sync()
            t2 = time.perf_counter()
        ttft = t1 - t0
        return {"ttft_s": ttft, "prefill_tps": L / ttft, "decode_tps": (n - 1) / (t2 - t1), "tokens": toks}

    res: Dict[str, Any] = {"device": dev, "dtype": str(tdtype), "torch": torch.__version__,
                           "transformers": transformers.__version__, "runs": {}, "medians": {}}
    try:
        for L in s.prompt_lengths:
            warm = run(L, max(2, min(s.decode_tokens, 8)))  # warm-up
            if L == min(s.prompt_lengths):
                res["tokens_match_ours"] = _prefix_match(warm["tokens"], check_tokens)
            rs = [run(L, s.decode_tokens) for _ in range(s.runs)]
            res["runs"][str(L)] = [{k: v for k, v in r.items() if k != "tokens"} for r in rs]
            res["medians"][str(L)] = {k: _median([r[k] for r in rs]) for k in ("ttft_s", "prefill_tps", "decode_tps")}
            log(f"  transformers prompt {L:>6}: prefill {res['medians'][str(L)]['prefill_tps']:,.0f} tok/s, "
                f"decode {res['medians'][str(L)]['decode_tps']:,.1f} tok/s")
        res["note"] = ("greedy loop over HF's KV cache (one forward for the prompt, one per token), "
                       "sdpa attention; tokens_match_ours compares its first tokens with ours' token check")
    except Exception as e:
        log(f"transformers reference failed: {type(e).__name__}: {e}")
        res["error"] = f"{type(e).__name__}: {e}"
    return res


# ----------------------------------------------------------------------------------------------
# output


def _num(v) -> float:
    """A number from results that may have come back from JSON (NaN is stored as null)."""
    return float("nan") if v is None else float(v)


def _fmt(v: float, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key == "ttft_s":
        return f"{v * 1e3:,.1f}"
    if key.endswith("bytes"):
        return f"{v / 1e6:,.1f}"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def table_rows(results: Dict[str, Any]) -> List[List[str]]:
    rows = []
    hf = results.get("transformers") or {}
    hf_med = hf.get("medians") or {}
    for key, label, _scale, better in METRICS:
        for L in results["medians"]["ours"]:
            o = results["medians"]["ours"][L][key]
            t = results["medians"]["stock"][L][key]
            r = _num(results["ratios"][L][key])
            row = [f"{label} @{L}", _fmt(o, key), _fmt(t, key),
                   "-" if math.isnan(r) else f"{r:.3f}", f"{better} is better"]
            if hf_med:
                row.append(_fmt(hf_med.get(L, {}).get(key, float("nan")), key) if key in ("prefill_tps", "decode_tps", "ttft_s") else "-")
            rows.append(row)
    return rows


def _headers(results) -> List[str]:
    h = ["metric", "ours", "stock", "ours/stock", "note"]
    if (results.get("transformers") or {}).get("medians"):
        h.append("transformers")
    return h


def format_table(results: Dict[str, Any]) -> str:
    headers = _headers(results)
    rows = table_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out) + "\n" + summary_line(results)


def summary_line(results: Dict[str, Any]) -> str:
    s, m, env, chk = results["settings"], results["model"], results["environment"], results["token_check"]
    what = m.get("preset") or m.get("model") or m.get("source")
    q = f", {s['quantize']}-bit" if s.get("quantize") else ""
    if chk.get("skipped"):
        c = "token check skipped"
    elif chk["match"]:
        c = f"token check: {chk['tokens']} greedy tokens identical"
    else:
        d = chk["first_divergence"]
        c = f"token check: first divergence at {d['position']} (ours {d['ours']}, stock {d['stock']})"
    return (f"{what} ({s['dtype']}{q}), {s['runs']} runs/side alternated, {s['decode_tokens']} decode tokens; "
            f"{env['device']}{' ' + env['gpu_name'] if env.get('gpu_name') else ''}; mlx {env['mlx']}, "
            f"mlx-lm {env['mlx_lm']}; {c}")


def markdown_table(results: Dict[str, Any]) -> str:
    headers = _headers(results)
    rows = table_rows(results)
    env, s = results["environment"], results["settings"]
    md = [
        f"# gemma4-mlx vs stock mlx-lm ({results['model'].get('preset') or results['model'].get('model')})",
        "",
        f"- device: {env['device']}{' — ' + env['gpu_name'] if env.get('gpu_name') else ''} ({env['cpu']}, {env['cpu_count']} CPUs)",
        f"- MLX {env['mlx']}, mlx-lm {env['mlx_lm']}, Python {env['python']}",
        f"- date {env['date']}, commit {env['git_commit']}, kernels {env['kernels'].get('mode', env['kernels'].get('env'))}",
        f"- dtype {s['dtype']}" + (f", {s['quantize']}-bit group 64" if s.get("quantize") else "")
        + f", {s['runs']} runs per side (alternated), {s['warmup']} warm-up, {s['decode_tokens']} decode tokens",
        f"- command: `{env['command']}`",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", summary_line(results), ""]
    return "\n".join(md)


def plot(results: Dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = list(results["medians"]["ours"])
    hf_med = (results.get("transformers") or {}).get("medians") or {}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.0))
    x = np.arange(len(lengths))
    for ax, (key, label, scale, better) in zip(axes, METRICS):
        series = [("ours", [_num(results["medians"]["ours"][L][key]) * scale for L in lengths]),
                  ("stock mlx-lm", [_num(results["medians"]["stock"][L][key]) * scale for L in lengths])]
        if hf_med and key in ("prefill_tps", "decode_tps", "ttft_s"):
            series.append(("transformers", [_num(hf_med.get(L, {}).get(key)) * scale for L in lengths]))
        w = 0.8 / len(series)
        for i, (name, vals) in enumerate(series):
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=name)
            if name == "ours":
                for b, L in zip(bars, lengths):
                    r = _num(results["ratios"][L][key])
                    if not math.isnan(r):
                        ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, lengths)
        ax.set_xlabel("prompt tokens")
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
    axes[0].legend(fontsize=8)
    env, s = results["environment"], results["settings"]
    fig.suptitle(f"{results['model'].get('preset') or results['model'].get('model')} {s['dtype']}"
                 f"{' %d-bit' % s['quantize'] if s.get('quantize') else ''} — {env['device']}"
                 f"{' ' + env['gpu_name'] if env.get('gpu_name') else ''} — ratio labels: ours/stock", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _jsonable(float(o))
    return o


def output_stem(results: Dict[str, Any]) -> str:
    s = results["settings"]
    name = results["model"].get("preset") or Path(str(results["model"].get("model", "model"))).name
    q = f"-q{s['quantize']}" if s.get("quantize") else ""
    return f"compare-{name}-{s['dtype']}{q}"


def write_outputs(results: Dict[str, Any], out_dir: Path) -> Dict[str, Optional[Path]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(results)
    paths: Dict[str, Optional[Path]] = {}
    paths["json"] = out_dir / f"{stem}.json"
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1))
    paths["md"] = out_dir / f"{stem}.md"
    paths["md"].write_text(markdown_table(results))
    paths["png"] = plot(results, out_dir / f"{stem}.png")
    return paths


def run_kernel_benchmarks(args: List[str], out_file: Optional[Path] = None) -> int:
    """Delegate to ``bench/kernels.py`` (the kernel micro-benchmarks) if it exists; tee to ``out_file``."""
    root = Path(__file__).resolve().parent.parent
    script = root / "bench" / "kernels.py"
    if not script.is_file():
        print(f"kernel benchmarks: {script} does not exist; skipped", file=sys.stderr)
        return 0
    print(f"\nkernel benchmarks: {sys.executable} bench/kernels.py {' '.join(args)}", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, str(script), *args], cwd=root, stdout=subprocess.PIPE, text=True)
    print(r.stdout, end="")
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(r.stdout)
        print(f"wrote {out_file}")
    return r.returncode
