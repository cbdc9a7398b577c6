// CUDA LoRA dropout: out = x * keep / (1 - p) with the keep mask of (seed, flat index) from csrc/common/dropout.h,
// the same mask as the CPU kernel and nf4q/_reference.py. Elementwise and memory-bound: a grid-stride loop.
#include <torch/library.h>

#include "../common/dropout.h"
#include "common.cuh"

namespace nf4q::cuda {
namespace {

template <typename T>
__global__ void dropout_kernel(const T* x, T* out, int64_t n, uint64_t seed, uint64_t threshold, float scale,
                               bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    float v = dropout_keep(seed, static_cast<uint64_t>(i), threshold) ? Cvt<T>::to_float(x[i]) * scale : 0.0f;
    if (accumulate) v += Cvt<T>::to_float(out[i]);
    out[i] = Cvt<T>::from(v);
  }
}

void launch(const at::Tensor& x, at::Tensor& out, double p, int64_t seed, bool accumulate) {
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "nf4q: lora_dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel() &&
                  x.scalar_type() == out.scalar_type(),
              "nf4q: lora_dropout: internal: x and out must be contiguous and alike");
  const int64_t n = x.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads,
                                           int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 16);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t thr = dropout_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  dispatch_float_types(x.scalar_type(), "lora_dropout", [&](auto tag) {
    using T = decltype(tag);
    dropout_kernel<T><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const T*>(x.data_ptr()), static_cast<T*>(out.data_ptr()), n, static_cast<uint64_t>(seed), thr,
        scale, accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lora_dropout_op(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK_VALUE(x.is_cuda(), "nf4q: lora_dropout: x must be a CUDA tensor");
  const auto dt = compute_dtype(x);
  const auto xc = x.to(dt).contiguous();
  auto out = at::empty_like(xc);
  launch(xc, out, p, seed, false);
  return out.to(x.scalar_type()).view(x.sizes());
}

}  // namespace

at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed) {
  auto out = at::empty_like(x);
  launch(x, out, p, seed, false);
  return out;
}

void lora_dropout_(at::Tensor& t, double p, int64_t seed) { launch(t, t, p, seed, false); }

void lora_dropout_add_(at::Tensor& out, const at::Tensor& t, double p, int64_t seed) {
  launch(t, out, p, seed, true);
}

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) { m.impl("lora_dropout", &lora_dropout_op); }

}  // namespace nf4q::cuda
