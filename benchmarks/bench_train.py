"""End-to-end QLoRA training steps on one GPU: transformers + bitsandbytes + peft vs peft bf16 LoRA vs nf4q.

    python -m benchmarks.bench_train                                  # 8 Llama-3-8B-shaped layers, stacks a-d
    python -m benchmarks.bench_train --batches 2x2048 --dropout 0 0.05 --stacks b d --csv train.csv
    python -m benchmarks.bench_train --layers 80 --shape 70b --batches 1x512 1x2048   # 70B shapes, one GPU
    python -m benchmarks.bench_train --stacks d --batches 2x2048 --profile --memory-snapshot snap.pickle

Stacks, all on one transformers LlamaForCausalLM (random weights), LoRA r=16 alpha=32 on q/k/v/o/gate/up/down,
gradient checkpointing (use_reentrant=False), SDPA, bf16, the same token batch every step, weight decay 0:
  a  transformers + bitsandbytes + peft, the documented QLoRA recipe: BitsAndBytesConfig(nf4, double quant, bf16
     compute), prepare_model_for_kbit_training (norms, embeddings and lm_head upcast to fp32), bnb PagedAdamW
  b  the same without prepare_model_for_kbit_training (no fp32 upcast)
  c  peft LoRA over the bf16 model, torch AdamW (fused)
  d  nf4q: nf4q.from_pretrained (where nf4q exports it; else a bf16 load + nf4q.quantize_model) +
     peft_layers.get_peft_model + nf4q.optim.PagedAdamW
  e  d under torch.compile (mode="reduce-overhead": CUDA graphs), only when asked for (--stacks ... e): the
     compile takes its warm-up steps
AdamW lr 2e-4 (--lr). The first 8 losses are printed per case; "vs (b)" is the tok/s ratio to (b) at the same batch
and dropout, beside the largest loss difference to (b) (issue 13 asks nf4q's within 0.02).
Weights: --shape 8b saves the model once as safetensors in a temp dir and every stack loads it (from_pretrained);
--shape 70b (or --layerwise) builds the model one decoder layer at a time on the GPU from a meta skeleton,
quantizing each layer as soon as it exists (nf4q, or bitsandbytes' Linear4bit for a/b), so the bf16 model never
exists; the seed makes the weights identical across stacks. LoRA A matrices are re-drawn from a seed per layer and
projection (B = 0), so every stack starts from the same adapters and the losses are comparable.

Each stack x batch x dropout runs in its own subprocess: peak = torch.cuda.max_memory_allocated over the warm-up and
timed steps, after the model and optimizer exist (paged optimizer state lives in CUDA managed memory, outside it).
ms/step: median over --steps steps, each synchronize() + perf_counter. A missing bitsandbytes/peft is "skipped".
--profile: torch.profiler on one nf4q step (host vs GPU time, kernels per step). --memory-snapshot FILE: allocator
history of one nf4q step, dumped to FILE (open it at pytorch.org/memory_viz) and its peak analysed: the top 15
allocation sites alive at the peak (benchmarks/train_diagnostics.py). --diag-stack b d looks at bitsandbytes too.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # LlamaConfig fields (num_hidden_layers comes from --layers)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),  # tests, CPU
}
STACKS = {"a": "bnb+peft QLoRA recipe", "b": "bnb+peft, no fp32 upcast", "c": "peft LoRA, bf16 base", "d": "nf4q",
          "e": "nf4q + torch.compile"}
DEFAULT_STACKS = ["a", "b", "c", "d"]  # e compiles for a minute or two first: asked for by name
N_LOSSES = 8


class Skipped(Exception):
    """The stack cannot run here (a package is missing, or it does not apply to this shape)."""


def config(shape, layers):
    return {**SHAPES[shape], "num_hidden_layers": layers, "max_position_embeddings": 8192,
            "attn_implementation": "sdpa", "use_cache": False}


def parse_batch(text):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"batch must look like 2x2048 (sequences x tokens), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# ---- models --------------------------------------------------------------------------------------------

def make_checkpoint(path, shape, layers, device, seed=0):
    """Random bf16 weights (N(0, 0.02), norms 1) saved as safetensors: the one model every stack loads."""
    from benchmarks.memory_table import build_llama

    torch.manual_seed(seed)
    model = build_llama(config(shape, layers), device, torch.bfloat16)
    model.config.dtype = torch.bfloat16  # loaders that read the dtype from config.json keep the norms in bf16
    model.save_pretrained(path)
    return path


def _bnb(device):
    try:
        import bitsandbytes as bnb

        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as e:  # noqa: BLE001  (absent, or no backend for this device: both mean "not compared")
        raise Skipped(f"bitsandbytes unavailable on {device.type}: {type(e).__name__}: {str(e)[:120]}") from e
    return bnb


def _peft():
    try:
        import peft
    except ImportError as e:
        raise Skipped(f"peft is not installed ({e})") from e
    return peft


def _bnb_quantize_layer(bnb):
    """Replace every nn.Linear of a decoder layer by bitsandbytes' Linear4bit (nf4, double quant, bf16 compute),
    quantized where the weight lives: what from_pretrained(quantization_config=...) builds."""
    def quantize(layer):
        for name, linear in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(linear.weight.device)
            if linear.bias is not None:
                q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)
    return quantize


def _base_model(stack, spec, device):
    """The bf16 or quantized transformers model of `stack`, before LoRA."""
    from transformers import AutoModelForCausalLM

    bf16 = torch.bfloat16
    layerwise = spec["checkpoint"] is None
    where = torch.cuda.current_device() if device.type == "cuda" else "cpu"
    direct = {"device_map": {"": where}} if device.type == "cuda" else {}  # load straight onto the GPU
    if layerwise:
        from benchmarks.memory_table import build_llama

        torch.manual_seed(spec["seed"])
        cfg = config(spec["shape"], spec["layers"])
    if stack in ("a", "b"):
        bnb = _bnb(device)
        _peft()
        if layerwise:
            model = build_llama(cfg, device, bf16, quantize=_bnb_quantize_layer(bnb))
            model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft dispatches on it
            return model
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=bf16)
        return AutoModelForCausalLM.from_pretrained(spec["checkpoint"], quantization_config=q, dtype=bf16,
                                                    device_map={"": where}, attn_implementation="sdpa")
    if stack == "c":
        _peft()
        if layerwise:
            return build_llama(cfg, device, bf16)
        model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=bf16, attn_implementation="sdpa",
                                                     **direct)
        return model if direct else model.to(device)
    import nf4q

    if layerwise:
        return build_llama(cfg, device, bf16, quantize=True)
    if hasattr(nf4q, "from_pretrained"):  # streams the checkpoint, quantizing each Linear as it arrives
        model = nf4q.from_pretrained(spec["checkpoint"], device=device, compute_dtype=bf16, progress=False)
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("sdpa")
            else:
                model.config._attn_implementation = "sdpa"
        return model
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=bf16, attn_implementation="sdpa",
                                                 **direct)
    model = model if direct else model.to(device)
    return nf4q.quantize_model(model, progress=False, compute_dtype=bf16)  # lm_head stays bf16


def seed_adapters(model, seed=0):
    """A of every LoRA pair from a generator seeded by (layer, projection), kaiming-uniform(a=sqrt 5) bounds as
    peft's default; B = 0. Returns the number of A matrices set."""
    pat = re.compile(r"layers\.(\d+)\..*?\b(\w+_proj)\.lora_([AB])\.")
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = pat.search(name)
            if not m or not p.requires_grad:
                continue
            if m.group(3) == "B":
                p.zero_()
                continue
            g = torch.Generator().manual_seed(seed * 100003 + 1000 * int(m.group(1)) + TARGETS.index(m.group(2)))
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
            n += 1
    return n


