// CPU lora_gemm_4bit, lora_gemm_4bit_dx, lora_gemm_4bit_backward and lora_dropout. Everything is computed in fp32
// and rounded once to the caller's dtype; the base products go through gemm_4bit / gemm_4bit_dx (the fused CPU
// kernels), the thin LoRA factors through ATen's GEMM.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dropout.h"
#include "../op_handles.h"
#include "kernels.h"

namespace nf4q::cpu {
namespace {

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// t (contiguous fp32) <- t * keep / (1 - p), the keep mask of (seed, flat index).
void dropout_inplace(at::Tensor& t, double p, int64_t seed) {
  if (p <= 0) return;
  const uint64_t thr = dropout_threshold(p), s = static_cast<uint64_t>(seed);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  float* d = t.data_ptr<float>();
  at::parallel_for(0, t.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) d[i] = dropout_keep(s, static_cast<uint64_t>(i), thr) ? d[i] * scale : 0.0f;
  });
}

// drop(x) as a contiguous fp32 [M, K] matrix (x itself, converted, when p = 0).
at::Tensor dropped_fp32(const at::Tensor& x2, double p, int64_t seed) {
  auto t = x2.to(at::kFloat).contiguous();
  if (p > 0) {
    if (t.data_ptr() == x2.data_ptr()) t = t.clone();  // never write into the caller's x
    dropout_inplace(t, p, seed);
  }
  return t;
}

// dx [M, K] in fp32 = g W + drop'(s (g B) A), given u = g B.
at::Tensor dx_fp32(const at::Tensor& g2, const at::Tensor& u, NF4Q_W4_PARAMS, const at::Tensor& A32, double scale,
                   double p, int64_t seed) {
  auto dx = gemm_dx_op().call(g2, NF4Q_W4_ARGS);  // fp32 in, fp32 out
  auto t = at::mm(u, A32).mul_(scale);
  dropout_inplace(t, p, seed);
  return dx.add_(t);
}

at::Tensor lora_gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const OptT& bias, const at::Tensor& lora_A,
                          const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "lora_gemm_4bit");
  check_lora(lora_A, lora_B, N, K, x, dropout_p, "lora_gemm_4bit");
  check_bias(bias, x, N, "lora_gemm_4bit");
  const auto x2 = x.reshape({-1, K});
  auto y = gemm_op().call(x2.to(at::kFloat), NF4Q_W4_ARGS, bias ? OptT(bias->to(at::kFloat)) : OptT());
  const auto xa = at::mm(dropped_fp32(x2, dropout_p, seed), lora_A.to(at::kFloat).t());
  y.addmm_(xa, lora_B.to(at::kFloat).t(), 1, scale);
  return y.to(x.scalar_type()).view(with_last(x, N));
}

at::Tensor lora_gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "lora_gemm_4bit_dx");
  check_lora(lora_A, lora_B, N, K, grad, dropout_p, "lora_gemm_4bit_dx");
  const auto g2 = grad.reshape({-1, N}).to(at::kFloat);
  const auto u = at::mm(g2, lora_B.to(at::kFloat));
  const auto dx = dx_fp32(g2, u, NF4Q_W4_ARGS, lora_A.to(at::kFloat), scale, dropout_p, seed);
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_gemm_4bit_backward(
    const at::Tensor& grad, const at::Tensor& x, NF4Q_W4_PARAMS, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, double dropout_p, int64_t seed, std::array<bool, 3> mask) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "lora_gemm_4bit_backward");
  check_matmul(x, w, K, "lora_gemm_4bit_backward");
  check_lora(lora_A, lora_B, N, K, x, dropout_p, "lora_gemm_4bit_backward");
  const auto g2 = grad.reshape({-1, N}).to(at::kFloat);
  const auto A32 = lora_A.to(at::kFloat);
  const auto u = at::mm(g2, lora_B.to(at::kFloat));  // [M, r]
  at::Tensor dx, dA, dB;
  if (mask[1] || mask[2]) {
    const auto xd = dropped_fp32(x.reshape({-1, K}), dropout_p, seed);
    if (mask[1]) dA = at::mm(u.t(), xd).mul_(scale).to(lora_A.scalar_type());
    if (mask[2]) dB = at::mm(g2.t(), at::mm(xd, A32.t())).mul_(scale).to(lora_B.scalar_type());
  }
  if (mask[0]) dx = dx_fp32(g2, u, NF4Q_W4_ARGS, A32, scale, dropout_p, seed).to(grad.scalar_type()).view(
      with_last(grad, K));
  // The schema returns three tensors: an empty one stands for each gradient output_mask did not ask for.
  const auto none = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, grad.options()); };
  return {none(dx), none(dA), none(dB)};
}

at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "nf4q: lora_dropout: p must be in [0, 1), got ", p);
  check_io_dtype(x.scalar_type(), "lora_dropout", "x");
  auto t = x.to(at::kFloat).contiguous();
  if (t.data_ptr() == x.data_ptr()) t = t.clone();
  dropout_inplace(t, p, seed);
  return t.to(x.scalar_type()).view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CPU, m) {
  m.impl("lora_gemm_4bit", &lora_gemm_4bit);
  m.impl("lora_gemm_4bit_dx", &lora_gemm_4bit_dx);
  m.impl("lora_gemm_4bit_backward", &lora_gemm_4bit_backward);
  m.impl("lora_dropout", &lora_dropout);
}

}  // namespace nf4q::cpu
