// CPU stand-in for prelude_cuda.h's header part (tests/kernel_emulator): every GPU thread of a
// block is an OS thread, the block's threads walk the blocks one at a time (so K_SHARED arrays
// can be function statics), K_BARRIER is a std::barrier of the block, and a warp reduction goes
// through a 32-slot exchange between two waits on the warp's barrier.
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#define K_TG 256
#define K_SHARED static
#define K_SHARED_PTR
#define K_GLOBAL  // the address space of a pointer into an input that a body makes (Metal: device)
#define K_INLINE inline
#define K_UNROLL
#define K_NEG_INF (-INFINITY)
#define K_BARRIER() emu_block_barrier->arrive_and_wait()
#define __global__
#define __launch_bounds__(n)
#define __restrict__ __restrict
struct emu_dim3 {
  unsigned x, y, z;
};
inline thread_local emu_dim3 blockIdx, threadIdx;
struct emu_warp {
  std::barrier<>* bar;
  float slot[32];
};
inline emu_warp* emu_warps;
inline std::barrier<>* emu_block_barrier;
inline float emu_warp_reduce(float v, bool max) {
  emu_warp& w = emu_warps[threadIdx.x >> 5];
  w.slot[threadIdx.x & 31] = v;
  w.bar->arrive_and_wait();
  float r = max ? w.slot[0] : 0.0f;
  for (int i = 0; i < 32; i++) r = max ? std::fmax(r, w.slot[i]) : r + w.slot[i];
  w.bar->arrive_and_wait();
  return r;
}
inline float k_warp_sum(float v) { return emu_warp_reduce(v, false); }
inline float k_warp_max(float v) { return emu_warp_reduce(v, true); }
inline float k_shfl(float v, int lane) {
  emu_warp& w = emu_warps[threadIdx.x >> 5];
  w.slot[threadIdx.x & 31] = v;
  w.bar->arrive_and_wait();
  const float r = w.slot[lane];
  w.bar->arrive_and_wait();
  return r;
}
#define K_DEVICE_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
inline void k_prefetch_l2(const void*) {}
inline int k_atomic_add(const int* p, int v) { return __atomic_fetch_add(const_cast<int*>(p), v, __ATOMIC_SEQ_CST); }
inline void k_atomic_zero(const int* p) { __atomic_store_n(const_cast<int*>(p), 0, __ATOMIC_SEQ_CST); }
template <typename T>
inline float k_load_coherent(const T* p) { return static_cast<float>(*p); }
inline float k_exp(float x) { return std::exp(x); }
inline float k_rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float k_cos(float x) { return float(std::cos(double(x))); }
inline float k_sin(float x) { return float(std::sin(double(x))); }
inline float k_tanh(float x) { return std::tanh(x); }
inline float k_gelu_tanh(float x) { return 0.5f * x * (1.0f + k_tanh(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
inline float k_fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float k_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned int k_fold(unsigned int bits, float v) {
  unsigned int u;
  std::memcpy(&u, &v, 4);
  return bits ^ u;
}
#define k_barrier_after(bits) ((void)(bits), K_BARRIER())
struct bf16_t {
  uint16_t bits;
  bf16_t() = default;
  bf16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const { return k_as_float(uint32_t(bits) << 16); }
};
struct half_t {
  _Float16 v;
  half_t() = default;
  half_t(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return float(v); }
};
template <typename T>
inline void k_load8(const T* p, int s, float* v) {
  for (int j = 0; j < 8; j++) v[j] = static_cast<float>(p[j * s]);
}
template <typename T>
inline void k_ld8f(const T* p, float* v) {
  if (reinterpret_cast<size_t>(p) & 15) __builtin_trap();  // the GPU's 16-byte load faults there too
  for (int j = 0; j < 8; j++) v[j] = static_cast<float>(p[j]);
}
struct k_words4 {
  unsigned int x, y, z, w;
};
inline k_words4 k_ld16(const uint32_t* p) {
  if (reinterpret_cast<size_t>(p) & 15) __builtin_trap();  // the GPU's 16-byte load faults there too
  return {p[0], p[1], p[2], p[3]};
}
