"""What a barrier across all of one launch's blocks costs, against a launch of its own (session 44).

E2B's decode step is ~231 launches, and in mlx-lm's order the step is the host's time: each launch costs
MLX's host ~3 us plus its inputs (bench/step_inputs.py). Our closing kernels already chain work inside one
launch through the last block to finish (a block counter). A layer in one launch would need every block to
wait for every other between its stages: a grid barrier, which CUDA gives only to blocks that are all
resident at once (as many blocks as the GPU holds; MLX's ``cuda_kernel`` has no cooperative launch, so
the barrier is an atomic count and a generation word the blocks spin on, bounded so a launch that is not
all resident ends with an error rather than hanging).

This times, on CUDA, each in one evaluation a round, ``REPS`` rounds, medians:

- ``barrier``: one launch of ``BLOCKS`` blocks running ``PHASES`` stages (at least 3), a grid barrier between two
  stages; in stage p each block reads what its neighbour wrote in stage p - 1 (so a barrier that lets a
  block through early reads a stale value, and the check below fails);
- ``barrier1``: the same launch with one stage (no barrier): the launch alone;
- ``launches``: ``PHASES - 1`` launches of one stage each, chained (each reads the last one's output).

and prints one JSON line: the median ms a round of each, the us a stage behind a barrier costs
(``(barrier - barrier1) / (PHASES - 1)``) against the us a stage as a launch of its own costs (``(launches -
barrier1) / (PHASES - 2)``: one evaluation's own cost taken out; with ``MB`` 0 these are a barrier's cost and a
launch's), and
whether every round's values were right. CUDA only: a research probe for the next step of issue 14, not a
kernel of the package (whose bodies are written once for Metal and CUDA; Metal gives no forward-progress
promise across threadgroups, which a layer-in-one-launch design would have to answer first).

    python3 bench/grid_barrier_probe.py [PHASES] [BLOCKS] [REPS] [MB]     (defaults 32, 132 (an H100 / H200's
                                                                            SMs), 50, 0)

``MB``: each stage (both forms) also streams that many megabytes, a block its own slice, as a layer's matvec
would (E2B 4-bit reads ~1.3 GB a token over ~230 launches: ~6 MB a launch); 0 times the barrier alone.
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, run as a script

import mlx.core as mx  # noqa: E402

from gemma4_mlx.kernels import dispatch  # noqa: E402

THREADS = 256
# The counter and the stage parameters come from the package's makers of device arrays (dispatch.block_counter,
# dispatch.constant): MLX's CUDA allocator keeps arrays of 8 bytes or less, and every array made from Python data,
# in managed memory, where each block's atomic costs ~1 us, one block after another (session 24; mv.py's
# CLOSE_COUNTER_SLOTS). Session 45's run made both here with two int32 each, and a stage behind the barrier took
# 660-1,461 us: that memory's cost, not a barrier's.
COUNTER_INTS = 1024
GEN = 32  # the generation's int: 128 bytes past the count
SPIN_LIMIT = 20_000_000  # ~tens of ms of spinning: far past any real wait, short of a hung device

# Each stage may also read MB megabytes (its own slice of `data`, all of a block's threads, streaming), as a
# layer's matvecs would: the stage's sum is added to the value it passes on (`data` is zeros, so the values stay
# checkable) and the reads cannot be left out.
HEADER = """
__device__ float stage_read(const float* data, int per_block, int stage, int b, int nblocks) {
    __shared__ float total;
    if (threadIdx.x == 0) total = 0.0f;
    __syncthreads();
    const float4* mine = reinterpret_cast<const float4*>(data) + ((size_t)stage * nblocks + b) * per_block;
    float s = 0.0f;
    for (int i = threadIdx.x; i < per_block; i += blockDim.x) {
        const float4 v = __ldcs(mine + i);
        s += v.x + v.y + v.z + v.w;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(&total, s);
    __syncthreads();
    return total;
}
"""

# counter[0]: blocks arrived at the current barrier (the last one sets it back to 0, so it is 0 between
# launches); counter[GEN]: the barrier's generation, which only grows (a 128-byte line of its own). A block takes the generation before it
# arrives, and waits until it changes. `work` holds two stages' values (each stage reads the other half).
BARRIER_SOURCE = f"""
    const int b = blockIdx.x, nblocks = gridDim.x, stages = phases[0], per_block = phases[1];
    int* count = const_cast<int*>(counter);
    volatile int* generation = const_cast<int*>(counter) + {GEN};
    __shared__ int timed_out;
    if (threadIdx.x == 0) {{
        timed_out = 0;
        work[b] = x[b];
    }}
    for (int p = 1; p < stages; ++p) {{
        __syncthreads();
        if (threadIdx.x == 0 && !timed_out) {{
            const int seen = *generation;
            __threadfence();
            if (atomicAdd(count, 1) == nblocks - 1) {{
                atomicExch(count, 0);
                __threadfence();
                atomicAdd(const_cast<int*>(counter) + {GEN}, 1);
            }} else {{
                long spins = 0;
                while (*generation == seen) {{
                    if (++spins > {SPIN_LIMIT}L) {{ timed_out = 1; break; }}
                }}
            }}
            __threadfence();
        }}
        __syncthreads();
        const float read = stage_read(data, per_block, p, b, nblocks);
        if (threadIdx.x == 0) {{
            const float* previous = work + ((p - 1) % 2) * nblocks;
            work[(p % 2) * nblocks + b] = __ldcg(previous + (b + 1) % nblocks) + 1.0f + read;
        }}
    }}
    __syncthreads();
    if (threadIdx.x == 0) out[b] = timed_out ? -1.0f : __ldcg(work + ((stages - 1) % 2) * nblocks + b);
"""

STAGE_SOURCE = """
    const int b = blockIdx.x, nblocks = gridDim.x;
    const float read = stage_read(data, stage[1], stage[0], b, nblocks);
    if (threadIdx.x == 0) out[b] = previous[(b + 1) % nblocks] + 1.0f + read;
"""


def _kernels():
    barrier = mx.fast.cuda_kernel(name="grid_barrier_probe", input_names=["x", "counter", "phases", "data"],
                                  output_names=["out", "work"], source=BARRIER_SOURCE, header=HEADER)
    stage = mx.fast.cuda_kernel(name="grid_stage_probe", input_names=["previous", "stage", "data"],
                                output_names=["out"], source=STAGE_SOURCE, header=HEADER)
    return barrier, stage


def _median_ms(run, reps: int, outputs: list) -> float:
    """The median wall ms of ``run()`` (one evaluation); its outputs kept, checked after the timing."""
    run()  # the build and the first launch
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        outputs.append(run())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    args = [int(a) for a in sys.argv[1:5]]
    phases, blocks, reps, megabytes = args + [32, 132, 50, 0][len(args):]
    if phases < 3 or blocks < 1 or reps < 1 or megabytes < 0:
        sys.exit("PHASES must be at least 3, BLOCKS and REPS at least 1, MB at least 0")
    if not mx.cuda.is_available():
        sys.exit("a CUDA GPU is needed (this probes MLX's CUDA backend)")
    barrier, stage = _kernels()
    x = mx.arange(blocks, dtype=mx.float32)
    counter = dispatch.block_counter("grid_barrier_probe", COUNTER_INTS)
    per_block = megabytes * 2**20 // (16 * blocks)  # float4s a block reads a stage
    data = mx.zeros((max(phases * blocks * per_block * 4, 4),), dtype=mx.float32)
    # (stage index, float4s a block reads): a launch's own stage in the chained form; stages[n][0] = n stages for
    # the one-launch form (n = 1 or PHASES)
    stages = [dispatch.constant([p, per_block], mx.int32) for p in range(phases + 1)]
    mx.eval(x, counter, data, *stages)

    def launch(n):
        out, _ = barrier(inputs=[x, counter, stages[n], data], grid=(blocks * THREADS, 1, 1),
                         threadgroup=(THREADS, 1, 1), output_shapes=[(blocks,), (2 * blocks,)],
                         output_dtypes=[mx.float32, mx.float32])
        mx.eval(out)
        return out

    def chained():
        y = x
        for p in range(1, phases):
            y = stage(inputs=[y, stages[p], data], grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                      output_shapes=[(blocks,)], output_dtypes=[mx.float32])[0]
        mx.eval(y)
        return y

    def wrong(name, outputs, n):
        expected = mx.roll(x, -(n - 1)) + (n - 1)
        return [(name, i, int((out < 0).sum().item())) for i, out in enumerate(outputs)
                if not mx.array_equal(out, expected).item()]

    outputs = []
    barrier_ms = _median_ms(lambda: launch(phases), reps, outputs)
    bad = wrong("barrier", outputs, phases)
    if bad:  # a barrier that timed out leaves the counter dirty: what follows would mean nothing
        print(json.dumps({"phases": phases, "blocks": blocks, "error": "wrong values (round, blocks timed out)",
                          "wrong": bad[:5]}))
        sys.exit(1)
    one, many = [], []
    barrier1_ms = _median_ms(lambda: launch(1), reps, one)
    launches_ms = _median_ms(chained, reps, many)
    bad = wrong("barrier1", one, 1) + wrong("launches", many, phases)
    print(json.dumps({
        "device": str(mx.default_device()), "mlx": mx.__version__, "phases": phases, "blocks": blocks,
        "threads": THREADS, "reps": reps, "mb_a_stage": round(per_block * 16 * blocks / 2**20, 3),
        "barrier_ms": round(barrier_ms, 4), "barrier1_ms": round(barrier1_ms, 4), "launches_ms": round(launches_ms, 4),
        # one evaluation's own cost is in all three, and the one-stage launch reads nothing: a stage behind a
        # barrier against the one-stage launch, a stage of its own launch against the one-launch evaluation (with
        # MB 0, a barrier's cost and a launch's; with MB > 0, each also holds a stage's reads)
        "us_a_stage_behind_a_barrier": round((barrier_ms - barrier1_ms) * 1e3 / (phases - 1), 2),
        "us_a_stage_as_a_launch": round((launches_ms - barrier1_ms) * 1e3 / (phases - 2), 2),
        "right": not bad, "wrong": bad[:5],
    }))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