def load_stack(stack, spec, device):
    """(model, optimizer, notes) ready to train: LoRA on the seven projections, checkpointing on, train mode."""
    model = _base_model(stack, spec, device)
    gc = {"use_reentrant": False}
    if stack == "a":
        model = _peft().prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                        gradient_checkpointing_kwargs=gc)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc)
    model.config.use_cache = False
    if stack in ("d", "e"):
        import peft_layers

        model = peft_layers.get_peft_model(model, peft_layers.LoRAConfig(
            r=spec["rank"], lora_alpha=spec["alpha"], target_modules=TARGETS, lora_dropout=spec["dropout"]))
    else:
        peft = _peft()
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=spec["rank"], lora_alpha=spec["alpha"], target_modules=TARGETS, lora_dropout=spec["dropout"],
            bias="none", task_type="CAUSAL_LM"))
    model.train()
    n = seed_adapters(model, spec["seed"])
    notes = [] if n == 7 * spec["layers"] else [f"seeded {n} LoRA A matrices, expected {7 * spec['layers']}"]
    params = [p for p in model.parameters() if p.requires_grad]
    lr, cuda = spec["lr"], device.type == "cuda"
    if stack in ("a", "b"):
        bnb = _bnb(device)
        opt = bnb.optim.PagedAdamW(params, lr=lr, weight_decay=0.0) if cuda else \
            bnb.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif stack == "c":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=cuda)
    else:
        from nf4q.optim import AdamW, PagedAdamW

        opt = (PagedAdamW if cuda else AdamW)(params, lr=lr, weight_decay=0.0)
    notes.append(f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}")
    if stack == "e":  # the model's forward and backward as compiled graphs (CUDA graphs: shapes are static here)
        model = torch.compile(model, mode="reduce-overhead" if cuda else None)
    return model, opt, notes


