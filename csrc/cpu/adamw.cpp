// CPU AdamW kernels: 32-bit and 8-bit blockwise states, multi-tensor. The work is cut into units of
// kQBlock elements over all tensors at once (so many small tensors still spread over the threads); each
// unit is loaded into fp32 scratch arrays where the update loop is branch-free and vectorizes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../common/adamw.h"

namespace nf4q::cpu {
namespace {

using adamw::Hyper;
using adamw::kQBlock;

struct Slot {
  void* p;
  const void* g;
  void* m;
  void* v;
  float* am1;
  float* am2;
  int64_t n;
};

// Midpoint tree of a table (check_adamw has checked it: flat, contiguous, sorted, on the CPU).
std::vector<float> tree_of(const at::Tensor& c) {
  std::vector<float> tree(kCodes8, 0.f);
  for (int i = 1; i < kCodes8; ++i) tree[i] = adamw::tree_node(c.data_ptr<float>(), i);
  return tree;
}

// Runs fn(slot, unit index within the slot, element offset, length) over all units, in parallel.
template <typename F>
void for_each_unit(const std::vector<Slot>& slots, F fn) {
  std::vector<int64_t> start(slots.size() + 1, 0);  // first unit of each slot
  for (size_t t = 0; t < slots.size(); ++t) start[t + 1] = start[t] + ceil_div(slots[t].n, kQBlock);
  // ATen's grain (32768 elements): small steps stay on one thread, where a parallel region costs more.
  at::parallel_for(0, start.back(), 32768 / kQBlock, [&](int64_t u0, int64_t u1) {
    size_t t = std::upper_bound(start.begin(), start.end(), u0) - start.begin() - 1;
    for (int64_t u = u0; u < u1; ++u) {
      while (start[t + 1] <= u) ++t;
      const int64_t b = u - start[t], off = b * kQBlock;
      fn(slots[t], b, off, std::min<int64_t>(kQBlock, slots[t].n - off));
    }
  });
}

template <typename T>
void update_unit(T* p_, const T* g_, float* m, float* v, int64_t len, const Hyper& h) {
  float p[kQBlock], g[kQBlock];
  for (int64_t i = 0; i < len; ++i) p[i] = static_cast<float>(p_[i]);
  for (int64_t i = 0; i < len; ++i) g[i] = static_cast<float>(g_[i]);
  for (int64_t i = 0; i < len; ++i) adamw::update(p[i], g[i], m[i], v[i], h);
  for (int64_t i = 0; i < len; ++i) p_[i] = static_cast<T>(p[i]);
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_adamw_hparams(lr, beta1, beta2, eps, weight_decay, step);
  check_adamw(params, grads, ms, vs, at::kFloat);
  if (params.empty()) return;
  TORCH_CHECK_VALUE(params[0].device().is_cpu(), "nf4q: adamw_step: the CPU kernel got ", params[0].device());
  std::vector<Slot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    slots.push_back({params[i].data_ptr(), grads[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(), nullptr,
                     nullptr, params[i].numel()});
  }
  const Hyper h = adamw::make_hyper(lr, beta1, beta2, eps, weight_decay, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adamw_step_cpu", [&] {
    for_each_unit(slots, [&](const Slot& s, int64_t, int64_t off, int64_t len) {
      update_unit(static_cast<scalar_t*>(s.p) + off, static_cast<const scalar_t*>(s.g) + off,
                  static_cast<float*>(s.m) + off, static_cast<float*>(s.v) + off, len, h);
    });
  });
}

void adamw8bit_step(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs,
                    at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& code1, const at::Tensor& code2,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_adamw_hparams(lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;
  check_adamw(params, grads, ms, vs, at::kByte, &absmax1, &absmax2, &code1, &code2);
  TORCH_CHECK_VALUE(params[0].device().is_cpu(), "nf4q: adamw8bit_step: the CPU kernel got ", params[0].device());
  std::vector<Slot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    slots.push_back({params[i].data_ptr(), grads[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(),
                     absmax1[i].data_ptr<float>(), absmax2[i].data_ptr<float>(), params[i].numel()});
  }
  const auto tree1 = tree_of(code1), tree2 = tree_of(code2);
  const auto c1t = code1.contiguous(), c2t = code2.contiguous();
  const float *c1 = c1t.data_ptr<float>(), *c2 = c2t.data_ptr<float>();
  const Hyper h = adamw::make_hyper(lr, beta1, beta2, eps, weight_decay, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adamw8bit_step_cpu", [&] {
    for_each_unit(slots, [&](const Slot& s, int64_t b, int64_t off, int64_t len) {
      uint8_t* qm = static_cast<uint8_t*>(s.m) + off;
      uint8_t* qv = static_cast<uint8_t*>(s.v) + off;
      float m[kQBlock], v[kQBlock];
      const float a1 = s.am1[b], a2 = s.am2[b];
      for (int64_t i = 0; i < len; ++i) m[i] = c1[qm[i]] * a1;
      for (int64_t i = 0; i < len; ++i) v[i] = c2[qv[i]] * a2;
      update_unit(static_cast<scalar_t*>(s.p) + off, static_cast<const scalar_t*>(s.g) + off, m, v, len, h);
      float n1 = 0.f, n2 = 0.f;
      for (int64_t i = 0; i < len; ++i) n1 = std::max(n1, std::abs(m[i]));
      for (int64_t i = 0; i < len; ++i) n2 = std::max(n2, v[i]);
      s.am1[b] = n1;
      s.am2[b] = n2;
      const float i1 = adamw::inv_absmax(n1), i2 = adamw::inv_absmax(n2);
      for (int64_t i = 0; i < len; ++i) qm[i] = adamw::encode_tree(clamp_unit(m[i] * i1), tree1.data());
      for (int64_t i = 0; i < len; ++i) qv[i] = adamw::encode_tree(clamp_unit(v[i] * i2), tree2.data());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4q, CPU, m) {
  m.impl("adamw_step", &adamw_step);
  m.impl("adamw8bit_step", &adamw8bit_step);
}

}  // namespace nf4q::cpu
