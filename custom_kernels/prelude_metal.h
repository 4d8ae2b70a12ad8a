// Metal prelude for the gemma4-mlx kernel bodies.
// The part before the @@SOURCE marker goes into the kernel *header*; the part
// after it is prepended to the kernel *source*, because MLX only adds the
// Metal thread attributes whose names appear in the source.
#define K_TG 256
#define K_SHARED threadgroup
#define K_SHARED_PTR threadgroup
#define K_GLOBAL device  // the address space of a pointer into an input that a body makes
#define K_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define K_NEG_INF (-INFINITY)
#define K_INLINE inline
#define K_UNROLL _Pragma("unroll")
K_INLINE float k_warp_sum(float v) { return simd_sum(v); }
K_INLINE float k_warp_max(float v) { return simd_max(v); }
K_INLINE float k_shfl(float v, int lane) { return simd_shuffle(v, ushort(lane)); }
K_INLINE float k_exp(float x) { return metal::exp(x); }
K_INLINE float k_rsqrt(float x) { return metal::precise::rsqrt(x); }
K_INLINE float k_cos(float x) { return metal::precise::cos(x); }
K_INLINE float k_sin(float x) { return metal::precise::sin(x); }
K_INLINE float k_tanh(float x) { return metal::precise::tanh(x); }
// gelu with the tanh approximation (the PLE gate, the GeGLU), one form for every body
K_INLINE float k_gelu_tanh(float x) { return 0.5f * x * (1.0f + k_tanh(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
K_INLINE float k_fma(float a, float b, float c) { return metal::fma(a, b, c); }
K_INLINE float k_as_float(unsigned int u) { return as_type<float>(u); }
// K_BARRIER() once the values folded into `bits` are loaded (the CUDA prelude's reduces a
// predicate of them, so that its compiler cannot sink their loads below the barrier; here a plain
// barrier: whether Metal's compiler sinks them is unmeasured).
K_INLINE unsigned int k_fold(unsigned int bits, float v) { return bits ^ as_type<unsigned int>(v); }
#define k_barrier_after(bits) ((void)(bits), K_BARRIER())
// no L2 prefetch in Metal's language (the closing forms that ask for one are CUDA's alone)
#define k_prefetch_l2(p) ((void)0)
// Eight values p[0], p[s], ..., p[7 s] as float (the CUDA prelude's one uses vector loads).
template <typename T>
K_INLINE void k_load8(const device T* p, int s, thread float* v) {
  for (int j = 0; j < 8; j++) v[j] = static_cast<float>(p[j * s]);
}
// Eight contiguous values from a 16-byte aligned p as float (the CUDA prelude's one is one vector load).
template <typename T>
K_INLINE void k_ld8f(const device T* p, thread float* v) {
  for (int j = 0; j < 8; j++) v[j] = static_cast<float>(p[j]);
}
// Four words p[0..3] from a 16-byte aligned p: one vector load.
struct k_words4 {
  unsigned int x, y, z, w;
};
K_INLINE k_words4 k_ld16(const device uint32_t* p) {
  const uint4 v = *reinterpret_cast<const device uint4*>(p);
  return {v.x, v.y, v.z, v.w};
}
// @@SOURCE
  const int k_bx = int(threadgroup_position_in_grid.x);
  const int k_by = int(threadgroup_position_in_grid.y);
  const int k_bz = int(threadgroup_position_in_grid.z);
  const int k_tid = int(thread_position_in_threadgroup.x);
  const int k_lane = int(thread_index_in_simdgroup);
  const int k_warp = int(simdgroup_index_in_threadgroup);
