"""SM clock and board power while one kernel runs back to back: dense bf16 F.linear (cuBLAS) and nf4q gemm_4bit.

    python -m benchmarks.clock_trace [--shapes NxK ...] [--ms M ...] [--seconds S]

Why: from M ~ 128 up an H200 runs both kernels into its power limit and lowers the SM clock (notes/cuda.md, round 5),
so µs alone do not say whether a kernel is short of issue slots or of energy. Each kernel runs back to back for
`--seconds` while `nvidia-smi --query-gpu=clocks.sm,power.draw -lms 20` samples the GPU; the table gives µs per
call (the last batch, CUDA events) and the mean MHz and W over the second half of the run (the clock has settled).
"""
import argparse
import shutil
import subprocess
import time

import torch
import torch.nn.functional as F

import nf4q
from benchmarks.utils import environment, markdown_table

SMI = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "20"]


def parse_samples(text):
    """[(MHz, W)] from nvidia-smi's csv lines ('1980, 561.32'); lines with '[N/A]' or other text are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            continue
        try:
            samples.append((float(fields[0]), float(fields[1])))
        except ValueError:
            continue
    return samples


def settled_mean(samples):
    """Mean MHz and W over the second half of the samples (the first half is the clock ramping), or (nan, nan)."""
    tail = samples[len(samples) // 2:]
    if not tail:
        return float("nan"), float("nan")
    return sum(s[0] for s in tail) / len(tail), sum(s[1] for s in tail) / len(tail)


def time_batch(fn, calls):
    """µs per call of `calls` back-to-back calls: CUDA events on a GPU, the wall clock otherwise."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return 1e3 * start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - t0) / calls


def trace(fn, seconds=1.5, batch=20, smi=SMI):
    """(µs per call in the last batch, mean MHz, mean W) while fn runs back to back for `seconds`, sampled by `smi`
    (a command printing 'MHz, W' lines until terminated)."""
    with subprocess.Popen(smi, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            t0 = time.perf_counter()
            us = time_batch(fn, batch)
            while time.perf_counter() - t0 < seconds:
                us = time_batch(fn, batch)
        finally:
            proc.terminate()
        out, _ = proc.communicate()
    return (us, *settled_mean(parse_samples(out)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["28672x8192", "4096x14336"], help="N x K of W")
    ap.add_argument("--ms", nargs="+", type=int, default=[16, 128, 512, 2048], help="token counts")
    ap.add_argument("--seconds", type=float, default=1.5, help="back-to-back run per kernel")
    args = ap.parse_args()
    if not torch.cuda.is_available() or shutil.which(SMI[0]) is None:
        raise SystemExit("clock_trace needs a CUDA GPU and nvidia-smi on the PATH")
    print(environment())
    rows = []
    for shape in args.shapes:
        N, K = (int(v) for v in shape.lower().split("x"))
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        w4 = nf4q.quantize(W, blocksize=64, double_quant=True).op_args()
        for M in args.ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{N}x{K}", "M": M}
            kernels = {"bf16": lambda: F.linear(x, W), "nf4q": lambda: torch.ops.nf4q.gemm_4bit(x, *w4, None)}
            for name, fn in kernels.items():
                row[f"{name} us"], row[f"{name} MHz"], row[f"{name} W"] = trace(fn, args.seconds)
                time.sleep(0.5)  # let the clock recover between kernels
            rows.append(row)
            print(row, flush=True)
    columns = [("shape", "shape (N x K)", 0), ("M", "M", 0)]
    for name in ("bf16", "nf4q"):
        columns += [(f"{name} us", f"{name} µs", 1), (f"{name} MHz", f"{name} MHz", 0), (f"{name} W", f"{name} W", 0)]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
