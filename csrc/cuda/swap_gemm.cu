// Fused NF4 GEMM on Hopper for batches of 1-2048 rows, with the operands swapped (Machete's arrangement):
//   y^T[N, M] = W[N, K] . x[M, K]^T,   W = wgmma's A operand, in registers; x = its B operand, in shared memory.
// Tensor cores are 64 rows tall, so a batch of 1-64 rows would waste most of an x-as-A tile; here the batch is
// wgmma's N (16..256 tokens per tile, tokens_per_tile) and W's rows fill the 64-row side.
//
// One CTA = two warpgroups = 128 rows of W x TN tokens. Per 64-wide step of K, TMA brings the packed NF4 bytes of
// those rows (128 x 32 bytes, the canonical layout) and x's tile (TN x 64, 128B-swizzled) into a ring of stages;
// each thread then dequantizes exactly its own A fragment in registers -- rows g and g+8 of its warp's 16, k slots
// 2t, 2t+1, 2t+8, 2t+9 of each k16 step, i.e. byte t of each 4-byte word of those rows -- with one lookup per
// byte in a byte -> (code, code) table and the block scale, and issues four wgmma. The dequantized W never touches
// shared memory (the x-as-A kernel in fused_gemm.cu writes and re-reads a 16 KB tile per step).
//
// What bounded it was instruction issue (ncu on the H200, 28672 x 8192, M = 16: 0.62 instructions issued per
// scheduler cycle, DRAM 22% busy), so every per-byte instruction counts: the table is laid out so that a lookup is
// one PRMT and one LDS (lut_shift), block scales are loaded four steps at a time, and 16-token tiles apply the
// scales to the fp32 products (kPost) instead of to the fragments. Since then, at M <= 16, the TMA ring itself is
// the cap: with the dequantization and wgmma removed it streams W at only 2.0-2.25 TB/s, 5 or 12 stages alike, and
// the kernel runs at ~85% of that (notes/cuda.md, round 6).
//
// No __syncthreads per step: each warp releases a stage on its "empty" mbarrier once its wgmma on it is done, and
// the thread that refills the stage waits for all eight. 16-64-token tiles run two CTAs per SM, 128/256 one (their
// accumulators need the registers: at two CTAs ptxas serialized the 128-token tile's wgmma: warning C7512).
//
// When the row tiles x token tiles do not fill the SMs, K is split: each split writes fp32 partial sums and a
// second kernel adds them in split order (deterministic) with the bias.
//
// One launch may cover up to three weights of one K that read the same x (q, k and v; gate and up: gemm_4bit_group
// for 9-64 tokens): each weight keeps the CTAs and split plan it would have alone, so the outputs are those bits, and
// the launches, the pipeline fills and the last waves of separate calls become one (notes/cuda.md, round 12).
// Built only for sm_90a (wgmma); elsewhere gemm_swap() returns false and callers take another path.
#include <cstdlib>
#include <type_traits>

#include "hopper.cuh"

namespace nf4q::cuda {
namespace {

constexpr int kRows = 128, kBK = 64, kThreads = 256;
constexpr int kRawBytes = kRows * kBK / 2;  // packed W of one step
constexpr int kMinStepsPerSplit = 8;
constexpr int kGroup = 4;  // steps whose block scales are loaded together, one group ahead
// CTAs per SM: two, except for 128- and 256-token tiles, whose 64 / 128 accumulators per thread leave too few
// registers at two CTAs for ptxas to keep the wgmma pipelined (ptxas warning C7512: it serialized them). The 64-token
// tile is serialized too, yet faster at two CTAs than at one (H200, 28672 x 8192, M = 64: 97 vs 120 us).
template <int TN>
constexpr int ctas_per_sm() {
  return TN >= 128 ? 1 : 2;
}

// The kernel is bound by instruction issue (ncu: 0.62 issued per scheduler cycle, ~190 instructions per warp per
// step, most of them the table addressing), so the table is laid out for the cheapest address: entry e of lane l's
// copy at e * stride + 4 l, stride = 256 >> shift bytes, and the address of byte j of a word is one PRMT (byte j
// next to the lane's byte: e << 8 | l << 2 + shift) and a shift. With 32 copies a warp's lookups hit 32 distinct
// banks. The wide stride costs shared memory (64 KB at shift 0), so 64-token tiles trade it for stages.
template <int TN>
constexpr int lut_shift() {
  return TN <= 32 || TN >= 128 ? 0 : 1;
}
template <int TN>
constexpr int lut_bytes() {
  return 256 * (256 >> lut_shift<TN>());
}
// Stages of the TMA ring: as many as fit beside the table, for two CTAs per SM where there are two (while one waits
// at its barrier, the other's dequantization and wgmma run).
template <int TN>
constexpr int stages() {
  return TN == 16 ? 6 : TN == 32 ? 5 : TN == 64 ? 6 : TN == 128 ? 7 : 4;
}
template <int TN>
constexpr int smem_bytes() {
  return 1024 /*alignment slack*/ + stages<TN>() * (TN * 128 + kRawBytes) + lut_bytes<TN>() + 256 * 4 +
         (2 * stages<TN>() + 1) * 8 /*mbarriers: the ring's full and empty ones, the LoRA steps'*/;
}
// 228 KB of shared memory per SM, 1 KB of it reserved per CTA
template <int TN>
constexpr bool fits() {
  return smem_bytes<TN>() <= (228 / ctas_per_sm<TN>() - 1) * 1024;
}
static_assert(fits<16>() && fits<32>() && fits<64>() && fits<128>() && fits<256>(), "shared memory per SM");

struct Out {
  const void* bias;    // [N] or null
  void* y;             // [M, N] when not split
  float* partial;      // [splits, M, N] when split
  const void* lora_b;  // LoRA's B [N, r] or null; its partner t = s d(x) A^T [M, r] comes by the tm_t map
  int64_t M;
  int N, K, m_tiles, steps;  // steps: 64-wide K steps per split
  int r;                     // LoRA rank, a multiple of 8
  bool vec;                  // block size 64, scales 4-aligned: one vector load per row covers a group of steps
};

#ifdef NF4Q_WGMMA
// m64nTNk16 with A from four registers: D registers, A registers, the B descriptor, scale-d (0: D = A B, 1:
// D += A B), then the accumulators.
#define NF4Q_WGMMA_RS(TN, TYPE, D, A, B, SD, ...)                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SD ", 0;\nwgmma.mma_async.sync.aligned.m64n" #TN "k16.f32." TYPE \
               "." TYPE " {" D "}, {" A "}, " B ", p, 1, 1, 0;\n}\n"                                                \
               : __VA_ARGS__                                                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate))
