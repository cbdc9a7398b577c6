// The quantized-weight argument group ("W4" in nf4q.cpp) as one checked struct, for every backend.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

#include <vector>

#include "checks.h"

namespace nf4q {

using OptT = c10::optional<at::Tensor>;
using OptList = c10::List<c10::optional<at::Tensor>>;  // a Tensor?[] argument

struct W4 {
  at::Tensor packed, absmax, code;
  c10::optional<at::Tensor> nested_absmax, nested_code, nested_offset;
  int64_t blocksize, nested_blocksize;
  std::vector<int64_t> shape;
  int64_t numel;

  bool double_quant() const { return nested_absmax.has_value(); }
  int64_t blocks() const { return (numel + blocksize - 1) / blocksize; }
  int64_t rows() const { return shape.size() == 2 ? shape[0] : -1; }
  int64_t cols() const { return shape.size() == 2 ? shape[1] : -1; }
};

// Every check of the W4 argument group, for every backend (the rules themselves live in checks.h).
inline W4 make_w4(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                  const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& nested_offset,
                  const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef shape) {
  W4 w{packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
       shape.vec(), checked_numel(shape)};
  const auto dev = packed.device();
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "nf4q: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.is_contiguous(), "nf4q: packed must be contiguous");
  TORCH_CHECK_VALUE(packed.numel() == (w.numel + 1) / 2, "nf4q: packed holds ", packed.numel(), " bytes but shape ",
                    shape, " needs ", (w.numel + 1) / 2);
  check_blocksize(blocksize);
  check_table(code, 16, "weight", "code", dev);
  TORCH_CHECK_VALUE(absmax.device() == dev, "nf4q: weight tensors must share one device (absmax is on ",
                    absmax.device(), ", packed on ", dev, ")");
  TORCH_CHECK_VALUE(absmax.is_contiguous() && absmax.numel() == w.blocks(), "nf4q: absmax must be contiguous with ",
                    w.blocks(), " values, got ", absmax.numel());
  if (w.double_quant()) {
    TORCH_CHECK_VALUE(nested_code.has_value() && nested_offset.has_value(),
                      "nf4q: double quantization needs nested_code and nested_offset");
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, "nf4q: double-quantized absmax must be uint8 codes, got ",
                     absmax.scalar_type());
    check_count_blocksize(nested_blocksize, "nested_blocksize");
    const auto& a2 = *nested_absmax;
    const int64_t groups = ceil_div_checked(w.blocks(), nested_blocksize);
    TORCH_CHECK_TYPE(a2.scalar_type() == at::kFloat, "nf4q: nested_absmax must be float32, got ", a2.scalar_type());
    TORCH_CHECK_VALUE(a2.is_contiguous() && a2.numel() == groups && a2.device() == dev,
                      "nf4q: nested_absmax must be contiguous with ", groups, " values (one per ", nested_blocksize,
                      " blocks) on ", dev, ", got ", a2.numel(), " on ", a2.device());
    check_table(*nested_code, 256, "weight", "nested_code", dev);
    TORCH_CHECK_TYPE(nested_offset->scalar_type() == at::kFloat, "nf4q: nested_offset must be float32");
    TORCH_CHECK_VALUE(nested_offset->numel() == 1 && nested_offset->device() == dev,
                      "nf4q: nested_offset must be one value on ", dev);
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "nf4q: absmax must be float32 without double quantization, got ",
                     absmax.scalar_type());
  }
  return w;
}

#define NF4Q_W4_PARAMS                                                                                       \
  const at::Tensor &packed, const at::Tensor &absmax, const c10::optional<at::Tensor>&nested_absmax,         \
      const c10::optional<at::Tensor>&nested_code, const c10::optional<at::Tensor>&nested_offset,            \
      const at::Tensor &code, int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef shape
#define NF4Q_W4_ARGS \
  packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape

// Checks common to the matmul ops: W is 2-D [N, K] and x's last dim is K (or N for the transposed product).
inline void check_matmul(const at::Tensor& x, const W4& w, int64_t inner, const char* what) {
  TORCH_CHECK_VALUE(w.shape.size() == 2, "nf4q: ", what, " needs a 2-D weight, got shape ", w.shape);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == inner, "nf4q: ", what, ": input's last dim must be ", inner,
                    ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == w.packed.device(), "nf4q: ", what, ": input and weight must be on one device");
  check_io_dtype(x.scalar_type(), what, "input");
}

// gemm_4bit_group's arguments (csrc/gemm_group.cpp): one W4 per weight, each checked as gemm_4bit checks its own
// (its shape [out_features[i], x.size(-1)]; the shared code and nested_code belong to every weight), and the bias list.
std::vector<W4> make_w4_group(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                              const OptList& nested_absmax, const OptT& nested_code, const OptList& nested_offset,
                              const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize,
                              at::IntArrayRef out_features, const OptList& bias);
// gemm_4bit_group as one gemm_4bit call per weight (through the dispatcher: any backend).
std::vector<at::Tensor> gemm_4bit_each(const at::Tensor& x, const std::vector<W4>& ws, const OptList& bias);

}  // namespace nf4q
