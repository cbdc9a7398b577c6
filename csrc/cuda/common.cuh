// Shared pieces of the CUDA backend: the device view of a W4 weight, exact absmax decoding, dtype helpers,
// and the host entry points one kernel family offers the others (dequantize into a strided buffer).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../common/nf4.h"
#include "../w4.h"

namespace nf4q::cuda {

// What a kernel needs of a W4 weight. absmax is fp32 per block, or uint8 codes when nested_absmax is set.
struct W4View {
  const uint8_t* packed;
  const void* absmax;
  const float* nested_absmax;  // null without double quantization
  const float* nested_code;
  const float* nested_offset;
  const float* code;
  int log2_bs;
  int nested_bs;
  int nested_log2;  // log2(nested_bs) when it is a power of two (256 in practice), else -1
};

// Host: every W4 tensor on CUDA (make_w4 already checked one device and the shapes).
inline W4View make_view(const W4& w, const char* what) {
  TORCH_CHECK(w.packed.is_cuda(), "nf4q: ", what, ": CUDA kernel got a weight on ", w.packed.device());
  W4View v;
  v.packed = w.packed.data_ptr<uint8_t>();
  v.absmax = w.absmax.data_ptr();
  v.nested_absmax = w.double_quant() ? w.nested_absmax->data_ptr<float>() : nullptr;
  v.nested_code = w.double_quant() ? w.nested_code->data_ptr<float>() : nullptr;
  v.nested_offset = w.double_quant() ? w.nested_offset->data_ptr<float>() : nullptr;
  v.code = w.code.data_ptr<float>();
  v.log2_bs = 0;
  while ((int64_t{1} << v.log2_bs) < w.blocksize) ++v.log2_bs;
  TORCH_CHECK(!w.double_quant() || w.nested_blocksize <= INT32_MAX, "nf4q: nested_blocksize too large");
  v.nested_bs = static_cast<int>(w.nested_blocksize);
  v.nested_log2 = -1;
  for (int i = 0; i < 31; ++i)
    if ((int64_t{1} << i) == w.nested_blocksize) v.nested_log2 = i;
  TORCH_CHECK(w.blocks() < (int64_t{1} << 31), "nf4q: ", what, ": too many blocks for the CUDA kernels");
  return v;
}

// The nested scale index of absmax block b: a shift when nested blocks are a power of two (256 whenever nf4q or
// bitsandbytes wrote them), a 32-bit division otherwise.
__device__ __forceinline__ uint32_t nested_block(const W4View& w, uint32_t b) {
  return w.nested_log2 >= 0 ? b >> w.nested_log2 : b / static_cast<uint32_t>(w.nested_bs);
}

// fp32 absmax of block b. The double-quantized form uses round-to-nearest multiply then add, never a fused
// multiply-add, so that it is bit-identical to the CPU kernels (x86 without FMA) and to _reference.py.
__device__ __forceinline__ float block_absmax(const W4View& w, const float* ncode_smem, float offset, uint32_t b) {
  if (w.nested_absmax != nullptr) {
    const uint8_t q = __ldg(static_cast<const uint8_t*>(w.absmax) + b);
    return __fadd_rn(__fmul_rn(ncode_smem[q], __ldg(w.nested_absmax + nested_block(w, b))), offset);
  }
  return __ldg(static_cast<const float*>(w.absmax) + b);
}

// A shared-memory address (32-bit, for ld.shared / cp.async / mbarriers) and cp.async (sm_80+).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// A 4-byte copy (cp.async's .cg form takes 16 bytes only).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
// The same with an L2 cache policy (createpolicy), e.g. evict_first for bytes read once.
__device__ __forceinline__ void cp_async16_hint(uint32_t dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "l"(policy));
}
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Streaming 16-byte load that skips L1 (the weight is read once; keep L1 for the activations).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// A 16-byte read-only load kept in L1 ahead of other lines (evict_last): data every warp rereads.
__device__ __forceinline__ uint4 ld_keep16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::evict_last.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Byte offset of entry (byte `B` of word) in a lookup table whose entries are 128 bytes apart (a 4-byte entry
// replicated 32 times, or an 8-byte one 16 times), ORed with this lane's copy offset: one shift and one LOP3,
// and the table base folds into the shared load's uniform register.
template <int B>
__device__ __forceinline__ uint32_t lut_offset(uint32_t word, uint32_t lane_off) {
  constexpr int sh = 8 * B - 7;
  const uint32_t v = sh >= 0 ? (word >> (sh >= 0 ? sh : 0)) : (word << (sh < 0 ? -sh : 0));
  return (v & 0x7f80u) | lane_off;
}

template <typename V>
__device__ __forceinline__ V lut(const void* table, uint32_t off) {
  return *reinterpret_cast<const V*>(reinterpret_cast<const char*>(table) + off);
}

// ---- dtype helpers: T is float, __half or __nv_bfloat16 -------------------------------------------------
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  __device__ static float from(float v) { return v; }
  __device__ static float to_float(float v) { return v; }
};
template <> struct Cvt<__half> {
  __device__ static __half from(float v) { return __float2half_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
  // Two values in one 32-bit word, the first in the low half (the lower address).
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t v) { return __half22float2(*reinterpret_cast<__half2*>(&v)); }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
};

