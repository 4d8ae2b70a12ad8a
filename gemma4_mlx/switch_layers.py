"""What this package reproduces of mlx-lm's ``switch_layers``: whether a ``SwitchGLU`` still has
its own projections, and one projection's gathered product. The decode step (``ops.switch_glu``:
the gathers' batch indices as constants of the trace) and a prompt chunk's experts in blocks
(:mod:`expert_blocks`) both call its projections through these instead of the module."""
from __future__ import annotations

from typing import Optional

import mlx.core as mx


def own_projections(glu) -> bool:
    """mlx-lm's SwitchGLU with its own bias-free ``SwitchLinear`` / ``QuantizedSwitchLinear``
    projections (a LoRA'd or otherwise changed projection keeps the module's call)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

    return type(glu) is SwitchGLU and all(
        type(p) in (SwitchLinear, QuantizedSwitchLinear) and "bias" not in p
        for p in (glu.gate_proj, glu.up_proj, glu.down_proj))


def product(proj, x: mx.array, experts: mx.array, batch: Optional[mx.array] = None) -> mx.array:
    """``proj(x, experts)`` for a projection :func:`own_projections` accepts: each batch entry of
    ``x`` (``batch`` picks them; None: in order) times its expert's weights."""
    if "scales" in proj:  # QuantizedSwitchLinear
        return mx.gather_qmm(x, proj["weight"], proj["scales"], proj.get("biases"), lhs_indices=batch,
                             rhs_indices=experts, transpose=True, group_size=proj.group_size, bits=proj.bits,
                             mode=proj.mode, global_scale=proj.global_scale)
    return mx.gather_mm(x, proj["weight"].swapaxes(-1, -2), lhs_indices=batch, rhs_indices=experts)
