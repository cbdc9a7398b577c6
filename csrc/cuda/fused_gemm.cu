// Fused NF4 GEMM on Hopper (wgmma): out = act @ op(dequant(W))^T (+ extra_act @ extra_w^T) (+ bias),
// with the bf16/fp16 W only ever in shared memory, one 64-wide tile at a time.
//
//   forward  (transposed = false): out[M, N] = x[M, K] @ W[N, K]^T        (+ [s xA^T] @ [lora_B]^T)
//   backward (transposed = true):  out[M, K] = g[M, N] @ W[N, K]          (+ [s gB]  @ [lora_A^T]^T)
//
// One CTA = two warpgroups = a 128 x 128 tile of out. Per 64-wide step of the reduction dimension:
//   TMA brings the activation tile (bf16, 128B-swizzled, K-major), the packed NF4 bytes and their fp32 absmax
//   (decoded and transposed to [K / blocksize, N] once per call) into a 6-stage ring, one mbarrier per stage;
//   the threads dequantize the packed tile into a 128 x 64 bf16 tile in the same swizzled K-major layout
//   (backward writes it transposed: W's rows are the reduction there), exactly code[q] * absmax rounded once,
//   as dequantize_4bit does;
//   each warpgroup issues four wgmma m64n128k16 on it, and the next tile is dequantized while they run.
// The LoRA term rides as extra reduction steps over [M, r] x [N_out, r] (r a multiple of 8, zero-filled to 64).
// Built only for sm_90a (wgmma); elsewhere gemm_fused() returns false and callers take another path.
#include <type_traits>

#include "hopper.cuh"

namespace nf4q::cuda {
namespace {

// Six stages (one CTA per SM) keep five 64-wide steps of TMA loads in flight; the version history is in
// notes/cuda.md.
constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 6, kThreads = 256, kGroupM = 16;
constexpr int kLutCopies = 16;  // lane l reads copy l % 16: a half-warp's 8-byte lookups hit 16 distinct bank pairs
constexpr int kTileBytes = 128 * 128;  // a 128-row x 64-element 16-bit tile (also the dequantized W tile)
constexpr int kRawBytes = 4096;        // packed NF4 bytes of one step: 128 x 32 (forward) or 64 x 64 (backward)
constexpr int kScaleBytes = 1024;      // fp32 absmax of one step: at most 256 values
constexpr int kSmemBytes = 1024 /*alignment slack*/ + kStages * (kTileBytes + kRawBytes + kScaleBytes) +
                           2 * kTileBytes + 256 * kLutCopies * 8 + kStages * 8 /*mbarriers*/;

struct Params {  // beside the tensor maps of act [M, R] (R = K forward, N backward), packed W and absmax
  const void* extra_act;  // [M, r] or null (r a multiple of 8)
  const void* extra_w;    // [n_out, r] or null
  const void* bias;       // [n_out] or null
  void* out;              // [M, n_out]
  const float* code;
  int64_t M;
  int R, n_out, log2bs, r, m_tiles, n_tiles;
};

#ifdef NF4Q_WGMMA
#define NF4Q_WGMMA_ASM(TYPE)                                                                                    \
  asm volatile(                                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE                                              \
      " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,"   \
      "%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52," \
      "%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"                            \
      : NF4Q_ACC8(0), NF4Q_ACC8(8), NF4Q_ACC8(16), NF4Q_ACC8(24), NF4Q_ACC8(32), NF4Q_ACC8(40), NF4Q_ACC8(48), \
        NF4Q_ACC8(56)                                                                                           \
      : "l"(da), "l"(db))

template <typename T> struct Wgmma;
template <> struct Wgmma<__nv_bfloat16> {
  __device__ static void run(float* d, uint64_t da, uint64_t db) { NF4Q_WGMMA_ASM("bf16"); }
};
template <> struct Wgmma<__half> {
  __device__ static void run(float* d, uint64_t da, uint64_t db) { NF4Q_WGMMA_ASM("f16"); }
};

// The four k16 steps of one 64-wide tile: A = this warpgroup's 64 rows of the activation tile, B = W's tile.
template <typename T>
__device__ __forceinline__ void mma_tile(float* d, uint32_t a_tile, uint32_t b_tile) {
  fence_acc<64>(d);
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
  for (int s = 0; s < 4; ++s) Wgmma<T>::run(d, desc_sw128(a_tile + 32 * s), desc_sw128(b_tile + 32 * s));
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  fence_acc<64>(d);
}
__device__ __forceinline__ void mma_wait(float* d) {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_acc<64>(d);
}
#endif

// 128 rows x 64 elements of a row-major 16-bit matrix [rows, cols] (row stride cols, a multiple of 8) into a
// swizzled tile; rows past `rows` and columns past `cols` are zero-filled (so a LoRA rank r needs no padding).
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t* src, int64_t cols, int64_t row0,
                                          int64_t rows, int64_t col0) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = threadIdx.x + kThreads * i, r = idx >> 3, c = idx & 7;
    const bool ok = row0 + r < rows && col0 + c * 8 < cols;
    const int64_t ld = cols;
    const uint16_t* p = ok ? src + (row0 + r) * ld + col0 + c * 8 : src;
    cp_async16(dst + swz(r, c), p, ok);
  }
}

