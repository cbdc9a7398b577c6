"""Mixed-adapter batches on one NF4 layer: 32 rows, 4096->4096 and 4096->14336, r=16, bf16 compute, 32 LoRA
adapters loaded. Rows name 1 / 8 / 32 distinct adapters (round robin). Columns:

- `base µs`: the NF4 layer alone;
- `one adapter µs`: every row through one active adapter (the fused QLoRA path, no adapter_names);
- `batched µs`: peft_layers' mixed batch (base op once + grouped bmm over the adapters present, multi_lora.py);
- `loop µs`: PEFT's way, base op once + a Python loop over the adapters present (multi_lora.loop_forward);
- `× one` = batched / one adapter (target <= 1.3 at 32 adapters), `loop ×` = loop / batched (target >= 3).

    python -m benchmarks.bench_multilora [--csv PATH] [--tokens T]

On CPU (no GPU) it runs with a wall-clock timer and smaller default shapes (--full keeps the GPU shapes).
"""
import argparse

import torch
from torch import nn

import nf4q
from peft_layers import LoRAConfig, LoRALayer, multi_lora

SHAPES = [(4096, 4096), (4096, 14336)]  # (in, out)
ROWS, RANK, ADAPTERS = 32, 16, 32
DISTINCT = [1, 8, 32]


def build_layer(k, n, device, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    base = nf4q.Linear4bit.from_linear(lin, compute_dtype=dtype)
    layer = LoRALayer(base, "a0", LoRAConfig(r=RANK, lora_alpha=2 * RANK))
    for i in range(1, ADAPTERS):
        layer.update_layer(f"a{i}", LoRAConfig(r=RANK, lora_alpha=2 * RANK))
    with torch.no_grad():
        for name in layer.adapter_names():
            layer.lora_B[name].weight.normal_(0, 0.02)
    return layer.requires_grad_(False).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row (1 = decode)")
    ap.add_argument("--full", action="store_true", help="GPU shapes on CPU too")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SHAPES if cuda or args.full else [(512, 512), (512, 1792)]
    if cuda:
        from benchmarks.utils import bench_us, environment

        print(environment())
        timer = bench_us
    else:
        print("no GPU: CPU wall clock, reduced shapes (pass --full for the GPU shapes)")
        from benchmarks.utils import cpu_bench_us

        timer = lambda fn: cpu_bench_us(fn, reps=5)  # noqa: E731
    from benchmarks.utils import markdown_table, write_csv

    rows = []
    for k, n in shapes:
        layer = build_layer(k, n, device, dtype)
        x = torch.randn(ROWS, args.tokens, k, device=device, dtype=dtype).squeeze(1)
        with torch.no_grad():
            t_base = timer(lambda: layer.base_layer(x))  # noqa: F821 (the timers run before the del below)
            layer.set_adapter("a0")
            t_one = timer(lambda: layer(x))  # noqa: F821
            for d in DISTINCT:
                names = [f"a{i % d}" for i in range(ROWS)]
                groups = multi_lora.RowGroups(names)
                got = multi_lora.mixed_forward(layer, x, groups)
                ref = multi_lora.loop_forward(layer, x, names)
                err = (got.float() - ref.float()).abs().max().item()
                t_mixed = timer(lambda: multi_lora.mixed_forward(layer, x, multi_lora.RowGroups(names)))  # noqa: F821
                t_loop = timer(lambda: multi_lora.loop_forward(layer, x, names))  # noqa: F821
                rows.append({"K": k, "N": n, "rows": ROWS, "tokens": args.tokens, "r": RANK, "distinct": d,
                             "base_us": t_base, "one_us": t_one, "batched_us": t_mixed, "loop_us": t_loop,
                             "x_one": t_mixed / t_one, "loop_x": t_loop / t_mixed, "max_err": err})
        del layer
    cols = [("K", "K", 0), ("N", "N", 0), ("distinct", "adapters", 0), ("base_us", "base µs", 1),
            ("one_us", "one adapter µs", 1), ("batched_us", "batched µs", 1), ("loop_us", "loop µs", 1),
            ("x_one", "× one", 2), ("loop_x", "loop ×", 2), ("max_err", "max |batched − loop|", 4)]
    print(markdown_table(rows, cols))
    write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
