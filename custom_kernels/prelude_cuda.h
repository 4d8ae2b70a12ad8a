// CUDA prelude for the gemma4-mlx kernel bodies.
// The part before the @@SOURCE marker goes into the kernel *header*; the part
// after it is prepended to the kernel *source*.
#define K_TG 256
#define K_SHARED __shared__
#define K_SHARED_PTR
#define K_BARRIER() __syncthreads()
#define K_NEG_INF (-__int_as_float(0x7f800000))
#define K_INLINE __device__ __forceinline__
K_INLINE float k_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
K_INLINE float k_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
K_INLINE float k_exp(float x) { return expf(x); }
K_INLINE float k_rsqrt(float x) { return rsqrtf(x); }
// RoPE angles reach ~1e6 rad; double trig stays accurate even if the JIT
// compiles with fast math (which would turn cosf into __cosf).
K_INLINE float k_cos(float x) { return float(cos(double(x))); }
K_INLINE float k_sin(float x) { return float(sin(double(x))); }
K_INLINE float k_tanh(float x) { return tanhf(x); }
// @@SOURCE
  const int k_bx = int(blockIdx.x);
  const int k_by = int(blockIdx.y);
  const int k_bz = int(blockIdx.z);
  const int k_tid = int(threadIdx.x);
  const int k_lane = int(threadIdx.x) & 31;
  const int k_warp = int(threadIdx.x) >> 5;