# ---- one case, in this process ------------------------------------------------------------------------

def _phase_marker(device):
    """A one-element allocation: starts the next phase in a memory snapshot (train_diagnostics.MARKER)."""
    if device.type == "cuda":
        torch.empty(1, device=device)  # allocated and freed here: both events carry this frame


def train_step(model, opt, ids, mark=None):
    mark = mark or (lambda: None)
    mark()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    mark()
    loss.backward()
    mark()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(spec):
    """Load one stack, train warmup + steps steps; returns the row (measure mode) or the mode's text."""
    device = torch.device(spec["device"])
    stack, (b, s) = spec["stack"], spec["batch"]
    row = {"stack": stack, "name": STACKS[stack], "dropout": spec["dropout"], "batch": f"{b}x{s}",
           "tokens": b * s, "shape": spec["shape"], "layers": spec["layers"]}
    torch.manual_seed(spec["seed"])
    try:
        return _run_loaded(spec, device, row, *load_stack(stack, spec, device))
    except Skipped as e:
        return {**row, "status": f"skipped: {e}"}


def _run_loaded(spec, device, row, model, opt, notes):
    b, s = spec["batch"]
    vocab = model.config.vocab_size if hasattr(model, "config") else spec["vocab"]
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(spec["seed"] + 1)).to(device)
    torch.manual_seed(spec["seed"] + 2)  # dropout masks
    if spec.get("mode") in ("profile", "snapshot"):
        from benchmarks import train_diagnostics

        step = train_diagnostics.profile_step if spec["mode"] == "profile" else train_diagnostics.snapshot_step
        return step(model, opt, ids, device, spec)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        loss = train_step(model, opt, ids)
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
        if len(losses) < N_LOSSES:
            losses.append(loss.item())
    ms = 1e3 * statistics.median(times) if times else None
    row.update(status="ok", peak_gib=None, static_gib=None, ms_step=ms, ms_min=1e3 * min(times) if times else None,
               tok_s=b * s / ms * 1e3 if ms else None, losses=" ".join(f"{v:.4f}" for v in losses),
               notes="; ".join(notes))
    if device.type == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, static_gib=static / 2**30)
    if not all(math.isfinite(v) for v in losses):
        row["status"] = "ok (non-finite loss)"
    return row


# ---- orchestration: one subprocess per case ---------------------------------------------------------

