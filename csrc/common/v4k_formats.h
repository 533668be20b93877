// Generated from v4kernels/formats.py by `python -m v4kernels.formats`; do not edit.
// The test suite checks that this file matches the Python module.
#pragma once

#include <cstdint>

namespace v4k {

// float storage codes
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// storage kinds beyond the float codes
constexpr int KV_FP8_PACKED = 100;
constexpr int KEY_FP8 = 101;
constexpr int KEY_FP4 = 102;
constexpr int W_FP8 = 201;
constexpr int W_FP4 = 202;

// packed FP8 KV row (584 bytes) and block sizes
constexpr int64_t kHeadDim = 512;
constexpr int64_t kRopeDim = 64;
constexpr int64_t kNopeDim = 448;
constexpr int64_t kKvScaleBlock = 64;
constexpr int64_t kKvNScales = 7;
constexpr int64_t kKvRopeOffset = 448;
constexpr int64_t kKvScaleOffset = 576;
constexpr int64_t kKvPadOffset = 583;
constexpr int64_t kPackedRowBytes = 584;
constexpr int64_t kUe8m0Bias = 127;
constexpr int64_t kFp8ActBlock = 128;
constexpr int64_t kFp4ActBlock = 32;
constexpr int64_t kFp8WeightBlock = 128;

}  // namespace v4k
