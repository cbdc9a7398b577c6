// Small-M fused NF4 matmul (decode, M <= 64): y = x @ dequant(W)^T on the tensor cores, W dequantized in
// registers, read straight from the canonical bitsandbytes layout (no reshuffled copy).
//
// The trick: mma.sync m16n8k16 computes W_tile[16 rows of N] x x_tile^T[16 k, 8 rows of M], so W is the A
// operand and up to 8 rows of x fill the n8 side with no padding waste at M = 8. The order of k inside one
// mma is free as long as A and B agree, and thread t (group g = t/4, tig = t%4) holds A's k-slots
// {2tig, 2tig+1, 2tig+8, 2tig+9} for rows g and g+8 and B's same k-slots for column g. So each thread loads a
// 16-byte chunk (32 consecutive k) of rows g and g+8, and at k-step s feeds bytes 2s (slots 2tig, 2tig+1) and
// 2s+1 (slots 2tig+8, 2tig+9) of it; its B fragment is then x[g][32c+4s .. 32c+4s+3], one 8-byte load.
// A byte decodes to its bf16x2/half2 register with one PRMT and one lookup in a 256-entry table; the block scale
// multiplies the fp32 product of each 32-k chunk.
//
// Block: 16*RT rows of W, the warps splitting K (each step a warp reads 128 contiguous bytes of each row: plain
// loads stream W at 3.1-3.4 TB/s that way, 2.5-2.95 with 32 bytes; notes/cuda.md round 6), reduced through shared
// memory at the end of a tile (deterministic, one launch). Persistent grid over the row tiles, the steps of
// consecutive tiles one software pipeline. Grid: (min(tiles, blocks per SM x SMs), M / (8*NT)).
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

constexpr int kWarps = 8;
// Adjacent 4-chunk groups a warp loads per step: 64 * kUnroll contiguous bytes of each row. A load-only probe on the
// H200 (notes/cuda.md, round 6) streamed 28672 x 8192 at 2.5-2.95 TB/s with 32 bytes per row per load and 3.1-3.4 with
// 128-512.
constexpr int kUnroll = 2;
// The byte -> T2 table is addressed by one PRMT (entry e of lane l's copy at e * 256 + 4 l: the byte next to the
// lane's byte), as in swap_gemm.cu; 32 copies, so a warp's 32 lookups hit 32 distinct banks. 64 KB.
constexpr int kTableBytes = 256 * 256;

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ static void run(float* d, const uint32_t* a, uint2 b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
};
template <>
struct Mma<__half> {
  __device__ static void run(float* d, const uint32_t* a, uint2 b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
};

// Dynamic shared memory: the table (first, so that a lookup's address is the PRMT result itself), the nested-code
// table, and the buffer of the reduction over the warps.
template <int NT, int RT>
constexpr int smem_bytes() {
  return kTableBytes + 256 * 4 + kWarps * RT * NT * 4 * 32 * 4;
}

template <typename T, int NT, int RT, bool DQ>
__global__ void __launch_bounds__(kWarps * 32, NT == 1 ? 2 : 1)
    gemm_mma_kernel(const T* __restrict__ x, W4View w, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                    int K) {
  extern __shared__ uint4 smem[];
  uint8_t* table = reinterpret_cast<uint8_t*>(smem);
  float* ncode = reinterpret_cast<float*>(table + kTableBytes);
  float(*red)[RT * NT * 4][32] = reinterpret_cast<float(*)[RT * NT * 4][32]>(ncode + 256);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  {
    const uint32_t v = Cvt<T>::pack(__ldg(w.code + (tid >> 4)), __ldg(w.code + (tid & 15)));
    uint4* dst = reinterpret_cast<uint4*>(table + tid * 256);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = make_uint4(v, v, v, v);  // 32 copies of entry tid
    if (DQ) ncode[tid] = __ldg(w.nested_code + tid);
  }
  __syncthreads();
  const uint32_t lane_byte = 4 * lane;
  // The pair of byte J of word: PRMT puts that byte next to the lane's byte (e << 8 | 4 lane), the table's offset.
  auto look = [&](uint32_t word, uint32_t sel) {
    uint32_t off;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(off) : "r"(word), "r"(lane_byte), "r"(sel));
    return *reinterpret_cast<const uint32_t*>(table + off);
  };
  const float offset = DQ ? __ldg(w.nested_offset) : 0.f;
  const int m0 = blockIdx.y * 8 * NT;
  const int KC = K / 32;  // 32-k chunks per row (16 bytes)
  const int ntiles = (N + 16 * RT - 1) / (16 * RT);
  const int step = kWarps * kUnroll;  // 4-chunk groups per step, all warps

