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
//
// decode_unit_kernel (M <= 8, block size 64, K % 256 == 0, Hopper's 227 KB of shared memory) is the same product
// arranged for bandwidth: per step a warp reads four 64-element units (128 contiguous bytes) of each of 16 rows through
// its own cp.async ring (4 stages: three steps in flight, no registers held), and thread t takes bytes 8t..8t+7 of
// each unit, so the 16 k slots of an mma lie in one block and its scale multiplies the fp32 product (4 FFMA per unit
// instead of 32 HMUL2); a lookup is one PRMT (whose result is the shared address) + one LDS; one block of 16 warps per
// SM, persistent. scripts/emulate_gemv.py checks its index logic in numpy. One launch may cover up to three weights
// of one K that read the same x (q, k and v; gate and up): their tiles numbered one after another, one table.
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

// Per step a warp reads kUnits 64-element units (32 bytes, one block scale at block size 64) of each of its rows: 128
// contiguous bytes per row. A load-only probe on the H200 (notes/cuda.md, round 6) streamed 28672 x 8192 at 2.5-2.95
// TB/s with 32 bytes per row per load and 3.1-3.4 with 128-512.
constexpr int kUnits = 4;
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
  __device__ static uint32_t splat(float a) {
    __nv_bfloat162 r = __float2bfloat162_rn(a);
    return *reinterpret_cast<uint32_t*>(&r);
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

// Every accumulator of a thread's [RT][NT] mma tiles set to 0.
template <int RT, int NT>
__device__ __forceinline__ void zero_tiles(float (&a)[RT][NT][4]) {
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[rt][nt][i] = 0.f;
}

// The reduction over the warps (deterministic) and the epilogue of one tile: acc[rt][nt] = c0, c1 (row g, tokens
// 2tig, 2tig + 1), c2, c3 (row g + 8) of each warp's partial sums.
template <typename T, int NT, int RT, int WARPS = kWarps>
__device__ __forceinline__ void store_tile(float (*red)[RT * NT * 4][32], const float (&acc)[RT][NT][4], int r0, int m0,
                                           int N, int M, const T* __restrict__ bias, T* __restrict__ y) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  __syncthreads();  // the previous tile's epilogue has finished reading red
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][(rt * NT + nt) * 4 + i][lane] = acc[rt][nt][i];
  __syncthreads();
  for (int p = tid; p < RT * NT * 4 * 32; p += WARPS * 32) {
    const int idx = p / 32, l = p % 32;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) sum += red[wi][idx][l];
    const int i = idx % 4, nt = (idx / 4) % NT, rt = idx / (4 * NT);
    const int row = r0 + 16 * rt + l / 4 + 8 * (i / 2);
    const int m = m0 + 8 * nt + 2 * (l % 4) + (i % 2);
    if (row < N && m < M) {
      if (bias != nullptr) sum += Cvt<T>::to_float(bias[row]);
      y[static_cast<int64_t>(m) * N + row] = Cvt<T>::from(sum);
    }
  }
}

