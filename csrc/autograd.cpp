// Autograd for the matmul ops, in C++: a layer call is one dispatcher call forward and one backward node, with no
// Python in between (the Python register_autograd version cost ~1 ms of host time per QLoRA layer step).
// Gradients flow to x, bias and the LoRA factors; the NF4 weight is frozen. Only x, lora_A and lora_B are saved
// through save_for_backward (so saved-tensor hooks see the activations and nothing else); the W4 tensors are frozen
// parameters, kept by reference in saved_data.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "op_handles.h"

namespace nf4q {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- typed handles of the ops called below autograd (gemm_op and gemm_dx_op: op_handles.h) -----------------
const auto& lora_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nf4q::lora_gemm_4bit", "")
          .typed<at::Tensor(const at::Tensor&, NF4Q_W4_TYPES, const OptT&, const at::Tensor&, const at::Tensor&,
                            double, double, int64_t)>();
  return op;
}
const auto& lora_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nf4q::lora_gemm_4bit_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, NF4Q_W4_TYPES, const at::Tensor&, const at::Tensor&, double,
              double, int64_t, std::array<bool, 3>)>();
  return op;
}

// ---- the W4 group in an autograd context ---------------------------------------------------------------------
void save_w4(AutogradContext* ctx, NF4Q_W4_PARAMS) {
  auto& d = ctx->saved_data;
  d["packed"] = packed;
  d["absmax"] = absmax;
  d["nested_absmax"] = nested_absmax;
  d["nested_code"] = nested_code;
  d["nested_offset"] = nested_offset;
  d["code"] = code;
  d["blocksize"] = blocksize;
  d["nested_blocksize"] = nested_blocksize;
  d["shape"] = shape.vec();
}

struct W4Saved {
  at::Tensor packed, absmax, code;
  OptT nested_absmax, nested_code, nested_offset;
  int64_t blocksize, nested_blocksize;
  std::vector<int64_t> shape;
};

W4Saved load_w4(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  auto opt = [&](const char* k) { return d[k].isNone() ? OptT() : OptT(d[k].toTensor()); };
  return {d["packed"].toTensor(), d["absmax"].toTensor(), d["code"].toTensor(), opt("nested_absmax"),
          opt("nested_code"), opt("nested_offset"), d["blocksize"].toInt(), d["nested_blocksize"].toInt(),
          d["shape"].toIntVector()};
}
#define NF4Q_W4_SAVED(s) \
  s.packed, s.absmax, s.nested_absmax, s.nested_code, s.nested_offset, s.code, s.blocksize, s.nested_blocksize, s.shape

// Edge index of each differentiable input: autograd numbers only the tensors that are present, so an absent
// optional shifts the ones after it. Returns the next free index after the W4 group.
int64_t w4_edges(const OptT& nested_absmax, const OptT& nested_code, const OptT& nested_offset) {
  return 1 + 2 + nested_absmax.has_value() + nested_code.has_value() + nested_offset.has_value() + 1;
}

bool needs(AutogradContext* ctx, const char* key) {
  const int64_t e = ctx->saved_data[key].toInt();
  return e >= 0 && ctx->needs_input_grad(static_cast<size_t>(e));
}

// The bias gradient in the bias's dtype (stored in saved_data as an int: the bias itself is not needed).
at::Tensor bias_grad(AutogradContext* ctx, const at::Tensor& grad) {
  const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
  return grad.reshape({-1, grad.size(-1)}).sum(0).to(dtype);
}

// ---- gemm_4bit ------------------------------------------------------------------------------------------------
struct Gemm4bit : public torch::autograd::Function<Gemm4bit> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, NF4Q_W4_PARAMS, const OptT& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_w4(ctx, NF4Q_W4_ARGS);
    const int64_t e = w4_edges(nested_absmax, nested_code, nested_offset);
    ctx->saved_data["e_x"] = int64_t{0};
    ctx->saved_data["e_bias"] = bias ? e : int64_t{-1};
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias ? bias->scalar_type() : x.scalar_type());
    return gemm_op().call(x, NF4Q_W4_ARGS, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto w = load_w4(ctx);
    const auto& g = grads[0];
    variable_list out(11);
    if (needs(ctx, "e_x")) out[0] = gemm_dx_op().call(g, NF4Q_W4_SAVED(w));
    if (needs(ctx, "e_bias")) out[10] = bias_grad(ctx, g);
    return out;
  }
};

at::Tensor gemm_4bit_autograd(const at::Tensor& x, NF4Q_W4_PARAMS, const OptT& bias) {
  return Gemm4bit::apply(x, NF4Q_W4_ARGS, bias);
}

// ---- lora_gemm_4bit -------------------------------------------------------------------------------------------
struct LoraGemm4bit : public torch::autograd::Function<LoraGemm4bit> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, NF4Q_W4_PARAMS, const OptT& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double dropout_p,
                            int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_w4(ctx, NF4Q_W4_ARGS);
    int64_t e = w4_edges(nested_absmax, nested_code, nested_offset);
    auto& d = ctx->saved_data;
    d["e_x"] = int64_t{0};
    d["e_bias"] = bias ? e++ : int64_t{-1};
    d["e_A"] = e++;
    d["e_B"] = e;
    d["bias_dtype"] = static_cast<int64_t>(bias ? bias->scalar_type() : x.scalar_type());
    d["scale"] = scale;
    d["dropout_p"] = dropout_p;
    d["seed"] = seed;
    ctx->save_for_backward({x, lora_A, lora_B});
    return lora_op().call(x, NF4Q_W4_ARGS, bias, lora_A, lora_B, scale, dropout_p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto w = load_w4(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto& g = grads[0];
    auto& d = ctx->saved_data;
    const std::array<bool, 3> mask{needs(ctx, "e_x"), needs(ctx, "e_A"), needs(ctx, "e_B")};
    variable_list out(16);
    if (mask[0] || mask[1] || mask[2]) {
      auto [dx, dA, dB] = lora_backward_op().call(g, saved[0], NF4Q_W4_SAVED(w), saved[1], saved[2],
                                                  d["scale"].toDouble(), d["dropout_p"].toDouble(), d["seed"].toInt(),
                                                  mask);
      if (mask[0]) out[0] = dx;
      if (mask[1]) out[11] = dA;
      if (mask[2]) out[12] = dB;
    }
    if (needs(ctx, "e_bias")) out[10] = bias_grad(ctx, g);
    return out;
  }
};

at::Tensor lora_gemm_4bit_autograd(const at::Tensor& x, NF4Q_W4_PARAMS, const OptT& bias, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, double scale, double dropout_p, int64_t seed) {
  return LoraGemm4bit::apply(x, NF4Q_W4_ARGS, bias, lora_A, lora_B, scale, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, Autograd, m) {
  m.impl("gemm_4bit", &gemm_4bit_autograd);
  m.impl("lora_gemm_4bit", &lora_gemm_4bit_autograd);
}

}  // namespace nf4q
