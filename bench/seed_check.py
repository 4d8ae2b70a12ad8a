"""GPU check of GEMMA4_MLX_NVRTC=seed (MLX's kernel cache seeded with our builds).

Usage (GPU machine): python3 bench/seed_check.py
1. For one kernel of each kind, MLX's own generated source (printed with verbose=True) must equal
   our reconstruction, or the module name we seed under is not the one MLX looks for.
2. In a fresh process with an empty MLX cache, the kernels must run from the seeded modules: the
   first launch takes milliseconds (no NVRTC under MLX's headers) and matches the reference.
Prints one line per check and "seed check: ok" at the end, or what differed.
"""
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import sys, time
import mlx.core as mx
import gemma4_mlx.kernels as K
from gemma4_mlx.kernels import dispatch
rope = sys.modules["gemma4_mlx.kernels.rope"]; att = sys.modules["gemma4_mlx.kernels.attention"]
ple = sys.modules["gemma4_mlx.kernels.ple"]
cases = [("q_norm_rope", K.q_norm_rope_kernel, K.q_norm_rope_reference, rope._probe_inputs(("mlx.core.bfloat16", 256, 8), False)),
         ("attention", K.attention_kernel, K.attention_reference, att._probe_inputs(("mlx.core.bfloat16", 512, 8, 1, False))),
         ("ple_gate", K.ple_gate_kernel, K.ple_gate_reference, ple._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))]
for name, kernel, reference, args in cases:
    t = time.perf_counter()
    out = kernel(*args)
    mx.eval(out)
    first = time.perf_counter() - t
    why = dispatch.compare(out, reference(*args))
    print(f"{name}: first launch {first * 1e3:.1f} ms, {'matches' if why is None else why}", flush=True)
'''


def run(env):
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)


def main():
    os.environ["GEMMA4_MLX_NVRTC"] = "seed"
    import mlx.core as mx

    from gemma4_mlx.kernels import cuda_build, dispatch

    import gemma4_mlx.kernels as K

    att = sys.modules["gemma4_mlx.kernels.attention"]
    ple = sys.modules["gemma4_mlx.kernels.ple"]
    rope = sys.modules["gemma4_mlx.kernels.rope"]
    ok = True
    # 1. MLX's generated source against ours, captured from fd 1
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MLX_PTX_CACHE_DIR"] = cache
        for name, kernel, args in (
                ("norm_rope", K.q_norm_rope_kernel, rope._probe_inputs(("mlx.core.bfloat16", 256, 8), False)),
                ("attention", K.attention_kernel, att._probe_inputs(("mlx.core.bfloat16", 512, 8, 1, False))),
                ("ple_gate", K.ple_gate_kernel, ple._probe_gate(("mlx.core.bfloat16", "mlx.core.bfloat16")))):
            dispatch.reset()
            with tempfile.TemporaryFile(mode="w+") as cap:
                saved = os.dup(1)
                sys.stdout.flush()
                os.dup2(cap.fileno(), 1)
                try:
                    with dispatch.verbose_kernels():
                        mx.eval(kernel(*args))
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                cap.seek(0)
                printed = cap.read()
            blocks = printed.split("```\n")[1::2]
            seeded = [k for k in dispatch._kernel_cache.values() if isinstance(k, cuda_build.SeededKernel)]
            modules = {f.result() for k in seeded for f in k._seeded.values()}
            names = {m.rsplit("_", 1)[0] for m in modules}
            for block in blocks:
                text = block if block.endswith("\n") else block + "\n"
                kname = text.split("__global__ void ", 1)[1].split("(", 1)[0].strip()
                for candidate in (text, text[:-1]):
                    if f"{kname}_{cuda_build.std_hash(candidate):x}" in modules:
                        print(f"{name}: MLX's source for {kname} hashes to the seeded module")
                        break
                else:
                    ok = False
                    print(f"{name}: MLX's source for {kname} does NOT match a seeded module "
                          f"(seeded names {sorted(names)}); first 400 chars:\n{text[:400]}")
    # 2. a fresh process over a fresh, seeded cache: first launches fast and right
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MLX_PTX_CACHE_DIR=cache, GEMMA4_MLX_NVRTC="seed")
        r = run(env)
        print(r.stdout + r.stderr[-2000:])
        ok = ok and r.returncode == 0 and r.stdout.count("matches") == 3
    print("seed check:", "ok" if ok else "FAILED")


if __name__ == "__main__":
    main()
