"""``gemma4-mlx compare``: this package's Gemma 4 against stock mlx-lm, same weights, one process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import app, user_errors


def _lengths(text: Optional[str], what: str = "prompt lengths") -> Optional[List[int]]:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}")
    if not vals:
        raise typer.BadParameter(f"no {what} given")
    return vals


@app.command()
def compare(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hub repo id (real weights)."),
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p",
        help="Architecture preset with fixed-seed random weights: e2b, e4b, 26b-a4b, 31b, e2b-mini, tiny... "
             "(default e2b-mini when no --model)."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16, float16, float32 or auto (float32 on CPU, "
                                                       "bfloat16 on GPU; checkpoints: as stored)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantize both models identically: 4 or 8 "
                                                                          "bits, group 64 (router at 8 bits)."),
    prompt_lengths: Optional[str] = typer.Option(
        None, "--prompt-lengths", "-L", help="Comma-separated prompt lengths (default 128,841,4096 on GPU; 64,256 on CPU)."),
    long: bool = typer.Option(False, "--long", help="Also measure a 32768-token prompt."),
    decode_tokens: Optional[int] = typer.Option(None, "--decode-tokens", "-n",
                                                help="Tokens generated after each prompt (default 128 GPU, 16 CPU)."),
    runs: Optional[int] = typer.Option(None, "--runs", "-r", help="Timed runs per side and length (default 5 GPU, 3 CPU; --e2e: 3 GPU, 2 CPU, "
                                                                "after one first run each)."),
    warmup: int = typer.Option(1, "--warmup", help="Warm-up runs per side and length."),
    check_tokens: int = typer.Option(32, "--check-tokens", help="Greedy tokens compared before timing (0: skip)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompts."),
    prefill_step_size: int = typer.Option(2048, "--prefill-step-size", help="generate_step's prefill chunk."),
    with_transformers: bool = typer.Option(False, "--with-transformers",
                                           help="Also time HF transformers (PyTorch) with the same weights."),
    kernels: bool = typer.Option(False, "--kernels", help="Also run bench/kernel_bench.py (kernel micro-benchmarks)."),
    require_match: bool = typer.Option(False, "--require-match",
                                       help="Exit with status 3 if float32 greedy tokens differ."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write JSON, Markdown and PNG results here."),
    e2e: bool = typer.Option(False, "--e2e", help="End to end instead: `mlx_lm.generate` against `gemma4-mlx "
                                                  "generate`, each command in a fresh process on one checkpoint."),
    new_tokens: Optional[str] = typer.Option(
        None, "--new-tokens", help="--e2e: comma-separated --max-tokens of the commands (default 128,512,2048 on "
                                   "GPU; 16,64 on CPU)."),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", help="--e2e: prompt length in tokens of the checkpoint's tokenizer (default 402 on "
                                      "GPU, 128 on CPU)."),
    work: Optional[Path] = typer.Option(
        None, "--work", help="--e2e: folder for the preset's checkpoint, reused while complete "
                             "(default ~/.cache/gemma4_mlx/e2e)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="--e2e: seconds allowed per command "
                                                                     "(default 600)."),
) -> None:
    """Benchmark ours against stock mlx-lm's gemma4_text: identical weights, alternated runs, medians."""
    if e2e:
        _compare_e2e(model=model, preset=preset, dtype=dtype, quantize=quantize, runs=runs, seed=seed, out=out,
                     new_tokens=new_tokens, prompt_tokens=prompt_tokens, work=work, timeout=timeout,
                     not_e2e={"--prompt-lengths": prompt_lengths is not None, "--long": long,
                              "--decode-tokens": decode_tokens is not None, "--with-transformers": with_transformers,
                              "--kernels": kernels, "--require-match": require_match})
        return
    given = [name for name, v in (("--new-tokens", new_tokens), ("--prompt-tokens", prompt_tokens), ("--work", work),
                                  ("--timeout", timeout)) if v is not None]
    if given:
        raise typer.BadParameter(f"{', '.join(given)} only apply with --e2e")
    from ..bench.report import format_table, write_outputs
    from ..bench.run import run_benchmark, run_kernel_benchmarks
    from ..bench.settings import DTYPES, BenchmarkError, BenchSettings

    with user_errors():
        settings = BenchSettings(
            preset=preset, model=model, dtype=dtype, quantize=quantize, prompt_lengths=_lengths(prompt_lengths),
            long=long, decode_tokens=decode_tokens, runs=runs, warmup=warmup, check_tokens=check_tokens, seed=seed,
            prefill_step_size=prefill_step_size, with_transformers=with_transformers,
        )
        try:
            results = run_benchmark(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        except BenchmarkError as e:
            raise ValueError(str(e)) from e
        print()
        print(format_table(results))
        if out is not None:
            paths = write_outputs(results, out)
            for kind, path in paths.items():
                if path is None:
                    print(f"{kind}: skipped (matplotlib is not installed)" if kind == "png" else f"{kind}: skipped")
                else:
                    print(f"wrote {path}")
        status = 0
        if kernels:
            dt = results["settings"]["dtype"]
            status = run_kernel_benchmarks(["--dtype", dt] if dt in DTYPES else [],
                                           out / f"kernels-{dt}.txt" if out is not None else None)
        chk = results["token_check"]
        if require_match and chk.get("exact_required") and not chk.get("match"):
            print("error: float32 greedy tokens differ between ours and stock", file=sys.stderr)
            raise typer.Exit(3)
        if status:
            raise typer.Exit(status)


def _compare_e2e(*, model, preset, dtype, quantize, runs, seed, out, new_tokens, prompt_tokens, work, timeout,
                 not_e2e) -> None:
    """``compare --e2e``: both generate commands in fresh processes (gemma4_mlx/bench/e2e.py)."""
    from ..bench.e2e import E2ESettings, run_e2e
    from ..bench.e2e_report import format_table, write_outputs
    from ..bench.settings import BenchmarkError

    wrong = [name for name, given in not_e2e.items() if given]
    if wrong:
        raise typer.BadParameter(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply with --e2e "
                                 "(see --new-tokens, --prompt-tokens)")
    counts = _lengths(new_tokens, "new-token counts")
    with user_errors():
        settings = E2ESettings(preset=preset, model=model, dtype=dtype, quantize=quantize, prompt_tokens=prompt_tokens,
                               new_tokens=counts, runs=runs, seed=seed, work=None if work is None else str(work),
                               timeout=timeout)
        try:
            results = run_e2e(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True), out_dir=out)
        except BenchmarkError as e:
            raise ValueError(str(e)) from e
        print()
        print(format_table(results))
        if out is not None:
            for kind, path in write_outputs(results, out).items():
                if path is None:
                    print(f"{kind}: skipped (matplotlib is not installed)" if kind == "png" else f"{kind}: skipped")
                else:
                    print(f"wrote {path}")