#define NF4Q_WGMMA_RS_SPECIALIZE(TN, D, A, B, SD, ...)                                              \
  template <>                                                                                       \
  struct WgmmaRS<__nv_bfloat16, TN> {                                                               \
    __device__ static void run(float* d, const uint32_t* a, uint64_t db, uint32_t accumulate = 1) { \
      NF4Q_WGMMA_RS(TN, "bf16", D, A, B, SD, __VA_ARGS__);                                          \
    }                                                                                               \
  };                                                                                                \
  template <>                                                                                       \
  struct WgmmaRS<__half, TN> {                                                                      \
    __device__ static void run(float* d, const uint32_t* a, uint64_t db, uint32_t accumulate = 1) { \
      NF4Q_WGMMA_RS(TN, "f16", D, A, B, SD, __VA_ARGS__);                                           \
    }                                                                                               \
  };

template <typename T, int TN>
struct WgmmaRS;
NF4Q_WGMMA_RS_SPECIALIZE(16, "%0,%1,%2,%3,%4,%5,%6,%7", "%8,%9,%10,%11", "%12", "%13", NF4Q_ACC8(0))
NF4Q_WGMMA_RS_SPECIALIZE(32, "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15", "%16,%17,%18,%19", "%20", "%21",
                         NF4Q_ACC8(0), NF4Q_ACC8(8))
NF4Q_WGMMA_RS_SPECIALIZE(64,
                         "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"
                         "%24,%25,%26,%27,%28,%29,%30,%31",
                         "%32,%33,%34,%35", "%36", "%37", NF4Q_ACC8(0), NF4Q_ACC8(8), NF4Q_ACC8(16), NF4Q_ACC8(24))
NF4Q_WGMMA_RS_SPECIALIZE(128,
                         "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"
                         "%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,"
                         "%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63",
                         "%64,%65,%66,%67", "%68", "%69", NF4Q_ACC8(0), NF4Q_ACC8(8), NF4Q_ACC8(16), NF4Q_ACC8(24),
                         NF4Q_ACC8(32), NF4Q_ACC8(40), NF4Q_ACC8(48), NF4Q_ACC8(56))

NF4Q_WGMMA_RS_SPECIALIZE(
    256,
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,"
    "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,"
    "%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,"
    "%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,"
    "%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127",
    "%128,%129,%130,%131", "%132", "%133", NF4Q_ACC8(0), NF4Q_ACC8(8), NF4Q_ACC8(16), NF4Q_ACC8(24), NF4Q_ACC8(32),
    NF4Q_ACC8(40), NF4Q_ACC8(48), NF4Q_ACC8(56), NF4Q_ACC8(64), NF4Q_ACC8(72), NF4Q_ACC8(80), NF4Q_ACC8(88),
    NF4Q_ACC8(96), NF4Q_ACC8(104), NF4Q_ACC8(112), NF4Q_ACC8(120))

__device__ __forceinline__ void fence_regs(uint32_t (&a)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) asm volatile("" : "+r"(a[i])::"memory");
}
#endif

// One weight of a launch: its view, its output and its CTAs (row tiles x token tiles, times its K splits).
struct SwapMember {
  W4View w;
  Out o;
  int tiles;  // row tiles x token tiles
};
// A launch: 1-3 weights of one x (q, k and v; gate and up), each with the CTAs, split plan and bits it would have
// alone, numbered one weight after another (weight s owns CTAs first[s] .. first[s + 1] - 1; CTA c of a weight is tile
// c % tiles of split c / tiles), so one launch gives what separate ones would, bit for bit. One weight: a 2-D grid
// (tiles, splits), as before groups existed.
constexpr int kMaxGroup = 3, kGroupMaxTokens = 64;  // grouped: 16-64-token tiles (batched decoding), not compiled wider
template <int G>
struct SwapArgs {
  CUtensorMap tm_w[G];  // each weight's packed bytes
  CUtensorMap tm_x, tm_t;
  SwapMember m[G];
  int first[G + 1];
};

