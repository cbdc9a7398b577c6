"""y = x @ W^T with W NF4 (double-quantized, blocksize 64): dense bf16 F.linear (cuBLAS), bitsandbytes
matmul_4bit and nf4q gemm_4bit over Llama-3 8B/70B layer shapes and token counts, in one run.

    python -m benchmarks.bench_linear [--quick] [--csv PATH]

Columns: µs each; nf4q's speedup vs bf16 and vs bitsandbytes; for M <= 64 the GB/s of nf4q (packed weight +
scales + x + y) and its % of the copy ceiling; TFLOP/s (2MNK / t) for larger M. `mma µs` (M <= 256), `wgmma µs`
and `dequant µs` time nf4q's three paths forced (NF4Q_CUDA_GEMM): the measurement behind the dispatch thresholds.
"""
import argparse

import torch
import torch.nn.functional as F

import nf4q
from benchmarks.utils import COPY_GBPS, bench_us, bnb_or_none, environment, markdown_table, with_env, write_csv

SHAPES = [  # (name, N, K)
    ("8B q/o", 4096, 4096), ("8B gate/up", 14336, 4096), ("8B down", 4096, 14336),
    ("70B gate/up", 28672, 8192), ("70B down", 8192, 28672),
]
MS = [1, 4, 16, 64, 256, 1024, 4096]


def forced(path, fn):
    return with_env("NF4Q_CUDA_GEMM", path, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes and M in {1, 16, 64, 512, 4096}")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    shapes = [SHAPES[0], SHAPES[3]] if args.quick else SHAPES
    ms = [1, 16, 64, 512, 4096] if args.quick else MS
    bnb = bnb_or_none()
    torch.manual_seed(0)
    rows = []
    for name, N, K in shapes:
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = nf4q.quantize(W, blocksize=64, double_quant=True)
        w4 = qw.op_args()
        wbytes = sum(t.numel() * t.element_size() for t in (qw.packed, qw.absmax, qw.nested_absmax))
        if bnb is not None:
            bq, bstate = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            nf = lambda: torch.ops.nf4q.gemm_4bit(x, *w4, None)  # noqa: E731
            r = {"shape": f"{name} {N}x{K}", "M": M, "bf16_us": bench_us(lambda: F.linear(x, W)),
                 "nf4q_us": bench_us(nf)}
            if bnb is not None:
                r["bnb_us"] = bench_us(lambda: bnb.matmul_4bit(x, bq.t(), quant_state=bstate))
                r["vs_bnb"] = r["bnb_us"] / r["nf4q_us"]
            r["vs_bf16"] = r["bf16_us"] / r["nf4q_us"]
            if M <= 256:
                r["mma_us"] = bench_us(forced("mma", nf))
            r["fused_us"] = bench_us(forced("fused", nf))
            r["dequant_us"] = bench_us(forced("dequant", nf))
            if M <= 64:
                gbps = (wbytes + 2 * M * (K + N)) / (r["nf4q_us"] * 1e3)
                r["GBps"], r["pct_copy"] = gbps, 100 * gbps / COPY_GBPS
            else:
                r["TFLOPs"] = 2 * M * N * K / (r["nf4q_us"] * 1e6)
            rows.append(r)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del W, qw
        torch.cuda.empty_cache()
    write_csv(args.csv, rows)
    print("\n## bench_linear: y = x @ W^T, W NF4 + double quant, blocksize 64, bf16 activations\n")
    print(environment() + "\n")
    print(markdown_table(rows, [("shape", "shape (N x K)", 0), ("M", "M", 0), ("bf16_us", "bf16 µs", 1),
                                ("bnb_us", "bnb µs", 1), ("nf4q_us", "nf4q µs", 1), ("vs_bf16", "× bf16", 2),
                                ("vs_bnb", "× bnb", 2), ("GBps", "GB/s", 0), ("pct_copy", "% copy", 0),
                                ("TFLOPs", "TFLOP/s", 0), ("mma_us", "mma µs", 1), ("fused_us", "wgmma µs", 1),
                                ("dequant_us", "dequant µs", 1)]))


if __name__ == "__main__":
    main()
