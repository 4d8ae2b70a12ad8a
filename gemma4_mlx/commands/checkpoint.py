"""``gemma4-mlx init`` (random-weight checkpoints) and ``gemma4-mlx convert`` (to MLX)."""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import typer

from . import app, user_errors


@contextlib.contextmanager
def _progress(desc: str, enabled: bool = True):
    """A byte-progress callback backed by tqdm (stderr); a no-op when disabled."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                       leave=True)
        bar.update(done - bar.n)
        bar.set_postfix_str(label[-40:], refresh=False)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@app.command()
def init(
    preset: str = typer.Option(..., "--preset", help="Architecture preset: e2b, e4b, 26b-a4b, 31b, tiny, ..."),
    out: str = typer.Option(..., "--out", help="Folder to create (must not exist or be empty, unless --force)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the weights."),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty folder."),
    dialect: str = typer.Option("published", "--dialect", help="config.json dialect: published or per_layer."),
    wrapper: bool = typer.Option(False, "--wrapper", help="Write the multimodal wrapper layout (model_type gemma4)."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Leave the chat template out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a random-weight Gemma 4 checkpoint (HF layout, real tokenizer) for tests and benchmarks."""
    with user_errors():
        from ..checkpoint.random_weights import write_random_checkpoint

        with _progress(f"init {preset}", not quiet) as progress:
            path = write_random_checkpoint(preset, out, dtype=dtype, seed=seed, force=force, dialect=dialect,
                                           wrapper=wrapper, chat_template=not no_chat_template, progress=progress)
        typer.echo(f"wrote {path}")


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", "--model",
                                help="Source checkpoint: a folder or a Hugging Face repo id."),
    mlx_path: str = typer.Option("mlx_model", "--mlx-path", help="Output folder."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Type of the non-quantized parameters: float16, bfloat16 or float32 "
                                             "(default: as stored)."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights (router kept at 8 bits)."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits",
                                         help="Bits per weight. affine: 2, 3, 4, 5, 6 or 8 (default 4); mxfp4 and "
                                              "nvfp4: 4; mxfp8: 8."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size",
                                               help="Group size. affine: 32, 64 or 128 (default 64); mxfp4 and "
                                                    "mxfp8: 32; nvfp4: 16."),
    q_mode: str = typer.Option("affine", "--q-mode", help="Quantization mode: affine, mxfp4, nvfp4 or mxfp8."),
    quant_predicate: Optional[str] = typer.Option(
        None, "--quant-predicate",
        help="Mixed-bit recipe (affine): mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6; the value and down "
             "projections of some layers get the higher width."),
    upload_repo: Optional[str] = typer.Option(None, "--upload-repo",
                                              help="Upload the result to this Hugging Face repo (owner/name)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output checkpoint folder."),
    strict_memory: bool = typer.Option(False, "--strict-memory",
                                       help="Refuse to load when the device lacks the memory."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Convert a Gemma 4 checkpoint to MLX (cast, optionally quantize), written atomically.

    The flags are mlx_lm.convert's (--model is --hf-path); --force, --strict-memory, --revision
    and --quiet are this tool's own.
    """
    with user_errors():
        from ..checkpoint.convert import convert_checkpoint

        with _progress("convert", not quiet) as progress:
            path = convert_checkpoint(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits,
                                      q_group_size=q_group_size, q_mode=q_mode, quant_predicate=quant_predicate,
                                      force=force, strict_memory=strict_memory, revision=revision,
                                      upload_repo=upload_repo, progress=progress)
        typer.echo(f"wrote {path}")
        if upload_repo is not None:
            typer.echo(f"uploaded to https://huggingface.co/{upload_repo}")