// The tensor maps: act [M, R] bf16/fp16 boxes of 128 x 64 (128B swizzle); packed W as bytes [N, K/2], boxes of
// 128 rows x 32 bytes (forward) or 64 x 64 (backward); absmax^T [K/bs, N] fp32, boxes of nb x 128 (forward) or
// nb x 64 (backward) -- nb block columns per step.
template <typename T, bool kTrans>
__global__ void __launch_bounds__(kThreads, 1)
    fused_gemm_kernel(const Params p, const __grid_constant__ CUtensorMap tm_act,
                      const __grid_constant__ CUtensorMap tm_w, const __grid_constant__ CUtensorMap tm_sc) {
#ifdef NF4Q_WGMMA
  extern __shared__ uint8_t smem_raw[];
  // Offset from smem_raw (not a cast through an integer) so the compiler still knows these are shared-memory
  // pointers: through an integer cast every lookup and store here became a generic LD.E / ST.E.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* act_s = smem;                                    // kStages x 16 KB
  uint8_t* w_s = act_s + kStages * kTileBytes;              // 2 x 16 KB (dequantized W, double-buffered)
  uint8_t* raw_s = w_s + 2 * kTileBytes;                    // kStages x 4 KB
  float* sc_s = reinterpret_cast<float*>(raw_s + kStages * kRawBytes);  // kStages x 256 floats
  // byte -> (code[hi], code[lo]) in fp32, entry e of copy c at e * kLutCopies + c
  float2* lut_all = reinterpret_cast<float2*>(sc_s + kStages * kScaleBytes / 4);
  const uint32_t bars = smem_addr(lut_all + 256 * kLutCopies);  // kStages mbarriers, 8 bytes each

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  for (int i = tid; i < 256 * kLutCopies; i += kThreads) {
    const int e = i / kLutCopies;
    lut_all[i] = make_float2(__ldg(p.code + (e >> 4)), __ldg(p.code + (e & 15)));
  }
  const float2* lut = lut_all + (lane % kLutCopies);

  // Tile order: groups of kGroupM row tiles walk the column tiles together, so W and x tiles are reused in L2.
  const int per_group = kGroupM * p.n_tiles;
  const int group = blockIdx.x / per_group, first_m = group * kGroupM;
  const int gm = min(p.m_tiles - first_m, kGroupM);
  const int in_group = blockIdx.x % per_group;
  const int64_t m0 = int64_t{first_m + in_group % gm} * kBM;
  const int n0 = (in_group / gm) * kBN;

  // Scales per row of the raw tile: TK = 64 (forward) or 128 (backward) consecutive W elements of one row
  // share max(1, TK / blocksize) absmax values; in shared memory as [nb][rows of the raw tile].
  constexpr int kLogTK = kTrans ? 7 : 6, kRawRows = kTrans ? 64 : 128;
  const int lmin = min(p.log2bs, kLogTK), nb = (1 << kLogTK) >> lmin;
  const int KT = p.R / kBK;
  const uint32_t stage_bytes = kTileBytes + kRawBytes + nb * kRawRows * 4;

  auto load_stage = [&](int kt, int slot) {  // one thread
    const uint32_t bar = bars + 8 * slot;
    mbar_expect(bar, stage_bytes);
    tma_load(smem_addr(act_s + slot * kTileBytes), &tm_act, kt * kBK, static_cast<int>(m0), bar);
    if constexpr (kTrans) {  // W rows kt*64.. (the reduction), output columns n0..: bytes n0/2..
      tma_load(smem_addr(raw_s + slot * kRawBytes), &tm_w, n0 / 2, kt * kBK, bar);
      tma_load(smem_addr(sc_s + slot * (kScaleBytes / 4)), &tm_sc, kt * kBK, n0 >> p.log2bs, bar);
    } else {  // W rows n0.. (the output), K columns kt*64..: bytes kt*32..
      tma_load(smem_addr(raw_s + slot * kRawBytes), &tm_w, kt * kBK / 2, n0, bar);
      tma_load(smem_addr(sc_s + slot * (kScaleBytes / 4)), &tm_sc, n0, (kt * kBK) >> p.log2bs, bar);
    }
  };

  auto dequant = [&](int slot, int wslot) {
    const uint8_t* raw = raw_s + slot * kRawBytes;
    const float* sc = sc_s + slot * (kScaleBytes / 4);
    uint8_t* dst = w_s + wslot * kTileBytes;
    if constexpr (!kTrans) {
      // thread: W row n = tid/2, elements 32h..32h+31 of the 64 (h = tid%2), one absmax
      const int n = tid >> 1, h = tid & 1;
      const uint4 q = *reinterpret_cast<const uint4*>(raw + n * 32 + h * 16);
      const float s = sc[((h * 32) >> lmin) * kRawRows + n];
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t pk[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float2 c = lut[((words[i] >> (8 * b)) & 0xff) * kLutCopies];  // first element: high nibble
          pk[b] = Cvt<T>::pack(__fmul_rn(c.x, s), __fmul_rn(c.y, s));
        }
        *reinterpret_cast<uint4*>(dst + swz(n, 4 * h + i)) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
      }
    } else {
      // thread: 8 reduction rows (chunk c: W rows 8c..8c+7) x one packed byte column b (outputs 2b, 2b+1), twice;
      // lanes are laid out so that each quarter-warp's 16-byte stores land in 8 distinct bank groups
      const int c = ((lane >> 2) & 1) | ((warp & 3) << 1);
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int b = (lane & 3) | ((lane >> 3) << 2) | ((warp >> 2) << 4) | (it << 5);
        float e0[8], e1[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const int row = 8 * c + r;
          const uint8_t q = raw[row * 64 + b];
          const float s = sc[((2 * b) >> lmin) * kRawRows + row];
          const float2 v = lut[q * kLutCopies];
          e0[r] = __fmul_rn(v.x, s);
          e1[r] = __fmul_rn(v.y, s);
        }
        *reinterpret_cast<uint4*>(dst + swz(2 * b, c)) =
            make_uint4(Cvt<T>::pack(e0[0], e0[1]), Cvt<T>::pack(e0[2], e0[3]), Cvt<T>::pack(e0[4], e0[5]),
                       Cvt<T>::pack(e0[6], e0[7]));
        *reinterpret_cast<uint4*>(dst + swz(2 * b + 1, c)) =
            make_uint4(Cvt<T>::pack(e1[0], e1[1]), Cvt<T>::pack(e1[2], e1[3]), Cvt<T>::pack(e1[4], e1[5]),
                       Cvt<T>::pack(e1[6], e1[7]));
      }
    }
  };

  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  const uint32_t a_off = wg * 64 * 128;  // this warpgroup's 64 rows of the activation tile

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(bars + 8 * s);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();  // barriers and the lookup table
  if (tid == 0)
    for (int s = 0; s < kStages - 1 && s < KT; ++s) load_stage(s, s);
  mbar_wait(bars, 0);
  dequant(0, 0);
  fence_to_async();
  __syncthreads();

  for (int kt = 0; kt < KT; ++kt) {
    const int slot = kt % kStages;
    mma_tile<T>(d, smem_addr(act_s + slot * kTileBytes) + a_off, smem_addr(w_s + (kt & 1) * kTileBytes));
    const int pre = kt + kStages - 1;  // refill the slot tile kt-1 used (everyone finished it last iteration)
    if (tid == 0 && pre < KT) load_stage(pre, pre % kStages);
    if (kt + 1 < KT) {
      const int next = (kt + 1) % kStages;
      mbar_wait(bars + 8 * next, ((kt + 1) / kStages) & 1);
      dequant(next, (kt + 1) & 1);  // overlaps the wgmma in flight
      fence_to_async();
    }
    mma_wait(d);
    __syncthreads();
  }

  // The LoRA term: extra 64-wide reduction steps over [M, r] x [n_out, r], the dense tile straight into w_s.
  for (int e = 0; p.extra_act != nullptr && e * kBK < p.r; ++e) {
    load_tile(smem_addr(act_s), static_cast<const uint16_t*>(p.extra_act), p.r, m0, p.M, int64_t{e} * kBK);
    load_tile(smem_addr(w_s), static_cast<const uint16_t*>(p.extra_w), p.r, n0, p.n_out, int64_t{e} * kBK);
    cp_async_commit();
    cp_async_wait<0>();
    fence_to_async();
    __syncthreads();
    mma_tile<T>(d, smem_addr(act_s) + a_off, smem_addr(w_s));
    mma_wait(d);
    __syncthreads();
  }

  // Epilogue: accumulator j of thread (warp w of the group, lane = 4g + t) is row 16w + g (+8 for j%4 >= 2),
  // column 8(j/4) + 2t (+1 for odd j).
  const int g = lane >> 2, t = lane & 3;
  const int64_t row = m0 + wg * 64 + (warp & 3) * 16 + g;
  T* out = static_cast<T*>(p.out);
  const uint32_t* bias2 = static_cast<const uint32_t*>(p.bias);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int col = n0 + 8 * j + 2 * t;
    const float2 bv = bias2 != nullptr ? Cvt<T>::unpack(__ldg(bias2 + col / 2)) : make_float2(0.f, 0.f);
    if (row < p.M)
      *reinterpret_cast<uint32_t*>(out + row * p.n_out + col) = Cvt<T>::pack(d[4 * j] + bv.x, d[4 * j + 1] + bv.y);
    if (row + 8 < p.M)
      *reinterpret_cast<uint32_t*>(out + (row + 8) * p.n_out + col) =
          Cvt<T>::pack(d[4 * j + 2] + bv.x, d[4 * j + 3] + bv.y);
  }
