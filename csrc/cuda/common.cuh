// Shared device helpers of the native CUDA kernels: dtype codes, loads/stores with one rounding,
// FP8 e4m3 / FP4 e2m1 encode-decode and power-of-two block scales exactly as the reference
// (v4kernels/ops/quant/reference.py). No torch headers: nvcc compiles these units alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace v4k {

template <int DT>
struct Elem;
template <>
struct Elem<V4K_F32> {
  using T = float;
};
template <>
struct Elem<V4K_BF16> {
  using T = __nv_bfloat16;
};
template <>
struct Elem<V4K_F16> {
  using T = __half;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// fp32 -> storage type, round to nearest even (the reference's `.to(dtype)`).
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Value after a round trip through the storage type.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Element i of a float tensor whose dtype is given at run time.
__device__ __forceinline__ float load_any(const void* p, int64_t i, int dt) {
  if (dt == V4K_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dt == V4K_F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ float e4m3_decode(uint8_t b) {
  __nv_fp8_e4m3 v;
  v.__x = b;
  return static_cast<float>(v);
}

// fp32 -> e4m3fn byte, values clamped to +-448 first, round to nearest even (torch's cast).
__device__ __forceinline__ uint8_t e4m3_encode(float v) {
  v = fminf(fmaxf(v, -448.0f), 448.0f);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = mag[code & 7u];
  return (code & 8u) ? -m : m;
}

// fp32 (already divided by the scale) -> e2m1 code: RNE on each uniform range, saturating at 6.
__device__ __forceinline__ uint32_t e2m1_encode(float v) {
  const float a = fminf(fabsf(v), 6.0f);
  float q;
  if (a < 2.0f) {
    q = rintf(a * 2.0f) * 0.5f;
  } else if (a < 4.0f) {
    q = rintf(a);
  } else {
    q = rintf(a * 0.5f) * 2.0f;
  }
  const uint32_t code = q < 2.0f ? static_cast<uint32_t>(q * 2.0f)
                                 : (q < 4.0f ? static_cast<uint32_t>(q + 2.0f) : static_cast<uint32_t>(q * 0.5f + 4.0f));
  return code | (signbit(v) ? 8u : 0u);
}

// Exponent k of the power-of-two scale 2^ceil(log2(amax * inv_qmax)) from the fp32 bits.
__device__ __forceinline__ int pow2_scale_exp(float amax, float inv_qmax) {
  const float f = amax * inv_qmax;
  const uint32_t bits = __float_as_uint(f);
  const int e = static_cast<int>((bits >> 23) & 0xFFu);
  return e - 127 + ((bits & 0x7FFFFFu) != 0u ? 1 : 0);
}

__device__ __forceinline__ float exp2i(int k) { return ldexpf(1.0f, k); }

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace v4k
