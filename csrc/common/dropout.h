// LoRA dropout's keep mask as a pure function of (seed, element index), torch-free so that the CPU kernels, the
// CUDA kernels and nf4q/_reference.py draw the same mask bit for bit. Element i of a call draws the i-th output of
// SplitMix64 started at `seed` (a counter-based generator: any element, any order, no state), so the forward, its
// recomputation under gradient checkpointing and the backward regenerate one mask without storing it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NF4Q_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NF4Q_HOST_DEVICE inline
#endif

namespace nf4q {

constexpr uint64_t kSplitMixGamma = 0x9e3779b97f4a7c15ULL;

// The upper 32 bits of SplitMix64's output number `index` (0-based) for `seed`.
NF4Q_HOST_DEVICE uint32_t dropout_draw(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * kSplitMixGamma;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

// An element is dropped when its draw is below this threshold: P(drop) = threshold / 2^32 = p within 2^-32.
inline uint64_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t <= 0 ? 0 : (t >= 4294967296.0 ? uint64_t{4294967296ULL} : static_cast<uint64_t>(t + 0.5));
}

NF4Q_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint64_t threshold) {
  return dropout_draw(seed, index) >= threshold;
}

}  // namespace nf4q
