// The bridge from the checked W4 tensors to the raw-pointer view the SIMD kernels read.
#pragma once
#include "../w4.h"
#include "nf4_simd.h"

namespace nf4q::cpu {

// Valid while w's tensors live. A 1-D weight is seen as one row.
inline simd::Nf4View nf4_view(const W4& w) {
  simd::Nf4View v{};
  v.packed = w.packed.data_ptr<uint8_t>();
  v.code = w.code.data_ptr<float>();
  v.blocksize = w.blocksize;
  v.N = w.shape.size() == 2 ? w.shape[0] : 1;
  v.K = w.shape.size() == 2 ? w.shape[1] : w.numel;
  if (w.double_quant()) {
    v.absmax_q = w.absmax.data_ptr<uint8_t>();
    v.nested_absmax = w.nested_absmax->data_ptr<float>();
    v.nested_code = w.nested_code->data_ptr<float>();
    v.offset = w.nested_offset->item<float>();
    v.nested_blocksize = w.nested_blocksize;
  } else {
    v.absmax = w.absmax.data_ptr<float>();
    v.nested_blocksize = 1;
  }
  simd::finish_view(v);
  return v;
}

}  // namespace nf4q::cpu
