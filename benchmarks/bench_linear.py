"""y = x @ W^T with W NF4 (double-quantized, blocksize 64): dense bf16 F.linear (cuBLAS), bitsandbytes
matmul_4bit and nf4q gemm_4bit over Llama-3 8B/70B layer shapes and token counts, in one run.

    python -m benchmarks.bench_linear [--quick] [--shapes NAME ...] [--ms M ...] [--csv PATH]
    python -m benchmarks.bench_linear --device cpu [--quick] [--csv PATH]

Columns: µs each (bf16, bnb and nf4q: the best of two timings in rotated order, utils.bench_rotated); nf4q's speedup
vs bf16 and vs bitsandbytes; per row nf4q's GB/s (packed weight + scales + x + y) as % of the copy ceiling and its
TFLOP/s (2MNK / t) as % of the bf16 cuBLAS ceiling (utils.BF16_TFLOPS): the ceiling that binds is the larger of the
two. `mma µs` (M <= 256; at M <= 8 gemv.cu's decode kernel where it applies), `swap µs`, `wgmma µs` and `dequant µs`
time nf4q's four paths forced (NF4Q_CUDA_GEMM): the measurement behind the dispatch thresholds.

--device cpu: dense fp32 and bf16 F.linear, torch's int4 CPU kernel (aten._weight_int4pack_mm_for_cpu, group 64,
bf16 activations), bitsandbytes matmul_4bit (when its CPU backend loads) and nf4q gemm_4bit (fp32 and bf16
activations; `fused µs` / `panel µs` force NF4Q_CPU_GEMM: the measurement behind the CPU threshold), in one run.
Speedups are vs dense fp32. Fastest of 15 perf_counter runs (utils.cpu_bench_us).
"""
import argparse

import torch
import torch.nn.functional as F

import nf4q
from benchmarks.utils import (
    BF16_TFLOPS,
    COPY_GBPS,
    bench_rotated,
    bench_us,
    bnb_or_none,
    cpu_bench_us,
    environment,
    markdown_table,
    with_env,
    write_csv,
)

SHAPES = [  # (name, N, K)
    ("8B q/o", 4096, 4096), ("8B gate/up", 14336, 4096), ("8B down", 4096, 14336),
    ("70B q/o", 8192, 8192), ("70B k/v", 1024, 8192), ("70B gate/up", 28672, 8192), ("70B down", 8192, 28672),
]
MS = [1, 2, 4, 16, 32, 64, 128, 256, 512, 1024, 4096]


def forced(path, fn):
    return with_env("NF4Q_CUDA_GEMM", path, fn)


CPU_SHAPES = [("8B q/o", 4096, 4096), ("8B gate/up", 14336, 4096)]
CPU_MS = [1, 8, 16, 32, 64, 256]


def _torch_int4(W, group=64):
    """torch's own int4 CPU matmul (asymmetric, group-wise) for W, or None where this torch lacks it."""
    try:
        N, K = W.shape
        g = W.float().reshape(N, K // group, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    except (AttributeError, RuntimeError) as e:
        print(f"torch int4 CPU kernel unavailable: {e}")
        return None


def _bnb_cpu(W):
    try:
        import bitsandbytes as bnb

        q, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)  # noqa: E731
        fn(torch.randn(1, W.shape[1], dtype=W.dtype))
        return fn
    except Exception as e:  # noqa: BLE001 -- no CPU backend: skip the column
        print(f"bitsandbytes CPU unavailable: {type(e).__name__}: {e}")
        return None


