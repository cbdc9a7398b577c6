// The portable scalar NF4 kernels, the x layout shared by all variants, and the run-time dispatch.
#include "nf4_simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace nf4q::cpu::simd {
namespace {

// fp32 -> bf16 / fp16 bits with round-to-nearest-even, as torch converts.
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to Inf (or is Inf)
  if (a < 0x38800000u) {  // subnormal or zero in fp16: let the fp32 adder round at 2^-24
    float af;
    std::memcpy(&af, &a, 4);
    const float r = af + 0.5f;  // 0.5 = 2^-1; the mantissa's last place is then 2^-24
    uint32_t ru;
    std::memcpy(&ru, &r, 4);
    return static_cast<uint16_t>(sign | (ru - 0x3f000000u));
  }
  const uint32_t odd = (a >> 13) & 1u;
  a += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to nearest even at bit 13
  return static_cast<uint16_t>(sign | (a >> 13));
}

}  // namespace

namespace scalar {

void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.packed + n * K / 2;
    for (int64_t m = 0; m < M; ++m) {
      const float* x = xs + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; k += 32) {
        const float s = w.scale(w.block_of(n * K + k));
        float part = 0.f;
        for (int j = 0; j < 16; ++j) {
          const uint8_t b = p[(k >> 1) + j];
          part += w.code[b >> 4] * s * x[k + j] + w.code[b & 15] * s * x[k + 16 + j];
        }
        acc += part;
      }
      y[m * ldy + n] = acc;
    }
  }
}

void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1) {
  const int64_t K = w.K;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = k0; k < k1; ++k) dx[m * ldd + k] = 0.f;
  for (int64_t n = 0; n < w.N; ++n) {
    for (int64_t k = k0; k < k1; k += 2) {
      const int64_t e = n * K + k;
      const float s = w.scale(w.block_of(e));
      const uint8_t b = w.packed[e >> 1];
      const float v0 = w.code[b >> 4] * s, v1 = w.code[b & 15] * s;
      for (int64_t m = 0; m < M; ++m) {
        const float gm = g[m * ldg + n];
        dx[m * ldd + k] += gm * v0;
        dx[m * ldd + k + 1] += gm * v1;
      }
    }
  }
}

void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t b = w.block_of(e);
    const int64_t end = std::min<int64_t>((b + 1) << w.bs_shift, e1);
    const float s = w.scale(b);
    for (; e < end; ++e) {
      const uint8_t byte = w.packed[e >> 1];
      const float v = w.code[(e & 1) ? (byte & 15) : (byte >> 4)] * s;
      if (out_kind == 0) static_cast<float*>(out)[e - e0] = v;
      else static_cast<uint16_t*>(out)[e - e0] = out_kind == 1 ? to_fp16(v) : to_bf16(v);
    }
  }
}

}  // namespace scalar

Isa active_isa() {
  static const Isa best = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (avx512::compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  const char* want = std::getenv("NF4Q_CPU_ISA");
  if (!want || !*want) return best;
  Isa forced = best;
  if (!std::strcmp(want, "scalar")) forced = Isa::kScalar;
  else if (!std::strcmp(want, "avx2")) forced = Isa::kAvx2;
  else if (!std::strcmp(want, "avx512")) forced = Isa::kAvx512;
  return static_cast<int>(forced) <= static_cast<int>(best) ? forced : best;
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

void split_x(const float* x, int64_t M, int64_t K, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    float* dst = xs + m * K;
    for (int64_t k = 0; k < K; k += 32)
      for (int j = 0; j < 16; ++j) {
        dst[k + j] = src[k + 2 * j];
        dst[k + 16 + j] = src[k + 2 * j + 1];
      }
  }
}

void gemv(Isa isa, const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (isa == Isa::kAvx512) return avx512::gemv(w, xs, M, y, ldy, n0, n1);
  if (isa == Isa::kAvx2) return avx2::gemv(w, xs, M, y, ldy, n0, n1);
  scalar::gemv(w, xs, M, y, ldy, n0, n1);
}

void gemv_t(Isa isa, const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0,
            int64_t k1) {
  if (isa == Isa::kAvx512) return avx512::gemv_t(w, g, ldg, M, dx, ldd, k0, k1);
  if (isa == Isa::kAvx2) return avx2::gemv_t(w, g, ldg, M, dx, ldd, k0, k1);
  scalar::gemv_t(w, g, ldg, M, dx, ldd, k0, k1);
}

void decode(Isa isa, const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind) {
  if (isa == Isa::kAvx512) return avx512::decode(w, e0, e1, out, out_kind);
  if (isa == Isa::kAvx2) return avx2::decode(w, e0, e1, out, out_kind);
  scalar::decode(w, e0, e1, out, out_kind);
}

void decode_panel(Isa isa, const Nf4View& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) decode(isa, w, n * w.K + k0, n * w.K + k1, out + (n - n0) * ld, 0);
}

}  // namespace nf4q::cpu::simd
