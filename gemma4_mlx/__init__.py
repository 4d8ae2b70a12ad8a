"""Gemma 4 on MLX: the text models, custom GPU kernels, generation and benchmarks."""

__version__ = "0.1.0"

from .config import ConfigError, LayerPlan, ModelArgs, parse_config  # noqa: E402
from .loading import LoadError, load, load_model  # noqa: E402
from .model import Model  # noqa: E402
from .generation import generate, stream_generate  # noqa: E402

__all__ = [
    "ConfigError", "LayerPlan", "LoadError", "Model", "ModelArgs", "generate", "load", "load_model", "parse_config",
    "stream_generate",
]

