// Argument checks of every op, shared by the CPU and CUDA backends: one rule per thing (blocksize, dtype,
// lookup table, bias, sizes), so that both backends accept and reject the same inputs with the same message.
// Errors are TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: ValueError / TypeError in Python, as the README promises.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace nf4q {

// ---- sizes -------------------------------------------------------------------------------------------------

// Largest element count of a (virtual) weight shape: leaves room for the +1 / +blocksize of the size formulas.
constexpr int64_t kMaxNumel = int64_t{1} << 62;

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b.
inline int64_t ceil_div_checked(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Element count of a shape: every dim >= 0 and the product within kMaxNumel (no int64 overflow).
inline int64_t checked_numel(at::IntArrayRef shape, const char* name = "shape") {
  int64_t n = 1;
  bool zero = false;
  for (auto s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "nf4q: ", name, " must be non-negative, got ", shape);
    zero |= s == 0;
  }
  if (zero) return 0;
  for (auto s : shape) {
    TORCH_CHECK_VALUE(s <= kMaxNumel / n, "nf4q: ", name, " ", shape, " has more than 2^62 elements");
    n *= s;
  }
  return n;
}

// ---- blocksizes --------------------------------------------------------------------------------------------

// The one NF4 blocksize rule (Python's twin: nf4q.tensor._check_blocksize; tests hold them equal).
constexpr int64_t kMinBlocksize = 32, kMaxBlocksize = 4096;
inline bool valid_blocksize(int64_t bs) { return bs >= kMinBlocksize && bs <= kMaxBlocksize && (bs & (bs - 1)) == 0; }
inline void check_blocksize(int64_t bs) {
  TORCH_CHECK_VALUE(valid_blocksize(bs), "nf4q: blocksize must be a power of two in [32, 4096], got ", bs);
}

// Blocksizes of the 8-bit blockwise ops and nested_blocksize: any positive int32 (the CUDA kernels index
// blocks with 32-bit divisors).
inline void check_count_blocksize(int64_t bs, const char* name) {
  TORCH_CHECK_VALUE(bs > 0 && bs <= std::numeric_limits<int32_t>::max(), "nf4q: ", name,
                    " must be in [1, 2^31 - 1], got ", bs);
}

// ---- dtypes: the one table ---------------------------------------------------------------------------------

// What the kernels compute in natively (and the only parameter dtypes of the optimizer ops).
inline bool is_native_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
// What the quantize/dequantize/matmul ops take and return: float64 too (through fp32 on CUDA).
inline bool is_io_float(at::ScalarType t) { return is_native_float(t) || t == at::kDouble; }

inline void check_io_dtype(at::ScalarType t, const char* what, const char* name) {
  TORCH_CHECK_TYPE(is_io_float(t), "nf4q: ", what, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                   t);
}

// ---- lookup tables -----------------------------------------------------------------------------------------

// A table of n fp32 values: flat, contiguous, on `device`. Tables that encode (quantize, the optimizer) must
// also be finite and sorted (non-decreasing: the fp8 nested map repeats 0), which is checked on a host copy;
// `host_check` false skips that for device tables on hot paths that would otherwise synchronize every call.
inline void check_table(const at::Tensor& t, int64_t n, const char* what, const char* name, at::Device device,
                        bool sorted = false, bool host_check = true) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "nf4q: ", what, ": ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n && t.is_contiguous(), "nf4q: ", what, ": ", name,
                    " must be a flat contiguous table of ", n, " values, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, "nf4q: ", what, ": ", name, " must be on ", device, ", got ", t.device());
  if (!sorted || !(host_check || t.is_cpu())) return;
  const auto c = t.cpu();
  const float* p = c.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(std::isfinite(p[i]) && (i == 0 || p[i] >= p[i - 1]), "nf4q: ", what, ": ", name,
                      " must be finite and sorted ascending; entry ", i, " is ", p[i]);
}

// ---- per-op checks -----------------------------------------------------------------------------------------

// quantize_4bit (bits 4) and quantize_blockwise_8bit (bits 8): input, table, blocksize.
inline void check_quantize(const at::Tensor& A, const at::Tensor& code, int64_t blocksize, int bits) {
  const char* what = bits == 4 ? "quantize_4bit" : "quantize_blockwise_8bit";
  check_io_dtype(A.scalar_type(), what, "input");
  if (bits == 4) check_blocksize(blocksize); else check_count_blocksize(blocksize, "blocksize");
  check_table(code, bits == 4 ? 16 : 256, what, "code", A.device(), /*sorted=*/true);
}

// dequantize_blockwise_8bit: uint8 codes, one fp32 absmax per block, a 256-entry table, a float dtype.
inline void check_dequantize8(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, at::ScalarType dtype) {
  const char* what = "dequantize_blockwise_8bit";
  TORCH_CHECK_TYPE(q.scalar_type() == at::kByte, "nf4q: ", what, ": q must be uint8, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.is_contiguous(), "nf4q: ", what, ": q must be contiguous");
  check_count_blocksize(blocksize, "blocksize");
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "nf4q: ", what, ": absmax must be float32");
  const int64_t blocks = ceil_div_checked(q.numel(), blocksize);
  TORCH_CHECK_VALUE(absmax.is_contiguous() && absmax.numel() == blocks && absmax.device() == q.device(), "nf4q: ",
                    what, ": absmax must be contiguous with ", blocks, " values on ", q.device(), ", got ",
                    absmax.numel());
  check_table(code, 256, what, "code", q.device());
  check_io_dtype(dtype, what, "dtype");
}

