// Small-M fused NF4 matmul (decode, M <= 64): y = x @ dequant(W)^T on the tensor cores, W dequantized in
// registers, read straight from the canonical bitsandbytes layout (no reshuffled copy).
//
// The trick: mma.sync m16n8k16 computes W_tile[16 rows of N] x x_tile^T[16 k, 8 rows of M], so W is the A
// operand and up to 8 rows of x fill the n8 side with no padding waste at M = 8. The order of k inside one
// mma is free as long as A and B agree, and thread t (group g = t/4, tig = t%4) holds A's k-slots
// {2tig, 2tig+1, 2tig+8, 2tig+9} for rows g and g+8 and B's same k-slots for column g. So each thread loads a
// 16-byte chunk (32 consecutive k) of rows g and g+8, and at k-step s feeds bytes 2s (slots 2tig, 2tig+1) and
// 2s+1 (slots 2tig+8, 2tig+9) of it; its B fragment is then x[g][32c+4s .. 32c+4s+3], one 8-byte load.
// A byte decodes to its bf16x2/half2 register with one lookup in a 256-entry table, times absmax (HMUL2).
//
// Block: 16*RT rows of W, WARPS warps splitting K (chunk columns strided by WARPS), reduced through shared
// memory at the end (deterministic, one launch). Grid: (N / (16*RT), M / (8*NT)).
#include <cstdlib>
#include <cstring>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

