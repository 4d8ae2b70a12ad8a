"""The end-to-end results (:mod:`.e2e`) as a console table, Markdown, a PNG chart and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from .e2e import DETAIL_METRICS, METRICS, OURS_COMMAND, SIDES, STOCK_COMMAND, output_stem
from .report import _jsonable, pyplot


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def fmt(v, key: str) -> str:
    v = _num(v)
    if math.isnan(v):
        return "-"
    if key == "gap_ratio":
        return f"{v:.1f}x"
    if key in ("gap_median_s", "gap_max_s"):
        return f"{v * 1e3:,.1f}"
    if key == "tokens_generated":
        return f"{v:.0f}"
    if key == "decode_tps":
        return f"{v:,.1f}"
    if key == "peak_memory_gb":
        return f"{v:.3f}"
    return f"{v:,.2f}"


def _fmt_ratio(r) -> str:
    r = _num(r)
    return "-" if math.isnan(r) else f"{r:.2f}x"


def title(results: Dict[str, Any]) -> str:
    c, s = results["checkpoint"], results["settings"]
    name = c.get("preset") or Path(str(c.get("model") or c.get("path"))).name
    q = f" {s['quantize']}-bit" if s.get("quantize") else ""
    return f"{name} {c.get('dtype') or s['dtype']}{q}, {results['prompt']['tokens']}-token prompt, fresh processes"


def table_rows(results: Dict[str, Any], metrics=METRICS) -> List[List[str]]:
    """Rows of the headline table: per new-token count, ours, stock and ours/stock; then the first runs."""
    rows = []
    for n in results["medians"]["ours"]:
        for who in ("ours", "stock"):
            m = results["medians"][who][n]
            rows.append([f"{n} new tokens: {who}"] + [fmt(m[k], k) for k, _, _ in metrics])
        rows.append([f"{n} new tokens: ours/stock"] + [_fmt_ratio(results["ratios"][n][k]) for k, _, _ in metrics])
    n0 = results["settings"]["new_tokens"][0]
    for who in ("ours", "stock"):
        r = results["first_run"][who]
        rows.append([f"first run on a fresh machine ({n0}): {who}"] + [fmt(r[k], k) for k, _, _ in metrics])
    rows.append([f"first run on a fresh machine ({n0}): ours/stock"]
                + [_fmt_ratio(results["first_run_ratios"][k]) for k, _, _ in metrics])
    return rows


def headers(results: Dict[str, Any], metrics=METRICS) -> List[str]:
    return [title(results)] + [lab for _, lab, _ in metrics]


def _notes(results: Dict[str, Any]) -> List[str]:
    notes = []
    sp = results.get("second_process") or {}
    if "ours" in sp:
        o = sp["ours"]
        verdict = {True: "no slower", False: "SLOWER", None: "unknown"}[o["no_slower"]]
        notes.append(f"ours' second fresh process: first token after {o['second_ttft_s']:.2f} s against "
                     f"{o['first_ttft_s']:.2f} s for its first ({verdict}; ratio {o['ratio']:.2f})")
    notes += _decode_spread(results)
    tok = results["tokens"]
    same = ", ".join(f"{side} {'yes' if tok['consistent'][side]['same'] else 'NO'}" for side in SIDES)
    notes.append(f"same greedy tokens in every fresh process: {same}")
    vs = tok["ours_vs_stock"]
    if vs["match"]:
        notes.append(f"ours and stock: the same {vs['compared']} greedy tokens")
    elif vs["first_divergence"]:
        d = vs["first_divergence"]
        notes.append(f"ours and stock first differ at generated token {d['position']} "
                     f"(ours {d['ours']}, stock {d['stock']}; bf16 may drift)")
    for r in results["runs"]:
        failed = (r.get("kernel_verdicts") or {}).get("failed")
        if failed:
            which = "first run" if r.get("cold") else f"round {r.get('round')}"
            notes.append(f"ours' {which} ({r['new_tokens']} new tokens) ran these kernels as MLX ops after "
                         f"their self-check failed: " + "; ".join(failed))
    short = sorted({(r["side"], r["new_tokens"], r["tokens_generated"]) for r in results["runs"]
                    if r["tokens_generated"] < r["new_tokens"]})
    if short:
        notes.append("stopped early at an end id (rates compare what was generated): "
                     + ", ".join(f"{side} {n} -> {g}" for side, n, g in short))
    return notes


def _decode_spread(results: Dict[str, Any]) -> List[str]:
    """Each warm process's decode rate per side and count, and the ratio's range over the pairings
    (a median of two or three processes moves with one slow process of either side)."""
    notes = []
    for n in results["medians"]["ours"]:
        rates = {side: [r["decode_tps"] for r in results["runs"] if r["side"] == side and not r.get("cold")
                        and str(r["new_tokens"]) == str(n) and r.get("decode_tps")] for side in SIDES}
        if not all(rates.values()):
            continue
        listed = "; ".join(f"{side} " + ", ".join(f"{v:,.1f}" for v in rates[side]) for side in SIDES)
        low, high = min(rates["ours"]) / max(rates["stock"]), max(rates["ours"]) / min(rates["stock"])
        notes.append(f"decode tok/s of each warm process ({n} new tokens): {listed}; ours/stock over the "
                     f"pairings {low:.2f}x-{high:.2f}x")
    return notes


def _text_table(hdr: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(hdr), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(results: Dict[str, Any]) -> str:
    env, s = results["environment"], results["settings"]
    parts = [_text_table(headers(results), table_rows(results)), "",
             _text_table(headers(results, DETAIL_METRICS), table_rows(results, DETAIL_METRICS)), ""]
    parts += _notes(results)
    parts.append(f"medians of {s['runs']} warm run(s) per side and count, alternated; "
                 f"{env['device']}{' ' + env['gpu_name'] if env.get('gpu_name') else ''}; mlx {env['mlx']}, "
                 f"mlx-lm {env['mlx_lm']}; TTFT counts from the spawn of the process")
    return "\n".join(parts)


def _md_table(hdr: List[str], rows: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(hdr) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(hdr))) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_table(results: Dict[str, Any]) -> str:
    env, s, c = results["environment"], results["settings"], results["checkpoint"]
    md = [f"# End to end: `{STOCK_COMMAND}` against `{OURS_COMMAND}` ({title(results)})", ""]
    md += _md_table(headers(results), table_rows(results))
    md += ["", "Wall: spawn to exit. Load: the side's `load()`. TTFT: spawn to the first token. Decode: "
           "(tokens - 1) / (last token - first token). Worst / median gap: the longest time between two "
           "tokens over the median one. Ratio ours/stock: < 1 is better, except decode tok/s.", ""]
    details_note = ("To the CLI's first statement: spawn to the command's `main` (a command that imports "
                    "lazily does its imports after it); to load(): spawn to the start of loading "
                    "(interpreter, imports, arguments: the same span on both sides).")
    md += [f"- {n}" for n in _notes(results)]
    md += ["", "Details (the same runs):", ""]
    md += _md_table(headers(results, DETAIL_METRICS), table_rows(results, DETAIL_METRICS))
    md += ["", details_note]
    md += [
        "",
        f"- device: {env['device']}{' — ' + env['gpu_name'] if env.get('gpu_name') else ''} ({env['cpu']}, "
        f"{env['cpu_count']} CPUs); MLX {env['mlx']}, mlx-lm {env['mlx_lm']}, Python {env['python']}",
        f"- date {env['date']}, commit {env['git_commit']}, code digest {env.get('source_digest')}",
        f"- checkpoint: {c.get('path')} ({c.get('source')}{', ' + c['weights'] if c.get('weights') else ''})",
        f"- {s['runs']} warm run(s) per side and new-token count (alternated, who goes first swapped every round), "
        "after one first run per side with empty kernel caches",
        f"- stock: `{results['commands']['stock']}`",
        f"- ours: `{results['commands']['ours']}`",
        f"- command: `{env['command']}`",
        "",
    ]
    return "\n".join(md)


def plot(results: Dict[str, Any], path: Path) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    counts = list(results["medians"]["ours"])
    n0 = results["settings"]["new_tokens"][0]
    labels = [f"first run\n{n0}"] + counts
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.8 * len(METRICS), 4.0))
    x = np.arange(len(labels))
    for ax, (key, label, better) in zip(axes, METRICS):
        vals = {who: [_num(results["first_run"][who][key])] + [_num(results["medians"][who][n][key]) for n in counts]
                for who in ("ours", "stock")}
        ratios = [_num(results["first_run_ratios"][key])] + [_num(results["ratios"][n][key]) for n in counts]
        w = 0.4
        bars = ax.bar(x - w / 2, vals["ours"], w, label="ours (gemma4-mlx generate)")
        ax.bar(x + w / 2, vals["stock"], w, label="stock (mlx_lm.generate)")
        for b, r in zip(bars, ratios):
            if not math.isnan(r):
                ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("new tokens")
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.margins(y=0.15)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8)
    env = results["environment"]
    fig.suptitle(f"{title(results)} — {env['device']}{' ' + env['gpu_name'] if env.get('gpu_name') else ''}"
                 " — ratio labels: ours/stock", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _compact_lists(text: str) -> str:
    """Lists of plain numbers (token ids) on one line instead of one number per line."""
    import re

    return re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_outputs(results: Dict[str, Any], out_dir: Path) -> Dict[str, Optional[Path]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(results)
    paths: Dict[str, Optional[Path]] = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(_compact_lists(json.dumps(_jsonable(results), indent=1)))
    paths["md"].write_text(markdown_table(results))
    paths["png"] = plot(results, out_dir / f"{stem}.png")
    return paths
