// CUDA gemm_4bit and gemm_4bit_dx: dispatch between the mma.sync small-M kernels (gemv.cu: its decode kernel for M <=
// 3, and M <= 8 on small weights, wherever that kernel applies; its chunk kernel for M <= 8 where nothing else does),
// the swapped wgmma kernel for M <= 2048 (swap_gemm.cu, sm_90a), the x-as-A wgmma kernel (fused_gemm.cu: backward, and
// forward where the swapped one does not apply) and, above that or where none applies (odd shapes, fp32, other GPUs),
// cuBLAS on dequantized slabs of W (measurements in notes/cuda.md).
#include <torch/library.h>

#include "common.cuh"

namespace nf4q::cuda {
namespace {

// Largest M for the mma.sync kernels (NF4Q_CUDA_GEMM overrides). gemv.cu's decode kernel (block size 64, K % 256 == 0,
// Hopper's shared memory) takes M <= kDecodeAnyM and, on weights of at most kDecodeMaxNK elements, M <= 8. bench_linear
// on the H200 (notes/cuda.md round 10), its forced columns in one run, decode vs swapped kernel, us: M = 2 28672x8192
// 63.7 vs 67.9, 8192x28672 59.2 vs 66.2, 8192x8192 26.0 vs 27.8, 14336x4096 22.8 vs 26.0, 4096x14336 22.5 vs 25.9;
// M = 3 66.9 vs 67.9, 64.7 vs 66.2, 26.6 vs 27.8, 24.3 vs 26.4, 23.5 vs 26.0; M = 4 73.1 vs 68.1 and 69.8 vs 66.7 on
// the two largest (the x reads grow with M; L1 keeps ~30 KB beside the ring), 4096x4096 12.4 vs 15.4, 1024x8192
// 11.3 vs 13.4. Where the decode kernel does not apply, the swapped kernel takes M > 1, and M = 1 where W has at
// least kSwapDecodeMinN rows (mma chunk kernel vs swapped at M = 1: 28672x8192 80.0 vs 67.9, 4096x14336 24.1 vs
// 25.9, 4096x4096 13.5 vs 15.1).
constexpr int64_t kMmaMaxM = 8, kSwapDecodeMinN = 8192, kDecodeAnyM = 3, kDecodeMaxNK = int64_t{4096} * 4096;
// The x-as-A wgmma kernel: backward, and forward where the swapped one does not apply (block size 32), chosen
// automatically for M <= 256 when its 128 x 128 tiles half-fill the GPU or more;
// elsewhere dequantized slabs + cuBLAS won on the H200 (scratch measurements in notes/cuda.md: at M = 4096 the
// kernel reaches ~320 TFLOP/s against cuBLAS's ~700; with few tiles its one-CTA-per-tile K loop is too long).
constexpr int64_t kFusedMaxM = 256;
// The swapped wgmma kernel (W as the register operand) up to kSwapMaxM: with 256-token tiles it beat dequant +
// cuBLAS on every shape up to M = 1024 (28672x8192: 720 vs 896 us, 4096x4096: 54.8 vs 63.6), by 0-8% at 2048
// (ties on 4096x4096), and lost at 4096 (3098 vs 2942 us at 28672x8192; bench on the H200, notes/cuda.md).
constexpr int64_t kSwapMaxM = 2048;
// Dequantized W the cuBLAS path holds at a time: 32 MiB (a 28672 x 8192 bf16 W is 448 MiB), but at least 2048
// rows, since each slab re-reads the activations (forward) or re-writes dx (backward): 512-row slabs of the
// 8192 x 28672 weight made the forward 1.16x bf16 at M = 4096 (bench_linear on the H200).
// A slab is a power of two of rows/columns: cuBLAS ran uneven widths slowly (the 14336 x 4096 weight's backward in
// 1152-column slabs, the budget's multiple of 128, took 8-31% longer than in 1024-column ones at M = 2048-8192), and
// equal slabs of 3584 lost 5-21% against 4096 + 4096 + 4096 + 2048 (H200, notes/cuda.md, round 13).
constexpr int64_t kSlabBytes = 32 << 20, kSlabMinRows = 2048, kSlabMinCols = 1024;

at::Tensor gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "gemm_4bit");
  TORCH_CHECK_VALUE(x.is_cuda(), "nf4q: gemm_4bit: x must be a CUDA tensor");
  check_bias(bias, x, N, "gemm_4bit");
  c10::cuda::CUDAGuard guard(x.device());
  const auto y = gemm_2d(x.reshape({-1, K}), w, bias);
  return y.to(x.scalar_type()).view(with_last(x, N));
}

