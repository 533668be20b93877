// Shared helpers of the native CPU kernels: storage decoders (bf16, fp16, FP8 e4m3, FP4 e2m1,
// UE8M0), fp32 -> bf16/fp16 rounding, and a fixed-width fp32 vector type.
//
// The kernel translation units include only this header and the standard library (no torch
// headers), so they compile in a few seconds; csrc/cpu/register.cpp owns every ATen call.
//
// Vector width: GCC vector extensions lower `vf` to one zmm (AVX-512F), one ymm (AVX) or one
// xmm register (baseline x86-64 / other targets), so every kernel is portable and picks up the
// widest ISA the extension was compiled for (setup.py enables -mavx2/-mavx512f only when the
// compiler and the build machine support them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "v4k_formats.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace v4k_cpu {

#if defined(__AVX512F__)
constexpr int VW = 16;   // fp32 lanes per vector
constexpr int NREG = 32; // architectural vector registers
#elif defined(__AVX__)
constexpr int VW = 8;
constexpr int NREG = 16;
#else
constexpr int VW = 4;
constexpr int NREG = 16;
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned access

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
// a * b + c with one rounding where the ISA has FMA (explicit, so that every instantiation of a
// kernel performs the same operations whatever the compiler's contraction choices).
static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && defined(__AVX__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// x in every lane. (Not `vf{} + x`: without -fno-signed-zeros that is a real scalar add before
// the broadcast, and it turns -0 into +0; set1 broadcasts straight from memory.)
static inline vf vbcast(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
#endif
}
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline float vsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// Float storage codes (v4k_formats.h).
using v4k::BF16;
using v4k::DType;
using v4k::F16;
using v4k::F32;

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (a < 0x38800000u) {  // fp16 subnormal or zero: exact arithmetic rounding via float add
    float af;
    std::memcpy(&af, &a, 4);
    // 2^-24 is the fp16 subnormal step; adding 0.5 (as magic) rounds RNE in fp32.
    float r = af * 16777216.0f;  // scale to units of 2^-24
    uint32_t m = static_cast<uint32_t>(std::nearbyint(r));
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// e4m3fn byte -> fp32 (NaN for 0x7f/0xff).
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
      float x;
      if (e == 0xf && m == 7)
        x = std::numeric_limits<float>::quiet_NaN();
      else if (e == 0)
        x = std::ldexp(static_cast<float>(m), -9);
      else
        x = std::ldexp(1.0f + m / 8.0f, e - 7);
      v[b] = s ? -x : x;
    }
  }
};
extern const Fp8Table kFp8;

// e2m1 nibble -> fp32 (SPEC §4.1).
static const float kFp4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                               -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// UE8M0 byte -> 2^(e-127) (0xff = NaN).
static inline float ue8m0_to_f32(uint8_t e) {
  if (e == 0xff) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return std::ldexp(1.0f, -127);
  uint32_t u = static_cast<uint32_t>(e) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Decode n values of a float storage type to fp32.
static inline void load_row(const void* src, int dtype, float* dst, int64_t n) {
  if (dtype == F32) {
    std::memcpy(dst, src, n * 4);
  } else if (dtype == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

// Round n fp32 values into a float storage type.
static inline void store_row(const float* src, int dtype, void* dst, int64_t n) {
  if (dtype == F32) {
    std::memcpy(dst, src, n * 4);
  } else if (dtype == BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  }
}

// ------------------------------------------------------------------ vector 16-bit storage access
typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));  // VW 16-bit values, unaligned
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

static inline vf vbits(vu u) { return (vf)u; }
static inline vu vubits(vf f) { return (vu)f; }

// VW bf16 values -> fp32 (exact).
static inline vf vload_bf16(const uint16_t* p) {
  return vbits(__builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16);
}

// fp32 -> bf16 (round to nearest even, NaN stays a quiet NaN): the lane-wise f32_to_bf16.
static inline vh vbf16(vf v) {
  const vu u = vubits(v);
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu q = (u >> 16) | 0x40u;
  const vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);  // all-ones lanes
  return __builtin_convertvector((q & nan) | (r & ~nan), vh);
}

// VW fp16 values -> fp32 (exact, subnormals included): vcvtph2ps where the ISA has it.
static inline vf vload_f16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf r;
  for (int l = 0; l < VW; ++l) r[l] = f16_to_f32(p[l]);
  return r;
#endif
}

// VW values of a float storage type at element offset i -> fp32.
static inline vf vload_as(const void* src, int dtype, int64_t i) {
  if (dtype == F32) return vload(static_cast<const float*>(src) + i);
  if (dtype == BF16) return vload_bf16(static_cast<const uint16_t*>(src) + i);
  vf r;
  const uint16_t* s = static_cast<const uint16_t*>(src) + i;
  for (int l = 0; l < VW; ++l) r[l] = f16_to_f32(s[l]);
  return r;
}

