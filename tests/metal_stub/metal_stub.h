// Minimal C++ stand-in for the Metal surface the gemma4-mlx kernels use, so
// that the Metal source MLX generates can be syntax-checked with
//   g++ -std=c++17 -fsyntax-only -Wno-attributes
// It cannot catch address-space mistakes or Metal-only limits.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>

#define device
#define constant
#define threadgroup
#define thread
#define kernel

typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 { uint x, y, z; };
struct alignas(16) uint4 { uint x, y, z, w; };
struct half {
  half() = default;
  half(float) {}
  operator float() const { return 0.0f; }
};
typedef half float16_t;
struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float) {}
  operator float() const { return 0.0f; }
};

template <typename To, typename From>
inline To as_type(From v) {
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_sum(float v) { return v; }
inline float simd_max(float v) { return v; }
inline float simd_min(float v) { return v; }
inline float simd_shuffle_xor(float v, ushort) { return v; }
inline float simd_shuffle(float v, ushort) { return v; }

namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float abs(float x) { return std::fabs(x); }
inline float max(float a, float b) { return a > b ? a : b; }
inline float min(float a, float b) { return a < b ? a : b; }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }  // MSL's metal::fma
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace precise
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}  // namespace fast
}  // namespace metal
