"""AdamW step time: torch (fused), bitsandbytes (when importable) and nf4q's variants, on the GPU.

    python -m benchmarks.bench_optim [--quick] [--sizes 16M 256M 1B] [--dtypes fp32 bf16] [--max-seconds S]

Parameters are 4096x4096 matrices (plus two 4096 vectors) adding up to each size. The time is the median
of a do_bench run (CUDA events, L2 flushed between steps); paged runs under a budget of 25% of their
states are slow (host transfers), so they take the median of 3 event-timed steps and report the achieved
host<->device transfer bandwidth. "floor" is the step's unavoidable bytes (param read+write, grad read,
states read+write) at the measured device copy bandwidth. The markdown table is printed last.
"""
import argparse
import gc
import statistics
import time

import torch

import nf4q
from nf4q import optim

try:
    from benchmarks import utils as _bench_utils  # the team's timer, when it exists
except ImportError:
    _bench_utils = None

SIZES = {"16M": 1, "256M": 16, "1B": 64}  # number of 4096x4096 matrices
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _median_ms(fn):
    if _bench_utils is not None and hasattr(_bench_utils, "bench_ms"):
        return _bench_utils.bench_ms(fn)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _event_ms(fn, reps=3):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth in GB/s (bytes read + written), the ceiling the floors use."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def state_bytes_per_param(bits, dtype):
    p = torch.empty((), dtype=dtype).element_size()
    return 3 * p + (16 if bits == 32 else 4)  # param r+w, grad r, two states r+w


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:  # not installed, or no GPU backend
        return None


def variants(bnb, total_state_bytes):
    out = [("torch AdamW fused", 32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), False)]
    if bnb is not None:
        out += [("bnb AdamW32bit", 32, lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-4), False),
                ("bnb PagedAdamW32bit", 32, lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-4), False),
                ("bnb AdamW8bit", 8, lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4), False),
                ("bnb PagedAdamW8bit", 8, lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4), False)]
    out += [("nf4q AdamW", 32, lambda ps: optim.AdamW(ps, lr=1e-4), False),
            ("nf4q PagedAdamW", 32, lambda ps: optim.PagedAdamW(ps, lr=1e-4), False),
            ("nf4q AdamW8bit", 8, lambda ps: optim.AdamW8bit(ps, lr=1e-4), False),
            ("nf4q PagedAdamW8bit", 8, lambda ps: optim.PagedAdamW8bit(ps, lr=1e-4), False),
            ("nf4q PagedAdamW @25%", 32,
             lambda ps: optim.PagedAdamW(ps, lr=1e-4, gpu_budget_bytes=total_state_bytes(32) // 4), True),
            ("nf4q PagedAdamW8bit @25%", 8,
             lambda ps: optim.PagedAdamW8bit(ps, lr=1e-4, gpu_budget_bytes=total_state_bytes(8) // 4), True)]
    return out


def run_size(size, dtype_name, ceiling, bnb, deadline):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4096, 4096, device="cuda", dtype=dtype)) for _ in range(SIZES[size])]
    params += [torch.nn.Parameter(torch.ones(4096, device="cuda", dtype=dtype)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    states = lambda bits: n * (8 if bits == 32 else 2)  # noqa: E731  (absmax adds 1/64 for 8-bit)
    rows, torch_ms = [], None
    for name, bits, make, budgeted in variants(bnb, states):
        if time.monotonic() > deadline:
            print(f"skipped {size} {dtype_name} {name}: out of time", flush=True)
            continue
        try:
            opt = make(params)
            opt.step()  # allocates the states
            torch.cuda.synchronize()
            pager = opt.page_manager(params[0].device) if isinstance(opt, optim.AdamW) else None
            moved0 = pager.bytes_to_device + pager.bytes_to_host if pager else 0
            ms = _event_ms(opt.step) if budgeted else _median_ms(opt.step)
            steps = 3 if budgeted else None
            transfer = ((pager.bytes_to_device + pager.bytes_to_host - moved0) / steps / ms / 1e6
                        if budgeted and pager else None)
        except Exception as exc:  # one failing library must not end the run
            print(f"{size} {dtype_name} {name}: failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        finally:
            opt = pager = None
            gc.collect()
            torch.cuda.empty_cache()
        floor = n * state_bytes_per_param(bits, dtype) / ceiling / 1e6
        if name.startswith("torch"):
            torch_ms = ms
        rows.append(dict(size=size, dtype=dtype_name, name=name, ms=ms, floor_x=ms / floor,
                         gbps=n * state_bytes_per_param(bits, dtype) / ms / 1e6,
                         vs_torch=(torch_ms / ms) if torch_ms else None, transfer=transfer))
        print(f"{size:>5} {dtype_name} {name:<26} {ms:9.3f} ms  {ms / floor:5.2f}x floor"
              + (f"  transfer {transfer:.1f} GB/s" if transfer else ""), flush=True)
    del params
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def markdown(rows, ceiling, bnb):
    props = torch.cuda.get_device_properties(0)
    lines = [f"GPU {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"bitsandbytes {getattr(bnb, '__version__', 'absent')}, nf4q {nf4q.__version__}; "
             f"copy ceiling {ceiling:.0f} GB/s",
             "",
             "| params | dtype | optimizer | step ms | GB/s | × byte floor | speedup vs torch fused | transfer GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_torch']:.2f}×" if r["vs_torch"] else ""
        tr = f"{r['transfer']:.1f}" if r["transfer"] else ""
        lines.append(f"| {r['size']} | {r['dtype']} | {r['name']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{r['floor_x']:.2f} | {vs} | {tr} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16M fp32 only")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="skip what is left after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_optim needs a GPU")
    sizes, dtypes = (["16M"], ["fp32"]) if args.quick else (args.sizes, args.dtypes)
    deadline = time.monotonic() + args.max_seconds
    bnb = _bnb()
    ceiling = copy_bandwidth()
    rows = []
    for size in sizes:
        for dtype_name in dtypes:
            rows += run_size(size, dtype_name, ceiling, bnb, deadline)
    print()
    print(markdown(rows, ceiling, bnb))


if __name__ == "__main__":
    main()
