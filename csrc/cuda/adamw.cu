// Fused multi-tensor AdamW on the GPU: one launch updates every tensor of a list, 32-bit or 8-bit
// blockwise states (one kernel template for both), on the current stream with no synchronization.
//
// Work split: all tensors are cut into units of 256 elements (kQBlock, also the 8-bit quantization
// block); one warp owns one unit, 8 consecutive elements per lane, so a block absmax is a warp
// reduction (no shared memory, no __syncthreads) and loads are 16-byte vectors. A warp finds its tensor
// by binary search over the units' prefix sums, which live with the pointers in a small table copied
// from pinned memory asynchronously. The arithmetic is csrc/common/adamw.h, shared with the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../common/adamw.h"

namespace nf4q::cuda {
namespace {

using adamw::Hyper;
using adamw::kQBlock;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = kQBlock / 32;  // 8

struct Slot {  // 64 bytes, as the host writes it
  void* p;
  const void* g;
  void* m;
  void* v;
  float* am1;
  float* am2;
  int64_t n;
  int64_t vec;  // all pointers aligned for vector access
};

// 8 values of T -> fp32: one or two 16-byte loads when aligned and whole, else element by element.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ src, float (&dst)[kPerLane], int cnt, bool vec) {
  if (vec && cnt == kPerLane) {
    constexpr int kVecs = sizeof(T) * kPerLane / 16;
    uint4 raw[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) raw[i] = reinterpret_cast<const uint4*>(src)[i];
    const T* vals = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = static_cast<float>(vals[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = i < cnt ? static_cast<float>(src[i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ dst, const float (&src)[kPerLane], int cnt, bool vec) {
  if (vec && cnt == kPerLane) {
    constexpr int kVecs = sizeof(T) * kPerLane / 16;
    uint4 raw[kVecs];
    T* vals = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) vals[i] = static_cast<T>(src[i]);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(dst)[i] = raw[i];
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (i < cnt) dst[i] = static_cast<T>(src[i]);
  }
}

__device__ __forceinline__ void load_codes(const uint8_t* src, uint8_t (&dst)[kPerLane], int cnt, bool vec) {
  if (vec && cnt == kPerLane) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = b[i];
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[i] = i < cnt ? src[i] : 0;
  }
}

__device__ __forceinline__ void store_codes(uint8_t* dst, const uint8_t (&src)[kPerLane], int cnt, bool vec) {
  if (vec && cnt == kPerLane) {
    uint2 raw;
    uint8_t* b = reinterpret_cast<uint8_t*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) b[i] = src[i];
    *reinterpret_cast<uint2*>(dst) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (i < cnt) dst[i] = src[i];
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T, int Bits>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const Slot* __restrict__ slots,
                                                         const int64_t* __restrict__ starts, int num,
                                                         int64_t total_units, Hyper h,
                                                         const float* __restrict__ code1,
                                                         const float* __restrict__ code2) {
  // 8-bit: value tables for decoding and midpoint trees for encoding (4 KB).
  __shared__ float s_code1[Bits == 8 ? 256 : 1], s_code2[Bits == 8 ? 256 : 1];
  __shared__ float s_tree1[Bits == 8 ? 256 : 1], s_tree2[Bits == 8 ? 256 : 1];
  if constexpr (Bits == 8) {
    const int t = threadIdx.x;
    s_code1[t] = code1[t];
    s_code2[t] = code2[t];
    __syncthreads();
    s_tree1[t] = t ? adamw::tree_node(s_code1, t) : 0.f;
    s_tree2[t] = t ? adamw::tree_node(s_code2, t) : 0.f;
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  // Grid-stride over units: 8-bit launches one wave of resident blocks, so the table setup above is paid
  // once per block rather than once per 2048 elements; 32-bit launches one block per 8 units (one pass).
  // The unit is warp-uniform, so whole warps enter and leave the loop and the shuffles stay full.
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); unit < total_units;
       unit += static_cast<int64_t>(gridDim.x) * kWarps) {
    int lo = 0, hi = num - 1;  // the last tensor whose first unit is <= unit
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (__ldg(starts + mid) <= unit) lo = mid; else hi = mid - 1;
    }
    const Slot s = slots[lo];
    const int64_t b = unit - __ldg(starts + lo);  // block index inside the tensor
    const int64_t off = b * kQBlock + lane * kPerLane;
    const int64_t left = s.n - off;
    const int cnt = left <= 0 ? 0 : (left >= kPerLane ? kPerLane : static_cast<int>(left));
    const bool vec = s.vec != 0;

    float p[kPerLane], g[kPerLane], m[kPerLane], v[kPerLane];
    load8(static_cast<const T*>(s.p) + off, p, cnt, vec);
    load8(static_cast<const T*>(s.g) + off, g, cnt, vec);
    uint8_t qm[kPerLane], qv[kPerLane];
    if constexpr (Bits == 32) {
      load8(static_cast<const float*>(s.m) + off, m, cnt, vec);
      load8(static_cast<const float*>(s.v) + off, v, cnt, vec);
    } else {
      load_codes(static_cast<const uint8_t*>(s.m) + off, qm, cnt, vec);
      load_codes(static_cast<const uint8_t*>(s.v) + off, qv, cnt, vec);
      const float a1 = s.am1[b], a2 = s.am2[b];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        m[i] = i < cnt ? s_code1[qm[i]] * a1 : 0.f;
        v[i] = i < cnt ? s_code2[qv[i]] * a2 : 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (i < cnt) adamw::update(p[i], g[i], m[i], v[i], h);
    store8(static_cast<T*>(s.p) + off, p, cnt, vec);
    if constexpr (Bits == 32) {
      store8(static_cast<float*>(s.m) + off, m, cnt, vec);
      store8(static_cast<float*>(s.v) + off, v, cnt, vec);
    } else {
      float n1 = 0.f, n2 = 0.f;  // lanes past the end hold zeros, which leave the max alone
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        n1 = fmaxf(n1, fabsf(m[i]));
        n2 = fmaxf(n2, v[i]);
      }
      n1 = warp_max(n1);
      n2 = warp_max(n2);
      if (lane == 0) {
        s.am1[b] = n1;
        s.am2[b] = n2;
      }
      const float i1 = adamw::inv_absmax(n1), i2 = adamw::inv_absmax(n2);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        qm[i] = adamw::encode_tree(clamp_unit(m[i] * i1), s_tree1);
        qv[i] = adamw::encode_tree(clamp_unit(v[i] * i2), s_tree2);
      }
      store_codes(static_cast<uint8_t*>(s.m) + off, qm, cnt, vec);
      store_codes(static_cast<uint8_t*>(s.v) + off, qv, cnt, vec);
    }
  }
}

// Blocks of the 8-bit kernel that fit on the GPU at once (one full wave), queried once per dtype.
template <typename T>
int64_t resident_blocks_8bit() {
  static const int64_t count = [] {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_kernel<T, 8>, kThreads, 0));
    return static_cast<int64_t>(std::max(per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }();
  return count;
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void launch(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs,
            const at::Tensor* absmax1, const at::Tensor* absmax2, int bits, const at::Tensor& code1,
            const at::Tensor& code2, const Hyper& h) {
  const int num = static_cast<int>(params.size());
  const int64_t slot_words = sizeof(Slot) / sizeof(int64_t);
  auto table = at::empty({num * (slot_words + 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  Slot* slots = reinterpret_cast<Slot*>(table.data_ptr<int64_t>());
  int64_t* starts = table.data_ptr<int64_t>() + num * slot_words;
  int64_t units = 0;
  const int state_align = bits == 32 ? 16 : 8;
  for (int i = 0; i < num; ++i) {
    Slot& s = slots[i];
    s.p = params[i].data_ptr();
    s.g = grads[i].data_ptr();
    s.m = ms[i].data_ptr();
    s.v = vs[i].data_ptr();
    s.am1 = bits == 8 ? absmax1[i].data_ptr<float>() : nullptr;
    s.am2 = bits == 8 ? absmax2[i].data_ptr<float>() : nullptr;
    s.n = params[i].numel();
    s.vec = aligned(s.p, 16) && aligned(s.g, 16) && aligned(s.m, state_align) && aligned(s.v, state_align);
    starts[i] = units;
    units += ceil_div(s.n, kQBlock);
  }
  if (units == 0) return;
  // Async copy from pinned memory: the caching host allocator keeps the buffer until the copy is done.
  const auto dev_table = table.to(params[0].device(), /*non_blocking=*/true);
  const Slot* d_slots = reinterpret_cast<const Slot*>(dev_table.data_ptr<int64_t>());
  const int64_t* d_starts = dev_table.data_ptr<int64_t>() + num * slot_words;
  const float* c1 = bits == 8 ? code1.data_ptr<float>() : nullptr;
  const float* c2 = bits == 8 ? code2.data_ptr<float>() : nullptr;
  const int64_t blocks = ceil_div(units, kWarps);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = params[0].scalar_type();
#define NF4Q_LAUNCH(T)                                                                                        \
  if (bits == 8) {                                                                                             \
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(blocks, resident_blocks_8bit<T>())));    \
    adamw_kernel<T, 8><<<grid, kThreads, 0, stream>>>(d_slots, d_starts, num, units, h, c1, c2);               \
  } else {                                                                                                     \
    const dim3 grid(static_cast<unsigned>(blocks));                                                            \
    adamw_kernel<T, 32><<<grid, kThreads, 0, stream>>>(d_slots, d_starts, num, units, h, c1, c2);              \
  }
  if (dtype == at::kFloat) {
    NF4Q_LAUNCH(float)
  } else if (dtype == at::kHalf) {
    NF4Q_LAUNCH(at::Half)
  } else {
    NF4Q_LAUNCH(at::BFloat16)
  }
#undef NF4Q_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_adamw_hparams(lr, beta1, beta2, eps, weight_decay, step);
  check_adamw(params, grads, ms, vs, at::kFloat);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor none;
  launch(params, grads, ms, vs, nullptr, nullptr, 32, none, none,
         adamw::make_hyper(lr, beta1, beta2, eps, weight_decay, step));
}

void adamw8bit_step(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs,
                    at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& code1, const at::Tensor& code2,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  if (params.empty()) return;
  check_adamw_hparams(lr, beta1, beta2, eps, weight_decay, step);
  check_adamw(params, grads, ms, vs, at::kByte, &absmax1, &absmax2, &code1, &code2);
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  launch(params, grads, ms, vs, absmax1.data(), absmax2.data(), 8, code1, code2,
         adamw::make_hyper(lr, beta1, beta2, eps, weight_decay, step));
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("adamw_step", &adamw_step);
  m.impl("adamw8bit_step", &adamw8bit_step);
}

}  // namespace nf4q::cuda