template <typename T, int TN, bool DQ, int G>
__global__ void __launch_bounds__(kThreads, ctas_per_sm<TN>()) swap_gemm_kernel(const __grid_constant__ SwapArgs<G> p) {
#ifdef NF4Q_WGMMA
  // This CTA's weight (G - 1 compares, once), tile and K split.
  int ws = 0;
#pragma unroll
  for (int i = 1; i < G; ++i) ws += static_cast<int>(blockIdx.x) >= p.first[i];
  const W4View& w = p.m[ws].w;  // references into the parameters, not copies (the compiler keeps what it needs)
  const Out& o = p.m[ws].o;
  const CUtensorMap* tm_w = &p.tm_w[ws];
  const int cta = static_cast<int>(blockIdx.x) - p.first[ws];
  const int tile = G == 1 ? static_cast<int>(blockIdx.x) : cta % p.m[ws].tiles;
  const int split = G == 1 ? static_cast<int>(blockIdx.y) : cta / p.m[ws].tiles;
  constexpr int S = stages<TN>(), kXBytes = TN * 128, kCopies = 32, kShift = lut_shift<TN>();
  constexpr bool kPost = TN == 16;  // block scales applied to the fp32 products (see blk below)
  extern __shared__ uint8_t smem_raw[];
  // The table first, at the start of dynamic shared memory (a lookup is then one PRMT, a shift and an LDS whose
  // base rides in a uniform register), then the 1024-aligned stages.
  uint8_t* lut = smem_raw;  // byte -> T2, kCopies copies (see lut_shift)
  uint8_t* smem = lut + lut_bytes<TN>();
  smem += (1024 - (smem_addr(smem) & 1023)) & 1023;
  uint8_t* x_s = smem;                 // S x [TN tokens x 64 k], 128B-swizzled
  uint8_t* raw_s = x_s + S * kXBytes;  // S x [128 rows x 32 bytes]
  float* ncode = reinterpret_cast<float*>(raw_s + S * kRawBytes);
  const uint32_t bars = smem_addr(ncode + 256), empty = bars + 8 * (S + 1);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  static_assert(kCopies == 32, "fill_pair_table writes 32 copies");
  fill_pair_table<T, kThreads>(lut, 256 >> kShift, w.code, tid);
  if (DQ) ncode[tid] = __ldg(w.nested_code + tid);
  if (tid == 0) {
    for (int s = 0; s <= S; ++s) mbar_init(bars + 8 * s);  // full: TMA bytes landed (and the LoRA steps' one)
    for (int s = 0; s < S; ++s) mbar_init(empty + 8 * s, kThreads / 32);  // empty: every warp is done with it
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // Token tiles vary fastest, so the CTAs that share W's rows run together and W is read from HBM once.
  const int m_tile = tile % o.m_tiles, n0 = (tile / o.m_tiles) * kRows;
  const int64_t m0 = int64_t{m_tile} * TN;
  const int kt0 = split * o.steps, nsteps = min(o.K / kBK - kt0, o.steps);
  const int lrow = (warp >> 2) * 64 + (warp & 3) * 16 + g;  // rows lrow and lrow + 8 of the tile
  const int row_a = n0 + lrow, row_b = row_a + 8;
  const float offset = DQ ? __ldg(w.nested_offset) : 0.f;
  // PRMT selector: byte 0 = the lane's byte (lane_byte), byte 1 = byte t of the word, bytes 2, 3 = zero.
  const uint32_t lane_byte = (lane % kCopies) << (2 + kShift), sel = 0x5504u | (tig << 4);

  // Block scales come from global memory (uint8 code + nested fp32, or fp32), one per row per step. They are loaded
  // a group of kGroup steps at a time (with block size 64: one 4-byte code word or one float4 per row, fewer
  // instructions) and a group ahead: waited on at the step that uses them, they would cost a DRAM latency.
  struct Scales {
    uint32_t qa, qb;               // double quant: byte j = the 8-bit code of rows a and b at step j of the group
    float sa[kGroup], sb[kGroup];  // their nested fp32 scale, or the fp32 absmax itself
  };
  const int ra_c = min(row_a, o.N - 1), rb_c = min(row_b, o.N - 1);  // rows past N: any valid address
  const uint8_t* codes = static_cast<const uint8_t*>(w.absmax);
  const float* absmax = static_cast<const float*>(w.absmax);
  auto fetch = [&](int i0, Scales& f) {
    if (i0 >= nsteps) return;
    const int64_t k = int64_t{kt0 + i0} * kBK;
    const int64_t ba = (int64_t{ra_c} * o.K + k) >> w.log2_bs, bb = (int64_t{rb_c} * o.K + k) >> w.log2_bs;
    if (o.vec) {  // blocks ba..ba+3 are the group's four steps, in one nested block
      if (DQ) {
        f.qa = __ldg(reinterpret_cast<const uint32_t*>(codes + ba));
        f.qb = __ldg(reinterpret_cast<const uint32_t*>(codes + bb));
        const float na = __ldg(w.nested_absmax + (ba >> w.nested_log2));
        const float nb = __ldg(w.nested_absmax + (bb >> w.nested_log2));
#pragma unroll
        for (int j = 0; j < kGroup; ++j) f.sa[j] = na, f.sb[j] = nb;
      } else {
        const float4 va = __ldg(reinterpret_cast<const float4*>(absmax + ba));
        const float4 vb = __ldg(reinterpret_cast<const float4*>(absmax + bb));
        f.sa[0] = va.x, f.sa[1] = va.y, f.sa[2] = va.z, f.sa[3] = va.w;
        f.sb[0] = vb.x, f.sb[1] = vb.y, f.sb[2] = vb.z, f.sb[3] = vb.w;
      }
      return;
    }
    f.qa = f.qb = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (i0 + j >= nsteps) break;
      const int64_t ja = (int64_t{ra_c} * o.K + k + j * kBK) >> w.log2_bs;
      const int64_t jb = (int64_t{rb_c} * o.K + k + j * kBK) >> w.log2_bs;
      if (DQ) {
        f.qa |= uint32_t{__ldg(codes + ja)} << (8 * j);
        f.qb |= uint32_t{__ldg(codes + jb)} << (8 * j);
        f.sa[j] = __ldg(w.nested_absmax + (ja >> w.nested_log2));
        f.sb[j] = __ldg(w.nested_absmax + (jb >> w.nested_log2));
      } else {
        f.sa[j] = __ldg(absmax + ja);
        f.sb[j] = __ldg(absmax + jb);
      }
    }
  };
  auto scale_of = [&](uint32_t q, float s, bool valid) {  // rows past N (TMA zero-filled bytes): a zero scale
    return valid ? (DQ ? fmaf(ncode[q], s, offset) : s) : 0.f;
  };
  // The T2 pair of byte t of word, from this lane's copy of the table.
  auto look = [&](uint32_t word) {
    uint32_t off;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(off) : "r"(word), "r"(lane_byte), "r"(sel));
    return *reinterpret_cast<const uint32_t*>(lut + (off >> kShift));
  };

  // This thread's A fragments of step i: a[4s..4s+3] = rows (g, g+8) x k slots (2t.., 2t+8..) of k16 step s; the
  // codes times the block scales fa, fb, or (kPost) the codes alone.
  auto build = [&](uint32_t slot, uint32_t(&a)[16], float fa, float fb) {
    const uint32_t sa = Cvt<T>::pack(fa, fa), sb = Cvt<T>::pack(fb, fb);
    const uint8_t* raw = raw_s + slot * kRawBytes;
    // Canonical k order: slots 2t, 2t+1 of step s are byte t of word 2s (and 2t+8.. of word 2s + 1) of the row.
    const uint4 qa0 = *reinterpret_cast<const uint4*>(raw + lrow * 32);
    const uint4 qa1 = *reinterpret_cast<const uint4*>(raw + lrow * 32 + 16);
    const uint4 qb0 = *reinterpret_cast<const uint4*>(raw + (lrow + 8) * 32);
    const uint4 qb1 = *reinterpret_cast<const uint4*>(raw + (lrow + 8) * 32 + 16);
    const uint32_t wa[8] = {qa0.x, qa0.y, qa0.z, qa0.w, qa1.x, qa1.y, qa1.z, qa1.w};
    const uint32_t wb[8] = {qb0.x, qb0.y, qb0.z, qb0.w, qb1.x, qb1.y, qb1.z, qb1.w};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      a[4 * s + 0] = look(wa[2 * s]);
      a[4 * s + 1] = look(wb[2 * s]);
      a[4 * s + 2] = look(wa[2 * s + 1]);
      a[4 * s + 3] = look(wb[2 * s + 1]);
      if (!kPost) {
        a[4 * s + 0] = hmul2<T>(a[4 * s + 0], sa);
        a[4 * s + 1] = hmul2<T>(a[4 * s + 1], sb);
        a[4 * s + 2] = hmul2<T>(a[4 * s + 2], sa);
        a[4 * s + 3] = hmul2<T>(a[4 * s + 3], sb);
      }
    }
  };

  auto load_stage = [&](int i, uint32_t slot) {  // one thread: step i into stage slot
    const uint32_t bar = bars + 8 * slot;
    mbar_expect(bar, kXBytes + kRawBytes);
    tma_load(smem_addr(x_s + slot * kXBytes), &p.tm_x, (kt0 + i) * kBK, static_cast<int>(m0), bar);
    tma_load(smem_addr(raw_s + slot * kRawBytes), tm_w, (kt0 + i) * kBK / 2, n0, bar);
  };
  if (tid == 0)
    for (int i = 0; i < S - 1 && i < nsteps; ++i) load_stage(i, i);
  Scales sc0, sc1;
  fetch(0, sc0);

  // kPost (16-token tiles): each step's product goes to its own accumulator blk (scale-d = 0 on its first wgmma) and
  // is added to acc times the fp32 block scales at the next step, once that step's fragments are built. At 16 tokens
  // that is 8 FFMA per step instead of 16 HMUL2 on the A fragments (the kernel is bound by instruction issue), and the
  // scale is applied in fp32 (one rounding fewer). Wider tiles would need more FFMA than HMUL2.
  float acc[TN / 2], blk[TN / 2];