def run_isolated(spec, timeout=900):
    """run_case(spec) in a fresh Python process (clean peak memory, no state shared between stacks)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        if spec.get("mode") == "snapshot":
            env.setdefault("TORCH_SYMBOLIZE_MODE", "dladdr")  # fast C++ frame names (addr2line can take minutes)
        cmd = [sys.executable, "-m", "benchmarks.bench_train", "--_child", json.dumps(spec), "--_result", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"failed: timed out after {timeout} s"}
        if proc.stdout.strip():
            print(proc.stdout.rstrip(), flush=True)
        if out.is_file():
            return json.loads(out.read_text())
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-15:]
        oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
        print("\n".join("    | " + line for line in tail), flush=True)
        return {"status": "OOM" if oom else f"failed: exit {proc.returncode}: {tail[-1][:160] if tail else ''}"}


def _child(spec_json, result_path):
    warnings.filterwarnings("ignore")
    spec = json.loads(spec_json)
    spec["batch"] = tuple(spec["batch"])
    try:
        if spec.get("mode") == "checkpoint":
            make_checkpoint(spec["checkpoint"], spec["shape"], spec["layers"], torch.device(spec["device"]),
                            spec["seed"])
            row = {"status": "ok"}
        else:
            row = run_case(spec)
    except Skipped as e:
        row = {"status": f"skipped: {e}"}
    except torch.OutOfMemoryError as e:
        row = {"status": "OOM: " + str(e).splitlines()[0][:120]}
    Path(result_path).write_text(json.dumps(row))


def compare(rows):
    """vs (b): tok/s ratio and the largest |loss difference| over the first losses, same batch and dropout."""
    ref = {(r["batch"], r["dropout"]): r for r in rows if r["stack"] == "b" and r.get("tok_s")}
    for r in rows:
        b = ref.get((r["batch"], r["dropout"]))
        if not b or not r.get("tok_s"):
            continue
        r["vs_b"] = r["tok_s"] / b["tok_s"]
        mine, theirs = [float(v) for v in r["losses"].split()], [float(v) for v in b["losses"].split()]
        r["max_dloss_vs_b"] = max((abs(x - y) for x, y in zip(mine, theirs)), default=None)
    return rows


def markdown(rows):
    head = "| stack | dropout | batch | ms/step | tok/s | peak GiB | vs (b) | max abs. loss diff vs (b) | status |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f = lambda k, d: "–" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        vs = "–" if r.get("vs_b") is None else f"{r['vs_b']:.2f}x"
        lines.append(f"| ({r['stack']}) {r['name']} | {r['dropout']} | {r['batch']} | {f('ms_step', 1)} | "
                     f"{f('tok_s', 0)} | {f('peak_gib', 2)} | {vs} | {f('max_dloss_vs_b', 4)} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", nargs="+", choices=list(STACKS), help="default: a b c d (a b d with --shape 70b)")
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    ap.add_argument("--batches", nargs="+", type=parse_batch, default=["1x512", "2x2048", "1x8192"],
                    metavar="BxS", help="sequences x tokens per step (default 1x512 2x2048 1x8192)")
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.05], help="lora_dropout values")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layerwise", action="store_true", help="build layer by layer (the default for --shape 70b)"
                                                            " instead of loading a saved checkpoint")
    ap.add_argument("--checkpoint", metavar="DIR", help="reuse (or create) the bf16 checkpoint in DIR")
    ap.add_argument("--profile", action="store_true", help="torch.profiler summary of one nf4q step")
    ap.add_argument("--memory-snapshot", metavar="FILE", help="allocator history of one nf4q step -> FILE + peak")
    ap.add_argument("--diag-stack", nargs="+", default=["d"], choices=list(STACKS), help="the stacks that --profile "
                    "and --memory-snapshot look at (default d, nf4q), at the first batch and dropout; with several, "
                    "FILE.pickle becomes FILE.<stack>.pickle")
    ap.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    ap.add_argument("--quick", action="store_true", help="1x512 and dropout 0 only, 3 timed steps")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # tests: no subprocesses
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: cpu
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return _child(args._child, args._result)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA GPU")
    batches = [parse_batch(b) if isinstance(b, str) else b for b in args.batches]
    if args.quick:  # the first batch (1x512 by default), the first dropout
        batches, args.dropout, args.steps = batches[:1], args.dropout[:1], 3
    layerwise = args.layerwise or args.shape == "70b"
    stacks = args.stacks or DEFAULT_STACKS
    started = time.perf_counter()
    run = run_case if args.in_process else run_isolated
    base = {"shape": args.shape, "layers": args.layers, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
            "rank": args.rank, "alpha": args.alpha, "seed": args.seed, "device": args.device, "checkpoint": None,
            "vocab": SHAPES[args.shape]["vocab_size"]}
    print(f"# bench_train: {args.layers} layers of {args.shape} shapes, LoRA r={args.rank} alpha={args.alpha:g} on "
          f"{len(TARGETS)} projections, gradient checkpointing, bf16, {args.warmup} warm-up + {args.steps} timed "
          f"steps, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if not layerwise:
            base["checkpoint"] = args.checkpoint or str(Path(tmp) / "llama")
            if not (Path(base["checkpoint"]) / "config.json").is_file():
                t0 = time.perf_counter()
                if args.in_process:
                    make_checkpoint(base["checkpoint"], args.shape, args.layers, torch.device(args.device), args.seed)
                    done = {"status": "ok"}
                else:
                    done = run_isolated({**base, "mode": "checkpoint", "batch": [1, 1]})
                if done.get("status") != "ok":
                    raise SystemExit(f"could not write the checkpoint: {done.get('status')}")
                print(f"checkpoint written to {base['checkpoint']} in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        cases = [(bt, p, st) for bt in batches for p in args.dropout for st in stacks]
        for i, (bt, p, st) in enumerate(cases, 1):
            t0 = time.perf_counter()
            r = {"stack": st, "name": STACKS[st], "dropout": p, "batch": f"{bt[0]}x{bt[1]}", "tokens": bt[0] * bt[1],
                 "shape": args.shape, "layers": args.layers}
            if st == "c" and args.shape == "70b" and not args.stacks:
                r["status"] = "skipped: bf16 70B weights alone are 129 GiB (ask for it with --stacks c)"
            else:
                spec = {**base, "stack": st, "batch": list(bt), "dropout": p}
                r.update(run({**spec, "batch": bt} if args.in_process else spec))
            rows.append(r)
            print(f"[{i}/{len(cases)}] ({st}) {STACKS[st]}, {r['batch']}, dropout {p}: {r['status']}"
                  + (f", {r['ms_step']:.1f} ms/step, {r['tok_s']:.0f} tok/s" if r.get("ms_step") else "")
                  + (f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "")
                  + (f", losses {r['losses']}" if r.get("losses") else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        for st in args.diag_stack:
            extra = {"stack": st, "batch": list(batches[0]), "dropout": args.dropout[0]}
            if args.profile:
                print(f"\n## profile ({st})", flush=True)
                print(run({**base, **extra, "mode": "profile"}).get("status"), flush=True)
            if args.memory_snapshot:
                print(f"\n## memory snapshot ({st})", flush=True)
                path = Path(args.memory_snapshot).resolve()
                if len(args.diag_stack) > 1:
                    path = path.with_name(f"{path.stem}.{st}{path.suffix}")
                print(run({**base, **extra, "mode": "snapshot", "snapshot_file": str(path)}).get("status"), flush=True)
    compare(rows)
    print("\n" + markdown(rows))
    print("\nfirst losses (fixed seed, same batch every step):")
    for r in rows:
        if r.get("losses"):
            print(f"  ({r['stack']}) dropout {r['dropout']} {r['batch']}: {r['losses']}")
    from benchmarks.utils import write_csv

    write_csv(args.csv, rows)
    print(f"\nbench_train: {len(rows)} cases in {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    from benchmarks import bench_train  # one module object: train_diagnostics imports it by this name

    bench_train.main()
