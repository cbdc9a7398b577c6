// gemm_4bit_group on every backend: its arguments checked and split into one W4 per weight, and the product as one
// gemm_4bit call per weight (CPU; CUDA where no one-launch kernel takes the group, csrc/cuda/gemm.cu).
#include <torch/library.h>

#include "op_handles.h"

namespace nf4q {

std::vector<W4> make_w4_group(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                              const OptList& nested_absmax, const OptT& nested_code, const OptList& nested_offset,
                              const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize,
                              at::IntArrayRef out_features, const OptList& bias) {
  const size_t n = packed.size();
  TORCH_CHECK_VALUE(n >= 1, "nf4q: gemm_4bit_group needs at least one weight");
  TORCH_CHECK_VALUE(absmax.size() == n && nested_absmax.size() == n && nested_offset.size() == n &&
                        out_features.size() == n && bias.size() == n,
                    "nf4q: gemm_4bit_group: packed, absmax, nested_absmax, nested_offset, out_features and bias must "
                    "have one entry per weight (", n, ")");
  TORCH_CHECK_VALUE(x.dim() >= 1, "nf4q: gemm_4bit_group: x must have at least one dimension");
  std::vector<W4> ws;
  const int64_t K = x.size(-1);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(out_features[i] >= 0 && packed[i].numel() == (out_features[i] * K + 1) / 2,
                      "nf4q: gemm_4bit_group: weight ", i, " holds ", packed[i].numel(), " bytes, not the ",
                      (out_features[i] * K + 1) / 2, " of out_features[", i, "] = ", out_features[i],
                      " rows of x's last dim (", K, ")");
    const OptT a2 = nested_absmax.get(i), off = nested_offset.get(i);
    ws.push_back(make_w4(packed[i], absmax[i], a2, a2 ? nested_code : c10::nullopt, a2 ? off : c10::nullopt, code,
                         blocksize, nested_blocksize, {out_features[i], K}));
    check_matmul(x, ws.back(), K, "gemm_4bit_group");
    check_bias(bias.get(i), x, out_features[i], "gemm_4bit_group");
  }
  return ws;
}

std::vector<at::Tensor> gemm_4bit_each(const at::Tensor& x, const std::vector<W4>& ws, const OptList& bias) {
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto& w = ws[i];
    ys.push_back(gemm_op().call(x, w.packed, w.absmax, w.nested_absmax, w.nested_code, w.nested_offset, w.code,
                                w.blocksize, w.nested_blocksize, w.shape, bias.get(i)));
  }
  return ys;
}

namespace {

std::vector<at::Tensor> gemm_4bit_group_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                            const OptList& nested_absmax, const OptT& nested_code,
                                            const OptList& nested_offset, const at::Tensor& code, int64_t blocksize,
                                            int64_t nested_blocksize, at::IntArrayRef out_features,
                                            const OptList& bias) {
  const auto ws = make_w4_group(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize,
                                nested_blocksize, out_features, bias);
  return gemm_4bit_each(x, ws, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CPU, m) { m.impl("gemm_4bit_group", &gemm_4bit_group_cpu); }

}  // namespace nf4q
