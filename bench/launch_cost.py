"""Host cost of one mx.fast.precompiled_cuda_kernel launch against its cubin's size (MLX hashes
the whole cubin at every launch), of the same kernel through mx.fast.cuda_kernel with a short
source and with one as long as our kernels' (~10 KB: MLX hashes its source at every launch too),
and of one of MLX's own element-wise ops. Then what our kernels' signatures add to a launch: seven
more inputs (mv takes eight), shape and stride parameters of three inputs, a second output (mv and
residual_norm write two): in session 15's chain of E2B products, each of ours took 3-4 us more than
MLX's matmul of the same shape, the smallest (1536 x 256) too."""
import time

import mlx.core as mx

from gemma4_mlx.kernels import cuda_build, nvrtc

SMALL = 'extern "C" __global__ void k(const float* x, float* y) { y[threadIdx.x] = x[threadIdx.x] + 1.0f; }\n'
BIG = ('extern "C" __global__ void k(const float* x, float* y) {\n  float a = x[threadIdx.x];\n'
       '  if (a == 12345.678f) {\n' + "".join(f"    a = a * x[{(i * 7) % 32}] + {i}.0f;\n" for i in range(3000))
       + '  }\n  y[threadIdx.x] = a + 1.0f;\n}\n')
x = mx.ones((32,))
mx.eval(x)
body = "y[threadIdx.x] = x[threadIdx.x] + 1.0f;"


def per_launch(label, launch):
    """Host time per launch of a chain of 2,000: building the graph, then evaluating it (third round)."""
    for rep in range(3):
        t = time.perf_counter()
        y = x
        for _ in range(2000):
            y = launch(y)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
    print(f"{label}: build {1e6*(t1-t)/2000:.2f} us/launch, eval {1e6*(t2-t1)/2000:.2f} us/launch")


for label, src in (("small", SMALL), ("big", BIG)):
    cubin = nvrtc.compile_source(src, arch=cuda_build.target_arch())
    per_launch(f"{label}: cubin {len(cubin)} bytes",
               lambda v, cubin=cubin: mx.fast.precompiled_cuda_kernel(
                   name="k", compiled_source=cubin, inputs=[v], output_shapes=[(32,)], output_dtypes=[mx.float32],
                   scalars=[], grid=(32, 1, 1), threadgroup=(32, 1, 1))[0])
for label, source in (("cuda_kernel", body), ("cuda_kernel, 10 KB source", body + "\n//" + "x" * 10000 + "\n")):
    k = mx.fast.cuda_kernel(name=f"k{len(source)}", input_names=["x"], output_names=["y"], source=source)
    per_launch(label, lambda v, k=k: k(inputs=[v], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
                                        output_dtypes=[mx.float32])[0])
per_launch("MLX's add", lambda v: v + 1.0)

extra = [mx.ones((32,)) for _ in range(7)]
mx.eval(extra)
names = [f"e{i}" for i in range(7)]
forms = {
    "cuda_kernel, 8 inputs": (["x"] + names, ["y"], body, lambda v: [v] + extra),
    "cuda_kernel, shapes and strides of 3 inputs": (
        ["x", "e0", "e1"], ["y"], "y[threadIdx.x] = x[threadIdx.x] + 1.0f + float(x_shape[0] + e0_strides[0] + "
        "e1_shape[0] + x_strides[0] + e0_shape[0] + e1_strides[0]) * 0.0f;", lambda v: [v] + extra[:2]),
    "cuda_kernel, 2 outputs": (["x"], ["y", "z"], "y[threadIdx.x] = x[threadIdx.x] + 1.0f; z[0] = 0.0f;", lambda v: [v]),
}
for label, (ins, outs, src, inputs) in forms.items():
    k = mx.fast.cuda_kernel(name=f"k{abs(hash(label)) % 10**8}", input_names=ins, output_names=outs, source=src)
    per_launch(label, lambda v, k=k, outs=outs, inputs=inputs: k(
        inputs=inputs(v), grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)] * len(outs),
        output_dtypes=[mx.float32] * len(outs))[0])
