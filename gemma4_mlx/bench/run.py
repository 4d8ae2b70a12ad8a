"""The whole comparison (:func:`run_benchmark`) and the kernel micro-benchmarks beside it."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .environment import PROJECT_ROOT, environment
from .measure import METRICS, SIDES, counted, make_prompt, median, one_run, token_check
from .pair import build_pair
from .reference import transformers_reference
from .settings import BenchSettings


def run_benchmark(settings: Optional[BenchSettings] = None, pair: Optional[Tuple[Any, Any]] = None,
                  meta: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the whole comparison and return the results dict (see :func:`.report.write_outputs`).

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
    sides = {"ours": counted(ours), "stock": counted(stock)}
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
        o = median([x["prefill_tps"] for x in runs["ours"][str(L)]])
        t = median([x["prefill_tps"] for x in runs["stock"][str(L)]])
        od = median([x["decode_tps"] for x in runs["ours"][str(L)]])
        td = median([x["decode_tps"] for x in runs["stock"][str(L)]])
        log(f"  prompt {L:>6}: prefill {o:,.0f} vs {t:,.0f} tok/s, decode {od:,.1f} vs {td:,.1f} tok/s (ours vs stock)")

    medians: Dict[str, Dict[str, Dict[str, float]]] = {side: {} for side in SIDES}
    ratios: Dict[str, Dict[str, float]] = {}
    for L in map(str, s.prompt_lengths):
        ratios[L] = {}
        for key, *_ in METRICS + [("decode_s", None, None, None), ("peak_over_start_bytes", None, None, None)]:
            for side in SIDES:
                medians[side].setdefault(L, {})[key] = median([x[key] for x in runs[side][L]])
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


def run_kernel_benchmarks(args: List[str], out_file: Optional[Path] = None) -> int:
    """Delegate to ``bench/kernel_bench.py`` (the kernel micro-benchmarks) if it exists; tee to ``out_file``."""
    root = PROJECT_ROOT
    script = root / "bench" / "kernel_bench.py"
    if not script.is_file():
        print(f"kernel benchmarks: {script} does not exist; skipped", file=sys.stderr)
        return 0
    print(f"\nkernel benchmarks: {sys.executable} {script.relative_to(root)} {' '.join(args)}", file=sys.stderr,
          flush=True)
    r = subprocess.run([sys.executable, str(script), *args], cwd=root, stdout=subprocess.PIPE, text=True)
    print(r.stdout, end="")
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(r.stdout)
        print(f"wrote {out_file}")
    return r.returncode
