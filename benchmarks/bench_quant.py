"""Quantize / dequantize throughput: nf4q (C++ or CUDA kernel) beside bitsandbytes and the pure-torch reference.

    python -m benchmarks.bench_quant [--device cpu|cuda] [--shape 4096 4096] [--csv PATH]

GB/s counts the bytes of the unquantized side (the input of quantize, the output of dequantize), as the
issue's anchors do. NF4 with double quantization, blocksize 64. The CPU timer is the fastest of `reps`
perf_counter runs after a warm-up (utils.cpu_bench_us); the GPU timer is triton's do_bench median.
"""
import argparse
import os
import platform

import torch

import nf4q
from nf4q import _reference as ref

from .utils import bench_us, cpu_bench_us, with_env, write_csv


def _time_ms(fn, device, reps):
    return bench_us(fn) / 1e3 if device == "cuda" else cpu_bench_us(fn, reps) / 1e3


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception:  # not installed, or no backend for this device
        return None
    return F


def run(device="cpu", shape=(4096, 4096), dtype=torch.float32, reps=9):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=device, dtype=dtype)
    nbytes = w.numel() * w.element_size()
    qw = nf4q.quantize(w)
    rows = []

    def add(impl, op, fn, r=reps):
        ms = _time_ms(fn, device, r)
        rows.append(dict(impl=impl, op=op, ms=ms, gbps=nbytes / ms / 1e6))

    add("nf4q", "quantize", lambda: nf4q.quantize(w))
    add("nf4q", "dequantize", lambda: qw.dequantize())
    # The same kernel into a reused buffer: on the CPU a fresh 64 MB output costs more in page faults than the
    # kernel itself, so this row shows what the kernel does.
    out = torch.empty(shape, device=device, dtype=dtype)
    add("nf4q", "dequantize .out (reused buffer)",
        lambda: torch.ops.nf4q.dequantize_4bit.out(*qw.op_args(), dtype, out=out))
    if device == "cpu":  # each SIMD variant of the CPU decode, forced (those the CPU lacks fall back)
        for isa in ("scalar", "avx2", "avx512"):
            add("nf4q", f"dequantize ({isa})", with_env("NF4Q_CPU_ISA", isa, lambda: qw.dequantize()))
    F = _bnb()
    if F is not None:
        try:
            _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            packed = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)[0]
            add("bitsandbytes", "quantize",
                lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
            add("bitsandbytes", "dequantize", lambda: F.dequantize_4bit(packed, state))
        except Exception as e:  # a backend without these kernels
            print(f"bitsandbytes skipped: {e}")
    add("reference", "quantize", lambda: ref.quantize_4bit(w, qw.code, 64), r=2)
    add("reference", "dequantize", lambda: ref.dequantize_4bit(*qw.op_args(), dtype), r=2)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    rows = run(args.device, tuple(args.shape), getattr(torch, args.dtype))
    hw = (torch.cuda.get_device_name() if args.device == "cuda" else
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"\nNF4+DQ quantize/dequantize, {args.shape[0]}x{args.shape[1]} {args.dtype}, {hw}, "
          f"torch {torch.__version__}")
    print("| impl | op | ms | GB/s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['op']} | {r['ms']:.2f} | {r['gbps']:.2f} |")
    write_csv(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