// Two 16-bit values packed in a word times two others, in T's arithmetic (HMUL2).
template <typename T>
__device__ __forceinline__ uint32_t hmul2(uint32_t p, uint32_t s) {
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  T2 r = __hmul2(*reinterpret_cast<T2*>(&p), *reinterpret_cast<T2*>(&s));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Fills the byte -> T2 lookup table of the fused kernels: entry e = (code[e >> 4], code[e & 15]) replicated 32 times
// (one 4-byte copy per lane) at table + e * stride + 4 c. A warp's 16-byte stores cover 4 entries x 128 contiguous
// bytes (4 wavefronts); a store per entry per thread put all 32 lanes on the same 4 banks (32 wavefronts per store,
// ~1 us of every launch on the H200, notes/cuda.md round 10).
template <typename T, int kThreads>
__device__ __forceinline__ void fill_pair_table(uint8_t* table, int stride, const float* __restrict__ code, int tid) {
  constexpr int kChunks = 8;  // 16-byte chunks of an entry's 32 copies
  static_assert(256 * kChunks % kThreads == 0, "every thread stores the same number of chunks");
#pragma unroll
  for (int i = 0; i < 256 * kChunks / kThreads; ++i) {
    const int c = i * kThreads + tid, e = c / kChunks;
    const uint32_t v = Cvt<T>::pack(__ldg(code + (e >> 4)), __ldg(code + (e & 15)));
    *reinterpret_cast<uint4*>(table + e * stride + 16 * (c % kChunks)) = make_uint4(v, v, v, v);
  }
}

// at::ScalarType -> CUDA element type.
template <typename F>
void dispatch_float_types(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "nf4q: ", what, ": dtype must be float32, float16 or bfloat16, got ", t);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
// t, or a contiguous 16-byte aligned copy of it (a view with strides or an odd storage offset), for vector loads.
inline at::Tensor contiguous_aligned16(const at::Tensor& t) {
  auto c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// ---- host entry points shared between the .cu files -------------------------------------------------------

// out[r * ld + c] = dequant(W)[row0 + r, col0 + c] for r < nrows, c < ncols (W viewed as rows of `row_len`).
// A flat dequantization is nrows = 1, ncols = numel, row_len = numel. out is fp32/fp16/bf16 on W's device.
void dequant4_rect(const W4& w, int64_t row_len, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                   at::Tensor& out, int64_t ld);

// The whole weight dequantized to a new contiguous tensor of its shape, in dtype.
at::Tensor dequant4_full(const W4& w, at::ScalarType dtype);

// Small-M fused path: y[M, N] = x[M, K] @ dequant(W)^T (+ bias), tensor cores with dequantization in
// registers. Returns false (doing nothing) when the inputs do not fit its constraints.
bool gemm_mma(const at::Tensor& x2, const W4& w, const c10::optional<at::Tensor>& bias, at::Tensor& y);
// Whether gemm_mma takes its decode kernel (M <= 8) for this weight: block size 64, K % 256 == 0, aligned scales and
// enough shared memory (227 KB: Hopper; other GPUs keep the chunk kernel).
bool decode_unit_eligible(const W4& w);
// ys[s] = x2 @ dequant(ws[s])^T (+ biases[s]) for 2-3 weights of one K in one launch of the decode kernel (their code
// tables are the caller's to keep equal: the first weight's are used), bit for bit what gemm_mma gives each alone.
// Returns false (doing nothing) unless that kernel takes every weight: decode_unit_eligible, M <= 8, fp16/bf16.
bool gemm_mma_group(const at::Tensor& x2, const std::vector<W4>& ws,
                    const std::vector<c10::optional<at::Tensor>>& biases, std::vector<at::Tensor>& ys);

// Small- and mid-M fused path (swap_gemm.cu, wgmma on sm_90a): y[M, N] = x2[M, K] @ dequant(W)^T (+ bias) as
// W . x2^T with W dequantized in registers as wgmma's A operand. Returns false (doing nothing) when the inputs do
// not fit: fp16/bf16, K a multiple of 64, power-of-two block sizes >= 64, a 9.0 GPU.
// With lora_t [M, r] and lora_b [N, r] (r a multiple of 8, x's dtype) it adds lora_t @ lora_b^T in the same fp32
// accumulation (extra reduction steps, the output rounded once).
bool gemm_swap_eligible(const at::Tensor& x2, const W4& w);
bool gemm_swap(const at::Tensor& x2, const W4& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
               const at::Tensor* lora_t = nullptr, const at::Tensor* lora_b = nullptr);
// ys[s] = x2 @ dequant(ws[s])^T (+ biases[s]) for 2-3 weights of one K in one launch of the swapped kernel (one grid
// holding each weight's CTAs as gemm_swap would launch them alone, and one kernel for the split sums), bit for bit what
// gemm_swap gives each. Returns false (doing nothing) unless every weight is eligible, one kind of scales, M <= 64.
bool gemm_swap_group(const at::Tensor& x2, const std::vector<W4>& ws,
                     const std::vector<c10::optional<at::Tensor>>& biases, std::vector<at::Tensor>& ys);

// A group's outputs [M, N_s] in x2's dtype (ys, replaced) and its biases in that dtype (undefined where a weight has
// none), for gemm_mma_group and gemm_swap_group.
inline std::vector<at::Tensor> group_outputs(const at::Tensor& x2, const std::vector<W4>& ws,
                                             const std::vector<c10::optional<at::Tensor>>& biases,
                                             std::vector<at::Tensor>& ys) {
  std::vector<at::Tensor> b(ws.size());
  ys.clear();
  for (size_t s = 0; s < ws.size(); ++s) {
    ys.push_back(at::empty({x2.size(0), ws[s].rows()}, x2.options()));
    if (biases[s]) b[s] = biases[s]->to(x2.scalar_type()).contiguous();
  }
  return b;
}

// Large-M fused path (fused_gemm.cu, wgmma on sm_90a): out = act @ W^T (transposed = false; act [M, K], out
// [M, N]) or act @ W (transposed = true; act [M, N], out [M, K]), plus extra_act @ extra_w^T when given (the LoRA
// term as extra reduction columns: [M, r] and [out cols, r], r a multiple of 8) plus bias. The
// dequantized W never reaches global memory. Returns false (doing nothing) when the inputs do not fit: fp16/bf16
// only, out columns a multiple of 128, reduction a multiple of 64 (K of 128 when transposed), a 9.0 GPU.
bool gemm_fused_eligible(const at::Tensor& act, const W4& w, bool transposed);
bool gemm_fused(const at::Tensor& act, const W4& w, bool transposed, const at::Tensor* extra_act,
                const at::Tensor* extra_w, const c10::optional<at::Tensor>& bias, at::Tensor& out);

// Whether the wgmma kernel is the automatic choice for an [M, out_cols] product (measured, see notes/cuda.md).
bool use_fused(int64_t M, int64_t out_cols);
// Whether the swapped wgmma kernel is the automatic choice for a forward product with M rows and N outputs.
bool use_swap(int64_t M, int64_t N);

// out = act @ W^T (transposed = false; out [M, N]) or act @ W (true; out [M, K]) through cuBLAS on dequantized
// slabs of W's rows or columns (a power of two of them within 32 MiB, at least 2048 rows or 1024 columns) at a time;
// accumulate adds to what out holds.
void gemm_slabs(const at::Tensor& act, const W4& w, bool transposed, at::Tensor& out, bool accumulate);

// Which gemm path to take; NF4Q_CUDA_GEMM=mma|swap|fused|dequant overrides the size heuristic (for benchmarks).
enum class GemmPath { kAuto, kMma, kSwap, kFused, kDequant };
GemmPath forced_gemm_path();

// y[M, N] = x2[M, K] @ dequant(W)^T (+ bias) in compute_dtype(x2): the mma.sync kernel for small M, the
// wgmma kernel above it where it applies, else dequantize to a temporary and let cuBLAS multiply.
at::Tensor gemm_2d(const at::Tensor& x2, const W4& w, const c10::optional<at::Tensor>& bias);

// x's sizes with the last one replaced: the output shape of a matmul op over x's leading dimensions.
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// Compute dtype of a matmul input: fp16/bf16/fp32 as given, anything else through fp32.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16 || t == at::kFloat) ? t : at::kFloat;
}

// LoRA dropout (dropout.cu) on contiguous fp32/fp16/bf16 tensors: a new drop(x), t = drop(t), out += drop(t).
at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed);
void lora_dropout_(at::Tensor& t, double p, int64_t seed);
void lora_dropout_add_(at::Tensor& out, const at::Tensor& t, double p, int64_t seed);

}  // namespace nf4q::cuda
