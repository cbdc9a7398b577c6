// Torch-free AdamW arithmetic shared by the CPU and CUDA optimizer kernels (csrc/cpu/adamw.cpp,
// csrc/cuda/adamw.cu), so both backends compute the same fp32 sequence.
//
// 32-bit states: m, v fp32.  8-bit states (the 8-bit optimizers paper): m and v stored as uint8 codes
// into a sorted 256-entry table (signed "dynamic" map for m, unsigned map for v) times an fp32 absmax
// per block of kQBlock elements. A step dequantizes with the old absmax, updates in fp32, takes the new
// block absmax and requantizes to the nearest table entry (a tie goes to the lower code).
#pragma once
#include <cmath>
#include <cstdint>

#include "nf4.h"

namespace nf4q::adamw {

constexpr int kQBlock = 256;  // elements per 8-bit quantization block, and per unit of work

// Per-call scalars, computed on the host in double and rounded to fp32 once, as torch does.
struct Hyper {
  float decay;            // 1 - lr * weight_decay (decoupled weight decay)
  float beta2;
  float one_minus_beta1;  // m += (1 - beta1) * (g - m): torch's lerp
  float one_minus_beta2;
  float step_size;        // lr / (1 - beta1^t)
  float bc2_sqrt;         // sqrt(1 - beta2^t)
  float eps;
};

inline Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const double t = static_cast<double>(step);
  Hyper h;
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  h.eps = static_cast<float>(eps);
  return h;
}

// Correctly rounded division and square root even under nvcc's --use_fast_math, so that the 32-bit
// optimizer matches torch.optim.AdamW to the last few ulps on both backends.
NF4Q_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

NF4Q_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// One AdamW element update in torch's operation order, each operation rounded on its own.
NF4Q_HD void update(float& p, float g, float& m, float& v, const Hyper& h) {
#if defined(__CUDA_ARCH__)
  // Explicit _rn intrinsics: nvcc would contract these into FMAs, and one rounding of p*decay instead of
  // torch's two drifts by ~1e-6 relative over 100 steps. With them the GPU matches the CPU bit for bit.
  m = __fadd_rn(m, __fmul_rn(h.one_minus_beta1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(h.one_minus_beta2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bc2_sqrt), h.eps);
  p = __fsub_rn(__fmul_rn(p, h.decay), __fmul_rn(h.step_size, __fdiv_rn(m, denom)));
#else
  m = m + h.one_minus_beta1 * (g - m);
  v = v * h.beta2 + h.one_minus_beta2 * (g * g);
  const float denom = div_rn(sqrt_rn(v), h.bc2_sqrt) + h.eps;
  p = p * h.decay - h.step_size * div_rn(m, denom);
#endif
}

// 1 / absmax of a block (a zero block scales by 1/kTinyAbsmax, so its values stay 0, not NaN).
NF4Q_HD float inv_absmax(float absmax) { return div_rn(1.0f, absmax < kTinyAbsmax ? kTinyAbsmax : absmax); }

// The midpoints of a sorted 256-entry table in breadth-first (Eytzinger) order: tree[1..255], tree[0]
// unused. Node i at depth d (2^d <= i < 2^(d+1)) holds midpoint (2(i - 2^d) + 1) * 2^(7-d) - 1.
// Why: a branch-free descent reads level k from 2^k consecutive slots, so on the GPU the first five
// levels are shared-memory broadcasts or distinct banks, and on the CPU the loop has no branches.
NF4Q_HD float tree_node(const float* code, int node) {
  int depth = 0;
  while ((node >> (depth + 1)) != 0) ++depth;
  const int mid = (2 * (node - (1 << depth)) + 1) * (1 << (7 - depth)) - 1;
  return (code[mid] + code[mid + 1]) / 2.0f;  // same fp32 midpoint as nf4q::midpoints
}

// Code of a scaled value: the number of midpoints strictly below it (equal to encode8 in nf4.h).
NF4Q_HD uint8_t encode_tree(float scaled, const float* tree) {
  int i = 1;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 8; ++k) i = 2 * i + (tree[i] < scaled ? 1 : 0);
  return static_cast<uint8_t>(i - 256);
}

}  // namespace nf4q::adamw
