// CPU AdamW kernels: 32-bit and 8-bit blockwise states, multi-tensor. The work is cut into units of
// kQBlock elements over all tensors at once (so many small tensors still spread over the threads); each
// unit is loaded into fp32 scratch arrays where the update loop is branch-free and vectorizes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList ms, at::TensorList vs) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && ms.size() == params.size() && vs.size() == params.size(),
                    "nf4q: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), "nf4q: params must share one dtype");
    TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                     "nf4q: params must be fp32, fp16 or bf16, got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.device().is_cpu() && p.is_contiguous(), "nf4q: params[", i, "] must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(grads[i].device().is_cpu() && grads[i].is_contiguous() && grads[i].numel() == p.numel() &&
                          grads[i].scalar_type() == p.scalar_type(),
                      "nf4q: grads[", i, "] must be a contiguous CPU tensor like params[", i, "]");
    TORCH_CHECK_VALUE(ms[i].is_contiguous() && ms[i].numel() == p.numel() && ms[i].device().is_cpu() &&
                          vs[i].is_contiguous() && vs[i].numel() == p.numel() && vs[i].device().is_cpu(),
                      "nf4q: exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be contiguous CPU tensors of ",
                      p.numel(), " elements");
  }
}

std::vector<float> tree_of(const at::Tensor& code, const char* name) {
  TORCH_CHECK_VALUE(code.device().is_cpu() && code.scalar_type() == at::kFloat && code.numel() == kCodes8,
                    "nf4q: ", name, " must be a CPU fp32 table of 256 values");
  const auto c = code.contiguous();
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
  if (params.empty()) return;
  check_lists(params, grads, ms, vs);
  std::vector<Slot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(ms[i].scalar_type() == at::kFloat && vs[i].scalar_type() == at::kFloat,
                     "nf4q: adamw_step needs fp32 exp_avgs/exp_avg_sqs");
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
  if (params.empty()) return;
  check_lists(params, grads, ms, vs);
  TORCH_CHECK_VALUE(absmax1.size() == params.size() && absmax2.size() == params.size(),
                    "nf4q: absmax1 and absmax2 must have one tensor per param");
  std::vector<Slot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(ms[i].scalar_type() == at::kByte && vs[i].scalar_type() == at::kByte,
                     "nf4q: adamw8bit_step needs uint8 exp_avgs/exp_avg_sqs");
    const int64_t blocks = ceil_div(params[i].numel(), kQBlock);
    for (const auto& a : {absmax1[i], absmax2[i]})
      TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat && a.is_contiguous() && a.numel() == blocks && a.device().is_cpu(),
                        "nf4q: absmax1[", i, "]/absmax2[", i, "] must be contiguous CPU fp32 of ", blocks, " values");
    slots.push_back({params[i].data_ptr(), grads[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(),
                     absmax1[i].data_ptr<float>(), absmax2[i].data_ptr<float>(), params[i].numel()});
  }
  const auto tree1 = tree_of(code1, "code1"), tree2 = tree_of(code2, "code2");
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
