// ctest: the torch-free format arithmetic of csrc/common/nf4.h, without Python.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "nf4.h"

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);    \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

// The NF4 table as bitsandbytes prints it (nf4q/codebook.py derives it; tests/test_codebook.py checks equality).
static const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                               0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                               0.7229568362236023f, 1.0f};

int main() {
  float mids[15];
  nf4q::midpoints(kNF4, 16, mids);
  for (int i = 0; i < 15; ++i) EXPECT(mids[i] > kNF4[i] && mids[i] < kNF4[i + 1]);

  // every table value encodes to its own index; a midpoint (a tie) goes to the lower code
  for (int i = 0; i < 16; ++i) EXPECT(nf4q::encode4(kNF4[i], mids) == i);
  for (int i = 0; i < 15; ++i) EXPECT(nf4q::encode4(mids[i], mids) == i);
  EXPECT(nf4q::encode4(0.0f, mids) == 7);
  EXPECT(nf4q::encode4(-1.0f, mids) == 0 && nf4q::encode4(1.0f, mids) == 15);

  // nearest-value property on a fine grid
  for (int k = -1000; k <= 1000; ++k) {
    const float v = k / 1000.0f;
    const int c = nf4q::encode4(v, mids);
    for (int j = 0; j < 16; ++j) EXPECT(std::fabs(kNF4[c] - v) <= std::fabs(kNF4[j] - v));
  }

  // scaling: a zero block stays finite; the partial block divides; values clamp to [-1, 1]
  EXPECT(nf4q::scale_block(0.0f, 0.0f, false) == 0.0f);
  EXPECT(nf4q::scale_block(3.0f, 2.0f, true) == 1.0f);
  EXPECT(nf4q::scale_block(-1.0f, 4.0f, false) == -0.25f);

  // 8-bit binary search agrees with a linear count on a uniform table
  float table[256], mids8[255];
  for (int i = 0; i < 256; ++i) table[i] = -1.0f + 2.0f * i / 255.0f;
  nf4q::midpoints(table, 256, mids8);
  for (int k = -300; k <= 300; ++k) {
    const float v = k / 300.0f;
    int count = 0;
    for (int i = 0; i < 255; ++i) count += mids8[i] < v;
    EXPECT(nf4q::encode8(v, mids8) == count);
  }

  // packing: first element in the high nibble
  const uint8_t b = nf4q::pack2(0xA, 0x3);
  EXPECT(b == 0xA3 && nf4q::high_nibble(b) == 0xA && nf4q::low_nibble(b) == 0x3);

  // double-quantized absmax
  const uint8_t q[3] = {0, 128, 255};
  const float a2[1] = {2.0f};
  EXPECT(nf4q::decode_absmax(q, a2, table, 0.5f, 2, 256) == table[255] * 2.0f + 0.5f);
  EXPECT(nf4q::ceil_div(65, 64) == 2 && nf4q::ceil_div(64, 64) == 1);

  std::printf("%s: %d failures\n", failures ? "FAIL" : "OK", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