constexpr int kWarps = 8;
// Chunks per thread per row and step. Measured on the H200 (notes/cuda.md): one chunk per step (70 registers,
// 3 blocks/SM) was slower on K-heavy shapes (97 vs 69 us at 8192x28672, M=1), and one row tile for M <= 4
// (66% occupancy) slower still: the loop is bound by load latency per warp, not by occupancy.
constexpr int kUnroll = 2;

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ static void run(float* d, const uint32_t* a, uint2 b) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
  __device__ static uint32_t splat(float a) {
    __nv_bfloat162 r = __float2bfloat162_rn(a);
    return *reinterpret_cast<uint32_t*>(&r);
  }
};
template <> struct Mma<__half> {
  __device__ static void run(float* d, const uint32_t* a, uint2 b) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
  __device__ static uint32_t splat(float a) {
    __half2 r = __float2half2_rn(a);
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

// Dynamic shared memory: the byte -> T2 table replicated 32 times (entry e of lane l's copy at e * 32 + l, so
// a warp's 32 random lookups hit 32 distinct banks instead of colliding ~3.5-way), the nested-code table, and
// the split-K reduction buffer.
template <int NT, int RT>
constexpr int smem_bytes() {
  return 256 * 32 * 4 + 256 * 4 + kWarps * RT * NT * 4 * 32 * 4;
}

template <typename T, int NT, int RT, bool DQ>
__global__ void __launch_bounds__(kWarps * 32) gemm_mma_kernel(const T* __restrict__ x, W4View w,
                                                               const T* __restrict__ bias, T* __restrict__ y, int M,
                                                               int N, int K) {
  extern __shared__ uint4 smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* ncode = reinterpret_cast<float*>(table + 256 * 32);
  float(*red)[RT * NT * 4][32] = reinterpret_cast<float(*)[RT * NT * 4][32]>(ncode + 256);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  {
    const uint32_t v = Cvt<T>::pack(__ldg(w.code + (tid >> 4)), __ldg(w.code + (tid & 15)));
#pragma unroll
    for (int i = 0; i < 8; ++i) smem[tid * 8 + i] = make_uint4(v, v, v, v);  // 32 copies of entry tid
    if (DQ) ncode[tid] = __ldg(w.nested_code + tid);
  }
  __syncthreads();
  const uint32_t lane_off = 4 * lane;  // this lane's copy of the table
  const float offset = DQ ? __ldg(w.nested_offset) : 0.f;
  // nested blocks are 256 absmax values in practice: a shift instead of an integer division
  const int nbs_log2 = (w.nested_bs & (w.nested_bs - 1)) == 0 ? __ffs(w.nested_bs) - 1 : -1;
  const int m0 = blockIdx.y * 8 * NT;
  const int KC = K / 32;  // 32-k chunks per row
  const int ntiles = (N + 16 * RT - 1) / (16 * RT);

  // Persistent blocks: one table build per block, no tail wave of short-lived blocks.
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
  const int r0 = tile * 16 * RT;
  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][nt][i] = 0.f;

  // Raw loads of one step: the weight chunks and their scales. Out-of-range chunks read element 0 and get a
  // zero scale, so their dequantized A fragment is exactly 0 (branch-free loads).
  struct Stage {
    uint4 wq[kUnroll][RT][2];
    float s[kUnroll][RT][2];
    uint32_t q[kUnroll][RT][2];
    bool ok[kUnroll][RT][2];
  };
  // A warp's kUnroll groups of four chunks are adjacent: 64 * kUnroll contiguous bytes per row per load step.
  auto chunk = [&](int jb, int u) { return 4 * (jb + warp * kUnroll + u) + tig; };
  auto load = [&](int jb, Stage& st) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = chunk(jb, u);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = r0 + 16 * rt + g + 8 * h;
          st.ok[u][rt][h] = c < KC && row < N;
          const int64_t e = st.ok[u][rt][h] ? static_cast<int64_t>(row) * K + 32 * c : 0;
          st.wq[u][rt][h] = ld_stream16(w.packed + (e >> 1));
          const uint32_t blk = static_cast<uint32_t>(e >> w.log2_bs);
          if (DQ) {
            st.q[u][rt][h] = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
            st.s[u][rt][h] = __ldg(w.nested_absmax + (nbs_log2 >= 0 ? blk >> nbs_log2 : blk / w.nested_bs));
          } else {
            st.s[u][rt][h] = __ldg(static_cast<const float*>(w.absmax) + blk);
          }
        }
    }
  };

  // Software pipeline: the next step's loads are issued before this step's math, so a full step of 16-byte
  // loads is always in flight behind the tensor-core work.
  const int step = kWarps * kUnroll;
  Stage cur;
  load(0, cur);
  for (int jb = 0; 4 * jb < KC; jb += step) {
    Stage nxt;
    load(jb + step, nxt);
    uint32_t scale[kUnroll][RT][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float a = DQ ? fmaf(ncode[cur.q[u][rt][h]], cur.s[u][rt][h], offset) : cur.s[u][rt][h];
          scale[u][rt][h] = cur.ok[u][rt][h] ? Mma<T>::splat(a) : 0u;
        }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = chunk(jb, u);  // past the end: zero scale and zero x, adds exact zeros
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint2 bf[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int m = m0 + 8 * nt + g;
          bf[nt] = (m < M && c < KC)
                       ? __ldg(reinterpret_cast<const uint2*>(x + static_cast<int64_t>(m) * K + 32 * c + 4 * s))
                       : make_uint2(0, 0);
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 q = cur.wq[u][rt][h];
            const uint32_t word = (s < 2) ? q.x : (s < 4) ? q.y : (s < 6) ? q.z : q.w;
            const uint32_t o0 = (s & 1) ? lut_offset<2>(word, lane_off) : lut_offset<0>(word, lane_off);
            const uint32_t o1 = (s & 1) ? lut_offset<3>(word, lane_off) : lut_offset<1>(word, lane_off);
            a[h] = hmul2<T>(lut<uint32_t>(table, o0), scale[u][rt][h]);      // slots 2tig, 2tig+1
            a[2 + h] = hmul2<T>(lut<uint32_t>(table, o1), scale[u][rt][h]);  // slots 2tig+8, +9
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc[rt][nt], a, bf[nt]);
        }
      }
    }
    cur = nxt;
  }

  // Split-K reduction over the warps, then the epilogue: c0,c1 = (row g, m 2tig, 2tig+1), c2,c3 = row g+8.
  __syncthreads();  // the previous tile's epilogue has finished reading red
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][(rt * NT + nt) * 4 + i][lane] = acc[rt][nt][i];
  __syncthreads();
  for (int p = tid; p < RT * NT * 4 * 32; p += kWarps * 32) {
    const int idx = p / 32, l = p % 32;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += red[wi][idx][l];
    const int i = idx % 4, nt = (idx / 4) % NT, rt = idx / (4 * NT);
    const int row = r0 + 16 * rt + l / 4 + 8 * (i / 2);
    const int m = m0 + 8 * nt + 2 * (l % 4) + (i % 2);
    if (row < N && m < M) {
      if (bias != nullptr) sum += Cvt<T>::to_float(bias[row]);
      y[static_cast<int64_t>(m) * N + row] = Cvt<T>::from(sum);
    }
  }
  }  // tile loop
}