#pragma unroll
  for (int i = 0; i < TN / 2; ++i) acc[i] = blk[i] = 0.f;
  float pa = 0.f, pb = 0.f;  // kPost: the block scales of the product in blk
  auto fold = [&] {          // acc[4j + 2h + e] is row a (h = 0) or b (h = 1)
#pragma unroll
    for (int k = 0; k < TN / 2; ++k) acc[k] = fmaf(blk[k], (k & 2) ? pb : pa, acc[k]);
  };
  uint32_t a0[16], a1[16];
  uint32_t slot = 0, phase = 0;  // the stage step i reads, and the parity of its barrier
  const uint64_t x_desc = desc_sw128(smem_addr(x_s));
  // Step i (step j of its scale group): dequantize into a (the registers step i - 2 used; its wgmma has finished)
  // while step i - 1's wgmma runs, and issue. kPost: wait for step i - 1's product before issuing into blk; else:
  // wait for it after issuing into acc. Either way step i - 1's stage is then free to be refilled.
  auto step = [&](int i, uint32_t(&a)[16], const Scales& f, int j) {
    const float fa = scale_of((f.qa >> (8 * j)) & 0xffu, f.sa[j], row_a < o.N);
    const float fb = scale_of((f.qb >> (8 * j)) & 0xffu, f.sb[j], row_b < o.N);
    mbar_wait(bars + 8 * slot, phase);
    build(slot, a, fa, fb);
    fence_regs(a);
    float(&d)[TN / 2] = kPost ? blk : acc;
    if (kPost) {
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      fence_acc<TN / 2>(blk);
      fold();  // at i = 0: zeros times zero scales
      pa = fa, pb = fb;
    }
    fence_acc<TN / 2>(d);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    const uint64_t xd = x_desc + ((slot * kXBytes) >> 4);  // the start address field, in 16-byte units
#pragma unroll
    for (int s = 0; s < 4; ++s) WgmmaRS<T, TN>::run(d, a + 4 * s, xd + 2 * s, kPost && s == 0 ? 0u : 1u);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    if (!kPost) asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    fence_acc<TN / 2>(d);
    fence_regs(a);
    // Step i - 1's wgmma is complete (waited on above): this warp is done with its stage. No __syncthreads: the
    // warps drift apart, and only the thread that refills a stage waits for all eight to release it.
    const uint32_t prev = slot == 0 ? S - 1 : slot - 1, prev_phase = slot == 0 ? phase ^ 1 : phase;
    if (i > 0 && lane == 0) mbar_arrive(empty + 8 * prev);
    if (tid == 0 && i + S - 1 < nsteps) {
      if (i > 0) mbar_wait(empty + 8 * prev, prev_phase);  // at i = 0 stage S - 1 has not been used yet
      load_stage(i + S - 1, prev);
    }
    __syncwarp();
    if (++slot == S) slot = 0, phase ^= 1;
  };
  // Groups of kGroup steps, each with the scales of one group while the next group's loads are in flight.
  static_assert(kGroup == 4, "the loops below are unrolled by 4");
  int i = 0;
  for (; i + 2 * kGroup <= nsteps; i += 2 * kGroup) {
    fetch(i + kGroup, sc1);
    step(i, a0, sc0, 0);
    step(i + 1, a1, sc0, 1);
    step(i + 2, a0, sc0, 2);
    step(i + 3, a1, sc0, 3);
    fetch(i + 2 * kGroup, sc0);
    step(i + 4, a0, sc1, 0);
    step(i + 5, a1, sc1, 1);
    step(i + 6, a0, sc1, 2);
    step(i + 7, a1, sc1, 3);
  }
  if (i + kGroup <= nsteps) {  // one whole group left
    fetch(i + kGroup, sc1);
    step(i, a0, sc0, 0);
    step(i + 1, a1, sc0, 1);
    step(i + 2, a0, sc0, 2);
    step(i + 3, a1, sc0, 3);
    i += kGroup;
    sc0 = sc1;
  }
  if (i < nsteps) step(i, a0, sc0, 0);  // and up to three steps
  if (i + 1 < nsteps) step(i + 1, a1, sc0, 1);
  if (i + 2 < nsteps) step(i + 2, a0, sc0, 2);
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_acc<TN / 2>(acc);
  if (kPost) fence_acc<TN / 2>(blk);
  fence_regs(a0);
  fence_regs(a1);
  if (kPost) fold();  // the last step's product

  // The LoRA term as extra reduction steps (first split only): A = lora_B's rows, straight from global memory into
  // registers (k slots past r read as zero), B = t's tile by TMA into stage 0 (columns past r zero-filled).
  const uint32_t* lb = static_cast<const uint32_t*>(o.lora_b);
  for (int e = 0; lb != nullptr && split == 0 && e * kBK < o.r; ++e) {
    __syncthreads();  // every warp is past its last read of stage 0
    if (tid == 0) {
      mbar_expect(bars + 8 * S, kXBytes);
      tma_load(smem_addr(x_s), &p.tm_t, e * kBK, static_cast<int>(m0), bars + 8 * S);
    }
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // j: rows a, b (bit 0) x k slots 2t.., 2t+8.. (bit 1)
        const int row = (j & 1) ? row_b : row_a, k = e * kBK + 16 * s + 2 * tig + 8 * (j >> 1);
        a0[4 * s + j] = (row < o.N && k < o.r) ? __ldg(lb + (int64_t{row} * o.r + k) / 2) : 0u;
      }
    mbar_wait(bars + 8 * S, e & 1);
    fence_regs(a0);
    fence_acc<TN / 2>(acc);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < 4; ++s) WgmmaRS<T, TN>::run(acc, a0 + 4 * s, desc_sw128(smem_addr(x_s) + 32 * s));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_acc<TN / 2>(acc);
    fence_regs(a0);
  }

  // Epilogue: acc[4j + 2h + e] = y^T[row lrow + 8h, token 8j + 2t + e]: this split's fp32 partial sums, or y + bias.
  // One loop per output type (the branch out of the loops: straight-line stores).
  const int64_t N = o.N, M = o.M;
  auto put = [&](auto* out, const T* bias) {  // out: [M, N]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = h ? row_b : row_a;
      if (row >= o.N) continue;
      const float b = bias != nullptr ? Cvt<T>::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int j = 0; j < TN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + 8 * j + 2 * tig + e;
          const float v = acc[4 * j + 2 * h + e];
          if (m >= M) continue;
          if constexpr (std::is_same_v<decltype(out), float*>)
            out[m * N + row] = v;
          else
            out[m * N + row] = Cvt<T>::from(v + b);
        }
    }
  };
  if (o.partial != nullptr)
    put(o.partial + split * M * N, nullptr);
  else
    put(static_cast<T*>(o.y), static_cast<const T*>(o.bias));