def cpu_main(args):
    shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
    torch.manual_seed(0)
    rows = []
    for name, N, K in shapes:
        W = torch.randn(N, K) * 0.02
        Wb = W.to(torch.bfloat16)
        w4 = nf4q.quantize(W, blocksize=64, double_quant=True).op_args()
        int4, bnb_fn = _torch_int4(W), _bnb_cpu(W)
        for M in ([1, 8, 64] if args.quick or N > 4096 else CPU_MS):
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            nf = lambda: torch.ops.nf4q.gemm_4bit(x, *w4, None)  # noqa: E731
            r = {"shape": f"{name} {N}x{K}", "M": M, "fp32_us": cpu_bench_us(lambda: F.linear(x, W)),
                 "bf16_us": cpu_bench_us(lambda: F.linear(xb, Wb)), "nf4q_us": cpu_bench_us(nf),
                 "nf4q_bf16_us": cpu_bench_us(lambda: torch.ops.nf4q.gemm_4bit(xb, *w4, None))}
            if int4 is not None:
                r["int4_us"] = cpu_bench_us(lambda: int4(xb))
            if bnb_fn is not None:
                r["bnb_us"] = cpu_bench_us(lambda: bnb_fn(x), reps=5)
            r["vs_fp32"] = r["fp32_us"] / r["nf4q_us"]
            if int4 is not None:
                r["vs_int4"] = r["int4_us"] / r["nf4q_us"]
            if M <= 256:
                r["fused_us"] = cpu_bench_us(with_env("NF4Q_CPU_GEMM", "fused", nf))
            r["panel_us"] = cpu_bench_us(with_env("NF4Q_CPU_GEMM", "panel", nf))
            rows.append(r)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    write_csv(args.csv, rows)
    print(f"\n## bench_linear --device cpu: y = x @ W^T, W NF4 + double quant, blocksize 64, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(markdown_table(rows, [("shape", "shape (N x K)", 0), ("M", "M", 0), ("fp32_us", "dense fp32 µs", 0),
                                ("bf16_us", "dense bf16 µs", 0), ("int4_us", "torch int4 µs", 0),
                                ("bnb_us", "bnb µs", 0), ("nf4q_us", "nf4q µs", 0),
                                ("nf4q_bf16_us", "nf4q bf16-x µs", 0),
                                ("vs_fp32", "× fp32", 2), ("vs_int4", "× int4", 2), ("fused_us", "fused µs", 0),
                                ("panel_us", "panel µs", 0)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes and M in {1, 16, 64, 512, 4096}")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", nargs="+", default=None, help="names from SHAPES, e.g. '70B k/v'")
    ap.add_argument("--ms", nargs="+", type=int, default=None, help="token counts (default MS)")
    args = ap.parse_args()
    if args.device == "cpu":
        return cpu_main(args)
    names = args.shapes or (["8B q/o", "70B gate/up"] if args.quick else [s[0] for s in SHAPES])
    shapes = [s for s in SHAPES if s[0] in names]
    ms = args.ms or ([1, 16, 64, 512, 4096] if args.quick else MS)
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
            rotated = {"bf16_us": lambda: F.linear(x, W), "nf4q_us": nf}  # noqa: F821 (runs before the del)
            if bnb is not None:
                rotated["bnb_us"] = lambda: bnb.matmul_4bit(x, bq.t(), quant_state=bstate)
            r = {"shape": f"{name} {N}x{K}", "M": M, **bench_rotated(rotated)}
            if bnb is not None:
                r["vs_bnb"] = r["bnb_us"] / r["nf4q_us"]
            r["vs_bf16"] = r["bf16_us"] / r["nf4q_us"]
            if M <= 256:
                r["mma_us"] = bench_us(forced("mma", nf))
            r["swap_us"] = bench_us(forced("swap", nf))
            r["fused_us"] = bench_us(forced("fused", nf))
            r["dequant_us"] = bench_us(forced("dequant", nf))
            gbps = (wbytes + 2 * M * (K + N)) / (r["nf4q_us"] * 1e3)
            r["pct_copy"] = 100 * gbps / COPY_GBPS
            r["TFLOPs"] = 2 * M * N * K / (r["nf4q_us"] * 1e6)
            r["pct_cublas"] = 100 * r["TFLOPs"] / BF16_TFLOPS
            rows.append(r)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        del W, qw
        torch.cuda.empty_cache()
    write_csv(args.csv, rows)
    print("\n## bench_linear: y = x @ W^T, W NF4 + double quant, blocksize 64, bf16 activations\n")
    print(environment() + "\n")
    print(markdown_table(rows, [("shape", "shape (N x K)", 0), ("M", "M", 0), ("bf16_us", "bf16 µs", 1),
                                ("bnb_us", "bnb µs", 1), ("nf4q_us", "nf4q µs", 1), ("vs_bf16", "× bf16", 2),
                                ("vs_bnb", "× bnb", 2), ("pct_copy", "% copy", 0), ("TFLOPs", "TFLOP/s", 0),
                                ("pct_cublas", "% cuBLAS", 0), ("mma_us", "mma µs", 1), ("swap_us", "swap µs", 1),
                                ("fused_us", "wgmma µs", 1), ("dequant_us", "dequant µs", 1)]))


if __name__ == "__main__":
    main()
