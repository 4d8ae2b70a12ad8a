"""Kernel body sources for gemma4_mlx.kernels.

Each ``*.inc`` file holds ONE kernel body, written once for both Metal
(``mx.fast.metal_kernel``) and CUDA (``mx.fast.cuda_kernel``). The per-backend
``prelude_metal.h`` / ``prelude_cuda.h`` supply the few names a body uses for
thread ids, warp reductions, shared memory, barriers and float math. Loaded
with ``importlib.resources`` by ``gemma4_mlx.kernels.dispatch``.
"""
