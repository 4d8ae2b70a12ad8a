"""``gemma4-mlx validate``: our model against HF transformers, layer by layer."""

from __future__ import annotations

from typing import Optional

import typer

from . import app, user_errors


@app.command()
def validate(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder (HF layout) or Hub repo id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to run (default: random token ids)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest relative error accepted (float32)."),
    length: int = typer.Option(24, "--length", help="Number of random tokens when no prompt is given."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt."),
) -> None:
    """Run transformers and gemma4-mlx on the same prompt in float32 and print, per layer and
    sub-block (input norm, attention, MLP, MoE, PLE, layer out) and for the logits, the max
    absolute and relative error. Exits 1 when any relative error exceeds --tolerance."""
    from ..validate import validate as run

    with user_errors():
        if tolerance <= 0:
            raise ValueError("--tolerance must be positive")
        if length < 1:
            raise ValueError("--length must be at least 1")
        report = run(model, prompt=prompt, tolerance=tolerance, length=length, seed=seed)
    typer.echo(report.table())
    worst = report.worst
    if report.ok:
        typer.echo(f"OK: worst relative error {worst.rel:.2e} ({worst.name}) <= {tolerance:g}")
    else:
        typer.echo(f"FAIL: {worst.name} relative error {worst.rel:.2e} > {tolerance:g}", err=True)
        raise typer.Exit(1)
