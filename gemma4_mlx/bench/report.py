"""Writing results: the console table, Markdown, a PNG chart and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .measure import METRICS


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
        f"- date {env['date']}, commit {env['git_commit']} (code digest {env.get('source_digest')}), kernels {env['kernels'].get('mode', env['kernels'].get('env'))}",
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


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(results: Dict[str, Any], path: Path) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
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