template <typename T, int NT, int RT, bool DQ>
__global__ void __launch_bounds__(kWarps * 32)
    gemm_mma_kernel(const T* __restrict__ x, W4View w, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                    int K) {
  extern __shared__ uint4 smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* ncode = reinterpret_cast<float*>(table + 256 * 32);
  float(*red)[RT * NT * 4][32] = reinterpret_cast<float(*)[RT * NT * 4][32]>(ncode + 256);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  fill_pair_table<T, kWarps * 32>(reinterpret_cast<uint8_t*>(smem), 128, w.code, tid);
  if (DQ) ncode[tid] = __ldg(w.nested_code + tid);
  __syncthreads();
  const uint32_t lane_off = 4 * lane;  // this lane's copy of the table
  const float offset = DQ ? __ldg(w.nested_offset) : 0.f;
  const int m0 = blockIdx.y * 8 * NT;
  const int KC = K / 32;  // 32-k chunks per row
  const int ntiles = (N + 16 * RT - 1) / (16 * RT);

  // Persistent blocks: one table build per block, no tail wave of short-lived blocks.
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int r0 = tile * 16 * RT;
    float acc[RT][NT][4];
    zero_tiles(acc);

    // Raw loads of one step: the weight chunks and their scales. Out-of-range chunks read element 0 and get a
    // zero scale, so their dequantized A fragment is exactly 0 (branch-free loads).
    struct Stage {
      uint4 wq[kUnroll][RT][2];
      float s[kUnroll][RT][2];
      uint32_t q[kUnroll][RT][2];
      bool ok[kUnroll][RT][2];
    };
    auto load = [&](int j0, Stage& st) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = 4 * (j0 + u * kWarps) + tig;
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
              st.s[u][rt][h] = __ldg(w.nested_absmax + nested_block(w, blk));
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
    load(warp, cur);
    for (int j0 = warp; 4 * j0 < KC; j0 += step) {
      Stage nxt;
      load(j0 + step, nxt);
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
        const int c = 4 * (j0 + u * kWarps) + tig;  // past the end: zero scale and zero x, adds exact zeros
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

    store_tile<T, NT, RT>(red, acc, r0, m0, N, M, bias, y);
  }  // tile loop
}

// decode_unit_kernel's dynamic shared memory: the table, at a 64 KB-aligned shared address so that a lookup's address
// is one PRMT of the code byte with (table | 4 lane), and 1 + kUnitWarps slots of kSlot bytes: the nested-code table
// and the reduction buffer, then each warp's ring of kUnitStages steps (its 16 rows x 128 bytes of codes, then their
// scales). Slots go below the table while they fit in the padding, the others above it; the padding left over is
// under one slot, which the size allows for.
constexpr int kUnitWarps = 16;
constexpr int kUnitStages = 4;
constexpr int kStepBytes = 16 * 128, kStepScaleBytes = 16 * 16;
constexpr int kSlot = kUnitStages * (kStepBytes + kStepScaleBytes);
static_assert(256 * 4 + kUnitWarps * 4 * 32 * 4 <= kSlot, "the nested codes and the reduction buffer fit one slot");
constexpr int kUnitSmem = kTableBytes + (1 + kUnitWarps) * kSlot + kSlot - 16;

// A shared-memory load at a 32-bit shared address; volatile so that it stays after the cp.async wait before it.
template <typename V>
__device__ __forceinline__ V lds(uint32_t a) {
  V v;
  if constexpr (sizeof(V) == 4) {
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(*reinterpret_cast<uint32_t*>(&v)) : "r"(a));
  } else {
    static_assert(sizeof(V) == 8);
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];"
                 : "=r"(reinterpret_cast<uint32_t*>(&v)[0]), "=r"(reinterpret_cast<uint32_t*>(&v)[1])
                 : "r"(a));
  }
  return v;
}

// The ring's layout: row r's 16-byte chunk c at r * 128 + 16 * (c ^ 2 (r & 3)), so that the 16 lanes of a half warp
// reading 8 bytes each of rows g = 0..3 (or 4..7) hit 16 distinct bank pairs. W is copied with L2 evict_first (read
// once) and x read with L1 evict_last (every warp of every block reads the same few KB; the 4-byte code-word copies
// would evict it): 2-7% faster on weights of >= 8192 rows or columns, within noise below (notes/cuda.md, round 8).
// The weights of one decode_unit_kernel launch: G <= kMaxGroup of one K, each with its own codes, scales, bias, output
// and N; the code and nested-code tables shared (the caller's contract). Their tiles of 16 rows are numbered one
// weight after another: weight s owns tiles first[s] .. first[s + 1] - 1; first[G] is the total.
constexpr int kMaxGroup = 3;
template <typename T>
struct DecodeWeights {
  const uint8_t* packed[kMaxGroup];
  const void* absmax[kMaxGroup];
  const float* nested_absmax[kMaxGroup];
  const float* nested_offset[kMaxGroup];
  const T* bias[kMaxGroup];
  T* y[kMaxGroup];
  int n[kMaxGroup];
  int first[kMaxGroup + 1];
  const float* code;
  const float* nested_code;
  int nested_log2;
};