// Whether gemm_2d sends an [M, N x K] product to gemv.cu's decode kernel (if decode_unit_eligible).
bool takes_decode_kernel(GemmPath path, int64_t M, int64_t N, int64_t K) {
  return path == GemmPath::kAuto && M >= 1 && M <= kMmaMaxM && (M <= kDecodeAnyM || N * K <= kDecodeMaxNK);
}
// Whether gemm_2d tries the swapped kernel next (where the decode kernel did not take the product).
bool takes_swap_kernel(GemmPath path, int64_t M, int64_t N) {
  return path == GemmPath::kSwap || (path == GemmPath::kAuto && use_swap(M, N));
}

// One launch for the whole group where gemm_2d would send every weight alone to the decode kernel, or every weight to the
// swapped kernel (so the results are the same bits), else one gemm_4bit per weight.
std::vector<at::Tensor> gemm_4bit_group(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                        const OptList& nested_absmax, const OptT& nested_code,
                                        const OptList& nested_offset, const at::Tensor& code, int64_t blocksize,
                                        int64_t nested_blocksize, at::IntArrayRef out_features, const OptList& bias) {
  const auto ws = make_w4_group(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize,
                                nested_blocksize, out_features, bias);
  TORCH_CHECK_VALUE(x.is_cuda(), "nf4q: gemm_4bit_group: x must be a CUDA tensor");
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K;
  const auto path = forced_gemm_path();
  bool decode = ws.size() > 1, swap = ws.size() > 1;
  for (const auto& w : ws) {
    const bool takes_decode = takes_decode_kernel(path, M, w.rows(), K);
    decode = decode && takes_decode;
    swap = swap && !(takes_decode && decode_unit_eligible(w)) && takes_swap_kernel(path, M, w.rows());
  }
  if (decode || swap) {
    c10::cuda::CUDAGuard guard(x.device());
    std::vector<c10::optional<at::Tensor>> b(bias.begin(), bias.end());
    std::vector<at::Tensor> ys;
    const auto x2 = x.reshape({-1, K});
    if (decode ? gemm_mma_group(x2, ws, b, ys) : gemm_swap_group(x2, ws, b, ys)) {
      for (auto& y : ys) y = y.view(with_last(x, y.size(1)));
      return ys;
    }
  }
  return gemm_4bit_each(x, ws, bias);
}

at::Tensor gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS) {
  const auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "gemm_4bit_dx");
  TORCH_CHECK_VALUE(grad.is_cuda(), "nf4q: gemm_4bit_dx: grad must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto dt = compute_dtype(grad);
  const auto g2 = grad.reshape({-1, N}).to(dt);
  at::Tensor dx;
  if (g2.size(0) == 0 || N == 0 || K == 0) {
    dx = at::zeros({g2.size(0), K}, g2.options());
  } else {
    dx = at::empty({g2.size(0), K}, g2.options());
    const auto path = forced_gemm_path();
    const bool fused = (path == GemmPath::kFused || (path == GemmPath::kAuto && use_fused(g2.size(0), K))) &&
                       gemm_fused(g2, w, true, nullptr, nullptr, {}, dx);
    if (!fused) gemm_slabs(g2, w, true, dx, false);
  }
  return dx.to(grad.scalar_type()).view(with_last(grad, K));
}

}  // namespace

