"""Gemma 4 on MLX: the text models, custom GPU kernels, generation and benchmarks."""

__version__ = "0.1.0"

from .config import ConfigError, LayerPlan, ModelArgs, parse_config  # noqa: E402
from .loading import LoadError, load, load_model  # noqa: E402
from .model import Model  # noqa: E402

__all__ = ["ConfigError", "LayerPlan", "LoadError", "Model", "ModelArgs", "load", "load_model", "parse_config"]


def __getattr__(name):
    # generate/stream_generate pull in mlx-lm's generation stack: import on first use.
    if name in ("generate", "stream_generate"):
        from . import generate as _generate

        return getattr(_generate, name)
    raise AttributeError(name)
