// The nf4q extension module: every op schema lives here, in one TORCH_LIBRARY block.
// Backends (csrc/cpu/*.cpp, csrc/cuda/*.cu) register implementations with TORCH_LIBRARY_IMPL.
//
// A quantized weight travels through the ops as the same group of arguments ("W4" below):
//   packed (uint8, n/2 bytes, first element in the high nibble), absmax (fp32 per block, or uint8 codes
//   when double-quantized), nested_absmax (fp32 per 256 absmax values), nested_code (256-entry fp32 table),
//   nested_offset (fp32 [1]), code (16-entry NF4 table), blocksize, nested_blocksize, shape.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: importing nf4q._C runs the static registrations below; no pybind11 needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#define W4 \
  "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset, " \
  "Tensor code, int blocksize, int nested_blocksize, int[] shape"

TORCH_LIBRARY(nf4q, m) {
  // ---- quantization ------------------------------------------------------------------------------
  m.def("quantize_4bit(Tensor A, Tensor code, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_4bit(" W4 ", ScalarType dtype) -> Tensor");
  m.def("dequantize_4bit.out(" W4 ", ScalarType dtype, *, Tensor(a!) out) -> ()");  // returns nothing: torch.compile can functionalize it
  m.def("quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");

  // ---- fused dequant + matmul ----------------------------------------------------------------------
  // y[..., N] = x[..., K] @ dequant(W)^T + bias
  m.def("gemm_4bit(Tensor x, " W4 ", Tensor? bias) -> Tensor");
  // ys[i] = x @ dequant(W_i)^T + bias[i] for 1-3 weights of one K that read the same x (sibling projections: q, k
  // and v; gate and up), each with its own codes, scales and out_features, the code and nested_code tables shared.
  // For inference (no autograd formula). CUDA: one launch where gemm_4bit would run every weight alone on the same
  // kernel, the decode kernel (M <= 3 in practice) or the swapped one (M <= 64), bit for bit gemm_4bit's results;
  // else, and on CPU, one gemm_4bit per weight.
  m.def("gemm_4bit_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] nested_absmax, Tensor? nested_code, "
        "Tensor?[] nested_offset, Tensor code, int blocksize, int nested_blocksize, int[] out_features, "
        "Tensor?[] bias) -> Tensor[]");
  // dx[..., K] = grad[..., N] @ dequant(W)   (the input gradient of gemm_4bit)
  m.def("gemm_4bit_dx(Tensor grad, " W4 ") -> Tensor");

  // ---- fused dequant + LoRA ------------------------------------------------------------------------
  // y = x @ dequant(W)^T + bias + scale * (drop(x) @ lora_A^T) @ lora_B^T, where drop is LoRA dropout: each
  // element of x kept with probability 1 - dropout_p and scaled by 1 / (1 - dropout_p), the keep mask a pure
  // function of (seed, element index) (csrc/common/dropout.h), so backward regenerates it instead of saving it.
  // Its autograd (csrc/autograd.cpp) saves x, lora_A and lora_B only.
  m.def("lora_gemm_4bit(Tensor x, " W4 ", Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p=0.0, int seed=0) -> Tensor");
  // dx = grad @ dequant(W) + drop'(scale * (grad @ lora_B) @ lora_A)   (drop' = the same mask and scaling)
  m.def("lora_gemm_4bit_dx(Tensor grad, " W4 ", Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p=0.0, int seed=0) -> Tensor");
  // The whole backward of lora_gemm_4bit in one call: (dx, d lora_A, d lora_B), each computed only where
  // output_mask says (undefined otherwise). dA = scale (grad B)^T drop(x), dB = scale grad^T (drop(x) A^T).
  m.def("lora_gemm_4bit_backward(Tensor grad, Tensor x, " W4 ", Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, int seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // drop(x): x * keep / (1 - p) in x's dtype (computed in fp32, rounded once), the mask of lora_gemm_4bit.
  m.def("lora_dropout(Tensor x, float p, int seed) -> Tensor");

  // ---- optimizers (schemas added by the optimizer work) ---------------------------------------------
  // Fused multi-tensor AdamW (decoupled weight decay) over lists of one param dtype; updates in place.
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // 8-bit states: uint8 codes into code1 (signed map, m) / code2 (unsigned map, v) times an fp32 absmax
  // per block of 256 elements (absmax1 for m, absmax2 for v).
  m.def("adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor code1, Tensor code2, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // Paged states: zeroed CUDA managed memory, freed with its last tensor; host_home zeroes it on the host
  // and hints the host as its home (the page manager prefetches it), else it lives on the device.
  m.def("managed_zeros(int nbytes, Device device, bool host_home) -> Tensor");
  // Migrate managed tensors to a device (index >= 0) or to the host (-1), async on the current stream.
  m.def("prefetch(Tensor[] tensors, int device) -> ()");
  // [live managed bytes, live managed allocations] of this process.
  m.def("managed_stats() -> int[]");
}