at::Tensor gemm_2d(const at::Tensor& x2, const W4& w, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x2.size(0), N = w.rows(), K = w.cols();
  const auto dt = compute_dtype(x2);
  if (M == 0 || N == 0 || K == 0) {
    auto y = at::zeros({M, N}, x2.options().dtype(dt));
    if (bias && M > 0) y.add_(bias->to(dt));
    return y;
  }
  const auto path = forced_gemm_path();
  if (takes_decode_kernel(path, M, N, K) && decode_unit_eligible(w)) {
    auto y = at::empty({M, N}, x2.options().dtype(dt));
    if (gemm_mma(x2, w, bias, y)) return y;
  }
  if (takes_swap_kernel(path, M, N)) {
    auto y = at::empty({M, N}, x2.options().dtype(dt));
    if (gemm_swap(x2, w, bias, y)) return y;
  }
  if (path == GemmPath::kMma || (path == GemmPath::kAuto && M <= kMmaMaxM)) {
    auto y = at::empty({M, N}, x2.options().dtype(dt));
    if (gemm_mma(x2, w, bias, y)) return y;
  }
  if (path == GemmPath::kFused || (path == GemmPath::kAuto && M > kMmaMaxM && use_fused(M, N))) {
    auto y = at::empty({M, N}, x2.options().dtype(dt));
    if (gemm_fused(x2, w, false, nullptr, nullptr, bias, y)) return y;
  }
  const auto xc = x2.to(dt);
  auto y = at::empty({M, N}, xc.options());
  if (bias) y.copy_(bias->to(dt).expand({M, N}));  // a fresh buffer: never write into the caller's bias
  gemm_slabs(xc, w, false, y, bias.has_value());
  return y;
}

bool use_swap(int64_t M, int64_t N) {
  return M >= 1 && M <= kSwapMaxM && (M > 1 || N >= kSwapDecodeMinN);
}

bool use_fused(int64_t M, int64_t out_cols) {
  const int64_t tiles = (M + 127) / 128 * (out_cols / 128);
  return M <= kFusedMaxM && 2 * tiles >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

void gemm_slabs(const at::Tensor& act, const W4& w, bool transposed, at::Tensor& out, bool accumulate) {
  const int64_t N = w.rows(), K = w.cols();
  const int64_t elt = out.element_size();
  // Slabs split the output columns, never the reduction: forward takes slabs of W's rows (columns n0.. of out =
  // act @ slab^T), backward slabs of W's columns (columns k0.. of out = act @ W[:, k0..]). Each output element is
  // then one cuBLAS reduction, accumulated in fp32 and rounded once, as on the fused paths (slabs of W's rows in
  // backward would round dx once per slab).
  const int64_t span = transposed ? K : N, depth = transposed ? N : K;
  // One slab when W is small. A column slab spans all N rows, so its floor is lower: 1024 columns of the
  // 8192 x 28672 weight are 56 MiB, and 8 such slabs re-read g about as many bytes as the row slabs re-wrote dx.
  const int64_t floor = transposed ? kSlabMinCols : kSlabMinRows;
  int64_t len = floor;  // the largest power of two within the budget, at least the floor (itself a power of two)
  while (2 * len * depth * elt <= kSlabBytes) len *= 2;
  auto slab = at::empty({std::min(len, span) * depth}, out.options());
  for (int64_t s0 = 0; s0 < span; s0 += len) {
    const int64_t n = std::min(len, span - s0);
    auto dst = out.narrow(1, s0, n);
    at::Tensor b;
    if (transposed) {
      auto wd = slab.narrow(0, 0, N * n).view({N, n});
      dequant4_rect(w, K, 0, N, s0, n, wd, n);
      b = wd;
    } else {
      auto wd = slab.narrow(0, 0, n * K).view({n, K});
      dequant4_rect(w, K, s0, n, 0, K, wd, K);
      b = wd.t();
    }
    if (accumulate)
      dst.addmm_(act, b);
    else
      at::mm_out(dst, act, b);
  }
}

TORCH_LIBRARY_IMPL(nf4q, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("gemm_4bit_dx", &gemm_4bit_dx);
  m.impl("gemm_4bit_group", &gemm_4bit_group);
}

}  // namespace nf4q::cuda
