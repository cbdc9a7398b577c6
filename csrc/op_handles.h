// Typed dispatcher handles of the ops that other ops and autograd call (every backend, through the dispatcher),
// one definition each.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include "w4.h"

namespace nf4q {

// The C++ types of the W4 argument group, for .typed<...>() signatures.
#define NF4Q_W4_TYPES                                                                                       \
  const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const OptT&, const at::Tensor&, int64_t, \
      int64_t, c10::IntArrayRef

inline const auto& gemm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nf4q::gemm_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, NF4Q_W4_TYPES, const OptT&)>();
  return op;
}
inline const auto& gemm_dx_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nf4q::gemm_4bit_dx", "")
                             .typed<at::Tensor(const at::Tensor&, NF4Q_W4_TYPES)>();
  return op;
}

}  // namespace nf4q
