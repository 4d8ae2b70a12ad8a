"""Writing checkpoints: random-weight Gemma 4 checkpoints in the exact HF layout, and MLX conversions.

* :mod:`.random_weights`: :func:`write_random_checkpoint` streams random tensors straight into
  safetensors files (one chunk in memory at a time, so E2B's 4.6B parameters never sit in memory).
* :mod:`.convert`: :func:`convert_checkpoint` loads any checkpoint :mod:`gemma4_mlx.loading`
  reads, casts and optionally quantizes it (:mod:`.quantize`), and writes an MLX checkpoint stock
  mlx-lm can also load.
* :mod:`.output`: both write into a temporary folder beside the target and rename it into place
  at the end, so an interrupted run never leaves a half-written folder.
* :mod:`.dialects`: config.json in the published or the per-layer dialect.

Reading is elsewhere: :mod:`gemma4_mlx.loading`, :mod:`gemma4_mlx.safetensors_io` and
:mod:`gemma4_mlx.memory`, none of which imports this package.
"""

from ..errors import CheckpointError
from .convert import convert_checkpoint
from .random_weights import checkpoint_config, write_random_checkpoint

__all__ = ["CheckpointError", "checkpoint_config", "convert_checkpoint", "write_random_checkpoint"]
