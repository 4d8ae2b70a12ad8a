"""Python's part of a prompt chunk on the CUDA path, measured on any machine: the time to build one
chunk's graph (nothing evaluated), stock's model call against ours' call and ours' fill_cache
(gemma4_mlx.prompt_fill), then a profile of ours' fill.

On a GPU the device waits while Python builds a chunk (docs/benchmarks.md, session 14), so this is
a floor under the prefill's host time. dispatch pretends the CUDA backend; every kernel is a
stand-in returning lazy zeros of its output shapes (MLX's own cost of a custom-kernel call is not
in it) and every self-check passes; the prefill overlap is off (it would evaluate). Weights are the
modules' lazy initial arrays, never evaluated.

Usage: python3 bench/prefill_build.py [PRESET] [POSITIONS] (default e2b 840); ROUNDS (9), TOP (20
profile lines; 0: none).
"""
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import gemma4_text  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from gemma4_mlx import Model, parse_config  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", 9))
TOP = int(os.environ.get("TOP", 20))


class StandIn:
    """A kernel's call: lazy zeros of the output shapes."""

    def __call__(self, *, output_shapes, output_dtypes, **_):
        return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]


def build_ms(model, write) -> float:
    """Median ms of ROUNDS builds of one chunk over a fresh cache."""
    times = []
    for _ in range(ROUNDS):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        write(model, cache)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def cuda_path_stood_in():
    """dispatch pretends CUDA with stand-in kernels and passing self-checks, the overlap off;
    everything put back afterwards."""
    saved = dispatch.get_kernel, dispatch._check, os.environ.get("GEMMA4_MLX_PREFILL_OVERLAP")
    dispatch.get_kernel = lambda *a, **k: StandIn()
    dispatch._check = lambda *a, **k: (True, "")
    os.environ["GEMMA4_MLX_PREFILL_OVERLAP"] = "0"
    try:
        with dispatch.force_backend("cuda"):
            yield
    finally:
        dispatch.get_kernel, dispatch._check = saved[:2]
        if saved[2] is None:
            os.environ.pop("GEMMA4_MLX_PREFILL_OVERLAP", None)
        else:
            os.environ["GEMMA4_MLX_PREFILL_OVERLAP"] = saved[2]


def main(preset: str, positions: int) -> None:
    config = preset_config(preset)
    ours = Model(parse_config(config))
    stock = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    ids = mx.zeros((1, positions), mx.int32)
    with cuda_path_stood_in():
        lines = [("stock, the model called", stock, lambda m, c: m(ids, cache=c)),
                 ("ours, the model called", ours, lambda m, c: m(ids, cache=c)),
                 ("ours, fill_cache", ours, lambda m, c: m.fill_cache(ids, c))]
        print(f"{preset}, a {positions}-position chunk's graph built on the CUDA path (kernels stood in), "
              f"median of {ROUNDS}")
        for name, model, write in lines:
            print(f"  {name:24s} {build_ms(model, write):7.2f} ms")
        if TOP:
            profile = cProfile.Profile()
            cache = make_prompt_cache(ours)
            profile.enable()
            ours.fill_cache(ids, cache)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(TOP)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "e2b", int(sys.argv[2]) if len(sys.argv) > 2 else 840)
