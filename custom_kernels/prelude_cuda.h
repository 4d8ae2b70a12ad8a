// CUDA prelude for the gemma4-mlx kernel bodies.
// The part before the @@SOURCE marker goes into the kernel *header*; the part
// after it is prepended to the kernel *source*.
#define K_TG 256
#define K_SHARED __shared__
#define K_SHARED_PTR
#define K_GLOBAL  // the address space of a pointer into an input that a body makes (Metal: device)
#define K_BARRIER() __syncthreads()
#define K_NEG_INF (-__int_as_float(0x7f800000))
#define K_INLINE __device__ __forceinline__
// before a loop over a register array: left rolled, its indices would send the array to local memory
#define K_UNROLL _Pragma("unroll")
K_INLINE float k_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
K_INLINE float k_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// lane's v, to every lane of the warp (all lanes must take part)
K_INLINE float k_shfl(float v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
K_INLINE float k_exp(float x) { return expf(x); }
K_INLINE float k_rsqrt(float x) { return rsqrtf(x); }
// RoPE angles reach ~1e6 rad; double trig stays accurate even if the JIT
// compiles with fast math (which would turn cosf into __cosf). Float cosf / sinf made the KV-shared layers'
// attention with its q prologue no faster on the H200 (session 45: 26.7 against 28.3 us a sliding launch, 38.2
// against 35.3 a global one, one ncu run each).
K_INLINE float k_cos(float x) { return float(cos(double(x))); }
K_INLINE float k_sin(float x) { return float(sin(double(x))); }
K_INLINE float k_tanh(float x) { return tanhf(x); }
// gelu with the tanh approximation (the PLE gate, the GeGLU), one form for every body
K_INLINE float k_gelu_tanh(float x) { return 0.5f * x * (1.0f + k_tanh(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
K_INLINE float k_fma(float a, float b, float c) { return fmaf(a, b, c); }
K_INLINE float k_as_float(unsigned int u) { return __uint_as_float(u); }
// K_BARRIER() once the values folded into `bits` (k_fold) are loaded: ptxas sinks loads of
// read-only inputs needed only after a barrier below it, a second memory round trip after the
// first (ncu, session 17: 58% of a prologue form's stall samples); a barrier that reduces a
// predicate of them must have them first.
K_INLINE unsigned int k_fold(unsigned int bits, float v) { return bits ^ __float_as_uint(v); }
K_INLINE void k_barrier_after(unsigned int bits) { (void)__syncthreads_or(bits == 0x7fc00001u); }
// Eight contiguous values from a 16-byte aligned p as float: one 16-byte load (two for 4-byte
// types), no alignment test (in a hot loop the untaken path's loads still cost issue slots:
// they are predicated, not skipped).
template <typename T>
K_INLINE void k_ld8f(const T* p, float* v) {
  uint4 u[2];
  u[0] = reinterpret_cast<const uint4*>(p)[0];
  if (sizeof(T) == 4) {
    u[1] = reinterpret_cast<const uint4*>(p)[1];
  }
  const T* e = reinterpret_cast<const T*>(u);
  for (int j = 0; j < 8; j++) v[j] = static_cast<float>(e[j]);
}
// Eight values p[0], p[s], ..., p[7 s] as float: k_ld8f when they are contiguous and the
// address is 16-byte aligned, else eight scalar loads.
template <typename T>
K_INLINE void k_load8(const T* p, int s, float* v) {
  if (s == 1 && (size_t(p) & size_t(15)) == 0) {
    k_ld8f(p, v);
  } else {
    for (int j = 0; j < 8; j++) v[j] = static_cast<float>(p[j * s]);
  }
}
// Four words p[0..3] from a 16-byte aligned p: one 16-byte load, no branch (a branch around an
// array's writes can send the array to local memory).
struct k_words4 {
  unsigned int x, y, z, w;
};
K_INLINE k_words4 k_ld16(const uint32_t* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  return {v.x, v.y, v.z, v.w};
}
// Cross-block counting (attention's fused form, the matvecs' closing forms): a device-wide fence,
// and atomics on an int32 input the kernel owns between launches (a const pointer in MLX's signature).
#define K_DEVICE_FENCE() __threadfence()
// a request that L2 hold p's 128-byte line (no register, nothing waits on it)
K_INLINE void k_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
K_INLINE int k_atomic_add(const int* p, int v) { return atomicAdd(const_cast<int*>(p), v); }
K_INLINE void k_atomic_zero(const int* p) { atomicExch(const_cast<int*>(p), 0); }
// A value another block of this launch stored (a matvec closing form's last block reads the
// rows): a volatile load, which this SM's L1 does not serve.
template <typename T>
K_INLINE float k_load_coherent(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const volatile float*>(p);
  } else {
    T v;
    *reinterpret_cast<unsigned short*>(&v) = *reinterpret_cast<const volatile unsigned short*>(p);
    return static_cast<float>(v);
  }
}
// @@SOURCE
  const int k_bx = int(blockIdx.x);
  const int k_by = int(blockIdx.y);
  const int k_bz = int(blockIdx.z);
  const int k_tid = int(threadIdx.x);
  const int k_lane = int(threadIdx.x) & 31;
  const int k_warp = int(threadIdx.x) >> 5;