// A matmul bias: 1-D, n values, floating point, on the input's device.
inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n, const char* what) {
  if (!bias) return;
  check_io_dtype(bias->scalar_type(), what, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "nf4q: ", what, ": bias must be 1-D with ", n,
                    " values, got shape ", bias->sizes());
  TORCH_CHECK_VALUE(bias->device() == x.device(), "nf4q: ", what, ": bias must be on ", x.device(), ", got ",
                    bias->device());
}

// The output of dequantize_4bit.out: contiguous, numel values of dtype on the weight's device.
inline void check_out(const at::Tensor& out, at::ScalarType dtype, int64_t numel, at::Device device) {
  check_io_dtype(dtype, "dequantize_4bit", "dtype");
  TORCH_CHECK_VALUE(out.scalar_type() == dtype && out.is_contiguous() && out.numel() == numel &&
                        out.device() == device,
                    "nf4q: dequantize_4bit: out must be a contiguous ", dtype, " tensor of ", numel,
                    " elements on ", device, ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
}

// ---- optimizer ops -----------------------------------------------------------------------------------------

inline void check_adamw_hparams(double lr, double beta1, double beta2, double eps, double weight_decay,
                                int64_t step) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "nf4q: adamw: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "nf4q: adamw: betas must be in [0, 1), got (",
                    beta1, ", ", beta2, ")");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "nf4q: adamw: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0,
                    "nf4q: adamw: weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, "nf4q: adamw: step must be >= 1 (the bias corrections divide by 1 - beta^step), got ",
                    step);
  const double step_size = lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
  TORCH_CHECK_VALUE(step_size <= std::numeric_limits<float>::max(), "nf4q: adamw: lr ", lr,
                    " is too large: the step size lr / (1 - beta1^step) = ", step_size, " overflows float32");
}

// The tensor lists of adamw_step (state_dtype float32) and adamw8bit_step (uint8, plus absmax lists of one fp32
// per 256-element block and two sorted 256-entry tables). Everything on params[0]'s device.
inline void check_adamw(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs,
                        at::ScalarType state_dtype, const at::TensorList* absmax1 = nullptr,
                        const at::TensorList* absmax2 = nullptr, const at::Tensor* code1 = nullptr,
                        const at::Tensor* code2 = nullptr) {
  const char* what = state_dtype == at::kByte ? "adamw8bit_step" : "adamw_step";
  TORCH_CHECK_VALUE(grads.size() == params.size() && ms.size() == params.size() && vs.size() == params.size(),
                    "nf4q: ", what, ": params, grads, exp_avgs and exp_avg_sqs must have the same length");
  if (params.empty()) return;
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK_TYPE(is_native_float(dtype), "nf4q: ", what, ": params must be float32, float16 or bfloat16, got ",
                   dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    TORCH_CHECK_TYPE(params[i].scalar_type() == dtype && grads[i].scalar_type() == dtype, "nf4q: ", what,
                     ": params and grads must share one dtype (", dtype, "), not at index ", i);
    TORCH_CHECK_TYPE(ms[i].scalar_type() == state_dtype && vs[i].scalar_type() == state_dtype, "nf4q: ", what,
                     ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be ", state_dtype);
    for (const auto* t : {&params[i], &grads[i], &ms[i], &vs[i]})
      TORCH_CHECK_VALUE(t->device() == device && t->is_contiguous() && t->numel() == n, "nf4q: ", what, ": params[",
                        i, "], grads, exp_avgs and exp_avg_sqs must be contiguous tensors of ", n, " elements on ",
                        device);
  }
  if (state_dtype != at::kByte) return;
  TORCH_CHECK_VALUE(absmax1->size() == params.size() && absmax2->size() == params.size(), "nf4q: ", what,
                    ": absmax1 and absmax2 must have one tensor per param");
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t blocks = ceil_div_checked(params[i].numel(), 256);
    for (const auto* a : {&(*absmax1)[i], &(*absmax2)[i]})
      TORCH_CHECK_VALUE(a->scalar_type() == at::kFloat && a->is_contiguous() && a->numel() == blocks &&
                            a->device() == device,
                        "nf4q: ", what, ": absmax1[", i, "]/absmax2[", i, "] must be contiguous float32 of ", blocks,
                        " values on ", device);
  }
  // On the GPU the tables are the optimizer's own constants: sortedness is checked on CPU tables only, so a
  // step never synchronizes.
  check_table(*code1, 256, what, "code1", device, /*sorted=*/true, /*host_check=*/false);
  check_table(*code2, 256, what, "code2", device, /*sorted=*/true, /*host_check=*/false);
}

// ---- LoRA ops ------------------------------------------------------------------------------------------------

// lora_A [r, K] and lora_B [N, r] of a weight [N, K]: floating point, on the input's device; dropout_p in [0, 1).
inline void check_lora(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& x,
                       double dropout_p, const char* what) {
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1) && A.size(1) == K && B.size(0) == N,
                    "nf4q: ", what, ": lora_A must be [r, ", K, "] and lora_B [", N, ", r] with one r, got ",
                    A.sizes(), " and ", B.sizes());
  TORCH_CHECK_TYPE(is_io_float(A.scalar_type()) && is_io_float(B.scalar_type()), "nf4q: ", what,
                   ": lora_A and lora_B must be floating point, got ", A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == x.device() && B.device() == x.device(), "nf4q: ", what,
                    ": lora_A and lora_B must be on the input's device ", x.device());
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "nf4q: ", what, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
}

}  // namespace nf4q
