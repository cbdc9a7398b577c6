// CUDA lora_gemm_4bit and lora_gemm_4bit_dx.
//   y  = x @ W^T + bias + s (x A^T) B^T        dx = g @ W + s (g B) A
// Small M: the fused NF4 kernel for x W^T, then one rank-r update (addmm_). Large M, two ways to fold the
// LoRA term into the one big cuBLAS GEMM, picked by which extra pass moves fewer bytes:
//   concat: one GEMM over the concatenated inner dimension, [x, s xA^T] @ [W, B]^T, W dequantized straight
//           into the wide buffer (strided dequant) -- costs one copy of x (M x K).
//   beta:   y = s (xA^T) B^T first, then y += x W^T inside the big GEMM (beta = 1) -- costs a read of y (M x N).
// NF4Q_CUDA_LORA=concat|beta overrides the choice (for benchmarks).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

constexpr int64_t kSmallM = 64;

enum class LoraPath { kAuto, kConcat, kBeta };

LoraPath forced_lora_path() {
  const char* s = std::getenv("NF4Q_CUDA_LORA");
  if (s != nullptr && std::strcmp(s, "concat") == 0) return LoraPath::kConcat;
  if (s != nullptr && std::strcmp(s, "beta") == 0) return LoraPath::kBeta;
  return LoraPath::kAuto;
}

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

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

bool use_concat(int64_t extra_concat, int64_t extra_beta, int64_t inner) {
  const auto p = forced_lora_path();
  if (p != LoraPath::kAuto) return p == LoraPath::kConcat;
  return inner % 32 == 0 && extra_concat <= extra_beta;  // the strided dequant's fast path needs rows of 32k
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
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
  if (M <= kSmallM || r == 0 || N == 0 || K == 0) {
    y = gemm_2d(x2, w, bias);
    if (r > 0 && M > 0 && N > 0) y.addmm_(at::mm(x2, A.t()), B.t(), 1, scale);
  } else if (use_concat(M * K, M * N, K)) {
    const int64_t ldk = round_up8(K + r);  // 16-byte aligned rows for the dequant stores and cuBLAS
    auto wcat = at::empty({N, ldk}, x2.options());
    dequant4_rect(w, K, 0, N, 0, K, wcat, ldk);
    wcat.narrow(1, K, r).copy_(B);
    auto xcat = at::empty({M, ldk}, x2.options());
    xcat.narrow(1, 0, K).copy_(x2);
    xcat.narrow(1, K, r).copy_(at::mm(x2, A.t()).mul_(scale));
    if (ldk > K + r) {
      wcat.narrow(1, K + r, ldk - K - r).zero_();
      xcat.narrow(1, K + r, ldk - K - r).zero_();
    }
    y = bias ? at::addmm(bias->to(dt), xcat, wcat.t()) : at::mm(xcat, wcat.t());
  } else {
    const auto xa = at::mm(x2, A.t()).mul_(scale);
    y = bias ? at::addmm(bias->to(dt), xa, B.t()) : at::mm(xa, B.t());
    y.addmm_(x2, dequant4_full(w, dt).t());  // the big GEMM reads y once as C (beta = 1)
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
  } else if (r > 0 && M > kSmallM && use_concat(M * N, M * K, 0)) {
    // [g, s gB] @ [W; A]: W dequantized into the first N rows, A below it (rows padded to a multiple of 8)
    const int64_t ldn = round_up8(N + r);
    auto wcat = at::empty({ldn, K}, g2.options());
    dequant4_rect(w, N * K, 0, 1, 0, N * K, wcat, N * K);  // the first N*K elements of wcat, flat
    wcat.narrow(0, N, r).copy_(A);
    auto gcat = at::empty({M, ldn}, g2.options());
    gcat.narrow(1, 0, N).copy_(g2);
    gcat.narrow(1, N, r).copy_(at::mm(g2, B).mul_(scale));
    if (ldn > N + r) {
      wcat.narrow(0, N + r, ldn - N - r).zero_();
      gcat.narrow(1, N + r, ldn - N - r).zero_();
    }
    dx = at::mm(gcat, wcat);
  } else {
    dx = r > 0 ? at::mm(at::mm(g2, B).mul_(scale), A) : at::zeros({M, K}, g2.options());
    dx.addmm_(g2, dequant4_full(w, dt));
  }
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("lora_gemm_4bit", &lora_gemm_4bit);
  m.impl("lora_gemm_4bit_dx", &lora_gemm_4bit_dx);
}

}  // namespace nf4q::cuda
