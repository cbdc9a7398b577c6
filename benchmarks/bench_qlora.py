"""One QLoRA layer, forward + backward (dx, dA, dB): bf16 base + LoRA (torch), bitsandbytes matmul_4bit + LoRA,
and nf4q's lora_gemm_4bit op (issue 4's list: M in {512, 2048, 4096, 8192}, K->N in {4096->4096,
4096->14336, 14336->4096, 8192->28672}, r in {8, 16, 64}).

    python -m benchmarks.bench_qlora [--quick] [--dropout 0.05] [--csv PATH]
    python -m benchmarks.bench_qlora --forward      # inference: forward only, M in {16, 64, 256, 512}

nf4q runs as users call it: `Linear4bit.lora_forward` (one op call, C++ autograd), LoRA dropout inside the op when
--dropout > 0 (bf16+LoRA and bnb+LoRA then apply torch's dropout to their LoRA branch, as PEFT does).
`× bf16` is nf4q's time over the bf16+LoRA time. `wgmma µs` / `slabs µs` force nf4q's two large-M strategies
(NF4Q_CUDA_LORA): the fused wgmma kernel (W dequantized in shared memory only) and cuBLAS on slabs of dequantized W
(a power of two of rows or columns within 32 MiB, at least 2048 rows or 1024 columns). `host µs` is the CPU time to
issue one forward + backward into an idle GPU queue (median of 10). `peak MiB` is the extra memory one step
allocates.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import nf4q
from benchmarks.utils import bench_us, bnb_or_none, environment, markdown_table, with_env, write_csv

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K in, N out)
MS = [512, 2048, 4096, 8192]
RANKS = [8, 16, 64]


def step_fn(layer, x, A, B, gy):
    def step():
        y = layer(x)
        return torch.autograd.grad(y, (x, A, B), gy)
    return step


def forced(path, fn):
    return with_env("NF4Q_CUDA_LORA", path, fn)


def host_us(fn, steps=10):
    """CPU time to issue one fn(): median over steps, each issued into an idle GPU queue (so nothing blocks)."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * sorted(times)[len(times) // 2]


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


FORWARD_MS = [16, 64, 256, 512]


def forward_main(args):
    """lora_gemm_4bit forward alone at serving batch sizes, 8192 -> 28672, r = 16: bf16 + LoRA (torch), nf4q's
    automatic path (the swapped wgmma kernel with the LoRA term as extra reduction steps, M <= 2048) and its
    two other strategies forced (NF4Q_CUDA_LORA=fused|slabs; at M <= 64 `slabs` is gemm_4bit then a rank-r
    update)."""
    K, N, r, s = 8192, 28672, 16, 2.0
    torch.manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    w4 = nf4q.quantize(W, blocksize=64, double_quant=True).op_args()
    A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * 0.01
    B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.01
    rows = []
    for M in FORWARD_MS:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        nf = lambda: torch.ops.nf4q.lora_gemm_4bit(x, *w4, None, A, B, s)  # noqa: E731
        row = {"M": M, "bf16_us": bench_us(lambda: F.linear(x, W) + s * F.linear(F.linear(x, A), B)),
               "nf4q_us": bench_us(nf), "fused_us": bench_us(forced("fused", nf)),
               "slabs_us": bench_us(forced("slabs", nf))}
        row["vs_bf16"] = row["bf16_us"] / row["nf4q_us"]
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_csv(args.csv, rows)
    print(f"\n## bench_qlora --forward: lora_gemm_4bit forward, {K}->{N}, r = {r}, bf16, NF4 + double quant\n")
    print(environment() + "\n")
    print(markdown_table(rows, [("M", "M", 0), ("bf16_us", "bf16+LoRA µs", 1), ("nf4q_us", "nf4q µs", 1),
                                ("vs_bf16", "× bf16", 2), ("fused_us", "wgmma µs", 1), ("slabs_us", "slabs µs", 1)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="M = 4096 and r = 16 only")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout in every stack (training mode)")
    ap.add_argument("--forward", action="store_true", help="forward only at serving batch sizes (see forward_main)")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    if args.forward:
        return forward_main(args)
    ms, ranks = ([4096], [16]) if args.quick else (MS, RANKS)
    bnb = bnb_or_none()
    torch.manual_seed(0)
    rows = []
    for K, N in SHAPES:
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        dense = torch.nn.Linear(K, N, bias=False, device="meta")
        dense.weight = torch.nn.Parameter(W, requires_grad=False)
        base = nf4q.Linear4bit.from_linear(dense, blocksize=64, double_quant=True)
        if bnb is not None:
            bq, st = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        for r in ranks:
            A = (torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
            B = (torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
            s, p = 2.0, args.dropout
            lora = lambda x: s * F.linear(F.linear(F.dropout(x, p) if p else x, A), B)  # noqa: E731
            layers = {"bf16": lambda x: F.linear(x, W) + lora(x),
                      "nf4q": lambda x: base.lora_forward(x, A, B, s, p)}
            if bnb is not None:
                layers["bnb"] = lambda x: bnb.matmul_4bit(x, bq.t(), quant_state=st) + lora(x)
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                row = {"shape": f"{K}->{N}", "r": r, "M": M}
                for name, layer in layers.items():
                    fn = step_fn(layer, x, A, B, gy)
                    row[f"{name}_us"] = bench_us(fn)
                    row[f"{name}_host_us"] = host_us(fn)
                    row[f"{name}_peak_MiB"] = peak_mib(fn)
                nf = step_fn(layers["nf4q"], x, A, B, gy)
                row["fused_us"] = bench_us(forced("fused", nf))
                row["slabs_us"] = bench_us(forced("slabs", nf))
                row["fused_peak_MiB"] = peak_mib(forced("fused", nf))
                row["time_vs_bf16"] = row["nf4q_us"] / row["bf16_us"]
                if "bnb_us" in row:
                    row["bnb_vs_bf16"] = row["bnb_us"] / row["bf16_us"]
                rows.append(row)
                print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                del x, gy
            A = B = None  # noqa: F841 (frees them before the next rank)
        W = base = None  # noqa: F841
        torch.cuda.empty_cache()
    write_csv(args.csv, rows)
    print(f"\n## bench_qlora: one layer forward + backward (dx, dA, dB), bf16, NF4 + double quant, blocksize 64, "
          f"LoRA dropout {args.dropout}\n")
    print(environment() + "\n")
    print(markdown_table(rows, [("shape", "K->N", 0), ("r", "r", 0), ("M", "M", 0), ("bf16_us", "bf16+LoRA µs", 0),
                                ("bnb_us", "bnb+LoRA µs", 0), ("nf4q_us", "nf4q µs", 0),
                                ("time_vs_bf16", "nf4q time / bf16", 2), ("bnb_vs_bf16", "bnb time / bf16", 2),
                                ("fused_us", "wgmma µs", 0), ("slabs_us", "slabs µs", 0),
                                ("bf16_host_us", "bf16 host µs", 0), ("nf4q_host_us", "nf4q host µs", 0),
                                ("bf16_peak_MiB", "bf16 peak MiB", 0), ("bnb_peak_MiB", "bnb peak MiB", 0),
                                ("nf4q_peak_MiB", "nf4q peak MiB", 0), ("fused_peak_MiB", "wgmma peak MiB", 0)]))


if __name__ == "__main__":
    main()
