"""Activation bytes one QLoRA decoder layer saves for backward, per token: nf4q vs bitsandbytes + peft vs peft over
a bf16 base, with and without LoRA dropout (no checkpointing: what one layer holds between its forward and its
backward, or during its recomputation under gradient checkpointing).

    python -m benchmarks.activation_bytes [--tokens 32] [--device cpu]

One Llama-3-8B-shaped decoder layer (hidden 4096, intermediate 14336, 32 heads, 8 kv heads), LoRA r=16 on the
seven projections, bf16. Counted with torch.autograd.graph.saved_tensors_hooks around the decoder layer only:
unique storages, parameters excluded. The counts do not depend on the device or the values.
"""
import argparse

import torch

from benchmarks.bench_train import SHAPES, TARGETS, _bnb_quantize_layer
from benchmarks.memory_table import build_llama
from benchmarks.utils import markdown_table


def build(stack, dropout, device):
    cfg = {**SHAPES["8b"], "vocab_size": 512, "num_hidden_layers": 1}
    if stack == "nf4q":
        import peft_layers

        model = build_llama(cfg, device, torch.bfloat16, quantize=True)
        return peft_layers.get_peft_model(model, peft_layers.LoRAConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=dropout))
    import peft

    if stack == "bnb+peft":
        import bitsandbytes as bnb

        model = build_llama(cfg, device, torch.bfloat16, quantize=_bnb_quantize_layer(bnb))
        model.is_loaded_in_4bit = True
    else:
        model = build_llama(cfg, device, torch.bfloat16)
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                      lora_dropout=dropout, task_type="CAUSAL_LM"))


def saved_bytes(model, tokens, device):
    """(bytes, tensors) the first decoder layer saves for backward on one forward of `tokens` tokens."""
    layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    model.train()
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(saved.values()), len(saved)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for stack in ("nf4q", "bnb+peft", "peft bf16"):
        for p in (0.0, 0.05):
            try:
                n, count = saved_bytes(build(stack, p, device), args.tokens, device)
                rows.append({"stack": stack, "dropout": p, "kib": n / args.tokens / 1024, "tensors": count})
            except ImportError as e:
                rows.append({"stack": stack, "dropout": p, "note": f"skipped: {e}"})
            print(rows[-1], flush=True)
    print(f"\n## activation bytes saved by one 8B-shaped decoder layer (LoRA r=16 on 7 projections, bf16), "
          f"per token, {args.tokens} tokens on {device.type}\n")
    print(markdown_table(rows, [("stack", "stack", 0), ("dropout", "lora_dropout", 2), ("kib", "KiB / token", 1),
                                ("tensors", "saved tensors", 0), ("note", "note", 0)]))


if __name__ == "__main__":
    main()
