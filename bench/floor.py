"""The weight-read floor of one decode token, per family and dtype (issue 14).

A decode step of batch 1 must read every weight it uses once: the projections of every layer
(KV-shared layers have no k/v projections: they reuse an earlier layer's cache), the top-k
experts of a MoE layer (their share of the expert tensors), the norms, and the tied LM head (the
whole embedding table); of the embedding and per-layer-embedding tables only one row each. The
floor is those bytes over a memory bandwidth: no decoder can be faster at batch 1.

    python bench/floor.py                       # every family, bf16 / 8-bit / 4-bit, at 3,000 GB/s
    python bench/floor.py --bandwidth 4000 --measured e2b:bf16:108.7 --measured e2b:4:98.2

``--measured family:bits:tok/s`` adds the fraction of the floor a measured decode reaches. The
model is built lazily (shapes only: nothing is allocated); quantized sizes follow MLX's affine
format (``bits`` per weight, a bf16 scale and bias per group of 64; the MoE router at 8 bits, as
mlx-lm's and our predicate keep it), and a matrix whose input width is not a multiple of the
group size stays in bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx.utils import tree_flatten  # noqa: E402

from gemma4_mlx import Model, parse_config  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

FAMILIES = ("e2b", "e4b", "26b-a4b", "31b")
GROUP = 64


def _bytes(shape, bits: int) -> float:
    """Bytes of one tensor in bf16, or quantized to ``bits`` (a matrix whose rows split into groups)."""
    n = 1
    for s in shape:
        n *= s
    if bits == 16 or len(shape) < 2 or shape[-1] % GROUP:
        return 2.0 * n
    return n * bits / 8 + 2 * 2.0 * n / GROUP


def token_bytes(family, bits: int) -> dict:
    """Bytes of weights one decode token reads, by part: layers, experts, head, tables, total
    (``family``: a preset name or a config dict)."""
    args = parse_config(preset_config(family) if isinstance(family, str) else family)
    model = Model(args)
    parts = {"layers": 0.0, "experts": 0.0, "head": 0.0, "tables": 0.0}
    for path, value in tree_flatten(model.parameters()):
        shape = tuple(value.shape)
        if path.endswith("embed_tokens.weight"):
            if args.tie_word_embeddings:  # the tied head reads the whole table
                parts["head"] += _bytes(shape, bits)
            parts["tables"] += _bytes((1, shape[1]), 16)  # the token's row (bf16 or dequantized)
            continue
        if path.endswith("embed_tokens_per_layer.weight"):
            parts["tables"] += _bytes((1, shape[1]), 16)
            continue
        if path.startswith("lm_head"):
            parts["head"] += _bytes(shape, bits)
            continue
        if ".experts." in path:  # (E, rows, cols): the top-k experts' share
            parts["experts"] += _bytes(shape, bits) * args.top_k_experts / args.num_experts
            continue
        parts["layers"] += _bytes(shape, 8 if (bits != 16 and path.endswith("router.proj.weight")) else bits)
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, default=3000.0, help="GB/s the weights stream at (default 3,000)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--measured", action="append", default=[], metavar="FAMILY:BITS:TOK_S",
                    help="a measured decode rate (bits 16 for bf16) to set against the floor")
    a = ap.parse_args(argv)
    measured = {}
    for item in a.measured:
        try:
            fam, bits, rate = item.split(":")
            measured[(fam, 16 if bits in ("bf16", "16", "0") else int(bits))] = float(rate)
        except ValueError:
            ap.error(f"--measured {item!r}: expected FAMILY:BITS:TOK_S, e.g. e2b:bf16:108.7")
    print(f"{'family':9s} {'dtype':6s} {'GB/token':>9s} {'of which head':>14s} {'floor ms':>9s} "
          f"{'floor tok/s':>12s} {'measured':>9s} {'of floor':>9s}")
    for fam in a.families.split(","):
        for bits in (16, 8, 4):
            parts = token_bytes(fam, bits)
            gb = parts["total"] / 1e9
            floor_s = gb / a.bandwidth
            rate = measured.get((fam, bits))
            tail = f"{rate:9.1f} {rate * floor_s * 100:8.1f}%" if rate else f"{'':9s} {'':9s}"
            print(f"{fam:9s} {'bf16' if bits == 16 else f'{bits}-bit':6s} {gb:9.2f} {parts['head'] / 1e9:14.2f} "
                  f"{floor_s * 1e3:9.2f} {1 / floor_s:12.0f} {tail}")
    print(f"at {a.bandwidth:,.0f} GB/s; batch 1, weights only (the KV cache read grows with the context)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
