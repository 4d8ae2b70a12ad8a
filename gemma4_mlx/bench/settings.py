"""What a benchmark run measures: :class:`BenchSettings` and its defaults per device."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

import mlx.core as mx

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
GPU_PROMPT_LENGTHS = [128, 841, 4096]
GPU_LONG_LENGTH = 32768
CPU_PROMPT_LENGTHS = [64, 256]  # MLX on a 2-core CPU: ~10-30 tok/s prefill for e2b-mini
DEFAULT_PRESET = "e2b-mini"


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run as asked (one line, shown to the user)."""


def on_gpu() -> bool:
    return mx.default_device().type == mx.gpu


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

