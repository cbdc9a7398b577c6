// AVX2+FMA NF4 kernels. A ymm register holds 8 of the 16 table entries, so a lookup permutes both halves
// (vpermps reads the low 3 bits of each index) and blends on bit 3. Same structure and layouts as the AVX-512
// file; every function carries a target attribute, so no compiler flags are needed.
#include "nf4_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define NF4Q_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace nf4q::cpu::simd::avx2 {
namespace {

inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Table {
  __m256 lo, hi;  // entries 0-7 and 8-15, times the block scale
};

NF4Q_AVX2 inline Table scaled(const float* code, float s) {
  const __m256 v = _mm256_set1_ps(s);
  return {_mm256_mul_ps(_mm256_loadu_ps(code), v), _mm256_mul_ps(_mm256_loadu_ps(code + 8), v)};
}

NF4Q_AVX2 inline __m256 lut(__m256i idx, const Table& t) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The high-nibble (even) and low-nibble (odd) values of 8 bytes.
NF4Q_AVX2 inline void decode8(const uint8_t* p, const Table& t, __m256& even, __m256& odd) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  even = lut(_mm256_srli_epi32(b, 4), t);
  odd = lut(b, t);
}

template <int NT, int MT>
NF4Q_AVX2 void tile(const Nf4View& w, const float* xs, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K;
  __m256 acc[NT][MT];
  for (int r = 0; r < NT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* p[NT];
  for (int r = 0; r < NT; ++r) p[r] = w.packed + ((n + r) * K >> 1);
  int64_t k = 0;
  while (k < K) {
    int64_t stop = K;
    Table t[NT];
    for (int r = 0; r < NT; ++r) {
      const int64_t e = (n + r) * K + k, b = w.block_of(e);
      stop = lmin(stop, k + ((b + 1) << w.bs_shift) - e);
      t[r] = scaled(w.code, w.scale(b));
    }
    for (; k < stop; k += 32) {
      for (int h = 0; h < 2; ++h) {  // bytes 0-7, then 8-15 of the chunk
        __m256 ev[NT], od[NT];
        for (int r = 0; r < NT; ++r) decode8(p[r] + (k >> 1) + 8 * h, t[r], ev[r], od[r]);
        for (int m = 0; m < MT; ++m) {
          const float* x = xs + m * K + k + 8 * h;
          const __m256 xe = _mm256_loadu_ps(x), xo = _mm256_loadu_ps(x + 16);
          for (int r = 0; r < NT; ++r)
            acc[r][m] = _mm256_fmadd_ps(od[r], xo, _mm256_fmadd_ps(ev[r], xe, acc[r][m]));
        }
      }
    }
  }
  for (int r = 0; r < NT; ++r)
    for (int m = 0; m < MT; ++m) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
      y[m * ldy + n + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    }
}

template <int NT>
NF4Q_AVX2 void tiles_m(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile<NT, 2>(w, xs + m * w.K, y + m * ldy, ldy, n);
  if (m < M) tile<NT, 1>(w, xs + m * w.K, y + m * ldy, ldy, n);
}

// Even and odd values of 8 bytes interleaved into 16 consecutive floats.
NF4Q_AVX2 inline void interleave(__m256 ev, __m256 od, __m256& first, __m256& second) {
  const __m256 a = _mm256_unpacklo_ps(ev, od), b = _mm256_unpackhi_ps(ev, od);
  first = _mm256_permute2f128_ps(a, b, 0x20);
  second = _mm256_permute2f128_ps(a, b, 0x31);
}

template <int MT>
NF4Q_AVX2 void tile_t(const Nf4View& w, const float* g, int64_t ldg, float* dx, int64_t ldd, int64_t kc) {
  __m256 acc[MT][4];  // even 0-7, odd 0-7, even 8-15, odd 8-15
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t n = 0; n < w.N; ++n) {
    const int64_t e = n * w.K + kc;
    const Table t = scaled(w.code, w.scale(w.block_of(e)));
    __m256 v[4];
    decode8(w.packed + (e >> 1), t, v[0], v[1]);
    decode8(w.packed + (e >> 1) + 8, t, v[2], v[3]);
    for (int m = 0; m < MT; ++m) {
      const __m256 gm = _mm256_set1_ps(g[m * ldg + n]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_fmadd_ps(v[j], gm, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) {
      __m256 a, b;
      interleave(acc[m][2 * h], acc[m][2 * h + 1], a, b);
      _mm256_storeu_ps(dx + m * ldd + kc + 16 * h, a);
      _mm256_storeu_ps(dx + m * ldd + kc + 16 * h + 8, b);
    }
}

NF4Q_AVX2 inline void store8(__m256 v, void* out, int64_t i, int kind) {
  if (kind == 0) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
    return;
  }
  __m128i h;
  if (kind == 1) {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // bf16, round to nearest even
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), h);
}

}  // namespace

bool compiled() { return true; }

NF4Q_AVX2 void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) tiles_m<2>(w, xs, M, y, ldy, n);
  for (; n < n1; ++n) tiles_m<1>(w, xs, M, y, ldy, n);
}

NF4Q_AVX2 void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0,
                      int64_t k1) {
  for (int64_t kc = k0; kc < k1; kc += 32) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_t<2>(w, g + m * ldg, ldg, dx + m * ldd, ldd, kc);
    if (m < M) tile_t<1>(w, g + m * ldg, ldg, dx + m * ldd, ldd, kc);
  }
}

NF4Q_AVX2 void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int kind) {
  const int64_t size = kind == 0 ? 4 : 2;
  char* o = static_cast<char*>(out);
  int64_t e = lmin(e1, (e0 + 31) & ~int64_t{31});
  if (e > e0) scalar::decode(w, e0, e, o, kind);
  const int64_t body_end = e1 & ~int64_t{31};
  while (e < body_end) {
    const int64_t b = w.block_of(e), stop = lmin((b + 1) << w.bs_shift, body_end);
    const Table t = scaled(w.code, w.scale(b));
    for (; e < stop; e += 16) {
      __m256 ev, od, a, c;
      decode8(w.packed + (e >> 1), t, ev, od);
      interleave(ev, od, a, c);
      store8(a, o, e - e0, kind);
      store8(c, o, e - e0 + 8, kind);
    }
  }
  if (e < e1) scalar::decode(w, e, e1, o + (e - e0) * size, kind);
}

}  // namespace nf4q::cpu::simd::avx2

#else  // not x86-64: never dispatched to

namespace nf4q::cpu::simd::avx2 {
bool compiled() { return false; }
void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  scalar::gemv(w, xs, M, y, ldy, n0, n1);
}
void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1) {
  scalar::gemv_t(w, g, ldg, M, dx, ldd, k0, k1);
}
void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int kind) { scalar::decode(w, e0, e1, out, kind); }
}  // namespace nf4q::cpu::simd::avx2

#endif
