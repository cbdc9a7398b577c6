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
  m.def("dequantize_4bit.out(" W4 ", ScalarType dtype, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");

  // ---- fused dequant + matmul ----------------------------------------------------------------------
  // y[..., N] = x[..., K] @ dequant(W)^T + bias
  m.def("gemm_4bit(Tensor x, " W4 ", Tensor? bias) -> Tensor");
  // dx[..., K] = grad[..., N] @ dequant(W)   (the input gradient of gemm_4bit)
  m.def("gemm_4bit_dx(Tensor grad, " W4 ") -> Tensor");

  // ---- fused dequant + LoRA ------------------------------------------------------------------------
  // y = x @ dequant(W)^T + bias + scale * (x @ lora_A^T) @ lora_B^T
  m.def("lora_gemm_4bit(Tensor x, " W4 ", Tensor? bias, Tensor lora_A, Tensor lora_B, float scale) -> Tensor");
  // dx = grad @ dequant(W) + scale * (grad @ lora_B) @ lora_A
  m.def("lora_gemm_4bit_dx(Tensor grad, " W4 ", Tensor lora_A, Tensor lora_B, float scale) -> Tensor");

  // ---- optimizers (schemas added by the optimizer work) ---------------------------------------------
}
