// Torch-free arithmetic of the NF4 format, shared by the CPU and CUDA kernels and unit-tested by ctest.
// The rounding follows bitsandbytes' quantizer so that our bytes equal theirs:
//   scaled = w * (1 / absmax) (a partial last block divides by absmax instead), clamped to [-1, 1];
//   code   = number of midpoints strictly below scaled (a tie goes to the lower code).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NF4Q_HD __host__ __device__ __forceinline__
#else
#define NF4Q_HD inline
#endif

namespace nf4q {

constexpr int kCodes4 = 16;
constexpr int kCodes8 = 256;
constexpr float kTinyAbsmax = 1e-38f;  // bitsandbytes clamps absmax so a zero block scales to 0, not NaN

// Midpoints of a sorted table, in fp32 as torch computes (c[i] + c[i+1]) / 2.
NF4Q_HD void midpoints(const float* code, int n, float* mids) {
  for (int i = 0; i + 1 < n; ++i) mids[i] = (code[i] + code[i + 1]) / 2.0f;
}

NF4Q_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Scale of one block: the reciprocal for a full block, the divisor itself for the partial last one.
NF4Q_HD float scale_block(float w, float absmax, bool partial) {
  float a = absmax < kTinyAbsmax ? kTinyAbsmax : absmax;
  return clamp_unit(partial ? w / a : w * (1.0f / a));
}

// 4-bit code of a scaled value: branch-free count of the 15 midpoints below it (vectorizes on CPU).
NF4Q_HD uint8_t encode4(float scaled, const float* mids15) {
  int c = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kCodes4 - 1; ++i) c += scaled > mids15[i];
  return static_cast<uint8_t>(c);
}

// 8-bit code: binary search over the 255 midpoints of a sorted 256-entry table; same tie rule.
NF4Q_HD uint8_t encode8(float scaled, const float* mids255) {
  int lo = 0, hi = kCodes8 - 1;  // answer in [0, 255] = count of mids < scaled
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (mids255[mid] < scaled) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

NF4Q_HD uint8_t pack2(uint8_t first, uint8_t second) { return static_cast<uint8_t>((first << 4) | second); }
NF4Q_HD uint8_t high_nibble(uint8_t b) { return b >> 4; }
NF4Q_HD uint8_t low_nibble(uint8_t b) { return b & 0x0F; }

// absmax of block i when it is double-quantized: map[q[i]] * absmax2[i / nested_blocksize] + offset.
NF4Q_HD float decode_absmax(const uint8_t* q, const float* absmax2, const float* nested_code, float offset,
                            int64_t i, int64_t nested_blocksize) {
  return nested_code[q[i]] * absmax2[i / nested_blocksize] + offset;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace nf4q