#endif
}

// The split weights of a launch: y = the sum over splits of partial (in split order) + bias, weight s of them in
// the blocks of blockIdx.y = s (so a block's weight is uniform and one weight is the kernel it always was).
template <typename T>
struct SplitSums {
  const float* partial[kMaxGroup];
  const T* bias[kMaxGroup];
  T* y[kMaxGroup];
  int64_t mn[kMaxGroup];  // M x N
  int n[kMaxGroup], splits[kMaxGroup];
  int count;
};
template <typename T>
__global__ void sum_splits_kernel(const __grid_constant__ SplitSums<T> a) {
  const int s = blockIdx.y, N = a.n[s], splits = a.splits[s];
  const int64_t MN = a.mn[s];
  const float* __restrict__ partial = a.partial[s];
  const T* __restrict__ bias = a.bias[s];
  T* __restrict__ y = a.y[s];
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < MN; p += int64_t{gridDim.x} * blockDim.x) {
    float v = 0.f;
    for (int j = 0; j < splits; ++j) v += partial[j * MN + p];
    if (bias != nullptr) v += Cvt<T>::to_float(bias[p % N]);
    y[p] = Cvt<T>::from(v);
  }
}

// One weight of a call and its output; bias null without one.
template <typename T>
struct Weight {
  const W4* w;
  W4View v;
  const T* bias;
  at::Tensor* y;
};
// One call's operands: x [M, K] contiguous and 16-byte aligned, 1-3 weights of one K and one kind of scales; t [M, r]
// and lb [N, r] (LoRA, one weight only; undefined without).
template <typename T>
struct Call {
  const at::Tensor& x;
  std::vector<Weight<T>> ws;
  at::Tensor t, lb;
};

