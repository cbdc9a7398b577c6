"""The one timer of the benchmarks (triton.testing.do_bench median, L2 flushed before every run) and the
markdown/CSV output helpers. Ceilings measured on the H200: copy 4274 GB/s (read + write), bf16 GEMM 686 TFLOP/s."""
import csv
import os
import platform

import torch

COPY_GBPS = 4274.0
BF16_TFLOPS = 686.0


def bench_us(fn, warmup_ms=10, rep_ms=60):
    """Median time of fn() in microseconds. do_bench zeroes a 256 MB buffer before each run (L2 flushed)."""
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_rotated(fns, rounds=2, timer=None):
    """{name: time in µs} of each fn in `fns` ({name: fn}), the fastest of `rounds` timings taken in rotated order.
    A GPU runs its next kernel at the clock the previous load left it (a compute-bound cuBLAS call heats it):
    timed once in a fixed order, whatever follows the heaviest call read up to ~8% slow on the H200."""
    timer = timer or bench_us
    names = list(fns)
    best = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best[name] = min(best.get(name, float("inf")), timer(fns[name]))
    return best


def cpu_bench_us(fn, reps=15):
    """Fastest of `reps` wall-clock runs of fn() in microseconds, after one warm-up run (CPU benchmarks). The
    minimum, not the median: on cores shared with other processes the median measures the scheduler."""
    import time

    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best


def with_env(name, value, fn):
    """fn wrapped to run with environment variable `name` set to `value` (e.g. forcing one CUDA path)."""
    def run():
        os.environ[name] = value
        try:
            return fn()
        finally:
            os.environ.pop(name, None)
    return run


def bnb_or_none():
    """bitsandbytes when it imports with a CUDA backend, else None (the benchmarks then skip its column)."""
    try:
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        return bnb
    except Exception as e:  # noqa: BLE001 -- any failure means "not available here"
        print(f"bitsandbytes unavailable: {type(e).__name__}: {e}")
        return None


def environment():
    """One markdown line per fact that the numbers depend on."""
    bnb = bnb_or_none()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"- GPU: {gpu}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
             f"- bitsandbytes {bnb.__version__ if bnb else 'not available'}",
             f"- timer: triton.testing.do_bench median, L2 flushed; ceilings: copy {COPY_GBPS:.0f} GB/s, "
             f"bf16 GEMM {BF16_TFLOPS:.0f} TFLOP/s"]
    return "\n".join(lines)


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, digits)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k), d) for k, _, d in columns) + " |")
    return "\n".join(out)


def write_csv(path, rows):
    if not path or not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
