// CUDA kernels: 4-bit NF4 and 8-bit blockwise quantize/dequantize, bit-identical to csrc/cpu/quant.cpp.
// Exactness: the same helpers as the CPU (common/nf4.h) with IEEE division and reciprocal (setup.py does not
// pass --use_fast_math), round-to-nearest products without fused multiply-add, RNE conversions.
#include <torch/library.h>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- 4-bit quantize: one warp per block; lanes take element pairs so each writes whole bytes ----------------
template <typename T>
__global__ void __launch_bounds__(kThreads) quant4_kernel(const T* __restrict__ A, int64_t n, int bs,
                                                          const float* __restrict__ code, uint8_t* __restrict__ packed,
                                                          float* __restrict__ absmax, int64_t blocks) {
  __shared__ float mids[kCodes4 - 1];
  if (threadIdx.x == 0) midpoints(code, kCodes4, mids);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= blocks) return;
  const int64_t start = b * bs;
  const int len = static_cast<int>(min(static_cast<int64_t>(bs), n - start));
  const T* src = A + start;
  float amax = 0.f;  // fmaxf ignores NaN like the CPU's max; a non-finite block is flagged instead
  bool finite = true;
  for (int i = 2 * lane; i < len; i += 64) {
    const float v0 = Cvt<T>::to_float(src[i]);
    amax = fmaxf(amax, fabsf(v0));
    finite &= isfinite(v0);
    if (i + 1 < len) {
      const float v1 = Cvt<T>::to_float(src[i + 1]);
      amax = fmaxf(amax, fabsf(v1));
      finite &= isfinite(v1);
    }
  }
  amax = warp_max(amax);
  finite = __all_sync(0xffffffffu, finite);
  if (lane == 0) absmax[b] = finite ? amax : __int_as_float(0x7fc00000);  // NaN: quantize() raises on it
  const bool partial = len < bs;
  const uint8_t pad = encode4(0.0f, mids);  // an odd tail is padded with a zero value, as bitsandbytes does
  for (int i = 2 * lane; i < len; i += 64) {
    const uint8_t q0 = encode4(scale_block(Cvt<T>::to_float(src[i]), amax, partial), mids);
    const uint8_t q1 = i + 1 < len ? encode4(scale_block(Cvt<T>::to_float(src[i + 1]), amax, partial), mids) : pad;
    packed[(start + i) >> 1] = pack2(q0, q1);
  }
}

// ---- 8-bit blockwise quantize (any positive blocksize): one warp per block, binary search in shared memory --
template <typename T>
__global__ void __launch_bounds__(kThreads) quant8_kernel(const T* __restrict__ A, int64_t n, int64_t bs,
                                                          const float* __restrict__ code, uint8_t* __restrict__ q,
                                                          float* __restrict__ absmax, int64_t blocks) {
  __shared__ float mids[kCodes8 - 1];
  if (threadIdx.x < kCodes8 - 1) mids[threadIdx.x] = (code[threadIdx.x] + code[threadIdx.x + 1]) / 2.0f;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= blocks) return;
  const int64_t start = b * bs, len = min(bs, n - start);
  float amax = 0.f;
  for (int64_t i = lane; i < len; i += 32) amax = fmaxf(amax, fabsf(Cvt<T>::to_float(A[start + i])));
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  for (int64_t i = lane; i < len; i += 32)
    q[start + i] = encode8(scale_block(Cvt<T>::to_float(A[start + i]), amax, len < bs), mids);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dequant8_kernel(const uint8_t* __restrict__ q,
                                                            const float* __restrict__ absmax,
                                                            const float* __restrict__ code, int64_t bs, int64_t n,
                                                            T* __restrict__ out) {
  __shared__ float table[kCodes8];
  table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    out[i] = Cvt<T>::from(__fmul_rn(table[q[i]], __ldg(absmax + i / bs)));
}

// ---- 4-bit dequantize into a strided rectangle -------------------------------------------------------------
// A warp decodes a unit of 1024 consecutive outputs of one row per step: lane l takes 4-byte words of packed
// codes at 128j + 4l (j = 0..3, coalesced 128-byte loads) and writes their 8 outputs at 256j + 8l, so each
// 16-byte store instruction of the warp covers 512 contiguous bytes. A group of 8 lies in one absmax block
// (blocks are powers of two >= 32). One shared-memory lookup gives both values of a byte: a 256-entry table of
// float pairs, replicated 16 times so that the 16 lanes of each half-warp read distinct banks (random codes
// would otherwise collide ~4-way). Grid-stride over units with the whole GPU resident; leftovers (partial
// units, unaligned buffers, rows that are not multiples of 32) go through the elementwise path at the end.
constexpr int kDqThreads = 512;
constexpr int kCopies = 16;
constexpr int kUnit = 1024;

