"""Quantizing a model with mlx-lm's quantizer."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict


def quantize_model(model, group_size: int, bits: int) -> Dict[str, Any]:
    """Quantize ``model`` in place with mlx-lm's quantizer (the model's ``quant_predicate`` keeps
    the MoE router at 8 bits) and return the ``quantization`` config it implies."""
    from mlx_lm.utils import quantize_model as mlx_lm_quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the bits per weight
        _, config = mlx_lm_quantize_model(model, {}, group_size=group_size, bits=bits)
    return config["quantization"]
