"""Where a small decode call's time goes: the cost per item of kernels inside a CUDA graph of 32 x [rms_norm, kernel]
(as a decode step runs them), minus a graph of 32 x [rms_norm]. Stand-in kernels with the decode kernel's shape for a
1024 x 4096 weight (64 blocks of 512 threads, each of 16 warps one 2 KB step): empty (no or 227 KB of shared memory),
+ the lookup table build (one entry per thread, as before notes/cuda.md round 10), + one W step, + the block reduction;
beside them nf4q's gemm_4bit and cuBLAS bf16. Needs a 9.0 GPU (compiles its kernels with load_inline)."""

import statistics

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

import nf4q

src = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
template <bool TABLE, bool STEP, bool RED>
__global__ void __launch_bounds__(512, 1) probe(const unsigned short* code, const uint8_t* w, int row_bytes, int* out) {
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  uint32_t acc = 0;
  if (TABLE) {
    if (tid < 256) {
      const uint32_t v = code[tid >> 4] | (uint32_t(code[tid & 15]) << 16);
      for (int i = 0; i < 8; ++i) smem[tid * 8 + i] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    acc = reinterpret_cast<uint32_t*>(smem)[(lane * 64) & 16383];
  }
  if (STEP) {
    uint8_t* ring = reinterpret_cast<uint8_t*>(smem) + 65536 + warp * 2048;
    for (int i = 0; i < 4; ++i) {
      const int r = lane / 8 + 4 * i, cc = lane % 8;
      const uint8_t* src = w + size_t(blockIdx.x * 16 + r) * row_bytes + warp * 128 + 16 * cc;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa(ring + r * 128 + 16 * cc)), "l"(src));
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncwarp();
    const uint4 q = reinterpret_cast<uint4*>(ring)[lane];
    acc ^= q.x ^ q.y ^ q.z ^ q.w;
  }
  if (RED) {
    float* red = reinterpret_cast<float*>(smem) + 16384 + 8192;
    __syncthreads();
    red[warp * 32 + lane] = float(acc & 0xff);
    __syncthreads();
    if (tid < 32) {
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += red[i * 32 + tid];
      out[blockIdx.x * 32 + tid] = int(s);
    }
  } else if (tid == 0) {
    out[blockIdx.x] = int(acc);
  }
}
void run(int variant, torch::Tensor code, torch::Tensor w, torch::Tensor out, int64_t smem, int64_t blocks) {
  auto s = at::cuda::getCurrentCUDAStream();
  auto c = reinterpret_cast<const unsigned short*>(code.data_ptr());
  const int rb = w.size(1);
  #define L(T, S, R) { auto k = probe<T, S, R>; \
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 231408); \
    k<<<blocks, 512, smem, s>>>(c, w.data_ptr<uint8_t>(), rb, out.data_ptr<int>()); }
  switch (variant) {
    case 0: L(false, false, false); break;
    case 1: L(true, false, false); break;
    case 2: L(true, true, false); break;
    case 3: L(true, true, true); break;
    case 4: L(false, true, true); break;
  }
}
"""
mod = load_inline(
    "floor_probe",
    cpp_sources="void run(int, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t);",
    cuda_sources=src,
    functions=["run"],
    extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"],
)

K = 4096
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
code = nf4q.nf4_code().to("cuda", torch.bfloat16)
SM = 231408


def graph_us(item, n=32, reps=15):
    def chain():
        for i in range(n):
            h = F.rms_norm(x, (K,))
            item(i, h)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
        chain()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(ts)


Ws = [torch.randint(0, 255, (1024, K // 2), dtype=torch.uint8, device="cuda") for _ in range(32)]
out = torch.zeros(64 * 32, dtype=torch.int32, device="cuda")
Wb = [torch.randn(1024, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(32)]
w4 = [nf4q.quantize(W).op_args() for W in Wb]
Wt = [torch.randn(16, 256, device="cuda", dtype=torch.bfloat16) for _ in range(32)]
w4t = [nf4q.quantize(W).op_args() for W in Wt]
xt = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
items = {
    "nothing (rms_norm only)": lambda i, h: None,
    "empty kernel, 64 blocks, no smem": lambda i, h: mod.run(0, code, Ws[i], out, 0, 64),
    "empty kernel, 64 blocks, 227 KB smem": lambda i, h: mod.run(0, code, Ws[i], out, SM, 64),
    "empty kernel, 132 blocks, 227 KB smem": lambda i, h: mod.run(0, code, Ws[i], out, SM, 132),
    "+ table build": lambda i, h: mod.run(1, code, Ws[i], out, SM, 64),
    "+ one 2 KB W step per warp": lambda i, h: mod.run(2, code, Ws[i], out, SM, 64),
    "+ block reduction (~ decode kernel)": lambda i, h: mod.run(3, code, Ws[i], out, SM, 64),
    "W step + reduction, no table": lambda i, h: mod.run(4, code, Ws[i], out, SM, 64),
    "nf4q gemm_4bit 1024x4096": lambda i, h: torch.ops.nf4q.gemm_4bit(h, *w4[i], None),
    "nf4q gemm_4bit 16x256 (x of 256)": lambda i, h: torch.ops.nf4q.gemm_4bit(xt, *w4t[i], None),
    "bf16 F.linear 1024x4096": lambda i, h: F.linear(h, Wb[i]),
    "bf16 F.linear 16x256": lambda i, h: F.linear(xt, Wt[i]),
}
for rnd in range(2):
    base = graph_us(items["nothing (rms_norm only)"])
    print(f"-- round {rnd}: rms_norm alone {base:.2f} us per item; below: us per item above that", flush=True)
    for name, fn in items.items():
        if name.startswith("nothing"):
            continue
        print(f"{name:40s} {graph_us(fn) - base:6.2f}", flush=True)
