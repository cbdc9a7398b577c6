// Hopper (sm_90a) building blocks shared by the wgmma kernels: TMA tensor maps and bulk loads, mbarriers,
// the 128B-swizzled K-major tile layout and its wgmma shared-memory descriptor.
#pragma once
#include <cuda.h>

#include "common.cuh"

namespace nf4q::cuda {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NF4Q_WGMMA 1
#endif

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count = 1) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done)
                 : "r"(bar), "r"(phase)
                 : "memory");
  }
}
// A 2-D box of a tensor map into shared memory; completion counted in bytes on the mbarrier.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Offset of 16-byte chunk `c` of row `r` in a 128B-swizzled tile whose rows are 128 bytes (the layout wgmma's
// descriptor mode 1 reads; the tile base is 1024-byte aligned).
__device__ __forceinline__ int swz(int r, int c) {
  return r * 128 + ((c ^ (r & 7)) << 4);
}

#ifdef NF4Q_WGMMA
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  // start address >> 4, leading offset 1 (unused with swizzling), stride 1024 B between 8-row groups, 128B swizzle
  return (uint64_t{(addr & 0x3FFFF) >> 4}) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
// Eight fp32 accumulators d[i..i+7] as read-write asm operands.
#define NF4Q_ACC8(i)                                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])

// wgmma's operands live outside the compiler's view until the wait: pin them in registers here.
template <int N>
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory writes by ordinary stores / cp.async, made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_to_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
#endif

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const auto err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const auto err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    TORCH_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && f != nullptr,
                "nf4q: cuTensorMapEncodeTiled is not available from the CUDA driver");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A row-major 2-D tensor [rows, cols] of `elt`-byte elements read in boxes of box_rows x box_cols.
inline CUtensorMap tensor_map(const void* base, CUtensorMapDataType type, int64_t elt, int64_t rows, int64_t cols,
                              uint32_t box_rows, uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elt)};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r =
      encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "nf4q: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

inline bool device_has_wgmma(const at::Tensor& t) {
#ifdef NF4Q_SM90A
  const auto* prop = at::cuda::getDeviceProperties(t.get_device());
  return prop->major == 9 && prop->minor == 0;
#else
  (void)t;
  return false;
#endif
}

}  // namespace nf4q::cuda