// Split K while the tiles leave CTA slots idle, keeping at least kMinStepsPerSplit steps per split; whole scale
// groups per split, so that a split starts 4-aligned.
struct SplitK {
  int64_t steps, splits;  // steps per split, splits
};
SplitK split_k(int64_t tiles, int64_t ksteps, int64_t slots) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(slots / tiles, ksteps / kMinStepsPerSplit));
  const int64_t steps = ceil_div(ceil_div(ksteps, want), kGroup) * kGroup;
  return {steps, ceil_div(ksteps, steps)};
}

template <typename T, int TN, bool DQ, int G>
void launch(const Call<T>& c) {
  const int64_t M = c.x.size(0), K = c.x.size(1), ksteps = K / kBK;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  SwapArgs<G> p{};
  p.tm_x = tensor_map(c.x.data_ptr(), type, 2, M, K, TN, kBK, CU_TENSOR_MAP_SWIZZLE_128B);
  SplitSums<T> sums{};
  int64_t partials = 0, ctas = 0;
  int64_t offset[G] = {};
  int splits[G] = {};
  // Each weight: the plan it would get alone (so the same bits), its CTAs after the previous weight's. Slots past the
  // call's weights repeat the last one with no CTAs.
  const int count = static_cast<int>(c.ws.size());
  for (int s = 0; s < G; ++s) {
    if (s >= count) {
      p.m[s] = p.m[s - 1];
      p.tm_w[s] = p.tm_w[s - 1];
      p.first[s] = static_cast<int>(ctas);
      continue;
    }
    const Weight<T>& cw = c.ws[s];
    const int64_t N = cw.w->rows();
    Out& o = p.m[s].o;
    o.M = M;
    o.N = static_cast<int>(N);
    o.K = static_cast<int>(K);
    o.m_tiles = static_cast<int>(ceil_div(M, TN));
    const int64_t tiles = o.m_tiles * ceil_div(N, kRows);
    const auto plan = split_k(tiles, ksteps, ctas_per_sm<TN>() * sms);
    o.steps = static_cast<int>(plan.steps);
    splits[s] = static_cast<int>(plan.splits);
    const auto scales = reinterpret_cast<uintptr_t>(cw.v.absmax);
    o.vec = cw.v.log2_bs == 6 && ksteps % kGroup == 0 &&
            (DQ ? cw.v.nested_log2 >= 2 && scales % 4 == 0 : scales % 16 == 0);
    if (splits[s] > 1) {
      offset[s] = partials;
      partials += splits[s] * M * N;
      sums.bias[sums.count] = cw.bias;
      sums.y[sums.count] = static_cast<T*>(cw.y->data_ptr());
      sums.n[sums.count] = o.N;
      sums.splits[sums.count] = splits[s];
      sums.mn[sums.count++] = M * N;
    } else {
      o.y = cw.y->data_ptr();
      o.bias = cw.bias;
    }
    p.m[s].w = cw.v;
    p.m[s].tiles = static_cast<int>(tiles);
    p.tm_w[s] = tensor_map(cw.w->packed.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, N, K / 2, kRows, kBK / 2,
                           CU_TENSOR_MAP_SWIZZLE_NONE);
    p.first[s] = static_cast<int>(ctas);
    ctas += tiles * splits[s];
    TORCH_CHECK(ctas < INT32_MAX, "nf4q: gemm_swap: too many tiles");
  }
  p.first[G] = static_cast<int>(ctas);
  at::Tensor partial;
  if (partials > 0) {
    partial = at::empty({partials}, c.x.options().dtype(at::kFloat));
    for (int s = 0, i = 0; s < count; ++s)
      if (splits[s] > 1) sums.partial[i++] = p.m[s].o.partial = partial.data_ptr<float>() + offset[s];
  }
  p.tm_t = p.tm_x;  // without LoRA the kernel never reads tm_t: x's map stands in
  if (c.t.defined()) {
    p.m[0].o.lora_b = c.lb.data_ptr();
    p.m[0].o.r = static_cast<int>(c.t.size(1));
    p.tm_t = tensor_map(c.t.data_ptr(), type, 2, M, p.m[0].o.r, TN, kBK, CU_TENSOR_MAP_SWIZZLE_128B);
  }
  constexpr int smem = smem_bytes<TN>();
  static const bool attr = [] {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(swap_gemm_kernel<T, TN, DQ, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)attr;
  const dim3 grid = G == 1 ? dim3(static_cast<unsigned>(p.m[0].tiles), splits[0]) : dim3(static_cast<unsigned>(ctas));
  const auto stream = at::cuda::getCurrentCUDAStream();
  swap_gemm_kernel<T, TN, DQ, G><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sums.count > 0) {
    const int threads = 256;
    int64_t most = 0;
    for (int s = 0; s < sums.count; ++s) most = std::max(most, sums.mn[s]);
    const dim3 blocks(static_cast<unsigned>(std::min<int64_t>(ceil_div(most, threads), 4 * sms)), sums.count);
    sum_splits_kernel<T><<<blocks, threads, 0, stream>>>(sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int TN>
void launch_dq(const Call<T>& c) {
  const bool dq = c.ws[0].v.nested_absmax != nullptr;
  if (c.ws.size() == 1) {
    dq ? launch<T, TN, true, 1>(c) : launch<T, TN, false, 1>(c);
  } else if constexpr (TN <= kGroupMaxTokens) {  // two weights take the three-weight form, with an empty third
    dq ? launch<T, TN, true, kMaxGroup>(c) : launch<T, TN, false, kMaxGroup>(c);
  } else {
    TORCH_CHECK(false, "nf4q: gemm_swap: no grouped kernel for ", TN, "-token tiles");
  }
}

// Tokens per tile for M tokens: the smallest tile that holds them, up to 128. Above that, 256-token tiles
// dequantize each step once for twice the tokens (ncu, 28672 x 8192, M = 512: tensor pipe 72% busy vs 61% with
// 128), but half as many tiles leave more of the last wave idle or split K more, so the tile with the lower
// estimated time wins (cost below). NF4Q_SWAP_TOKENS=16|32|64|128|256 forces one (tests, benchmarks).
int tokens_per_tile(int64_t M, int64_t N, int64_t K) {
  if (const char* s = std::getenv("NF4Q_SWAP_TOKENS")) {
    const int t = std::atoi(s);
    if (t == 16 || t == 32 || t == 64 || t == 128 || t == 256) return t;
  }
  if (M <= 128) return M <= 16 ? 16 : M <= 32 ? 32 : M <= 64 ? 64 : 128;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Estimated time in units of ~3 ns (bench on the H200): waves x steps per CTA x the cost of a step, 256 for a
  // 256-token tile, 164 for a 128-token one (1.28x its share: its time per token at equal waves), plus writing and
  // reading back the split partial sums (8 bytes per output per split, ~1 unit per 1024 of them) and the kernel
  // that adds them (~5 us).
  auto cost = [&](int64_t tn, int64_t per_step) {
    const int64_t tiles = ceil_div(M, tn) * ceil_div(N, kRows);
    const auto plan = split_k(tiles, K / kBK, sms);  // one CTA per SM for both
    const int64_t partials = plan.splits > 1 ? plan.splits * M * N / 1024 + 1600 : 0;
    return ceil_div(tiles * plan.splits, sms) * plan.steps * per_step + partials;
  };
  return cost(256, 256) < cost(128, 164) ? 256 : 128;
}

// The call in dtype T: one W4View per weight, the biases already in T.
template <typename T>
void dispatch(const at::Tensor& x, const std::vector<const W4*>& ws, const std::vector<at::Tensor>& biases,
              const std::vector<at::Tensor*>& ys, const at::Tensor& t, const at::Tensor& lb) {
  Call<T> c{x, {}, t, lb};
  for (size_t s = 0; s < ws.size(); ++s) {
    const T* bias = biases[s].defined() ? static_cast<const T*>(biases[s].data_ptr()) : nullptr;
    c.ws.push_back({ws[s], make_view(*ws[s], "gemm_4bit"), bias, ys[s]});
  }
  switch (tokens_per_tile(x.size(0), ws[0]->rows(), ws[0]->cols())) {
    case 16:
      return launch_dq<T, 16>(c);
    case 32:
      return launch_dq<T, 32>(c);
    case 64:
      return launch_dq<T, 64>(c);
    case 128:
      return launch_dq<T, 128>(c);
    default:
      return launch_dq<T, 256>(c);
  }
}

void dispatch(const at::Tensor& x, const std::vector<const W4*>& ws, const std::vector<at::Tensor>& biases,
              const std::vector<at::Tensor*>& ys, const at::Tensor& t = {}, const at::Tensor& lb = {}) {
  x.scalar_type() == at::kHalf ? dispatch<__half>(x, ws, biases, ys, t, lb)
                               : dispatch<__nv_bfloat16>(x, ws, biases, ys, t, lb);
}

}  // namespace

bool gemm_swap_eligible(const at::Tensor& x, const W4& w) {
  const auto dt = x.scalar_type();
  const int64_t M = x.size(0), N = w.rows(), K = w.cols();
  const bool pow2 = w.blocksize >= kBK && (w.blocksize & (w.blocksize - 1)) == 0;  // one scale per row per step
  const bool nested_pow2 = !w.double_quant() || (w.nested_blocksize & (w.nested_blocksize - 1)) == 0;
  return (dt == at::kBFloat16 || dt == at::kHalf) && x.dim() == 2 && M > 0 && N > 0 && K > 0 && K % kBK == 0 && pow2 &&
         nested_pow2 && N < (int64_t{1} << 31) && K < (int64_t{1} << 31) && M < (int64_t{1} << 31) &&
         aligned16(w.packed.data_ptr()) && device_has_wgmma(x);
}

bool gemm_swap(const at::Tensor& x_in, const W4& w, const c10::optional<at::Tensor>& bias, at::Tensor& y,
               const at::Tensor* lora_t, const at::Tensor* lora_b) {
  const auto dt = x_in.scalar_type();
  const int64_t M = x_in.size(0), N = w.rows();
  const bool lora_ok =
      lora_t == nullptr || (lora_t->scalar_type() == dt && lora_b->scalar_type() == dt && lora_t->dim() == 2 &&
                            lora_b->dim() == 2 && lora_t->size(0) == M && lora_b->size(0) == N &&
                            lora_t->size(1) == lora_b->size(1) && lora_t->size(1) % 8 == 0 && lora_t->size(1) > 0);
  if (!lora_ok || !gemm_swap_eligible(x_in, w)) return false;
  const auto x = contiguous_aligned16(x_in);
  at::Tensor b, t, lb;
  if (bias) b = bias->to(dt).contiguous();
  if (lora_t != nullptr) {
    t = contiguous_aligned16(*lora_t);
    lb = contiguous_aligned16(*lora_b);
  }
  dispatch(x, {&w}, {b}, {&y}, t, lb);
  return true;
}

bool gemm_swap_group(const at::Tensor& x_in, const std::vector<W4>& ws,
                     const std::vector<c10::optional<at::Tensor>>& biases, std::vector<at::Tensor>& ys) {
  const int64_t M = x_in.size(0), K = x_in.size(1);
  if (ws.size() < 2 || ws.size() > kMaxGroup || M > kGroupMaxTokens) return false;
  for (const auto& w : ws)
    if (!gemm_swap_eligible(x_in, w) || w.cols() != K || w.double_quant() != ws[0].double_quant()) return false;
  if (tokens_per_tile(M, ws[0].rows(), K) > kGroupMaxTokens) return false;  // NF4Q_SWAP_TOKENS forced a wide tile
  const auto x = contiguous_aligned16(x_in);
  const auto b = group_outputs(x, ws, biases, ys);
  std::vector<const W4*> wp;
  std::vector<at::Tensor*> yp;
  for (size_t s = 0; s < ws.size(); ++s) {
    wp.push_back(&ws[s]);
    yp.push_back(&ys[s]);
  }
  dispatch(x, wp, b, yp);
  return true;
}

}  // namespace nf4q::cuda
