"""Quantizing a model with mlx-lm's quantizer: its modes and its mixed-bit recipes.

Modes (``mode``, mlx-lm's ``--q-mode``) and the bits / group sizes each allows; the default is
mlx-lm's. Every mode quantizes and runs on MLX's CPU backend as well as on Metal and CUDA.

=========  ==================  ==============  =========
mode       bits                group size      default
=========  ==================  ==============  =========
affine     2, 3, 4, 5, 6, 8    32, 64, 128     4 / 64
mxfp4      4                   32              4 / 32
nvfp4      4                   16              4 / 16
mxfp8      8                   32              8 / 32
=========  ==================  ==============  =========

Whatever the mode, the MoE router stays at 8 bits (affine, group 64), as stock does: it decides
which experts run. Recipes (mlx-lm's ``--quant-predicate``: ``mixed_2_6``, ``mixed_3_4``,
``mixed_3_6``, ``mixed_4_6``) give the value and down projections of some layers the higher bit
width and the rest the lower one; like mlx-lm, they are affine only.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Optional, Tuple

from ..errors import CheckpointError

# mode: (allowed bits, allowed group sizes, (default bits, default group size))
Q_MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), (4, 64)),
    "mxfp4": ((4,), (32,), (4, 32)),
    "nvfp4": ((4,), (16,), (4, 16)),
    "mxfp8": ((8,), (32,), (8, 32)),
}
ROUTER_QUANTIZATION = {"group_size": 64, "bits": 8}


def quant_recipes() -> Tuple[str, ...]:
    """mlx-lm's mixed-bit recipes (``mlx_lm.convert --quant-predicate``)."""
    from mlx_lm.convert import QUANT_RECIPES

    return tuple(QUANT_RECIPES)


def quantization_params(mode: str = "affine", bits: Optional[int] = None,
                        group_size: Optional[int] = None, recipe: Optional[str] = None) -> Tuple[int, int]:
    """(bits, group size) for ``mode``: mlx-lm's defaults for what is not given; a CheckpointError
    naming the flag for what the mode does not allow."""
    if mode not in Q_MODES:
        raise CheckpointError(f"--q-mode must be one of {', '.join(Q_MODES)} (got {mode!r})")
    allowed_bits, allowed_groups, (default_bits, default_group) = Q_MODES[mode]
    bits = default_bits if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if bits not in allowed_bits:
        raise CheckpointError(f"--q-bits must be {' or '.join(map(str, allowed_bits))} with --q-mode {mode} "
                              f"(got {bits})")
    if group_size not in allowed_groups:
        raise CheckpointError(f"--q-group-size must be {' or '.join(map(str, allowed_groups))} with --q-mode "
                              f"{mode} (got {group_size})")
    if recipe is not None:
        if recipe not in quant_recipes():
            raise CheckpointError(f"--quant-predicate must be one of {', '.join(quant_recipes())} (got {recipe!r})")
        if mode != "affine":
            raise CheckpointError(f"--quant-predicate recipes quantize with --q-mode affine only (got {mode})")
    return bits, group_size


def _predicate(model, group_size: int, recipe: Optional[str]):
    """The model's own predicate (router at 8 bits); with a recipe, the recipe for everything else."""
    if recipe is None:
        return model.quant_predicate
    from mlx_lm.convert import mixed_quant_predicate_builder

    mixed = mixed_quant_predicate_builder(recipe, model, group_size)

    def predicate(path, module):
        if path.endswith("router.proj"):
            return dict(ROUTER_QUANTIZATION)
        return mixed(path, module)

    return predicate


def quantize_model(model, group_size: Optional[int] = None, bits: Optional[int] = None, mode: str = "affine",
                   recipe: Optional[str] = None) -> Dict[str, Any]:
    """Quantize ``model`` in place with mlx-lm's quantizer and return the ``quantization`` config
    it implies (per-layer entries where a layer differs from the global setting)."""
    from mlx_lm.utils import quantize_model as mlx_lm_quantize_model

    bits, group_size = quantization_params(mode, bits, group_size, recipe)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the bits per weight
        _, config = mlx_lm_quantize_model(model, {}, group_size=group_size, bits=bits, mode=mode,
                                          quant_predicate=_predicate(model, group_size, recipe))
    return config["quantization"]
