"""numpy emulation of gemv.cu's decode_unit_kernel, float64: checks its index logic (the ring's copies and swizzled
reads, units, k order inside each mma, block scales on the fp32 products, tiles, rows past N, the persistent loop)
against x @ W^T without a GPU. The tests (test_decode_unit_kernel_edges) check the kernel itself on a GPU."""
import numpy as np

rng = np.random.default_rng(0)
code = np.sort(rng.uniform(-1, 1, 16))
code[7] = 0.0


def emulate(x, packed, scales, N, K, M, grid, kWarps=16, kUnits=4):
    KU, KG = K // 64, K // 256
    ntiles = (N + 15) // 16
    y = np.full((M, N), np.nan)
    pair = lambda b: (code[b >> 4], code[b & 15])  # noqa: E731
    for bx in range(grid):
        tile, jb = bx, 0
        acc = np.zeros((kWarps, 32, 4))
        while tile < ntiles:
            next_tile, next_jb = tile, jb + kWarps
            if next_jb >= KG:
                next_jb, next_tile = 0, next_tile + grid
            for warp in range(kWarps):
                grp = jb + warp
                if grp >= KG:
                    continue
                # The step's copies into the warp's ring slot: lane l's 16-byte chunk l % 8 of rows l / 8 + 4 i.
                ring = np.full(16 * 128, -1, dtype=np.int64)
                for lane in range(32):
                    cc, r0 = lane % 8, lane // 8
                    for i in range(4):
                        r = r0 + 4 * i
                        e = min(tile * 16 + r, N - 1) * KU + kUnits * grp
                        dst = r * 128 + 16 * (cc ^ (2 * r0))
                        ring[dst: dst + 16] = packed[32 * e + 16 * cc: 32 * e + 16 * cc + 16]
                for u in range(kUnits):
                    A, B, sc = np.zeros((4, 16, 16)), np.zeros((4, 16, 8)), np.zeros((32, 2))
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        m = min(g, M - 1)
                        xp = m * K + 64 * (kUnits * grp + u) + 16 * t
                        for h in range(2):
                            row = tile * 16 + g + 8 * h
                            e = min(row, N - 1) * KU + kUnits * grp + u
                            off = (g + 8 * h) * 128 + 8 * ((4 * u + t) ^ (4 * (g & 3)))
                            mine = ring[off: off + 8]
                            assert (mine >= 0).all() and (mine == packed[32 * e + 8 * t: 32 * e + 8 * t + 8]).all()
                            sc[lane, h] = scales[e] if row < N else 0.0
                            for s in range(4):
                                word = mine[0:4] if s < 2 else mine[4:8]
                                j = 2 * (s & 1)
                                A[s, g + 8 * h, 2 * t: 2 * t + 2] = pair(word[j])
                                A[s, g + 8 * h, 2 * t + 8: 2 * t + 10] = pair(word[j + 1])
                        for s in range(4):
                            b = x.flat[xp + 4 * s: xp + 4 * s + 4]
                            B[s, 2 * t: 2 * t + 2, g] = b[0:2]
                            B[s, 2 * t + 8: 2 * t + 10, g] = b[2:4]
                    part = sum(A[s] @ B[s] for s in range(4))
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for h in range(2):
                            for e_ in range(2):
                                acc[warp, lane, 2 * h + e_] += part[g + 8 * h, 2 * t + e_] * sc[lane, h]
            if next_jb == 0:
                red = acc.sum(axis=0)
                for ln in range(32):
                    for i in range(4):
                        row, m = tile * 16 + ln // 4 + 8 * (i // 2), 2 * (ln % 4) + (i % 2)
                        if row < N and m < M:
                            y[m, row] = red[ln, i]
                acc[:] = 0
            tile, jb = next_tile, next_jb
    return y


CASES = [(40, 256 * 9, 3, 2), (64, 2048 * 2, 1, 3), (17, 256, 8, 1), (48, 256 * 13, 5, 5), (33, 512, 2, 7)]
for (N, K, M, grid) in CASES:
    bs = 64
    nblocks = N * K // bs
    scales = rng.uniform(0.5, 2, nblocks)
    codes = rng.integers(0, 16, size=N * K)
    packed = (codes[0::2] << 4 | codes[1::2]).astype(np.int64)
    Wd = (code[codes] * np.repeat(scales, bs)).reshape(N, K)
    x = rng.normal(size=(M, K))
    y = emulate(x, packed, scales, N, K, M, grid)
    ref = x @ Wd.T
    print(N, K, M, grid, "max err", np.nanmax(np.abs(y - ref)), "nan", int(np.isnan(y).sum()))