// The 4 table entries of a word's bytes (entries 128 bytes apart: 16 copies of a float2).
__device__ __forceinline__ void lookup4(uint32_t word, const float2* tab, uint32_t lane_off, float2 c[4]) {
  c[0] = lut<float2>(tab, lut_offset<0>(word, lane_off));
  c[1] = lut<float2>(tab, lut_offset<1>(word, lane_off));
  c[2] = lut<float2>(tab, lut_offset<2>(word, lane_off));
  c[3] = lut<float2>(tab, lut_offset<3>(word, lane_off));
}

template <typename T>
__device__ __forceinline__ void store8(T* o, uint32_t word, const float2* tab, uint32_t lane_off, float a) {
  float2 c[4];
  lookup4(word, tab, lane_off, c);
  uint32_t out[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = Cvt<T>::pack(__fmul_rn(c[j].x, a), __fmul_rn(c[j].y, a));
  *reinterpret_cast<uint4*>(o) = make_uint4(out[0], out[1], out[2], out[3]);
}

template <>
__device__ __forceinline__ void store8<float>(float* o, uint32_t word, const float2* tab, uint32_t lane_off, float a) {
  float2 c[4];
  lookup4(word, tab, lane_off, c);
  float v[8];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = __fmul_rn(c[j].x, a);
    v[2 * j + 1] = __fmul_rn(c[j].y, a);
  }
  reinterpret_cast<float4*>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename T>
__global__ void __launch_bounds__(kDqThreads, 4) dequant4_kernel(W4View w, int64_t row_len, int64_t row0, int64_t nrows,
                                                              int64_t col0, int64_t ncols, T* __restrict__ out,
                                                              int64_t ld, bool vec) {
  __shared__ float2 tab[256 * kCopies];
  __shared__ float ncode[256];
  const int tid = threadIdx.x, lane = tid % 32;
  for (int i = tid; i < 256 * kCopies; i += kDqThreads) {
    const int e = i / kCopies;
    tab[i] = make_float2(__ldg(w.code + (e >> 4)), __ldg(w.code + (e & 15)));
  }
  if (w.nested_absmax != nullptr && tid < 256) ncode[tid] = __ldg(w.nested_code + tid);
  __syncthreads();
  const float offset = w.nested_absmax != nullptr ? __ldg(w.nested_offset) : 0.f;
  const uint32_t lane_off = 8 * (lane % kCopies);  // this half-warp lane's copy of the table

  const int64_t upr = vec ? ncols / kUnit : 0, units = nrows * upr;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (kDqThreads / 32);
  // (ncu: DRAM-bound at ~84% of the copy ceiling, 89% occupancy. Two units per step spilled at 40 registers
  // and was not adopted.)
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * (kDqThreads / 32) + tid / 32; u < units; u += nwarps) {
    const int64_t r = nrows == 1 ? 0 : u / upr, c = (u - r * upr) * kUnit;
    const int64_t e0 = (row0 + r) * row_len + col0 + c + 8 * lane;
    uint32_t word[4];
    float a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) word[j] = __ldg(reinterpret_cast<const uint32_t*>(w.packed + ((e0 + 256 * j) >> 1)));
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = block_absmax(w, ncode, offset, static_cast<uint32_t>((e0 + 256 * j) >> w.log2_bs));
    T* o = out + r * ld + c + 8 * lane;
#pragma unroll
    for (int j = 0; j < 4; ++j) store8<T>(o + 256 * j, word[j], tab, lane_off, a[j]);
  }

  // Elementwise path for everything the units did not cover.
  const int64_t rem = ncols - upr * kUnit, tail = nrows * rem;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kDqThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kDqThreads + tid; i < tail; i += nthreads) {
    const int64_t r = i / rem, c = upr * kUnit + (i - r * rem);
    const int64_t e = (row0 + r) * row_len + col0 + c;
    const uint8_t byte = w.packed[e >> 1];
    const float2 c2 = tab[((e & 1) ? low_nibble(byte) : (high_nibble(byte) << 4)) * kCopies];
    const float v = (e & 1) ? c2.y : c2.x;  // entry lo has .y == code[lo]; entry hi << 4 has .x == code[hi]
    out[r * ld + c] = Cvt<T>::from(__fmul_rn(v, block_absmax(w, ncode, offset, static_cast<uint32_t>(e >> w.log2_bs))));
  }
}