  // One step of one tile: warp w's kUnroll adjacent 4-chunk groups of rows g, g + 8 of each 16-row tile. Past the end
  // (K, N or the last tile) a chunk reads a clamped valid chunk and gets a zero scale (and zero x past K), so it adds
  // exact zeros.
  struct Stage {
    uint4 wq[kUnroll][RT][2];
    float s[kUnroll][RT][2];
    uint32_t q[kUnroll][RT][2];
    uint32_t ok;  // bit (u * RT + rt) * 2 + h: that chunk of that row is inside W (a mask: fewer registers)
  };
  auto chunk = [&](int jb, int u) { return 4 * (jb + warp * kUnroll + u) + tig; };
  // The load cursor's rows (set at each tile's first step): offset of each row's start in 32-element chunks (32-bit
  // arithmetic; rows past N clamped to N - 1, their bit in rows_ok clear).
  uint32_t row_c[RT][2];
  uint32_t rows_ok = 0;
  auto set_rows = [&](int tile) {
    rows_ok = 0;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = tile * 16 * RT + 16 * rt + g + 8 * h;  // tiles past the last one: row >= N
        rows_ok |= uint32_t{row < N} << (rt * 2 + h);
        row_c[rt][h] = static_cast<uint32_t>(min(row, N - 1)) * static_cast<uint32_t>(KC);
      }
  };
  auto load = [&](int tile, int jb, Stage& st) {
    if (jb == 0) set_rows(tile);
    st.ok = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = chunk(jb, u);
      const uint32_t cmask = c < KC ? rows_ok : 0u;
      const int cc = min(c, KC - 1);  // clamped to a valid chunk: the mask zeroes its scale
      st.ok |= cmask << (u * RT * 2);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t e = row_c[rt][h] + cc;  // in chunks: 16 bytes, 32 elements, 2^(log2_bs - 5) per block
          st.wq[u][rt][h] = ld_stream16(w.packed + 16 * static_cast<uint64_t>(e));
          const uint32_t blk = e >> (w.log2_bs - 5);
          if (DQ) {
            st.q[u][rt][h] = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
            st.s[u][rt][h] = __ldg(w.nested_absmax + (blk >> w.nested_log2));
          } else {
            st.s[u][rt][h] = __ldg(static_cast<const float*>(w.absmax) + blk);
          }
        }
    }
  };

  float acc[RT][NT][4];
  auto zero_acc = [&] {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rt][nt][i] = 0.f;
  };
  zero_acc();

  // The steps of all this block's tiles (persistent: tiles blockIdx.x, + gridDim.x, ...) run as one stream, so the
  // next tile's first loads are in flight behind this tile's last math.
  // Two stages used in turn (no register copies from one to the other).
  int tile = blockIdx.x, jb = 0;
  auto run = [&](const Stage& cur, Stage& nxt) {
    int next_tile = tile, next_jb = jb + step;
    if (4 * next_jb >= KC) next_jb = 0, next_tile += gridDim.x;
    load(next_tile, next_jb, nxt);
    // The warp's last step of a tile may run past K (K not a multiple of 2048): only that one pays for zeroing x.
    auto math = [&](auto tail) {
      constexpr bool kTail = decltype(tail)::value;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = chunk(jb, u);
        // This chunk's x: k = 32 c + 4 s .. + 3 of token m, 8 bytes per k16 step s (the k order inside an mma is free
        // as long as A and B agree: byte 2(s&1), +1 of word s/2 of the weight chunk are the same k).
        // Tokens past M read token M - 1: they only feed output columns that are never stored. Chunks past K read
        // zeros.
        const bool cok = !kTail || c < KC;
        const uint2* xp[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          xp[nt] = reinterpret_cast<const uint2*>(x + static_cast<int64_t>(min(m0 + 8 * nt + g, M - 1)) * K +
                                                  32 * min(c, KC - 1));
        // The block scales go on the fp32 product of each 32-k chunk (one FFMA per output instead of an HMUL2 per
        // byte of the fragments).
        float part[RT][NT][4];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) part[rt][nt][i] = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          uint2 b[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) b[nt] = __ldg(xp[nt] + s);
          if (kTail && !cok)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) b[nt] = make_uint2(0, 0);
          const uint32_t j = 2 * (s & 1), sel0 = 0x5504u | (j << 4), sel1 = 0x5504u | ((j + 1) << 4);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const uint4 qa = cur.wq[u][rt][0], qb = cur.wq[u][rt][1];
            const uint32_t wa = (s < 2) ? qa.x : (s < 4) ? qa.y : (s < 6) ? qa.z : qa.w;
            const uint32_t wb = (s < 2) ? qb.x : (s < 4) ? qb.y : (s < 6) ? qb.z : qb.w;
            const uint32_t a[4] = {look(wa, sel0), look(wb, sel0), look(wa, sel1), look(wb, sel1)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) Mma<T>::run(part[rt][nt], a, b[nt]);
          }
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float sc = (cur.ok >> ((u * RT + rt) * 2 + h)) & 1u
                                 ? (DQ ? fmaf(ncode[cur.q[u][rt][h]], cur.s[u][rt][h], offset) : cur.s[u][rt][h])
                                 : 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                acc[rt][nt][2 * h + e] = fmaf(part[rt][nt][2 * h + e], sc, acc[rt][nt][2 * h + e]);
          }
      }
    };
    if (chunk(jb, kUnroll - 1) - tig + 3 < KC) {
      math(std::false_type{});
    } else {
      math(std::true_type{});
    }

    if (next_jb == 0) {  // the tile is done: reduce over the warps, then the epilogue
      // c0,c1 = (row g, m 2tig, 2tig+1), c2,c3 = row g+8
      __syncthreads();  // the previous tile's epilogue has finished reading red
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) red[warp][(rt * NT + nt) * 4 + i][lane] = acc[rt][nt][i];
      __syncthreads();
      const int r0 = tile * 16 * RT;
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
      zero_acc();
    }
    tile = next_tile;
    jb = next_jb;
    return tile < ntiles;
  };
  Stage st0, st1;
  load(tile, 0, st0);
  while (tile < ntiles && run(st0, st1) && run(st1, st0)) {
  }
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
  // One 16-row tile per block: with 128 contiguous bytes per row per load the loads in flight suffice, a second row
  // tile would spill at two blocks per SM, and 16-row tiles split N more evenly over the persistent blocks.
  if (M <= 8) {
    launch<T, 1, 1>(x2, v, bias, y, M, N, K);
  } else if (M <= 16) {
    launch<T, 2, 1>(x2, v, bias, y, M, N, K);
  } else if (M <= 32) {
    launch<T, 4, 1>(x2, v, bias, y, M, N, K);
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
  // nested blocks of a power of two (bitsandbytes: 256): a shift, never a division, per scale
  if (w.double_quant() && (w.nested_blocksize & (w.nested_blocksize - 1)) != 0) return false;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || M * K > INT32_MAX * int64_t{32}) return false;
  if (N * K / 32 > UINT32_MAX) return false;  // chunk offsets are 32-bit
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