#endif
}

// fp32 absmax of every block (the double-quantized codes decoded the way dequantize_4bit decodes them).
__global__ void decode_absmax_kernel(W4View w, int64_t blocks, float* out) {
  const float offset = __ldg(w.nested_offset);
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < blocks; b += int64_t{gridDim.x} * blockDim.x)
    out[b] = block_absmax(w, w.nested_code, offset, static_cast<uint32_t>(b));
}


}  // namespace

bool gemm_fused_eligible(const at::Tensor& act, const W4& w, bool transposed) {
  const auto dt = act.scalar_type();
  const int64_t N = w.rows(), K = w.cols();
  const int64_t out_dim = transposed ? K : N, red = transposed ? N : K;
  // K % blocksize == 0: every row of W starts a block, so absmax reads as a [N, K / blocksize] matrix
  return (dt == at::kBFloat16 || dt == at::kHalf) && act.dim() == 2 && act.size(0) > 0 && w.blocksize >= 32 &&
         K % w.blocksize == 0 && out_dim % kBN == 0 && red % kBK == 0 && (!transposed || K % 128 == 0) && out_dim > 0 && red > 0 &&
         N < (int64_t{1} << 31) && K < (int64_t{1} << 31) && aligned16(w.packed.data_ptr()) &&
         device_has_wgmma(act);
}