// a[s] for a weight index s < G: by selects for G <= 2, else an indexed load from the (__grid_constant__) parameter
// space. Measured on the H200 (notes/cuda.md, round 11): selects ~3% faster for two weights, loads 4-8% for three.
template <int G, typename V, int L>
__device__ __forceinline__ V pick(const V (&a)[L], int s) {
  if constexpr (G > 2) {
    return a[s];
  } else {
    return G == 2 && s == 1 ? a[1] : a[0];
  }
}

template <typename T, bool DQ, int G>
__global__ void __launch_bounds__(kUnitWarps * 32, 1)
    decode_unit_kernel(const T* __restrict__ x, const __grid_constant__ DecodeWeights<T> d, int M, int K) {
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  // 32-bit shared addresses (ld.shared): a generic pointer into shared memory costs an add per access on sm_90.
  const uint32_t smem_s = smem_addr(smem), pad = (0u - smem_s) & 0xffffu, table_s = smem_s + pad;
  auto slot_s = [&](int i) {
    const int below = static_cast<int>(pad) / kSlot;
    return i < below ? smem_s + i * kSlot : table_s + kTableBytes + (i - below) * kSlot;
  };
  auto generic = [&](uint32_t a) { return reinterpret_cast<uint8_t*>(smem) + (a - smem_s); };
  const uint32_t ncode_s = slot_s(0), ring_s = slot_s(1 + warp);
  float* ncode = reinterpret_cast<float*>(generic(ncode_s));
  float(*red)[4][32] = reinterpret_cast<float(*)[4][32]>(ncode + 256);
  fill_pair_table<T, kUnitWarps * 32>(generic(table_s), 256, d.code, tid);
  if (DQ && tid < 256) ncode[tid] = __ldg(d.nested_code + tid);
  __syncthreads();
  const uint32_t lane_b = table_s | 4 * lane;
  // The pair of byte j of word, from this lane's copy: PRMT (sel 0x76j4) gives table + (byte << 8) + 4 lane.
  auto look = [&](uint32_t word, uint32_t sel) {
    uint32_t off;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(off) : "r"(word), "r"(lane_b), "r"(sel));
    return lds<uint32_t>(off);
  };
  float offsets[kMaxGroup] = {0.f, 0.f, 0.f};
  if constexpr (DQ)
