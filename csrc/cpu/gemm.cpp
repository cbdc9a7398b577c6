// CPU matmuls with an NF4 weight. Few rows: the fused kernels of nf4_simd*.cpp decode the weight in SIMD
// registers and multiply it there, so W is never written out. More rows: one panel of W at a time (about 1 MB
// of fp32, inside L2) is decoded and handed to ATen's GEMM, parallel over panels so that every thread runs a
// single-threaded GEMM on what it just decoded. NF4Q_CPU_GEMM=fused|panel forces a path (tests, benchmarks).
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../common/nf4.h"
#include "kernels.h"
#include "nf4_simd_view.h"

namespace nf4q::cpu {
namespace {

// Largest M of the fused kernels: about where they stop beating panel + GEMM on 4096x4096 (bench_linear
// --device cpu, 2-core Zen 4; AVX2 forced on the same machine). The scalar kernel loses to BLAS early.
int64_t fused_max_rows(simd::Isa isa) {
  return isa == simd::Isa::kAvx512 ? 96 : isa == simd::Isa::kAvx2 ? 8 : 2;
}

bool use_fused(const simd::Nf4View& v, int64_t M, simd::Isa isa) {
  if (!simd::fused_ok(v)) return false;
  const char* path = std::getenv("NF4Q_CPU_GEMM");
  if (path && !std::strcmp(path, "fused")) return true;
  if (path && !std::strcmp(path, "panel")) return false;
  return M <= fused_max_rows(isa);
}

// Panel length along a dimension of n values: about 2^18 fp32 values (1 MB) per panel, a multiple of align, and
// a panel count that is a multiple of the thread count, so that no thread waits on another's extra panel.
int64_t panel_len(int64_t n, int64_t other, int64_t align) {
  const int64_t target = std::max<int64_t>(align, (int64_t{1} << 18) / std::max<int64_t>(other, 1));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t panels = threads * ceil_div(n, threads * target);
  return std::max<int64_t>(align, ceil_div(ceil_div(n, panels), align) * align);
}

// A weight of at most this many values (8 MB as fp32) is decoded whole and multiplied by one multi-threaded
// ATen GEMM: at the demo's MiniLM shapes (384 x 1536, M = 1024) that beats per-thread panels by 10-20%.
constexpr int64_t kWholeDecode = int64_t{1} << 21;

at::Tensor dequantized_fp32(const W4& w) {
  auto wd = at::empty({w.rows(), w.cols()}, w.packed.options().dtype(at::kFloat));
  dequantize_into(w, wd);
  return wd;
}

at::Tensor out_shape(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return at::empty(sizes, x.options());
}

// x as fp32 [M, inner]; M = product of the leading dims (reshape(-1, 0) would be ambiguous).
at::Tensor rows_fp32(const at::Tensor& x, int64_t inner) {
  const int64_t M = inner ? x.numel() / inner : c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  return x.reshape({M, inner}).to(at::kFloat).contiguous();
}

void fused_gemm(const simd::Nf4View& v, simd::Isa isa, const at::Tensor& x2, at::Tensor& y) {
  const int64_t M = x2.size(0), N = v.N, K = v.K;
  auto xs = at::empty({M, K}, x2.options());
  simd::split_x(x2.data_ptr<float>(), M, K, xs.data_ptr<float>());
  const float* xp = xs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Whole groups of 4 rows per thread (the kernels' tile); at least ~2^16 multiply-adds per task.
  const int64_t groups = ceil_div(N, 4), grain = std::max<int64_t>(1, (int64_t{1} << 16) / (4 * K * M));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    simd::gemv(isa, v, xp, M, yp, N, g0 * 4, std::min(N, g1 * 4));
  });
}

void panel_gemm(const simd::Nf4View& v, simd::Isa isa, const at::Tensor& x2, at::Tensor& y) {
  const int64_t N = v.N, K = v.K, rows = panel_len(N, K, 16);
  at::parallel_for(0, ceil_div(N, rows), 1, [&](int64_t p0, int64_t p1) {
    auto panel = at::empty({rows, K}, x2.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, n = std::min(N - n0, rows);
      simd::decode_panel(isa, v, n0, n0 + n, 0, K, panel.data_ptr<float>(), K);
      y.narrow(1, n0, n).copy_(at::mm(x2, panel.narrow(0, 0, n).t()));
    }
  });
}

at::Tensor gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias) {
  auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "gemm_4bit");
  check_bias(bias, x, N, "gemm_4bit");
  const auto x2 = rows_fp32(x, K);
  const int64_t M = x2.size(0);
  auto y = at::empty({M, N}, x2.options());
  if (K == 0) {
    y.zero_();
  } else if (M > 0 && N > 0) {
    const auto v = nf4_view(w);
    const auto isa = simd::active_isa();
    if (use_fused(v, M, isa)) fused_gemm(v, isa, x2, y);
    else if (N * K <= kWholeDecode) at::mm_out(y, x2, dequantized_fp32(w).t());
    else panel_gemm(v, isa, x2, y);
  }
  if (bias) y.add_(bias->to(at::kFloat));
  auto out = out_shape(x, N);
  if (x.scalar_type() == at::kFloat) return y.view(out.sizes());  // already the answer: no copy
  out.copy_(y.view(out.sizes()));
  return out;
}

at::Tensor gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS) {
  auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(grad, w, N, "gemm_4bit_dx");
  const auto g2 = rows_fp32(grad, N);
  const int64_t M = g2.size(0);
  auto dx = at::empty({M, K}, g2.options());
  if (N == 0) {
    dx.zero_();
  } else if (M > 0 && K > 0) {
    const auto v = nf4_view(w);
    const auto isa = simd::active_isa();
    const float* gp = g2.data_ptr<float>();
    if (use_fused(v, M, isa)) {
      // 32-column chunks: each reads its 16 bytes of every weight row.
      float* dp = dx.data_ptr<float>();
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (32 * N * M));
      at::parallel_for(0, K / 32, grain, [&](int64_t c0, int64_t c1) {
        simd::gemv_t(isa, v, gp, N, M, dp, K, c0 * 32, c1 * 32);
      });
    } else if (N * K <= kWholeDecode) {
      at::mm_out(dx, g2, dequantized_fp32(w));
    } else {
      // Column panels W[:, k0:k1], so that the panels' products are independent.
      const int64_t cols = panel_len(K, N, 32);
      at::parallel_for(0, ceil_div(K, cols), 1, [&](int64_t p0, int64_t p1) {
        auto buf = at::empty({N * cols}, g2.options());
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t k0 = p * cols, kc = std::min(K - k0, cols);
          simd::decode_panel(isa, v, 0, N, k0, k0 + kc, buf.data_ptr<float>(), kc);
          dx.narrow(1, k0, kc).copy_(at::mm(g2, buf.narrow(0, 0, N * kc).view({N, kc})));
        }
      });
    }
  }
  auto out = out_shape(grad, K);
  if (grad.scalar_type() == at::kFloat) return dx.view(out.sizes());
  out.copy_(dx.view(out.sizes()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("gemm_4bit_dx", &gemm_4bit_dx);
}

}  // namespace nf4q::cpu
