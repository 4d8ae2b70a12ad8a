"""Host cost of a launch's distinct constant inputs in a compiled, pipelined step (session 38).

E2B's 4-bit decode step records on the H200's host ~0.9 ms more than its bf16 one (session 36,
`PIPE=1`: call 1.73 against 1.36 ms, encode 3.61 against 3.10) with the same 299 launches. The 4-bit
matvecs take three weight arrays (packed weights, scales, biases) where the float ones take one, and
in the step every weight is its own array: a constant of the trace that MLX's replay maps and its
evaluation visits, keeps alive and records as a dependency at every token. `bench/launch_cost.py`
(session 16) passed the same seven extras to every launch, so it could not see that.

Here a step is a chain of LAUNCHES (default 300) trivial `cuda_kernel` launches (y = x + 1 on 32
floats), compiled and run as mlx-lm's generate runs a decode step (the next step recorded and
submitted before waiting on this one). Per line, each launch also takes EXTRA constant arrays of its
own (distinct, evaluated, never read), or the same EXTRA arrays shared by all launches. Prints per
line the median over ROUNDS x STEPS steps of the replay ("call") and of async_eval's return
("encode"), per launch and per extra input.

``OUTPUTS=1`` (session 40) times outputs instead: each launch of a chain writes K arrays that the
next launch takes, either as K outputs of its own or as one output of K times the size that a Split
cuts into K views. E2B's 4-bit step has 170 outputs past its launches' first (a close's new residual
and next norm, the PLE gate, attention's scratch: bench/step_inputs.py); whether one packed output
and its views cost the host less than the outputs they replace decides whether to pack them.

    python3 bench/input_cost.py            (on a CUDA machine)
    OUTPUTS=1 python3 bench/input_cost.py
"""
import os
import statistics
import time

import mlx.core as mx

LAUNCHES = int(os.environ.get("LAUNCHES", 300))
STEPS = int(os.environ.get("STEPS", 20))
ROUNDS = int(os.environ.get("ROUNDS", 5))
BODY = "unsigned int i = threadIdx.x; y[i] = x[i] + 1.0f;"


def line(extra: int, distinct: bool):
    names = [f"e{i}" for i in range(extra)]
    kernel = mx.fast.cuda_kernel(name=f"input_cost_{extra}", input_names=["x"] + names, output_names=["y"],
                                 source=BODY)
    if distinct:
        consts = [[mx.full((64,), float(j), mx.float32) for _ in range(extra)] for j in range(LAUNCHES)]
    else:
        shared = [mx.full((64,), 1.0, mx.float32) for _ in range(extra)]
        consts = [shared] * LAUNCHES
    mx.eval(consts)

    def step(x):
        for c in consts:
            x = kernel(inputs=[x] + c, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
                       output_dtypes=[mx.float32])[0]
        return x - LAUNCHES  # back to the input's values: a fixed point

    return mx.compile(step)


def timed(fn, x, rounds: int, steps: int):
    calls, encodes = [], []
    for r in range(rounds + 1):  # the first round warms up (trace, build, graph instantiation)
        prev = fn(x)
        mx.async_eval(prev)
        for _ in range(steps):
            t0 = time.perf_counter()
            y = fn(prev)
            t1 = time.perf_counter()
            mx.async_eval(y)
            t2 = time.perf_counter()
            mx.eval(prev)
            prev = y
            if r:
                calls.append(t1 - t0)
                encodes.append(t2 - t1)
        mx.eval(prev)
    return statistics.median(calls), statistics.median(encodes)


def output_line(k: int, packed: bool):
    """A chain of launches each taking the K arrays the one before wrote: K outputs, or (``packed``)
    one output of K x 32 floats and a Split of it into K views."""
    ins = [f"x{j}" for j in range(k)]
    if packed:
        body = "unsigned int i = threadIdx.x; " + " ".join(f"y[{32 * j} + i] = x{j}[i] + 1.0f;" for j in range(k))
        outs = ["y"]
    else:
        body = "unsigned int i = threadIdx.x; " + " ".join(f"y{j}[i] = x{j}[i] + 1.0f;" for j in range(k))
        outs = [f"y{j}" for j in range(k)]
    kernel = mx.fast.cuda_kernel(name=f"output_cost_{k}_{int(packed)}", input_names=ins, output_names=outs,
                                 source=body)

    def step(x):
        xs = [x] * k
        for _ in range(LAUNCHES):
            if packed:
                y = kernel(inputs=xs, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32 * k,)],
                           output_dtypes=[mx.float32])[0]
                xs = mx.split(y, k) if k > 1 else [y]
            else:
                xs = kernel(inputs=xs, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)] * k,
                            output_dtypes=[mx.float32] * k)
        return xs[0] - LAUNCHES

    return mx.compile(step)


def main_outputs():
    x = mx.zeros((32,), mx.float32)
    mx.eval(x)
    lines = [(1, False), (2, False), (2, True), (3, False), (3, True)]
    fns = {spec: output_line(*spec) for spec in lines}
    results = {spec: [] for spec in lines}
    for _ in range(ROUNDS):
        for spec, fn in fns.items():
            results[spec].append(timed(fn, x, 1, STEPS))
    print(f"{LAUNCHES} launches a step, {ROUNDS} x {STEPS} steps, mlx {mx.__version__}: us a launch (call / encode)")
    base = None
    for spec in lines:
        call = statistics.median(c for c, _ in results[spec]) * 1e6 / LAUNCHES
        encode = statistics.median(e for _, e in results[spec]) * 1e6 / LAUNCHES
        k, packed = spec
        label = f"{k} arrays a launch" + (", one output + Split" if packed else f", {k} outputs")
        if base is None:
            base = (call, encode)
            print(f"  {label:36s} call {call:6.2f}  encode {encode:6.2f}")
        else:
            dc, de = (call - base[0]) / (k - 1), (encode - base[1]) / (k - 1)
            print(f"  {label:36s} call {call:6.2f}  encode {encode:6.2f}   per array past the first: "
                  f"call {dc:+.2f} encode {de:+.2f}")


def main():
    if os.environ.get("OUTPUTS") == "1":
        main_outputs()
        return
    x = mx.zeros((32,), mx.float32)
    mx.eval(x)
    lines = [(0, True), (2, True), (2, False), (6, True), (6, False)]
    fns = {spec: line(*spec) for spec in lines}
    results = {spec: [] for spec in lines}
    for _ in range(ROUNDS):  # lines interleaved round by round: the machine's speed drifts
        for spec, fn in fns.items():
            results[spec].append(timed(fn, x, 1, STEPS))
    base = None
    print(f"{LAUNCHES} launches a step, {ROUNDS} x {STEPS} steps, mlx {mx.__version__}: us a launch (call / encode)")
    for spec in lines:
        call = statistics.median(c for c, _ in results[spec]) * 1e6 / LAUNCHES
        encode = statistics.median(e for _, e in results[spec]) * 1e6 / LAUNCHES
        extra, distinct = spec
        label = f"{extra} extra inputs" + ("" if not extra else (", distinct" if distinct else ", shared"))
        if base is None:
            base = (call, encode)
            print(f"  {label:28s} call {call:6.2f}  encode {encode:6.2f}")
        else:
            dc, de = (call - base[0]) / extra, (encode - base[1]) / extra
            print(f"  {label:28s} call {call:6.2f}  encode {encode:6.2f}   per extra input: call {dc:+.2f} encode {de:+.2f}")


if __name__ == "__main__":
    main()