#pragma unroll
    for (int s = 0; s < G; ++s) offsets[s] = __ldg(d.nested_offset[s]);
  const int KU = K / 64, KG = KU / kUnits;  // units and groups of kUnits units per row
  const int ntiles = d.first[G];
  // The weight a tile belongs to: G - 1 compares.
  auto member = [&](int tile) {
    int s = 0;
#pragma unroll
    for (int i = 1; i < G; ++i) s += tile >= d.first[i];
    return s;
  };

  // A step: warp w's group jb + w of kUnits units of the tile's 16 rows. Steps run tile by tile (a persistent block's
  // tiles blockIdx.x, + gridDim.x, ...), jb by kUnitWarps; the load cursor runs kUnitStages - 1 steps ahead of the
  // compute cursor.
  // A cursor also keeps its tile's weight s, first row row0 in it and the rows left from there (set on entering a
  // tile, so that a step only selects the weight's pointers).
  struct Cursor {
    int tile, jb, s, row0, rows;
  };
  auto enter = [&](Cursor& c) {
    c.s = member(c.tile);
    c.row0 = (c.tile - pick<G>(d.first, c.s)) * 16;
    c.rows = pick<G>(d.n, c.s) - c.row0;
  };
  auto next = [&](Cursor& c) {
    c.jb += kUnitWarps;
    if (c.jb >= KG) {
      c.jb = 0, c.tile += gridDim.x;
      enter(c);
    }
  };
  // Lane l copies 16-byte chunk l % 8 of rows l / 8 + {0, 4, 8, 12} and one scale word of row l % 16 (the code word
  // for l < 16, the nested scale otherwise; without double quant the float4 of row l, l < 16). Rows past N read row
  // N - 1 (their scale is zeroed at use); groups past K copy nothing.
  const uint64_t policy = l2_evict_first_policy();
  auto issue = [&](Cursor c, int slot) {
    const int grp = c.jb + warp;
    if (c.tile < ntiles && grp < KG) {
      const uint32_t base = ring_s + slot * (kStepBytes + kStepScaleBytes);
      const int cc = lane % 8, r0 = lane / 8;
      const uint8_t* packed = pick<G>(d.packed, c.s);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = r0 + 4 * i;
        const uint32_t e = static_cast<uint32_t>(c.row0 + min(r, c.rows - 1)) * KU + kUnits * grp;
        cp_async16_hint(base + r * 128 + 16 * (cc ^ (2 * r0)), packed + 32 * static_cast<uint64_t>(e) + 16 * cc,
                        policy);
      }
      const int r = lane % 16;
      const uint32_t e = static_cast<uint32_t>(c.row0 + min(r, c.rows - 1)) * KU + kUnits * grp;
      const uint32_t sdst = base + kStepBytes;
      const void* absmax = pick<G>(d.absmax, c.s);
      if constexpr (DQ) {
        if (lane < 16)
          cp_async4(sdst + 4 * r, static_cast<const uint8_t*>(absmax) + e);
        else
          cp_async4(sdst + 64 + 4 * r, pick<G>(d.nested_absmax, c.s) + (e >> d.nested_log2));
      } else if (lane < 16) {
        cp_async16(sdst + 16 * r, static_cast<const float*>(absmax) + e, true);
      }
    }
    cp_async_commit();
  };

  float acc[1][1][4];
  zero_tiles(acc);
  Cursor load{static_cast<int>(blockIdx.x), 0};
  enter(load);
  Cursor cur = load;
  for (int s = 0; s < kUnitStages - 1; ++s) issue(load, s), next(load);
  for (int step = 0; cur.tile < ntiles; ++step) {
    cp_async_wait<kUnitStages - 2>();
    __syncwarp();  // every lane's copies of this step landed; every lane is done with the slot refilled next
    issue(load, (step + kUnitStages - 1) % kUnitStages);
    next(load);
    const int grp = cur.jb + warp;
    if (grp < KG) {
      const uint32_t st = ring_s + (step % kUnitStages) * (kStepBytes + kStepScaleBytes);
      const int sw = 4 * (g & 3);
      float offset = offsets[0];  // selects: an indexed register array would live in local memory
#pragma unroll
      for (int i = 1; i < G; ++i) offset = cur.s == i ? offsets[i] : offset;
      uint32_t ok = 0;  // bit h: row g + 8 h is inside W
#pragma unroll
      for (int h = 0; h < 2; ++h) ok |= uint32_t{g + 8 * h < cur.rows} << h;
      // Tokens past M read token M - 1: they only feed output columns that are never stored.
      const T* xr = x + static_cast<int64_t>(min(g, M - 1)) * K + 64 * kUnits * grp + 16 * tig;
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        uint2 wq[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) wq[h] = lds<uint2>(st + (g + 8 * h) * 128 + 8 * ((4 * u + tig) ^ sw));
        float part[4] = {0.f, 0.f, 0.f, 0.f};
        // This unit's x: elements 16t + 4s .. + 3 for mma s (the k order inside an mma is free as long as A and B
        // agree: bytes 2s, 2s + 1 of the thread's 8 bytes are the same elements).
        const uint4 xv[2] = {ld_keep16(xr + 64 * u), ld_keep16(xr + 64 * u + 8)};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint2 b = s % 2 ? make_uint2(xv[s / 2].z, xv[s / 2].w) : make_uint2(xv[s / 2].x, xv[s / 2].y);
          const uint32_t j = 2 * (s & 1), sel0 = 0x7604u | (j << 4), sel1 = 0x7604u | ((j + 1) << 4);
          const uint32_t wa = s < 2 ? wq[0].x : wq[0].y, wb = s < 2 ? wq[1].x : wq[1].y;
          const uint32_t a[4] = {look(wa, sel0), look(wb, sel0), look(wa, sel1), look(wb, sel1)};
          Mma<T>::run(part, a, b);
        }
        // The unit's block scale on its fp32 product: one FFMA per output instead of an HMUL2 per byte.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = g + 8 * h;
          float sc;
          if constexpr (DQ) {
            const uint32_t q = lds<uint32_t>(st + kStepBytes + 4 * r);
            sc = fmaf(lds<float>(ncode_s + 4 * ((q >> (8 * u)) & 0xffu)), lds<float>(st + kStepBytes + 64 + 4 * r),
                      offset);
          } else {
            sc = lds<float>(st + kStepBytes + 16 * r + 4 * u);
          }
          sc = (ok >> h) & 1u ? sc : 0.f;
#pragma unroll
          for (int e = 0; e < 2; ++e) acc[0][0][2 * h + e] = fmaf(part[2 * h + e], sc, acc[0][0][2 * h + e]);
        }
      }
    }
    const Cursor done = cur;
    next(cur);
    if (cur.jb == 0) {  // the tile is done
      store_tile<T, 1, 1, kUnitWarps>(red, acc, done.row0, 0, pick<G>(d.n, done.s), M, pick<G>(d.bias, done.s),
                                      pick<G>(d.y, done.s));
      zero_tiles(acc);
    }
  }
}