at::Tensor float_input(const at::Tensor& A, const char* what) {
  TORCH_CHECK_VALUE(A.is_cuda(), "nf4q: ", what, ": input must be a CUDA tensor");
  // double goes through fp32, exactly as the CPU kernel's static_cast<float> does per element
  return (A.scalar_type() == at::kDouble ? A.to(at::kFloat) : A).contiguous();
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t g = ceil_div(items, per_block);
  TORCH_CHECK(g < (int64_t{1} << 31), "nf4q: tensor too large for one launch");
  return static_cast<unsigned>(std::max<int64_t>(g, 1));
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A_in, const at::Tensor& code, int64_t blocksize) {
  check_quantize(A_in, code, blocksize, 4);
  const auto A = float_input(A_in, "quantize_4bit");
  c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize);
  auto packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  auto absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(A.scalar_type(), "quantize_4bit", [&](auto tag) {
    using T = decltype(tag);
    quant4_kernel<T><<<grid_for(blocks, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(A.data_ptr()), n, static_cast<int>(blocksize), code.data_ptr<float>(),
        packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit(const at::Tensor& A_in, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_quantize(A_in, code, blocksize, 8);
  const auto A = float_input(A_in, "quantize_blockwise_8bit");
  c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize);
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(A.scalar_type(), "quantize_blockwise_8bit", [&](auto tag) {
    using T = decltype(tag);
    quant8_kernel<T><<<grid_for(blocks, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(A.data_ptr()), n, blocksize, code.data_ptr<float>(), q.data_ptr<uint8_t>(),
        absmax.data_ptr<float>(), blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  check_dequantize8(q, absmax, code, blocksize, dtype);
  c10::cuda::CUDAGuard guard(q.device());
  const auto kdtype = dtype == at::kDouble ? at::kFloat : dtype;
  auto out = at::empty({q.numel()}, q.options().dtype(kdtype));
  const int64_t n = q.numel();
  if (n > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 65535));
    dispatch_float_types(kdtype, "dequantize_blockwise_8bit", [&](auto tag) {
      using T = decltype(tag);
      dequant8_kernel<T><<<grid, kThreads, 0, stream>>>(q.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                        code.data_ptr<float>(), blocksize, n,
                                                        static_cast<T*>(out.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return kdtype == dtype ? out : out.to(dtype);
}

at::Tensor dequantize_4bit(NF4Q_W4_PARAMS, at::ScalarType dtype) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  return dequant4_full(w, dtype);
}

void dequantize_4bit_out(NF4Q_W4_PARAMS, at::ScalarType dtype, at::Tensor& out) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  check_out(out, dtype, w.numel, packed.device());
  if (dtype == at::kDouble) {
    out.copy_(dequant4_full(w, at::kFloat).view(out.sizes()));
  } else {
    dequant4_rect(w, std::max<int64_t>(w.numel, 1), 0, 1, 0, w.numel, out, w.numel);
  }
}

}  // namespace

void dequant4_rect(const W4& w, int64_t row_len, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                   at::Tensor& out, int64_t ld) {
  const W4View v = make_view(w, "dequantize_4bit");
  TORCH_CHECK(out.device() == w.packed.device(), "nf4q: dequantize output must be on the weight's device");
  TORCH_CHECK(row0 >= 0 && col0 >= 0 && col0 + ncols <= row_len && (row0 + nrows) * row_len <= w.numel &&
                  (nrows <= 1 || ld >= ncols),
              "nf4q: dequantize rectangle out of range");
  if (nrows == 0 || ncols == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  dispatch_float_types(out.scalar_type(), "dequantize_4bit", [&](auto tag) {
    using T = decltype(tag);
    T* dst = static_cast<T*>(out.data_ptr());
    const bool vec = aligned16(v.packed) && aligned16(dst) && (row0 * row_len + col0) % 32 == 0 &&
                     (nrows == 1 || (row_len % 32 == 0 && (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0));
    // enough blocks to fill the GPU (4 of 512 threads per SM), fewer for small tensors
    const int64_t work = vec ? nrows * (ncols / kUnit) * 32 + nrows * (ncols % kUnit) : nrows * ncols;
    const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(work, kDqThreads), 1, 4 * sms));
    dequant4_kernel<T><<<grid, kDqThreads, 0, stream>>>(v, row_len, row0, nrows, col0, ncols, dst, ld, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequant4_full(const W4& w, at::ScalarType dtype) {
  check_io_dtype(dtype, "dequantize_4bit", "dtype");
  const auto kdtype = dtype == at::kDouble ? at::kFloat : dtype;
  auto out = at::empty(w.shape, w.packed.options().dtype(kdtype));
  dequant4_rect(w, std::max<int64_t>(w.numel, 1), 0, 1, 0, w.numel, out, w.numel);
  return kdtype == dtype ? out : out.to(dtype);
}

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit);
}

}  // namespace nf4q::cuda
