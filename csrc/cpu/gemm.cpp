// CPU matmuls with an NF4 weight. Few rows (decode): a fused loop that dequantizes one weight row at a
// time into a small buffer and dots it with every input row, so W is never materialised. More rows:
// dequantize W once to fp32 and let ATen's GEMM do the work, which beats any hand loop here.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/nf4.h"
#include "kernels.h"

namespace nf4q::cpu {
namespace {

constexpr int64_t kFusedMaxRows = 4;

// Dequantize elements [e0, e0 + len) of the flat weight into out (fp32), crossing blocks as needed.
void decode_range(const uint8_t* src, const float* am, const float* code, int64_t bs, int64_t e0, int64_t len,
                  float* out) {
  int64_t e = e0;
  const int64_t stop = e0 + len;
  while (e < stop) {
    const int64_t b = e / bs, end = std::min((b + 1) * bs, stop);
    const float a = am[b];
    for (; e < end; ++e) {
      const uint8_t byte = src[e >> 1];
      out[e - e0] = code[(e & 1) ? low_nibble(byte) : high_nibble(byte)] * a;
    }
  }
}

at::Tensor out_shape(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return at::empty(sizes, x.options());
}

at::Tensor gemm_4bit(const at::Tensor& x, NF4Q_W4_PARAMS, const c10::optional<at::Tensor>& bias) {
  auto w = make_w4(NF4Q_W4_ARGS);
  const int64_t N = w.rows(), K = w.cols();
  check_matmul(x, w, K, "gemm_4bit");
  check_bias(bias, x, N, "gemm_4bit");
  const auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y;
  if (M <= kFusedMaxRows && M > 0) {
    y = at::empty({M, N}, x2.options());
    const auto am_t = absmax_fp32(w);
    const float *am = am_t.data_ptr<float>(), *c = w.code.data_ptr<float>(), *xs = x2.data_ptr<float>();
    const uint8_t* src = w.packed.data_ptr<uint8_t>();
    float* ys = y.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> row(K);
      for (int64_t n = n0; n < n1; ++n) {
        decode_range(src, am, c, w.blocksize, n * K, K, row.data());
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = xs + m * K;
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += xr[k] * row[k];
          ys[m * N + n] = acc;
        }
      }
    });
    if (bias) y.add_(bias->to(at::kFloat));
  } else {
    auto wd = at::empty({N, K}, x2.options());
    dequantize_into(w, wd);
    y = bias ? at::linear(x2, wd, bias->to(at::kFloat)) : at::linear(x2, wd);
  }
  auto out = out_shape(x, N);
  out.copy_(y.view(out.sizes()));
  return out;
}

at::Tensor dequantized_fp32(const W4& w) {
  auto wd = at::empty(w.shape, w.packed.options().dtype(at::kFloat));
  dequantize_into(w, wd);
  return wd;
}

at::Tensor gemm_4bit_dx(const at::Tensor& grad, NF4Q_W4_PARAMS) {
  auto w = make_w4(NF4Q_W4_ARGS);
  check_matmul(grad, w, w.rows(), "gemm_4bit_dx");
  auto dx = at::matmul(grad.reshape({-1, w.rows()}).to(at::kFloat), dequantized_fp32(w));
  auto out = out_shape(grad, w.cols());
  out.copy_(dx.view(out.sizes()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("gemm_4bit_dx", &gemm_4bit_dx);
}

}  // namespace nf4q::cpu
