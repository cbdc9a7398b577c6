// CPU kernels shared between the files of csrc/cpu.
#pragma once
#include "../w4.h"

namespace nf4q::cpu {

// fp32 absmax per block, decoding double quantization when present.
at::Tensor absmax_fp32(const W4& w);

// Dequantize W into out (contiguous, numel == w.numel, any float dtype).
void dequantize_into(const W4& w, at::Tensor& out);

}  // namespace nf4q::cpu
