"""QLoRA on several processes with PyTorch FSDP2: NF4 weights sharded and all-gathered packed (4.13 bits/param).

    torchrun --nproc_per_node=2 examples/fsdp_qlora.py                      # CPU: gloo
    torchrun --nproc_per_node=4 examples/fsdp_qlora.py --bf16 --hidden 4096 --layers 8   # GPUs: NCCL

A Llama-shaped model (random weights, transformers' LlamaForCausalLM) is quantized to NF4 with
nf4q.quantize_model, gets LoRA adapters from peft_layers, is sharded per decoder layer with
nf4q.fsdp.shard_qlora and trained to memorize a random batch per rank. With --save DIR the
sharded checkpoint (bitsandbytes' keys) is written with torch.distributed.checkpoint and read back.
For a real model, load it with transformers, then the same four calls apply.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import nf4q  # noqa: E402
from nf4q import fsdp as nf4q_fsdp  # noqa: E402
from peft_layers import LoRAConfig, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None, help="default: 3.5 x hidden (Llama 3's ratio)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="compute in bf16 (FSDP MixedPrecisionPolicy)")
    p.add_argument("--save", default=None, help="directory for a sharded checkpoint")
    return p.parse_args()


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or args.hidden * 7 // 2,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)  # every rank builds and quantizes the same weights, then keeps its shards
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    nf4q.quantize_model(model, skip=("lm_head",), progress=False)
    return get_peft_model(model, LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS))


def synthetic_batch(args, rank, device):
    """A fixed random batch per rank: LoRA memorizes it, so the loss falls (swap in your data loader)."""
    g = torch.Generator().manual_seed(rank)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    log = print if rank == 0 else (lambda *a, **k: None)

    model = build_model(args, device)
    mp = None
    if args.bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    nf4q_fsdp.shard_qlora(model, mp_policy=mp)  # one FSDP group per decoder layer, then the root
    meter = nf4q_fsdp.AllGatherMeter.attach(model)

    nb = nf4q_fsdp.nf4_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"world {world} on {device.type}; NF4 weights {nb['params'] / 1e6:.1f}M params, "
        f"{nb['wire'] / 2**20:.2f} MiB sharded ({nb['bits_per_param']:.3f} bits/param; bf16 would be "
        f"{nb['bf16'] / 2**20:.2f} MiB), {nb['replicated'] / 2**20:.3f} MiB replicated; "
        f"LoRA {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable params")
    opt = torch.optim.AdamW(trainable, lr=args.lr)

    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        meter.reset()
        ids = synthetic_batch(args, rank, device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        log(f"step {step:3d}  loss {total.item() / world:.4f}  {args.batch * args.seq * world / dt:9.0f} tok/s  "
            f"all-gather {meter.bytes / 2**20:.2f} MiB in {meter.calls} calls")
    if cuda:
        log(f"peak memory rank 0: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    if args.save:
        nf4q_fsdp.save_sharded(model, args.save)
        ids = synthetic_batch(args, rank, device)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            fresh = build_model(args, device)
            nf4q_fsdp.shard_qlora(fresh, mp_policy=mp)
            diff = torch.stack([(fresh(input_ids=ids).logits - before).abs().max(), torch.zeros((), device=device)])
            nf4q_fsdp.load_sharded(fresh, args.save)
            diff[1] = (fresh(input_ids=ids).logits - before).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        log(f"saved {args.save}; a fresh sharded model differs by {diff[0].item():.3g} (max |logits diff|), "
            f"after load_sharded by {diff[1].item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
