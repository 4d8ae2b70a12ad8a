"""Custom GPU kernels for gemma4-mlx (Metal and CUDA from one body each).

Public functions (each dispatches: kernel on a GPU backend after a one-time
self-check per shape class, else the pure-MLX reference):

* :func:`q_norm_rope`, :func:`kv_norm_rope`, :func:`qkv_norm_rope` (:func:`qkv_norm_rope_joined`: over the
  joined q/k/v projection's output itself)
* :func:`attention`
* :func:`embed`, :func:`embed_quantized` (the token embedding: clamp, gather, scale; on on CUDA, off on Metal)
* :func:`ple_combine`, :func:`ple_gate` (and :func:`geglu`, the MLP's, through its kernel)
* :func:`scale`, :func:`residual_scale`, :func:`softcap` (a runtime scalar, element-wise)
* :func:`residual_norm` (norm + residual add + layer scalar + the next norm)
* :func:`norm_pair`, :func:`moe_topk` (a MoE layer's two norms at a time; the router's top-k)
* :func:`matvec`, :func:`quantized_matvec` and their gated forms (``_geglu``: a joined gate/up
  projection and its GeGLU; ``_gate``: a PLE gate), off by default
* :func:`ple_tail` (a PLE layer's close: gate and projection matvecs, gelu gate, residual_norm;
  off by default)

Switches: :func:`set_kernels_mode`, :func:`kernels_mode` (context manager),
env ``GEMMA4_MLX_KERNELS=auto|off|strict``; :func:`kernels_enabled`,
:func:`active_backend`. See docs/kernels.md.
"""

from .attention import (
    attention,
    attention_kernel,
    attention_mask,
    attention_prefix,
    attention_prefix_q,
    attention_prefix_q_reference,
    attention_prefix_reference,
    attention_reference,
)
from .dispatch import (
    KernelCheckError,
    active_backend,
    get_mode,
    is_disabled,
    kernels_enabled,
    kernels_mode,
    set_kernels_mode,
)
from .embed import embed, embed_kernel, embed_quantized, embed_quantized_reference, embed_reference
from .ple import (
    geglu,
    geglu_joined,
    geglu_joined_kernel,
    geglu_joined_reference,
    gelu_tanh_reference,
    ple_combine,
    ple_combine_kernel,
    ple_combine_quantized,
    ple_combine_quantized_reference,
    ple_combine_reference,
    ple_gate,
    ple_gate_kernel,
    ple_gate_reference,
)
from .residual import residual_norm, residual_norm_kernel, residual_norm_reference
from .moe import (
    moe_topk,
    moe_topk_kernel,
    moe_topk_reference,
    norm_pair,
    norm_pair_close,
    norm_pair_close_kernel,
    norm_pair_close_reference,
    norm_pair_kernel,
    norm_pair_reference,
)
from .scalar import residual_scale, scale, scale_kernel, scale_reference, softcap
from .ple_tail import ple_tail, ple_tail_kernel, ple_tail_reference
from .mv import (
    GATE,
    GEGLU,
    PLAIN,
    close_rows_enabled,
    matvec,
    matvec_gate,
    matvec_gate_kernel,
    matvec_gate_reference,
    matvec_geglu,
    matvec_geglu_kernel,
    matvec_geglu_reference,
    matvec_kernel,
    matvec_reference,
    residual_matvec,
    residual_matvec_kernel,
    residual_matvec_reference,
    matvec_close,
    matvec_close_kernel,
    matvec_close_reference,
)
from .qmv import (
    quantized_matvec,
    quantized_matvec_gate,
    quantized_matvec_gate_kernel,
    quantized_matvec_gate_reference,
    quantized_matvec_geglu,
    quantized_matvec_geglu_kernel,
    quantized_matvec_geglu_reference,
    quantized_matvec_kernel,
    quantized_matvec_reference,
    quantized_residual_matvec,
    quantized_residual_matvec_kernel,
    quantized_residual_matvec_reference,
    quantized_matvec_close,
    quantized_matvec_close_kernel,
    quantized_matvec_close_reference,
    quantized_matvec_close_gate,
    quantized_matvec_close_gate_kernel,
    quantized_matvec_close_gate_reference,
)
from .rope import (
    kv_norm_rope,
    kv_norm_rope_kernel,
    kv_norm_rope_reference,
    q_norm_rope,
    q_norm_rope_kernel,
    q_norm_rope_reference,
    qkv_norm_rope,
    qkv_norm_rope_joined,
    qkv_norm_rope_joined_kernel,
    qkv_norm_rope_joined_reference,
    qkv_norm_rope_kernel,
    qkv_norm_rope_reference,
    rms_norm_reference,
    rope_reference,
    split_heads,
)

__all__ = [
    "KernelCheckError", "active_backend", "get_mode", "kernels_enabled", "kernels_mode", "set_kernels_mode",
    "matvec", "matvec_kernel", "matvec_reference", "matvec_geglu", "matvec_geglu_kernel", "matvec_geglu_reference",
    "matvec_gate", "matvec_gate_kernel", "matvec_gate_reference", "residual_matvec", "residual_matvec_kernel",
    "residual_matvec_reference", "matvec_close", "matvec_close_kernel", "matvec_close_reference", "PLAIN", "GEGLU", "GATE", "is_disabled",
    "quantized_matvec", "quantized_matvec_kernel", "quantized_matvec_reference", "quantized_matvec_geglu",
    "quantized_matvec_geglu_kernel", "quantized_matvec_geglu_reference", "quantized_matvec_gate",
    "quantized_matvec_gate_kernel", "quantized_matvec_gate_reference", "quantized_residual_matvec",
    "quantized_residual_matvec_kernel", "quantized_residual_matvec_reference", "quantized_matvec_close",
    "quantized_matvec_close_kernel", "quantized_matvec_close_reference", "quantized_matvec_close_gate",
    "quantized_matvec_close_gate_kernel", "quantized_matvec_close_gate_reference",
    "q_norm_rope", "kv_norm_rope", "qkv_norm_rope", "qkv_norm_rope_kernel", "qkv_norm_rope_reference",
    "qkv_norm_rope_joined", "qkv_norm_rope_joined_kernel", "qkv_norm_rope_joined_reference", "split_heads", "attention", "attention_prefix", "attention_prefix_reference", "attention_prefix_q",
    "attention_prefix_q_reference", "ple_combine", "ple_combine_quantized", "ple_gate",
    "q_norm_rope_reference", "kv_norm_rope_reference", "attention_reference", "ple_combine_reference",
    "ple_combine_quantized_reference", "embed", "embed_kernel", "embed_quantized", "embed_quantized_reference",
    "embed_reference",
    "ple_gate_reference", "rms_norm_reference", "rope_reference", "gelu_tanh_reference",
    "q_norm_rope_kernel", "kv_norm_rope_kernel", "attention_kernel", "ple_combine_kernel", "ple_gate_kernel",
    "attention_mask", "residual_norm", "residual_norm_kernel", "residual_norm_reference",
    "ple_tail", "ple_tail_kernel", "ple_tail_reference", "geglu", "geglu_joined", "geglu_joined_kernel",
    "geglu_joined_reference", "scale", "residual_scale", "softcap",
    "scale_kernel", "scale_reference", "norm_pair", "norm_pair_close", "norm_pair_close_kernel",
    "norm_pair_close_reference", "norm_pair_kernel", "norm_pair_reference", "moe_topk",
    "moe_topk_kernel", "moe_topk_reference",
]
