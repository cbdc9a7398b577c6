"""NF4 dequantize throughput: nf4q's CUDA kernel (double-quantized absmax decoded inside the kernel) against
bitsandbytes' dequantize_4bit, blocksize 64, bf16 output.

    python -m benchmarks.bench_dequant [--csv PATH]

`out GB/s` counts the bf16 output only (the issue's anchor: bitsandbytes 1315 GB/s at 14336x4096, target
>= 3400); `total GB/s` counts every byte read and written, comparable with the copy ceiling (4274 GB/s) and with a
write-only pass over the output (`zero_()`), the rate a write-heavy kernel meets first.
"""
import argparse

import torch

import nf4q
from benchmarks.utils import COPY_GBPS, bench_us, bnb_or_none, environment, markdown_table, write_csv

SHAPES = [(4096, 4096), (14336, 4096), (28672, 8192)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    bnb = bnb_or_none()
    torch.manual_seed(0)
    rows = []
    for N, K in SHAPES:
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        out_bytes = W.numel() * 2
        for dq in (True, False):
            qw = nf4q.quantize(W, blocksize=64, double_quant=dq)
            in_bytes = sum(t.numel() * t.element_size() for t in (qw.packed, qw.absmax, qw.nested_absmax)
                           if t is not None)
            out = torch.empty_like(W)
            w4 = qw.op_args()
            r = {"shape": f"{N}x{K}", "double_quant": dq,
                 "nf4q_us": bench_us(lambda: torch.ops.nf4q.dequantize_4bit.out(*w4, torch.bfloat16, out=out))}
            r["nf4q_out_GBps"] = out_bytes / (r["nf4q_us"] * 1e3)
            r["nf4q_total_GBps"] = (out_bytes + in_bytes) / (r["nf4q_us"] * 1e3)
            r["pct_copy"] = 100 * r["nf4q_total_GBps"] / COPY_GBPS
            if bnb is not None:
                bq, st = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type="nf4")
                r["bnb_us"] = bench_us(lambda: bnb.functional.dequantize_4bit(bq, st))
                r["bnb_out_GBps"] = out_bytes / (r["bnb_us"] * 1e3)
                r["vs_bnb"] = r["bnb_us"] / r["nf4q_us"]
            rows.append(r)
            print(r, flush=True)
        r = {"shape": f"{N}x{K}", "double_quant": "copy (ceiling)"}
        src = torch.empty_like(W)
        r["nf4q_us"] = bench_us(lambda: out.copy_(src))
        r["nf4q_total_GBps"] = 2 * out_bytes / (r["nf4q_us"] * 1e3)
        rows.append(r)
        # Four fifths of dequantize's bytes are writes: the write-only rate is the other ceiling.
        r = {"shape": f"{N}x{K}", "double_quant": "write-only (ceiling)"}
        r["nf4q_us"] = bench_us(lambda: out.zero_())
        r["nf4q_total_GBps"] = out_bytes / (r["nf4q_us"] * 1e3)
        rows.append(r)
    write_csv(args.csv, rows)
    print("\n## bench_dequant: NF4 -> bf16, blocksize 64\n")
    print(environment() + "\n")
    print(markdown_table(rows, [("shape", "shape", 0), ("double_quant", "double quant", 0), ("nf4q_us", "nf4q µs", 1),
                                ("nf4q_out_GBps", "out GB/s", 0), ("nf4q_total_GBps", "total GB/s", 0),
                                ("pct_copy", "% copy", 0), ("bnb_us", "bnb µs", 1), ("bnb_out_GBps", "bnb out GB/s", 0),
                                ("vs_bnb", "× bnb", 2)]))


if __name__ == "__main__":
    main()
