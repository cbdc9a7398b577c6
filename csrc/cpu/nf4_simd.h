// Torch-free NF4 decode kernels for the CPU matmuls and dequantize, in three variants: AVX-512
// (nf4_simd_avx512.cpp), AVX2+FMA (nf4_simd_avx2.cpp) and portable scalar (nf4_simd.cpp). The x86 variants carry
// target attributes, so no per-file compiler flags are needed; active_isa() picks one at run time.
#pragma once
#include <cstdint>

namespace nf4q::cpu::simd {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best variant this CPU runs, or the one NF4Q_CPU_ISA=scalar|avx2|avx512 forces (read on every call so
// tests can switch; a forced variant the CPU lacks falls back to the best supported one).
Isa active_isa();
const char* isa_name(Isa isa);

// An NF4 weight [N, K] seen through raw pointers. absmax is fp32 per block, or (double quantization) uint8
// codes decoded as nested_code[q] * nested_absmax[b / nested_blocksize] + offset.
struct Nf4View {
  const uint8_t* packed;
  const float* absmax;   // fp32 scales, or nullptr when absmax_q is set
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
  const float* code;  // 16 values
  int64_t blocksize, N, K;
  int bs_shift;      // log2(blocksize)
  int nested_shift;  // log2(nested_blocksize), or -1 when it is not a power of two

  int64_t block_of(int64_t e) const { return e >> bs_shift; }
  float scale(int64_t block) const {
    if (!absmax_q) return absmax[block];
    const int64_t nb = nested_shift >= 0 ? block >> nested_shift : block / nested_blocksize;
    float p = nested_code[absmax_q[block]] * nested_absmax[nb];
    // Round the product before adding, as the reference does: no fused multiply-add in the FMA-enabled files.
#if defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+x"(p));
#elif defined(__aarch64__)
    __asm__("" : "+w"(p));
#else
    p = *static_cast<volatile float*>(&p);
#endif
    return p + offset;
  }
};

// Fills the shifts; the pointers are set by the caller.
inline void finish_view(Nf4View& w) {
  w.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  const int64_t nb = w.nested_blocksize;
  w.nested_shift = nb > 0 && (nb & (nb - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(nb)) : -1;
}

// The fused GEMV/small-GEMM path needs every 32-value chunk of a row inside one block and on a byte boundary.
inline bool fused_ok(const Nf4View& w) { return w.K % 32 == 0; }

// x (fp32, M rows of K) into the layout the fused kernels read: in every 32-value chunk the 16 even-indexed
// values first, then the 16 odd ones, matching the high and low nibbles of 16 packed bytes.
void split_x(const float* x, int64_t M, int64_t K, float* xs);

// y[m * ldy + n] = sum_k W[n, k] * x[m, k] for n in [n0, n1), m in [0, M); xs from split_x. Needs fused_ok.
void gemv(Isa isa, const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);

// dx[m * ldd + k] = sum_n g[m * ldg + n] * W[n, k] for k in [k0, k1), m < M, overwriting dx. k0, k1 multiples of
// 32 (k1 may be K). Needs fused_ok.
void gemv_t(Isa isa, const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0,
            int64_t k1);

// Flat elements [e0, e1) of the weight into out[0, e1 - e0) (fp32, fp16 or bf16 bits: out_kind 0, 1, 2), the
// way the reference rounds (fp32 product, then round-to-nearest-even).
void decode(Isa isa, const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind);

// A panel of W: out[(n - n0) * ld + (k - k0)] = W[n, k] (fp32) for n in [n0, n1), k in [k0, k1).
void decode_panel(Isa isa, const Nf4View& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld);

// The portable variant; the x86 variants also use decode for unaligned heads and tails.
namespace scalar {
void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1);
void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind);
}  // namespace scalar

// The variants behind the dispatch (a variant is only called when the CPU supports it).
namespace avx512 {
void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1);
void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind);
bool compiled();
}  // namespace avx512
namespace avx2 {
void gemv(const Nf4View& w, const float* xs, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
void gemv_t(const Nf4View& w, const float* g, int64_t ldg, int64_t M, float* dx, int64_t ldd, int64_t k0, int64_t k1);
void decode(const Nf4View& w, int64_t e0, int64_t e1, void* out, int out_kind);
bool compiled();
}  // namespace avx2

}  // namespace nf4q::cpu::simd
