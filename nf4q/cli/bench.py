"""`nf4q bench`: runs the benchmarks of a repository checkout (benchmarks/ is not installed) and prints one table
with the hardware and versions. nf4q's core never imports benchmarks/: only this subcommand does, on request."""
import sys
from pathlib import Path

from ._common import EXIT_OK, CliError, _print_table

BENCHMARKS = ("bench_quant", "bench_dequant", "bench_linear", "bench_qlora", "bench_optim", "bench_train",
              "bench_generate")
# minutes of end-to-end training or decoding of an 8B-shaped model: run when named (`nf4q bench train`)
ON_REQUEST = ("bench_train", "bench_generate")


def _environment() -> dict:
    import platform

    import torch

    from .. import __version__, has_cuda_kernels

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    env = {"cpu": f"{cpu} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} "
                  f"cores)", "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "nf4q": f"{__version__} (CUDA kernels: {has_cuda_kernels()})"}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001  (absent or broken: both mean "not compared")
        env["bitsandbytes"] = "not installed"
    return env


class _Counting:
    """stdout wrapper that notes whether a benchmark printed anything (if not, its returned rows get printed)."""

    def __init__(self, stream):
        self.stream, self.wrote = stream, False

    def write(self, text):
        self.wrote = self.wrote or bool(text.strip())
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _run_benchmark(mod, name, quick, tmp):
    """Call a benchmark's main() with --quick/--csv when its parser has them (read from its source); mains that
    parse sys.argv themselves see only those flags. Returns its rows: the returned list, else its CSV."""
    import contextlib
    import csv
    import inspect

    try:
        src = inspect.getsource(mod)
    except (OSError, TypeError):
        src = ""
    csv_path = Path(tmp) / f"{name}.csv"
    argv = (["--quick"] if quick and '"--quick"' in src else []) + (["--csv", str(csv_path)] if '"--csv"' in src
                                                                    else [])
    old_argv, sys.argv = sys.argv, [f"benchmarks/{name}.py", *argv]
    out = _Counting(sys.stdout)
    try:
        with contextlib.redirect_stdout(out):
            result = mod.main(argv) if inspect.signature(mod.main).parameters else mod.main()
    finally:
        sys.argv = old_argv
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        if not out.wrote:
            _print_table(result)
        return result
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            return list(csv.DictReader(f))
    return []


def _benchmarks_on_path():
    """benchmarks/ is not installed (it lives in the repository): from a checkout (the current directory, or the
    one an editable install points at) put it on sys.path."""
    import importlib.util

    if importlib.util.find_spec("benchmarks") is not None:
        return
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return


def cmd_bench(args) -> int:
    import csv
    import importlib
    import tempfile

    import torch

    _benchmarks_on_path()
    print("# nf4q bench\n")
    _print_table([{"": k, "value": v} for k, v in _environment().items()])
    collected, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        named = [n if n.startswith("bench_") else f"bench_{n}" for n in args.names]
        if any(n not in BENCHMARKS for n in named):
            raise CliError(f"unknown benchmark in {args.names}; known: {', '.join(BENCHMARKS)}")
        for name in args.only or named or [n for n in BENCHMARKS if n not in ON_REQUEST]:
            print(f"\n## {name}\n", flush=True)
            try:
                mod = importlib.import_module(f"benchmarks.{name}")
                if not callable(getattr(mod, "main", None)):
                    print(f"skipped: benchmarks/{name}.py has no main()")
                    continue
                rows = _run_benchmark(mod, name, args.quick, tmp)
            except ModuleNotFoundError as e:
                if e.name not in (f"benchmarks.{name}", "benchmarks"):
                    raise
                print(f"skipped: benchmarks/{name}.py is not present in this install (the benchmarks are not "
                      f"installed with nf4q: run `nf4q bench` from a repository checkout)")
                continue
            except SystemExit as e:  # argparse errors, or "needs a GPU" messages
                if isinstance(e.code, str):
                    print(f"skipped: {e.code}")
                elif e.code:
                    failed.append(f"{name} exited with status {e.code}")
                continue
            except Exception as e:  # noqa: BLE001  (one broken benchmark must not hide the others)
                if not torch.cuda.is_available() and any(w in str(e).lower() for w in ("cuda", "nvidia", "gpu")):
                    print(f"skipped: needs a CUDA GPU ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                else:
                    print(f"failed: {type(e).__name__}: {e}")
                    failed.append(f"{name}: {type(e).__name__}: {e}")
                continue
            collected += [{"bench": name, **r} for r in rows]
    if args.csv:
        cols = list(dict.fromkeys(k for r in collected for k in r))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols or ["bench"])
            writer.writeheader()
            writer.writerows(collected)
        print(f"\nwrote {len(collected)} rows to {args.csv}")
    if args.plot:
        _plot(collected, args.plot)
    if failed:
        raise CliError("; ".join(failed))
    return EXIT_OK


def _plot(rows, path):
    try:
        from benchmarks.plot import plot
        n = plot(rows, path)
    except ModuleNotFoundError as e:
        if e.name not in ("matplotlib", "benchmarks", "benchmarks.plot"):
            raise
        need = "matplotlib (pip install 'nf4q[plot]')" if e.name == "matplotlib" else \
            "benchmarks/plot.py (run from a repository checkout)"
        raise CliError(f"--plot needs {need}") from None
    print(f"\nwrote {path} ({n} panels)" if n else f"\n--plot: no bench_linear or bench_train rows to plot, "
                                                       f"{path} not written")

