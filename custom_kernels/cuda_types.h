// Element types for kernels that gemma4-mlx compiles itself with NVRTC (no CUDA header is
// included, so a kernel builds in milliseconds). Same storage as MLX's bfloat16 / float16
// arrays; the kernel bodies only convert to and from float.
typedef long long int64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;

struct bf16_t {
  uint16_t bits;
  bf16_t() = default;
  __device__ __forceinline__ bf16_t(float f) {
#if __CUDA_ARCH__ >= 800
    // one instruction (F2FP) where the GPU has it, against ~6 dependent ones below: the decode
    // kernels round to bf16 several times an element, along their serial chains (session 17)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(f));
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;  // NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      bits = uint16_t(u >> 16);
    }
#endif
  }
  __device__ __forceinline__ operator float() const { return __uint_as_float(unsigned(bits) << 16); }
};

struct half_t {
  uint16_t bits;
  half_t() = default;
  __device__ __forceinline__ half_t(float f) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f)); }
  __device__ __forceinline__ operator float() const {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
  }
};