bool gemm_fused(const at::Tensor& act_in, const W4& w, bool transposed, const at::Tensor* extra_act,
                const at::Tensor* extra_w, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  if (!gemm_fused_eligible(act_in, w, transposed)) return false;
  const auto dt = act_in.scalar_type();
  const auto act = contiguous_aligned16(act_in);
  const int64_t M = act.size(0), N = w.rows(), K = w.cols();
  const int64_t n_out = transposed ? K : N;
  at::Tensor scales = w.absmax;  // fp32 per block, flat [N * K / bs]
  if (w.double_quant()) {
    scales = at::empty({w.blocks()}, act.options().dtype(at::kFloat));
    const auto view = make_view(w, "gemm_fused");
    const int threads = 256;
    const int64_t grid = std::min<int64_t>((w.blocks() + threads - 1) / threads, 4096);
    decode_absmax_kernel<<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(view, w.blocks(),
                                                                                scales.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t kb = K / w.blocksize;
  const auto scales_t = scales.view({N, kb}).t().contiguous();  // [K / bs, N]: a step's values are contiguous
  at::Tensor bias_t;
  if (bias) {
    bias_t = bias->to(dt).contiguous();
    if ((reinterpret_cast<uintptr_t>(bias_t.data_ptr()) & 3) != 0) bias_t = bias_t.clone();  // read in pairs
  }
  Params p{};
  p.code = w.code.data_ptr<float>();
  p.bias = bias ? bias_t.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.M = M;
  p.R = static_cast<int>(transposed ? N : K);
  p.n_out = static_cast<int>(n_out);
  p.log2bs = 0;
  while ((int64_t{1} << p.log2bs) < w.blocksize) ++p.log2bs;
  if (extra_act != nullptr) {
    TORCH_CHECK(extra_act->is_contiguous() && extra_w->is_contiguous() && extra_act->size(1) % 8 == 0 &&
                    extra_w->size(1) == extra_act->size(1) && extra_w->size(0) == n_out &&
                    extra_act->size(0) == M && extra_act->scalar_type() == dt && extra_w->scalar_type() == dt &&
                    aligned16(extra_act->data_ptr()) && aligned16(extra_w->data_ptr()),
                "nf4q: gemm_fused: bad extra operands");
    p.extra_act = extra_act->data_ptr();
    p.extra_w = extra_w->data_ptr();
    p.r = static_cast<int>(extra_act->size(1));
  }
  p.m_tiles = static_cast<int>((M + kBM - 1) / kBM);
  p.n_tiles = static_cast<int>(n_out / kBN);
  TORCH_CHECK(int64_t{p.m_tiles} * p.n_tiles < INT32_MAX, "nf4q: gemm_fused: too many tiles");
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(dt, "gemm_fused", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      auto kernel = transposed ? fused_gemm_kernel<T, true> : fused_gemm_kernel<T, false>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      const auto type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
      const auto tm_act = tensor_map(act.data_ptr(), type, 2, M, p.R, kBM, kBK, CU_TENSOR_MAP_SWIZZLE_128B);
      const uint32_t raw_rows = transposed ? 64 : 128, log_tk = transposed ? 7 : 6;
      const auto tm_w = tensor_map(w.packed.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, N, K / 2, raw_rows,
                                   kRawBytes / raw_rows, CU_TENSOR_MAP_SWIZZLE_NONE);
      const uint32_t nb = uint32_t{1} << (log_tk - std::min<uint32_t>(p.log2bs, log_tk));
      const auto tm_sc = tensor_map(scales_t.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, kb, N, nb, raw_rows,
                                    CU_TENSOR_MAP_SWIZZLE_NONE);
      kernel<<<p.m_tiles * p.n_tiles, kThreads, kSmemBytes, stream>>>(p, tm_act, tm_w, tm_sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return true;
}

}  // namespace nf4q::cuda
