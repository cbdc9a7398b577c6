"""Load-only ceiling of a TMA ring (what caps the swapped kernel's decode rows at ~2.0-2.25 TB/s, notes/cuda.md round
6): CTAs stream the packed weight of a 28672 x 8192 NF4 matrix through a ring of shared-memory stages and do no math.
Varied: 2-D boxes (rows x bytes per row, the swapped kernel's is 128 x 32) against 1-D bulk copies of contiguous bytes,
ring depth, CTAs per SM. Each configuration runs in its own process with a timeout (a hang costs one row, not the
call). Needs an sm_90 GPU; run from the repository root: python scripts/tma_ceiling.py
"""
import subprocess
import sys

import torch

SRC = r"""
#include <torch/extension.h>
#include "cuda/hopper.cuh"
using namespace nf4q::cuda;

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// mode 0: CTA c reads rows [rows c, rows (c + 1)) of W [N, Kb] in 2-D boxes of rows x cols bytes, left to right;
// mode 1: CTA c reads its contiguous share of W in 1-D bulk copies of cols bytes. Each step's stage is waited on by
// all warps, touched, and released; thread 0 refills it (stages steps in flight).
__global__ void __launch_bounds__(256) ring(const __grid_constant__ CUtensorMap tm, const uint8_t* w, int mode,
                                            int rows, int cols, int steps, int stages, long long per_cta,
                                            unsigned* sink) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int bytes = rows * cols, tid = threadIdx.x, warps = blockDim.x / 32;
  const uint32_t full = smem_addr(smem + stages * bytes), empty = full + 8 * stages;
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(full + 8 * s), mbar_init(empty + 8 * s, warps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int i, int slot) {
    mbar_expect(full + 8 * slot, bytes);
    if (mode == 0)
      tma_load(smem_addr(smem + slot * bytes), &tm, i * cols, blockIdx.x * rows, full + 8 * slot);
    else
      bulk_load(smem_addr(smem + slot * bytes), w + blockIdx.x * per_cta + (long long)i * bytes, bytes,
                full + 8 * slot);
  };
  if (tid == 0)
    for (int i = 0; i < stages && i < steps; ++i) issue(i, i);
  unsigned acc = 0;
  for (int i = 0; i < steps; ++i) {
    const int slot = i % stages;
    const uint32_t phase = (i / stages) & 1;
    mbar_wait(full + 8 * slot, phase);
    acc ^= reinterpret_cast<const unsigned*>(smem + slot * bytes)[tid % (bytes / 4)];
    __syncwarp();
    if (tid % 32 == 0) mbar_arrive(empty + 8 * slot);
    if (tid == 0 && i + stages < steps) {
      mbar_wait(empty + 8 * slot, phase);
      issue(i + stages, slot);
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

void run(torch::Tensor w, int64_t mode, int64_t rows, int64_t cols, int64_t stages, int64_t ctas_per_sm,
         int64_t grid, torch::Tensor sink) {
  const int64_t n = w.size(0), kb = w.size(1);
  CUtensorMap tm{};
  int steps;
  long long per_cta = 0;
  if (mode == 0) {
    tm = tensor_map(w.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, n, kb, rows, cols, CU_TENSOR_MAP_SWIZZLE_NONE);
    grid = n / rows;
    steps = static_cast<int>(kb / cols);
  } else {
    rows = 1;
    per_cta = n * kb / grid;
    steps = static_cast<int>(per_cta / cols);
  }
  const int need = static_cast<int>(stages * rows * cols + 16 * stages);
  const int smem = std::max(need, 227 * 1024 / static_cast<int>(ctas_per_sm) - 2048);  // forces the CTAs per SM
  TORCH_CHECK(need <= 227 * 1024, "stages do not fit");
  C10_CUDA_CHECK(cudaFuncSetAttribute(ring, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  ring<<<static_cast<unsigned>(grid), 256, smem, at::cuda::getCurrentCUDAStream()>>>(
      tm, w.data_ptr<uint8_t>(), static_cast<int>(mode), static_cast<int>(rows), static_cast<int>(cols), steps,
      static_cast<int>(stages), per_cta, reinterpret_cast<unsigned*>(sink.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

# (label, mode, box rows, box bytes per row (mode 1: bytes per copy), stages, CTAs per SM)
CONFIGS = [
    ("2-D 128 x 32 B (the swapped kernel's)", 0, 128, 32, 6, 2),
    ("2-D 128 x 32 B", 0, 128, 32, 12, 2),
    ("2-D 128 x 32 B", 0, 128, 32, 24, 1),
    ("2-D 128 x 64 B", 0, 128, 64, 6, 2),
    ("2-D 128 x 128 B", 0, 128, 128, 6, 2),
    ("2-D 64 x 256 B", 0, 64, 256, 6, 2),
    ("2-D 32 x 128 B", 0, 32, 128, 12, 2),
    ("1-D 4 KB", 1, 1, 4096, 6, 2),
    ("1-D 4 KB", 1, 1, 4096, 12, 2),
    ("1-D 16 KB", 1, 1, 16384, 6, 2),
    ("1-D 32 KB", 1, 1, 32768, 3, 2),
    ("1-D 16 KB", 1, 1, 16384, 12, 1),
]


def module():
    from pathlib import Path

    from torch.utils.cpp_extension import load_inline

    root = Path(__file__).resolve().parents[1]
    decl = ("void run(torch::Tensor w, int64_t mode, int64_t rows, int64_t cols, int64_t stages, int64_t ctas_per_sm, "
            "int64_t grid, torch::Tensor sink);")
    return load_inline("tma_ceiling", cpp_sources=decl, cuda_sources=SRC, functions=["run"],
                       extra_include_paths=[str(root / "csrc")],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a",
                                          "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                          "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"])


def one(index):
    from triton.testing import do_bench

    label, mode, rows, cols, stages, cps = CONFIGS[index]
    mod = module()
    w = torch.randint(0, 255, (28672, 4096), dtype=torch.uint8, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    grid = 28672 // 128  # mode 1: as many CTAs as the swapped kernel has row tiles
    t = do_bench(lambda: mod.run(w, mode, rows, cols, stages, cps, grid, sink), return_mode="median")
    print(f"{label:38s} stages {stages:2d} CTAs/SM {cps}: {t * 1e3:6.1f} us {w.numel() / t / 1e9:.2f} TB/s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(int(sys.argv[2]))
    else:
        module()  # build once; the children load the cached extension
        for i in range(len(CONFIGS)):
            try:
                subprocess.run([sys.executable, __file__, "--one", str(i)], timeout=60, check=False)
            except subprocess.TimeoutExpired:
                print(f"{CONFIGS[i][0]}: timed out (a hang?)", flush=True)
