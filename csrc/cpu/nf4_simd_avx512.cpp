// AVX-512 NF4 kernels. The 16-entry table fits one zmm register: scaling it by the block's absmax once per block
// and looking codes up with vpermps (which reads only the low 4 bits of each index) decodes 16 values in one
// instruction: the raw byte indexes its low nibble, byte >> 4 its high nibble. Every function carries a target
// attribute, so this file needs no compiler flags and runs only where the dispatch found AVX-512.
#include "nf4_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define NF4Q_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace nf4q::cpu::simd::avx512 {
namespace {

inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

// The high-nibble (even) and low-nibble (odd) values of 16 bytes, through the scaled table t.
NF4Q_AVX512 inline void decode16(const uint8_t* p, __m512 t, __m512& even, __m512& odd) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
  odd = _mm512_permutexvar_ps(b, t);
}

// NT weight rows [n, n + NT) times MT rows of xs (split layout); x loads are shared by the NT rows, decodes by
// the MT rows, and NT * MT independent accumulators hide the FMA latency.
template <int NT, int MT>
NF4Q_AVX512 void tile(const Nf4View& w, const float* xs, float* y, int64_t ldy, int64_t n) {
  const int64_t K = w.K;
  const __m512 tbl = _mm512_loadu_ps(w.code);
  __m512 acc[NT][MT];
  for (int r = 0; r < NT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* p[NT];
  for (int r = 0; r < NT; ++r) p[r] = w.packed + ((n + r) * K >> 1);
  int64_t k = 0;
  while (k < K) {
    // The longest run of k in which no row crosses a block boundary.
    int64_t stop = K;
    __m512 t[NT];
    for (int r = 0; r < NT; ++r) {
      const int64_t e = (n + r) * K + k, b = w.block_of(e);
      stop = lmin(stop, k + ((b + 1) << w.bs_shift) - e);
      t[r] = _mm512_mul_ps(tbl, _mm512_set1_ps(w.scale(b)));
    }
    for (; k < stop; k += 32) {
      __m512 ev[NT], od[NT];
      for (int r = 0; r < NT; ++r) {
        // Few rows of x: bound by memory. A row is only K/2 bytes, too short a stream for the hardware
        // prefetcher, so fetch the same place in the next tile's rows (1.8x at 14336x4096, M = 1).
        if (NT * MT <= 4) _mm_prefetch(reinterpret_cast<const char*>(p[r] + (k >> 1) + NT * (K >> 1)), _MM_HINT_T0);
        decode16(p[r] + (k >> 1), t[r], ev[r], od[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 xe = _mm512_loadu_ps(xs + m * K + k), xo = _mm512_loadu_ps(xs + m * K + k + 16);
        for (int r = 0; r < NT; ++r) acc[r][m] = _mm512_fmadd_ps(od[r], xo, _mm512_fmadd_ps(ev[r], xe, acc[r][m]));
      }
    }
  }
  for (int r = 0; r < NT; ++r)
    for (int m = 0; m < MT; ++m) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int NT>
NF4Q_AVX512 void tiles_m(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<NT, 4>(w, xs + m * w.K, y + m * ldy, ldy, n);
  switch (M - m) {
    case 3: tile<NT, 3>(w, xs + m * w.K, y + m * ldy, ldy, n); break;
    case 2: tile<NT, 2>(w, xs + m * w.K, y + m * ldy, ldy, n); break;
    case 1: tile<NT, 1>(w, xs + m * w.K, y + m * ldy, ldy, n); break;
    default: break;
  }
}

// dx columns [kc, kc + 32) for MT rows of g: every weight row's 16 bytes there, decoded once, feed MT rows.
template <int MT>
NF4Q_AVX512 void tile_t(const Nf4View& w, const float* g, int64_t ldg, float* dx, int64_t ldd, int64_t kc) {
  const __m512 tbl = _mm512_loadu_ps(w.code);
  __m512 ae[MT], ao[MT];
  for (int m = 0; m < MT; ++m) ae[m] = ao[m] = _mm512_setzero_ps();
  for (int64_t n = 0; n < w.N; ++n) {
    const int64_t e = n * w.K + kc;
    __m512 ev, od;
    decode16(w.packed + (e >> 1), _mm512_mul_ps(tbl, _mm512_set1_ps(w.scale(w.block_of(e)))), ev, od);
    for (int m = 0; m < MT; ++m) {
      const __m512 gm = _mm512_set1_ps(g[m * ldg + n]);
      ae[m] = _mm512_fmadd_ps(ev, gm, ae[m]);
      ao[m] = _mm512_fmadd_ps(od, gm, ao[m]);
    }
  }
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int m = 0; m < MT; ++m) {
    _mm512_storeu_ps(dx + m * ldd + kc, _mm512_permutex2var_ps(ae[m], lo, ao[m]));
    _mm512_storeu_ps(dx + m * ldd + kc + 16, _mm512_permutex2var_ps(ae[m], hi, ao[m]));
  }
}

NF4Q_AVX512 inline void store16(__m512 v, void* out, int64_t i, int kind) {
  if (kind == 0) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    return;
  }
  __m256i h;
  if (kind == 1) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // bf16, round to nearest even
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), h);
}

}  // namespace

bool compiled() { return true; }

NF4Q_AVX512 void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles_m<4>(w, xs, M, y, ldy, n);
  for (; n < n1; ++n) tiles_m<1>(w, xs, M, y, ldy, n);
}

NF4Q_AVX512 void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0,
                        int64_t k1) {
  for (int64_t kc = k0; kc < k1; kc += 32) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) tile_t<8>(w, g + m * ldg, ldg, dx + m * ldd, ldd, kc);
    for (; m + 2 <= M; m += 2) tile_t<2>(w, g + m * ldg, ldg, dx + m * ldd, ldd, kc);
    if (m < M) tile_t<1>(w, g + m * ldg, ldg, dx + m * ldd, ldd, kc);
  }
}

NF4Q_AVX512 void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int kind) {
  const int64_t size = kind == 0 ? 4 : 2;
  char* o = static_cast<char*>(out);
  int64_t e = lmin(e1, (e0 + 31) & ~int64_t{31});
  if (e > e0) scalar::decode(w, e0, e, o, kind);
  const int64_t body_end = e1 & ~int64_t{31};
  const __m512 tbl = _mm512_loadu_ps(w.code);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  while (e < body_end) {
    const int64_t b = w.block_of(e), stop = lmin((b + 1) << w.bs_shift, body_end);
    const __m512 t = _mm512_mul_ps(tbl, _mm512_set1_ps(w.scale(b)));
    for (; e < stop; e += 32) {
      __m512 ev, od;
      decode16(w.packed + (e >> 1), t, ev, od);
      store16(_mm512_permutex2var_ps(ev, lo, od), o, e - e0, kind);
      store16(_mm512_permutex2var_ps(ev, hi, od), o, e - e0 + 16, kind);
    }
  }
  if (e < e1) scalar::decode(w, e, e1, o + (e - e0) * size, kind);
}

}  // namespace nf4q::cpu::simd::avx512

#else  // not x86-64: never dispatched to

namespace nf4q::cpu::simd::avx512 {
bool compiled() { return false; }
void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  scalar::gemv(w, xs, M, y, ldy, n0, n1);
}
void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1) {
  scalar::gemv_t(w, g, ldg, M, dx, ldd, k0, k1);
}
void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int kind) { scalar::decode(w, e0, e1, out, kind); }
}  // namespace nf4q::cpu::simd::avx512

#endif
