// CUDA lora_gemm_4bit, lora_gemm_4bit_dx and lora_gemm_4bit_backward (d = LoRA dropout, csrc/common/dropout.h):
//   y  = x W^T + bias + s (d(x) A^T) B^T
//   dx = g W + d'(s (g B) A)      dA = s (g B)^T d(x)      dB = s g^T (d(x) A^T)
// Paths for the base product: forward with M <= 2048 on a 9.0 GPU (use_swap; M = 1 only for N >= 8192): the
// swapped wgmma kernel (swap_gemm.cu) with the LoRA term as extra reduction steps. Otherwise M <= 64: gemm_2d, then
// one rank-r update.
// 64 < M <= 256 on a 9.0 GPU, where use_fused() says it wins (backward, or forward where the swapped kernel does not
// apply): the wgmma kernel (fused_gemm.cu) over the concatenated inner dimension, [x, s d(x)A^T] @ [W, B]^T and
// [g, s gB] @ [W; A], W dequantized only in shared memory. Elsewhere
// (larger M, fp32, odd shapes, other GPUs): the thin LoRA term first, then cuBLAS adds x W^T slab by slab of
// dequantized W (beta = 1), slabs of W as gemm_slabs cuts them.
// Numerics, every path but the rank-r update after gemm_2d: the base product is accumulated in fp32 over the whole
// reduction and the output rounded once; the thin factor s d(x)A^T (or s gB) is rounded to the compute dtype before
// it joins the same accumulation. With dropout, backward's LoRA part of dx is masked elementwise, so it is added
// after the product.
// NF4Q_CUDA_LORA=fused|slabs overrides the choice (for benchmarks and tests).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

constexpr int64_t kSmallM = 64;

enum class LoraPath { kAuto, kFused, kSlabs };

LoraPath forced_lora_path() {
  const char* s = std::getenv("NF4Q_CUDA_LORA");
  if (s != nullptr && std::strcmp(s, "fused") == 0) return LoraPath::kFused;
  if (s != nullptr && std::strcmp(s, "slabs") == 0) return LoraPath::kSlabs;
  return LoraPath::kAuto;
}

// Whether to try the wgmma kernel for an [M, out_cols] product.
bool want_fused(int64_t M, int64_t out_cols) {
  const auto p = forced_lora_path();
  return p == LoraPath::kFused || (p == LoraPath::kAuto && M > kSmallM && use_fused(M, out_cols));
}

// s * a @ b in one cuBLAS call (alpha = s; beta = 0 ignores the uninitialized input).
at::Tensor mm_scaled(const at::Tensor& a, const at::Tensor& b, double s) {
  return at::addmm(at::empty({a.size(0), b.size(1)}, a.options()), a, b, 0, s);
}

// The LoRA operand of the fused kernel's extra steps: r columns, a multiple of 8 (the kernel zero-fills to 64).
at::Tensor pad8(const at::Tensor& t) {
  const int64_t r = t.size(1), r8 = (r + 7) / 8 * 8;
  if (r8 == r) return t.contiguous();
  auto out = at::zeros({t.size(0), r8}, t.options());
  out.narrow(1, 0, r).copy_(t);
  return out;
}

// The wgmma kernel with the LoRA term lo [M, r] @ hi [out cols, r]^T as extra reduction steps (none when r = 0).
void fused_with_lora(const at::Tensor& act, const W4& w, bool transposed, const at::Tensor& lo, const at::Tensor& hi,
                     const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  if (lo.size(1) == 0) {
    gemm_fused(act, w, transposed, nullptr, nullptr, bias, out);
    return;
  }
  const auto lo8 = pad8(lo), hi8 = pad8(hi);
  gemm_fused(act, w, transposed, &lo8, &hi8, bias, out);
}

// d(x) for a contiguous [M, K] x in the compute dtype (x itself when p = 0).
at::Tensor dropped(const at::Tensor& x2, double p, int64_t seed) {
  return p > 0 ? lora_dropout(x2.contiguous(), p, seed) : x2;
}

// dx [M, K] = g W + d'(us A) in g2's dtype, given us = s g B [M, r] and A [r, K] in that dtype.
at::Tensor lora_dx(const at::Tensor& g2, const W4& w, const at::Tensor& us, const at::Tensor& A, double p,
                   int64_t seed) {
  const int64_t M = g2.size(0), N = w.rows(), K = w.cols(), r = A.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, K}, g2.options());  // N = 0: g B = 0, no LoRA term either
  const bool fused = want_fused(M, K) && gemm_fused_eligible(g2, w, true);
  if (p > 0) {  // the mask acts on the [M, K] LoRA term: it cannot ride inside the GEMM's reduction
    auto t = at::mm(us, A);
    if (fused) {
      auto dx = at::empty({M, K}, g2.options());
      gemm_fused(g2, w, true, nullptr, nullptr, {}, dx);
      lora_dropout_add_(dx, t, p, seed);
      return dx;
    }
    auto dx = t;  // d'(us A), then += g W
    lora_dropout_(dx, p, seed);
    gemm_slabs(g2, w, true, dx, true);
    return dx;
  }
  if (fused) {
    auto dx = at::empty({M, K}, g2.options());
    fused_with_lora(g2, w, true, us, A.t(), {}, dx);
    return dx;
  }
  if (r == 0) {
    auto dx = at::empty({M, K}, g2.options());
    gemm_slabs(g2, w, true, dx, false);
    return dx;
  }
  auto dx = at::mm(us, A);
  gemm_slabs(g2, w, true, dx, true);
  return dx;
}

