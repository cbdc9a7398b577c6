// CUDA lora_gemm_4bit and lora_gemm_4bit_dx.
//   y  = x @ W^T + bias + s (x A^T) B^T        dx = g @ W + s (g B) A
// M <= 64: gemm_2d (the mma.sync / wgmma kernels) for x W^T, then one rank-r update (addmm_). 64 < M <= 256 on a
// 9.0 GPU, where use_fused() says it wins: the wgmma kernel (fused_gemm.cu) over the concatenated inner
// dimension, [x, s xA^T] @ [W, B]^T and [g, s gB] @ [W; A], W dequantized only in shared memory. Elsewhere (larger
// M, fp32, odd shapes, other GPUs): the thin LoRA product first, then cuBLAS adds x W^T slab by slab of
// dequantized W (beta = 1), max(32 MiB, 2048 rows) of W at a time.
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

// [rows, r] -> [rows, r rounded up to 64] with zero columns: the LoRA operand of the fused kernel's extra steps.
at::Tensor pad64(const at::Tensor& t) {
  const int64_t r = t.size(1), r64 = (r + 63) / 64 * 64;
  auto out = at::zeros({t.size(0), r64}, t.options());
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
  const auto lo64 = pad64(lo), hi64 = pad64(hi);
  gemm_fused(act, w, transposed, &lo64, &hi64, bias, out);
}

void check_lora(const W4& w, const at::Tensor& A, const at::Tensor& B, const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.is_cuda(), "nf4q: ", what, ": input must be a CUDA tensor");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1),
              "nf4q: lora_A [r, K] and lora_B [N, r] must share r");
  TORCH_CHECK(A.size(1) == w.cols() && B.size(0) == w.rows(), "nf4q: lora_A must be [r, ", w.cols(),
              "] and lora_B [", w.rows(), ", r]");
  TORCH_CHECK(A.device() == x.device() && B.device() == x.device(),
              "nf4q: LoRA weights must be on the input's device");
  TORCH_CHECK(at::isFloatingType(A.scalar_type()) && at::isFloatingType(B.scalar_type()),
              "nf4q: LoRA weights must be floating point");
}

at::Tensor lora_gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scale) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "lora_gemm_4bit");
  check_lora(w, lora_A, lora_B, x, "lora_gemm_4bit");
  if (bias) {
    TORCH_CHECK(bias->numel() == N && bias->device() == x.device() && at::isFloatingType(bias->scalar_type()),
                "nf4q: bias must be a floating-point tensor of ", N, " values on ", x.device());
  }
  c10::cuda::CUDAGuard guard(x.device());
  const auto dt = compute_dtype(x);
  const auto x2 = x.reshape({-1, K}).to(dt);
  const int64_t M = x2.size(0), r = lora_A.size(0);
  const auto A = lora_A.to(dt), B = lora_B.to(dt);
  at::Tensor y;
  if (M > 0 && want_fused(M, N) && gemm_fused_eligible(x2, w, false)) {
    y = at::empty({M, N}, x2.options());
    fused_with_lora(x2, w, false, at::mm(x2, A.t()).mul_(scale), B, bias, y);
  } else if (M <= kSmallM || r == 0 || N == 0 || K == 0) {
    y = gemm_2d(x2, w, bias);
    if (r > 0 && M > 0 && N > 0) y.addmm_(at::mm(x2, A.t()), B.t(), 1, scale);
  } else {
    const auto xa = at::mm(x2, A.t()).mul_(scale);
    y = bias ? at::addmm(bias->to(dt), xa, B.t()) : at::mm(xa, B.t());
    gemm_slabs(x2, w, false, y, true);
  }
  return y.to(x.scalar_type()).view(with_last(x, N));
}

at::Tensor lora_gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, double scale) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "lora_gemm_4bit_dx");
  check_lora(w, lora_A, lora_B, grad, "lora_gemm_4bit_dx");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dt = compute_dtype(grad);
  const auto g2 = grad.reshape({-1, N}).to(dt);
  const int64_t M = g2.size(0), r = lora_A.size(0);
  const auto A = lora_A.to(dt), B = lora_B.to(dt);
  at::Tensor dx;
  if (M == 0 || N == 0 || K == 0) {
    dx = at::zeros({M, K}, g2.options());
    if (r > 0 && M > 0 && K > 0 && N > 0) dx.addmm_(at::mm(g2, B), A, 1, scale);
  } else if (want_fused(M, K) && gemm_fused_eligible(g2, w, true)) {
    dx = at::empty({M, K}, g2.options());
    fused_with_lora(g2, w, true, at::mm(g2, B).mul_(scale), A.t(), {}, dx);
  } else if (r == 0) {
    dx = at::empty({M, K}, g2.options());
    gemm_slabs(g2, w, true, dx, false);
  } else {
    dx = at::mm(at::mm(g2, B).mul_(scale), A);
    gemm_slabs(g2, w, true, dx, true);
  }
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("lora_gemm_4bit", &lora_gemm_4bit);
  m.impl("lora_gemm_4bit_dx", &lora_gemm_4bit_dx);
}

}  // namespace nf4q::cuda
