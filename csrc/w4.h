// The quantized-weight argument group ("W4" in nf4q.cpp) as one checked struct, for every backend.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

namespace nf4q {

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

inline W4 make_w4(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                  const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& nested_offset,
                  const at::Tensor& code, int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef shape) {
  W4 w{packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
       shape.vec(), 1};
  for (auto s : shape) {
    TORCH_CHECK(s >= 0, "nf4q: shape must be non-negative, got ", shape);
    w.numel *= s;
  }
  TORCH_CHECK(packed.scalar_type() == at::kByte, "nf4q: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), "nf4q: packed must be contiguous");
  TORCH_CHECK(packed.numel() == (w.numel + 1) / 2, "nf4q: packed holds ", packed.numel(), " bytes but shape ",
              shape, " needs ", (w.numel + 1) / 2);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4q: blocksize must be a power of two in [32, 4096], got ", blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "nf4q: code must be a contiguous fp32 table of 16 values");
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == w.blocks(), "nf4q: absmax must be contiguous with ",
              w.blocks(), " values, got ", absmax.numel());
  const auto dev = packed.device();
  TORCH_CHECK(absmax.device() == dev && code.device() == dev, "nf4q: weight tensors must share one device");
  if (w.double_quant()) {
    TORCH_CHECK(nested_code.has_value() && nested_offset.has_value(),
                "nf4q: double quantization needs nested_code and nested_offset");
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "nf4q: double-quantized absmax must be uint8 codes");
    TORCH_CHECK(nested_blocksize > 0, "nf4q: nested_blocksize must be positive");
    const auto& a2 = *nested_absmax;
    TORCH_CHECK(a2.scalar_type() == at::kFloat && a2.is_contiguous() &&
                    a2.numel() == (w.blocks() + nested_blocksize - 1) / nested_blocksize,
                "nf4q: nested_absmax must be contiguous fp32 with one value per ", nested_blocksize, " blocks");
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256 &&
                    nested_code->is_contiguous(),
                "nf4q: nested_code must be a contiguous fp32 table of 256 values");
    TORCH_CHECK(nested_offset->scalar_type() == at::kFloat && nested_offset->numel() == 1,
                "nf4q: nested_offset must be one fp32 value");
    TORCH_CHECK(a2.device() == dev && nested_code->device() == dev && nested_offset->device() == dev,
                "nf4q: weight tensors must share one device");
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "nf4q: absmax must be fp32 without double quantization");
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
  TORCH_CHECK(w.shape.size() == 2, "nf4q: ", what, " needs a 2-D weight, got shape ", w.shape);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == inner, "nf4q: ", what, ": input's last dim must be ", inner,
              ", got ", x.sizes());
  TORCH_CHECK(x.device() == w.packed.device(), "nf4q: ", what, ": input and weight must be on one device");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "nf4q: ", what, ": input must be floating point");
}

}  // namespace nf4q
