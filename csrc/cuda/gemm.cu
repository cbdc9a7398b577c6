// CUDA gemm_4bit and gemm_4bit_dx: dispatch between the fused small-M kernel (gemv.cu) and
// dequantize-to-a-temporary + cuBLAS for large M, where cuBLAS's Hopper GEMM beats any mma.sync kernel we
// could write and the dequant pass costs a few percent (measurements in notes/cuda.md).
#include <torch/library.h>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

// Largest M for the fused kernel by default (NF4Q_CUDA_GEMM overrides). bench_linear on the H200: at M=16 the
// fused kernel wins (136 vs 287 us at 28672x8192), at M=64 dequant+cuBLAS does (292 vs 616 us).
constexpr int64_t kMmaMaxM = 16;

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias) return;
  TORCH_CHECK(bias->numel() == N && bias->device() == x.device() && at::isFloatingType(bias->scalar_type()),
              "nf4q: bias must be a floating-point tensor of ", N, " values on ", x.device());
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

at::Tensor gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "gemm_4bit");
  TORCH_CHECK(x.is_cuda(), "nf4q: gemm_4bit: x must be a CUDA tensor");
  check_bias(bias, x, N);
  c10::cuda::CUDAGuard guard(x.device());
  const auto y = gemm_2d(x.reshape({-1, K}), w, bias);
  return y.to(x.scalar_type()).view(with_last(x, N));
}

at::Tensor gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "gemm_4bit_dx");
  TORCH_CHECK(grad.is_cuda(), "nf4q: gemm_4bit_dx: grad must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dt = compute_dtype(grad);
  const auto g2 = grad.reshape({-1, N}).to(dt);
  at::Tensor dx;
  if (g2.size(0) == 0 || N == 0 || K == 0) {
    dx = at::zeros({g2.size(0), K}, g2.options());
  } else {
    dx = at::mm(g2, dequant4_full(w, dt));  // grad @ W: dequantized once, cuBLAS reads it transposed
  }
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

}  // namespace

at::Tensor gemm_2d(const at::Tensor& x2, const W4& w, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x2.size(0), N = w.rows(), K = w.cols();
  const auto dt = compute_dtype(x2);
  if (M == 0 || N == 0 || K == 0) {
    auto y = at::zeros({M, N}, x2.options().dtype(dt));
    if (bias && M > 0) y.add_(bias->to(dt));
    return y;
  }
  const auto path = forced_gemm_path();
  if (path == GemmPath::kMma || (path == GemmPath::kAuto && M <= kMmaMaxM)) {
    auto y = at::empty({M, N}, x2.options().dtype(dt));
    if (gemm_mma(x2, w, bias, y)) return y;
  }
  const auto xc = x2.to(dt);
  const auto wd = dequant4_full(w, dt);
  return bias ? at::linear(xc, wd, bias->to(dt)) : at::linear(xc, wd);
}

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("gemm_4bit_dx", &gemm_4bit_dx);
}

}  // namespace nf4q::cuda
