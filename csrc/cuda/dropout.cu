// CUDA LoRA dropout: out = x * keep / (1 - p) with the keep mask of (seed, flat index) from csrc/common/dropout.h,
// the same mask as the CPU kernel and nf4q/_reference.py. Elementwise and memory-bound: a grid-stride loop of
// 16-byte accesses.
#include <torch/library.h>

#include "../common/dropout.h"
#include "common.cuh"

namespace nf4q::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float dropped(T v, uint64_t seed, uint64_t i, uint64_t threshold, float scale) {
  return dropout_keep(seed, i, threshold) ? Cvt<T>::to_float(v) * scale : 0.0f;
}

// 16 bytes per thread and step where x and out are 16-byte aligned (elements i = 8 v .. 8 v + 7 of a 16-bit type,
// 4 of fp32), the scalar loop for the tail: memory-bound at 2 bytes an element, so the loads must be wide.
template <typename T>
__global__ void dropout_kernel(const T* x, T* out, int64_t n, uint64_t seed, uint64_t threshold, float scale,
                               bool accumulate, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x, tid = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int64_t nv = vec ? n / kVec : 0;
  for (int64_t v = tid; v < nv; v += stride) {
    uint4 xin = *reinterpret_cast<const uint4*>(x + v * kVec), acc;
    if (accumulate) acc = *reinterpret_cast<const uint4*>(out + v * kVec);
    const T* xe = reinterpret_cast<const T*>(&xin);
    T* ae = reinterpret_cast<T*>(&acc);
    uint4 res;
    T* re = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float f = dropped(xe[j], seed, static_cast<uint64_t>(v * kVec + j), threshold, scale);
      if (accumulate) f += Cvt<T>::to_float(ae[j]);
      re[j] = Cvt<T>::from(f);
    }
    *reinterpret_cast<uint4*>(out + v * kVec) = res;
  }
  for (int64_t i = nv * kVec + tid; i < n; i += stride) {
    float f = dropped(x[i], seed, static_cast<uint64_t>(i), threshold, scale);
    if (accumulate) f += Cvt<T>::to_float(out[i]);
    out[i] = Cvt<T>::from(f);
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
  const bool vec = aligned16(x.data_ptr()) && aligned16(out.data_ptr());
  const int64_t per_thread = vec ? 16 / x.element_size() : 1;
  const int64_t blocks = std::min<int64_t>((n / per_thread + threads) / threads,
                                           int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 16);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t thr = dropout_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  dispatch_float_types(x.scalar_type(), "lora_dropout", [&](auto tag) {
    using T = decltype(tag);
    dropout_kernel<T><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const T*>(x.data_ptr()), static_cast<T*>(out.data_ptr()), n, static_cast<uint64_t>(seed), thr,
        scale, accumulate, vec);
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