at::Tensor lora_gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                          int64_t seed) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "lora_gemm_4bit");
  TORCH_CHECK_VALUE(x.is_cuda(), "nf4q: lora_gemm_4bit: x must be a CUDA tensor");
  check_lora(lora_A, lora_B, N, K, x, dropout_p, "lora_gemm_4bit");
  check_bias(bias, x, N, "lora_gemm_4bit");
  c10::cuda::CUDAGuard guard(x.device());
  const auto dt = compute_dtype(x);
  const auto x2 = x.reshape({-1, K}).to(dt);
  const int64_t M = x2.size(0), r = lora_A.size(0);
  const auto A = lora_A.to(dt), B = lora_B.to(dt);
  at::Tensor y;
  if (forced_lora_path() == LoraPath::kAuto && use_swap(M, N) && r > 0 && gemm_swap_eligible(x2, w)) {
    // the swapped wgmma kernel with the LoRA term as extra reduction steps (x gets no zero-padded copy)
    const auto t8 = pad8(mm_scaled(dropped(x2, dropout_p, seed), A.t(), scale)), B8 = pad8(B);
    y = at::empty({M, N}, x2.options());
    if (gemm_swap(x2, w, bias, y, &t8, &B8)) return y.to(x.scalar_type()).view(with_last(x, N));
  }
  if (M > 0 && want_fused(M, N) && gemm_fused_eligible(x2, w, false)) {
    y = at::empty({M, N}, x2.options());
    fused_with_lora(x2, w, false, mm_scaled(dropped(x2, dropout_p, seed), A.t(), scale), B, bias, y);
  } else if (M <= kSmallM || r == 0 || N == 0 || K == 0) {
    y = gemm_2d(x2, w, bias);
    if (r > 0 && M > 0 && N > 0) y.addmm_(at::mm(dropped(x2, dropout_p, seed), A.t()), B.t(), 1, scale);
  } else {
    const auto xa = mm_scaled(dropped(x2, dropout_p, seed), A.t(), scale);
    y = bias ? at::addmm(bias->to(dt), xa, B.t()) : at::mm(xa, B.t());
    gemm_slabs(x2, w, false, y, true);
  }
  return y.to(x.scalar_type()).view(with_last(x, N));
}

at::Tensor lora_gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "lora_gemm_4bit_dx");
  TORCH_CHECK_VALUE(grad.is_cuda(), "nf4q: lora_gemm_4bit_dx: grad must be a CUDA tensor");
  check_lora(lora_A, lora_B, N, K, grad, dropout_p, "lora_gemm_4bit_dx");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dt = compute_dtype(grad);
  const auto g2 = grad.reshape({-1, N}).to(dt);
  const auto dx = lora_dx(g2, w, mm_scaled(g2, lora_B.to(dt), scale), lora_A.to(dt), dropout_p, seed);
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_gemm_4bit_backward(
    const at::Tensor& grad, const at::Tensor& x, NF4Q_W4_PARAMS, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scale, double dropout_p, int64_t seed, std::array<bool, 3> mask) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "lora_gemm_4bit_backward");
  check_matmul(x, w, K, "lora_gemm_4bit_backward");
  TORCH_CHECK_VALUE(grad.is_cuda(), "nf4q: lora_gemm_4bit_backward: grad must be a CUDA tensor");
  check_lora(lora_A, lora_B, N, K, x, dropout_p, "lora_gemm_4bit_backward");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dt = compute_dtype(grad);
  const auto g2 = grad.reshape({-1, N}).to(dt);
  const auto A = lora_A.to(dt);
  const auto us = mm_scaled(g2, lora_B.to(dt), scale);  // s g B [M, r], shared by dA and dx
  at::Tensor dx, dA, dB;
  if (mask[1] || mask[2]) {  // first, so that d(x) is freed before dx is allocated
    const auto xd = dropped(x.reshape({-1, K}).to(dt), dropout_p, seed);
    if (mask[1]) dA = at::mm(us.t(), xd).to(lora_A.scalar_type());
    if (mask[2]) dB = mm_scaled(g2.t(), at::mm(xd, A.t()), scale).to(lora_B.scalar_type());
  }
  if (mask[0]) dx = lora_dx(g2, w, us, A, dropout_p, seed).to(grad.scalar_type()).view(with_last(grad, K));
  // The schema returns three tensors: an empty one stands for each gradient output_mask did not ask for.
  const auto none = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, grad.options()); };
  return {none(dx), none(dA), none(dB)};
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("lora_gemm_4bit", &lora_gemm_4bit);
  m.impl("lora_gemm_4bit_dx", &lora_gemm_4bit_dx);
  m.impl("lora_gemm_4bit_backward", &lora_gemm_4bit_backward);
}

}  // namespace nf4q::cuda
