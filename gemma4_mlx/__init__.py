"""Gemma 4 on MLX: the text models, custom GPU kernels, generation and benchmarks.

The public names are imported on first use, so ``import gemma4_mlx`` (and the ``gemma4-mlx``
command's start) does not pay for MLX and mlx-lm until they are needed.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "config", "LayerPlan": "config", "ModelArgs": "config", "parse_config": "config",
    "LoadError": "loading", "load": "loading", "load_model": "loading",
    "Model": "model",
    "generate": "generation", "stream_generate": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gemma4_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gemma4_mlx.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