// Blocks per SM for one instantiation (over 48 KB of shared memory needs the opt-in attribute), asked once.
template <typename Kernel>
int resident_blocks(Kernel kernel, int smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kWarps * 32, smem));
  return std::max(blocks, 1);
}

template <typename T, int NT, int RT, bool DQ>
void launch_one(const at::Tensor& x2, const W4View& v, const T* bias, at::Tensor& y, int M, int N, int K) {
  constexpr int smem = smem_bytes<NT, RT>();
  static const int per_sm = resident_blocks(gemm_mma_kernel<T, NT, RT, DQ>, smem);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = ceil_div(N, 16 * RT), mtiles = ceil_div(M, 8 * NT);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, std::max<int64_t>(1, per_sm * sms / mtiles))),
                  static_cast<unsigned>(mtiles));
  gemm_mma_kernel<T, NT, RT, DQ><<<grid, kWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(x2.data_ptr()), v, bias, static_cast<T*>(y.data_ptr()), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT, int RT>
void launch(const at::Tensor& x2, const W4View& v, const T* bias, at::Tensor& y, int M, int N, int K) {
  if (v.nested_absmax != nullptr) {
    launch_one<T, NT, RT, true>(x2, v, bias, y, M, N, K);
  } else {
    launch_one<T, NT, RT, false>(x2, v, bias, y, M, N, K);
  }
}

template <typename T>
void dispatch(const at::Tensor& x2, const W4View& v, const T* bias, at::Tensor& y, int M, int N, int K) {
  // Two row tiles per block when that still leaves two blocks per SM: more loads in flight, half the x reads.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool two = ceil_div(N, 32) >= 2 * sms;
  if (M <= 8) {
    two ? launch<T, 1, 2>(x2, v, bias, y, M, N, K) : launch<T, 1, 1>(x2, v, bias, y, M, N, K);
  } else if (M <= 16) {
    two ? launch<T, 2, 2>(x2, v, bias, y, M, N, K) : launch<T, 2, 1>(x2, v, bias, y, M, N, K);
  } else if (M <= 32) {
    launch<T, 4, 1>(x2, v, bias, y, M, N, K);  // two row tiles would need 255 registers
  } else {
    launch<T, 8, 1>(x2, v, bias, y, M, N, K);
  }
}

}  // namespace

GemmPath forced_gemm_path() {
  const char* s = std::getenv("NF4Q_CUDA_GEMM");
  if (s == nullptr) return GemmPath::kAuto;
  if (std::strcmp(s, "mma") == 0) return GemmPath::kMma;
  if (std::strcmp(s, "swap") == 0) return GemmPath::kSwap;
  if (std::strcmp(s, "dequant") == 0) return GemmPath::kDequant;
  if (std::strcmp(s, "fused") == 0) return GemmPath::kFused;
  return GemmPath::kAuto;
}

bool gemm_mma(const at::Tensor& x2_in, const W4& w, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x2_in.size(0), N = w.rows(), K = w.cols();
  const auto dt = x2_in.scalar_type();
  if (dt != at::kHalf && dt != at::kBFloat16) return false;
  if (K % 32 != 0 || K == 0 || M == 0 || N == 0 || !aligned16(w.packed.data_ptr())) return false;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || M * K > INT32_MAX * int64_t{32}) return false;
  const auto x2 = contiguous_aligned16(x2_in);
  at::Tensor b;
  if (bias) b = bias->to(dt).contiguous();
  const W4View v = make_view(w, "gemm_4bit");
  if (dt == at::kHalf) {
    dispatch<__half>(x2, v, bias ? static_cast<const __half*>(b.data_ptr()) : nullptr, y, M, N, K);
  } else {
    dispatch<__nv_bfloat16>(x2, v, bias ? static_cast<const __nv_bfloat16*>(b.data_ptr()) : nullptr, y, M, N, K);
  }
  return true;
}

}  // namespace nf4q::cuda