// Blocks per SM for one instantiation (over 48 KB of shared memory needs the opt-in attribute), asked once.
template <typename Kernel>
int resident_blocks(Kernel kernel, int smem, int threads = kWarps * 32) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
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

// Weight s of a decode launch: its tiles follow weight s - 1's. The slots after the last weight repeat it with no
// tiles of their own.
template <typename T>
void set_weight(DecodeWeights<T>& d, int s, const W4View& v, const T* bias, at::Tensor& y, int N) {
  const int first = s == 0 ? 0 : d.first[s];
  for (int i = s; i < kMaxGroup; ++i) {
    d.packed[i] = v.packed;
    d.absmax[i] = v.absmax;
    d.nested_absmax[i] = v.nested_absmax;
    d.nested_offset[i] = v.nested_offset;
    d.bias[i] = bias;
    d.y[i] = static_cast<T*>(y.data_ptr());
    d.n[i] = N;
    d.first[i + 1] = first + static_cast<int>(ceil_div(N, 16));
  }
  d.first[s] = first;
  d.code = v.code;
  d.nested_code = v.nested_code;
  d.nested_log2 = v.nested_log2;
}

template <typename T, bool DQ, int G>
void launch_unit(const at::Tensor& x2, const DecodeWeights<T>& d, int M, int K) {
  static const int per_sm = resident_blocks(decode_unit_kernel<T, DQ, G>, kUnitSmem, kUnitWarps * 32);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const dim3 grid(static_cast<unsigned>(std::min(d.first[G], per_sm * sms)), 1);
  decode_unit_kernel<T, DQ, G><<<grid, kUnitWarps * 32, kUnitSmem, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(x2.data_ptr()), d, M, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int G>
void launch_unit(const at::Tensor& x2, const DecodeWeights<T>& d, bool double_quant, int M, int K) {
  double_quant ? launch_unit<T, true, G>(x2, d, M, K) : launch_unit<T, false, G>(x2, d, M, K);
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
void dispatch(const at::Tensor& x2, const W4View& v, const T* bias, at::Tensor& y, int M, int N, int K, bool unit) {
  // Two row tiles per block when that still leaves two blocks per SM: more loads in flight, half the x reads.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool two = ceil_div(N, 32) >= 2 * sms;
  if (M <= 8 && unit) {
    DecodeWeights<T> d;
    set_weight(d, 0, v, bias, y, N);
    launch_unit<T, 1>(x2, d, v.nested_absmax != nullptr, M, K);
  } else if (M <= 8) {
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

bool decode_unit_eligible(const W4& w) {
  // 4-aligned code words (16-aligned fp32 absmax), nested blocks of a power of two >= 4, 32-bit unit offsets.
  const auto scales = reinterpret_cast<uintptr_t>(w.absmax.data_ptr());
  const int64_t nbs = w.double_quant() ? w.nested_blocksize : 0;
  return w.blocksize == 64 && w.cols() % 256 == 0 && scales % (w.double_quant() ? 4 : 16) == 0 &&
         (!w.double_quant() || (nbs >= 4 && (nbs & (nbs - 1)) == 0)) && w.rows() * w.cols() / 64 <= UINT32_MAX &&
         at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin >= kUnitSmem;
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
  const bool unit = decode_unit_eligible(w);
  if (dt == at::kHalf) {
    dispatch<__half>(x2, v, bias ? static_cast<const __half*>(b.data_ptr()) : nullptr, y, M, N, K, unit);
  } else {
    dispatch<__nv_bfloat16>(x2, v, bias ? static_cast<const __nv_bfloat16*>(b.data_ptr()) : nullptr, y, M, N, K, unit);
  }
  return true;
}

template <typename T>
void launch_group(const at::Tensor& x2, const std::vector<W4>& ws, const std::vector<at::Tensor>& biases,
                  std::vector<at::Tensor>& ys) {
  DecodeWeights<T> d;
  for (size_t s = 0; s < ws.size(); ++s) {
    const T* bias = biases[s].defined() ? static_cast<const T*>(biases[s].data_ptr()) : nullptr;
    set_weight(d, static_cast<int>(s), make_view(ws[s], "gemm_4bit_group"), bias, ys[s], ws[s].rows());
  }
  // Two weights get their own instantiation (pick: one select), three the indexed loads.
  ws.size() == 2 ? launch_unit<T, 2>(x2, d, ws[0].double_quant(), x2.size(0), x2.size(1))
                 : launch_unit<T, kMaxGroup>(x2, d, ws[0].double_quant(), x2.size(0), x2.size(1));
}

bool gemm_mma_group(const at::Tensor& x2_in, const std::vector<W4>& ws,
                    const std::vector<c10::optional<at::Tensor>>& biases, std::vector<at::Tensor>& ys) {
  const auto dt = x2_in.scalar_type();
  const int64_t M = x2_in.size(0), K = x2_in.size(1);
  if (ws.size() < 2 || ws.size() > kMaxGroup || (dt != at::kHalf && dt != at::kBFloat16)) return false;
  if (M == 0 || M > 8 || M * K > INT32_MAX * int64_t{32}) return false;
  int64_t tiles = 0;
  for (const auto& w : ws) {
    if (w.rows() == 0 || w.cols() != K || w.double_quant() != ws[0].double_quant() || !decode_unit_eligible(w) ||
        !aligned16(w.packed.data_ptr()))
      return false;
    tiles += ceil_div(w.rows(), 16);
  }
  if (tiles > INT32_MAX) return false;
  const auto x2 = contiguous_aligned16(x2_in);
  const auto b = group_outputs(x2, ws, biases, ys);
  dt == at::kHalf ? launch_group<__half>(x2, ws, b, ys) : launch_group<__nv_bfloat16>(x2, ws, b, ys);
  return true;
}

}  // namespace nf4q::cuda