// Store VW fp32 values into a float storage type at element offset i (one rounding).
static inline void vstore_as(void* dst, int dtype, int64_t i, vf v) {
  if (dtype == F32) {
    vstore(static_cast<float*>(dst) + i, v);
  } else if (dtype == BF16) {
    *reinterpret_cast<vh*>(static_cast<uint16_t*>(dst) + i) = vbf16(v);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst) + i;
    for (int l = 0; l < VW; ++l) d[l] = f32_to_f16(v[l]);
  }
}

// fp32 values rounded through a float storage type and back (x.to(dtype).float()), lane-wise.
static inline vf vround_as(int dtype, vf v) {
  if (dtype == BF16) return vbits(__builtin_convertvector(vbf16(v), vu) << 16);
  if (dtype == F16)
    for (int l = 0; l < VW; ++l) v[l] = f16_to_f32(f32_to_f16(v[l]));
  return v;
}

static inline int elem_size(int dtype) { return dtype == F32 ? 4 : 2; }

static inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads of the enclosing parallel region (1 outside one).
static inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

static inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// 64-byte aligned scratch buffer.
struct Scratch {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n + 16) buf.assign(n + 16, 0.f);
    uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
};

// ------------------------------------------------------------------ QAT simulation (SPEC §4.2-4.5)
// Bit-exact with the reference kernels: scales from the fp32 bits, true division by the scale,
// round-to-nearest-even into the storage grid, multiplication back by the scale.

// Power-of-two scale 2^ceil(log2(amax * fp32(1/qmax))) from the fp32 bits (SPEC §4.2).
static inline float pow2_scale(float amax, float inv_qmax) {
  const float f = amax * inv_qmax;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const int k = static_cast<int>((u >> 23) & 0xffu) - 127 + ((u & 0x7fffffu) != 0 ? 1 : 0);
  return std::ldexp(1.0f, k);
}

// fp32 value (|v| <= 448) -> nearest e4m3fn value (RNE), as fp32.
static inline float e4m3_round(float v) {
  const float a = std::fabs(v);
  if (a < 0.015625f) {  // below the smallest normal 2^-6: the subnormal grid step is 2^-9
    const float r = std::nearbyint(a * 512.0f) / 512.0f;
    return std::signbit(v) ? -r : r;
  }
  // keep 3 mantissa bits, ties to even (a carry into the exponent is the right answer)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7ffffu + ((u >> 20) & 1u);
  u &= ~0xfffffu;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// act_quant_roundtrip(x, block, round_scale=True) on n values in place (n % block == 0).
static inline void fp8_roundtrip_pow2(float* x, int64_t n, int64_t block) {
  const float inv = static_cast<float>(1.0 / 448.0);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    float amax = 0.f;
    bool nan = false;
    for (int64_t i = b0; i < b0 + block; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      nan |= x[i] != x[i];
    }
    if (nan) {  // a NaN amax makes the scale and so the whole block NaN (as torch.amax does)
      for (int64_t i = b0; i < b0 + block; ++i) x[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float s = pow2_scale(std::max(amax, 1e-4f), inv);
    for (int64_t i = b0; i < b0 + block; ++i) {
      const float v = std::min(std::max(x[i] / s, -448.0f), 448.0f);
      x[i] = e4m3_round(v) * s;
    }
  }
}

// e2m1 code of an fp32 value already divided by its scale (RNE, saturating at 6, SPEC §4.1).
static inline int e2m1_code(float v) {
  const float a = std::min(std::fabs(v), 6.0f);
  const int code = (a > 0.25f) + (a > 1.25f) + (a > 2.5f) + (a > 5.0f) + (a >= 0.75f) + (a >= 1.75f) + (a >= 3.5f);
  return code | (std::signbit(v) ? 8 : 0);
}

// fp4_act_roundtrip(x, block) on n values in place (n % block == 0).
static inline void fp4_roundtrip(float* x, int64_t n, int64_t block) {
  const float inv = static_cast<float>(1.0 / 6.0);
  const float amin = std::ldexp(6.0f, -126);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    float amax = 0.f;
    bool nan = false;
    for (int64_t i = b0; i < b0 + block; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      nan |= x[i] != x[i];
    }
    if (nan) {  // NaN amax: the whole block is NaN
      for (int64_t i = b0; i < b0 + block; ++i) x[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float s = pow2_scale(std::max(amax, amin), inv);
    for (int64_t i = b0; i < b0 + block; ++i) x[i] = kFp4[e2m1_code(x[i] / s)] * s;
  }
}

// Round n fp32 values through a float storage type and back (x.to(dtype).float()).
static inline void round_through(float* x, int dtype, int64_t n) {
  if (dtype == BF16) {
    for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
  } else if (dtype == F16) {
    for (int64_t i = 0; i < n; ++i) x[i] = f16_to_f32(f32_to_f16(x[i]));
  }
}

// Small-M GEMMs straight from packed FP8 / FP4 weights (gemm.cpp; GemmJob is in kernels.h).
// Every job's weight must be W_FP8 or W_FP4. C[m, n] is computed by an operation sequence that
// depends only on (A row m, weight row n): never on M, on the job mix or on the thread count.
struct GemmJob;
void gemm_direct(const GemmJob* jobs, int njobs);

}  // namespace v4k_cpu
