// CPU kernels: 4-bit NF4 and 8-bit blockwise quantize/dequantize. Multi-threaded over blocks with
// at::parallel_for; inner loops are plain arrays so the compiler can vectorize them.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/nf4.h"
#include "kernels.h"
#include "nf4_simd_view.h"

namespace nf4q::cpu {
namespace {

constexpr int64_t kGrainBlocks = 64;

// One pass per block: convert, absmax (+ a NaN/Inf flag), scale, encode, pack. Kept out of the dispatch
// macro because pragmas cannot stand inside macro arguments.
template <typename scalar_t>
void quantize_blocks(const scalar_t* src, int64_t n, int64_t blocksize, const float* mids, uint8_t* dst, float* am) {
  at::parallel_for(0, ceil_div(n, blocksize), kGrainBlocks, [&](int64_t b0, int64_t b1) {
    float v[4096];
    uint8_t q[4096 + 1];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      float amax = 0.f, poison = 0.f;
#pragma omp simd reduction(max : amax) reduction(+ : poison)
      for (int64_t i = 0; i < len; ++i) {
        v[i] = static_cast<float>(src[start + i]);
        amax = std::max(amax, std::abs(v[i]));
        poison += v[i] * 0.0f;  // NaN if any value is NaN or Inf
      }
      // A non-finite block reports a NaN absmax; quantize() turns that into a ValueError.
      am[b] = poison == 0.0f ? amax : std::numeric_limits<float>::quiet_NaN();
      if (len < blocksize) {
        for (int64_t i = 0; i < len; ++i) q[i] = encode4(scale_block(v[i], amax, true), mids);
        q[len] = encode4(0.0f, mids);  // an odd tail is padded with a zero value, as bitsandbytes does
      } else {
        const float inv = 1.0f / std::max(amax, kTinyAbsmax);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const float s = clamp_unit(v[i] * inv);
          int c = 0;
          for (int j = 0; j < kCodes4 - 1; ++j) c += s > mids[j];
          q[i] = static_cast<uint8_t>(c);
        }
      }
      uint8_t* out = dst + start / 2;
      for (int64_t i = 0; i < (len + 1) / 2; ++i) out[i] = pack2(q[2 * i], q[2 * i + 1]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A_in, const at::Tensor& code, int64_t blocksize) {
  check_quantize(A_in, code, blocksize, 4);
  const auto A = A_in.contiguous();
  const int64_t n = A.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  auto packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  auto absmax = at::empty({blocks}, A.options().dtype(at::kFloat));
  float mids[kCodes4 - 1];
  midpoints(code.contiguous().data_ptr<float>(), kCodes4, mids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "quantize_4bit_cpu", [&] {
    quantize_blocks(A.data_ptr<scalar_t>(), n, blocksize, mids, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit(const at::Tensor& A_in, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_quantize(A_in, code, blocksize, 8);
  const auto A = A_in.contiguous().to(at::kFloat);
  const int64_t n = A.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({blocks}, A.options());
  float mids[kCodes8 - 1];
  midpoints(code.contiguous().data_ptr<float>(), kCodes8, mids);
  const float* src = A.data_ptr<float>();
  uint8_t* dst = q.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      float amax = 0.f;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::abs(src[start + i]));
      am[b] = amax;
      for (int64_t i = 0; i < len; ++i) dst[start + i] = encode8(scale_block(src[start + i], amax, len < blocksize), mids);
    }
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  check_dequantize8(q, absmax, code, blocksize, dtype);
  auto out = at::empty({q.numel()}, q.options().dtype(dtype));
  const uint8_t* src = q.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  const auto table = code.contiguous();
  const float* c = table.data_ptr<float>();
  const int64_t n = q.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_8bit_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<scalar_t>(c[src[i]] * am[i / blocksize]);
    });
  });
  return out;
}

// A fresh output costs more in first-touch page faults than the decode itself: ask for 2 MB pages (where
// transparent huge pages are in "madvise" mode) over the untouched buffer, 512x fewer faults.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes(), first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
}

at::Tensor dequantize_4bit(NF4Q_W4_PARAMS, at::ScalarType dtype) {
  auto w = make_w4(NF4Q_W4_ARGS);
  check_io_dtype(dtype, "dequantize_4bit", "dtype");
  auto out = at::empty(w.shape, packed.options().dtype(dtype));
  advise_huge_pages(out);
  dequantize_into(w, out);
  return out;
}

void dequantize_4bit_out(NF4Q_W4_PARAMS, at::ScalarType dtype, at::Tensor& out) {
  auto w = make_w4(NF4Q_W4_ARGS);
  check_out(out, dtype, w.numel, packed.device());
  dequantize_into(w, out);
}

}  // namespace

at::Tensor absmax_fp32(const W4& w) {
  if (!w.double_quant()) return w.absmax;
  auto out = at::empty({w.blocks()}, w.absmax.options().dtype(at::kFloat));
  const uint8_t* q = w.absmax.data_ptr<uint8_t>();
  const float* a2 = w.nested_absmax->data_ptr<float>();
  const auto nc = w.nested_code->contiguous();
  const float* c = nc.data_ptr<float>();
  const float offset = w.nested_offset->item<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < w.blocks(); ++i) dst[i] = decode_absmax(q, a2, c, offset, i, w.nested_blocksize);
  return out;
}

void dequantize_into(const W4& w, at::Tensor& out) {
  TORCH_CHECK(w.packed.device().is_cpu(), "nf4q: CPU kernel got a non-CPU weight");
  const auto st = out.scalar_type();
  if (st == at::kFloat || st == at::kHalf || st == at::kBFloat16) {
    // SIMD decode (nf4_simd*.cpp) in one contiguous range per thread: each thread also first-touches the
    // pages of its part of a fresh output, so the page faults are taken in parallel too.
    const auto v = nf4_view(w);
    const auto isa = simd::active_isa();
    const int kind = st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2;
    char* dst = static_cast<char*>(out.data_ptr());
    const int64_t size = out.element_size(), chunk = 1 << 14;
    at::parallel_for(0, ceil_div(w.numel, chunk), 1, [&](int64_t c0, int64_t c1) {
      const int64_t e0 = c0 * chunk, e1 = std::min(w.numel, c1 * chunk);
      simd::decode(isa, v, e0, e1, dst + e0 * size, kind);
    });
    return;
  }
  const auto am_t = absmax_fp32(w);
  const float* am = am_t.data_ptr<float>();
  const float* c = w.code.data_ptr<float>();
  // float64: one lookup decodes a byte into both of its values.
  float pair_hi[256], pair_lo[256];
  for (int b = 0; b < 256; ++b) {
    pair_hi[b] = c[high_nibble(b)];
    pair_lo[b] = c[low_nibble(b)];
  }
  const uint8_t* src = w.packed.data_ptr<uint8_t>();
  const int64_t n = w.numel, bs = w.blocksize;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_4bit_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, w.blocks(), kGrainBlocks, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * bs, len = std::min(bs, n - start);
        const float a = am[b];
        const uint8_t* p = src + start / 2;
        scalar_t* o = dst + start;
        const int64_t pairs = len / 2;
        for (int64_t j = 0; j < pairs; ++j) {
          o[2 * j] = static_cast<scalar_t>(pair_hi[p[j]] * a);
          o[2 * j + 1] = static_cast<scalar_t>(pair_lo[p[j]] * a);
        }
        if (len % 2) o[len - 1] = static_cast<scalar_t>(pair_hi[p[pairs]] * a);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(nf4q, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit);
}

}  // namespace nf4q::cpu
