"""One numerical contract for every path of the QLoRA op: a short bf16 training run of a small transformers Llama
follows the same loss trajectory on the wgmma-fused path, the cuBLAS-slab path and the CPU kernels. Every path
accumulates the base product in fp32 over the whole reduction and rounds the output once; the thin LoRA factor is
rounded to bf16 before it joins (csrc/cuda/lora.cu). (The slab path's backward used to split the reduction and
round dx once per slab; 8-step runs of the two paths then ended 0.06 apart on an 8B-shaped model.)"""
import pytest
import torch

import nf4q
from peft_layers import LoRAConfig, get_peft_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(device, steps=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    nf4q.quantize_model(model, progress=False, compute_dtype=torch.bfloat16)
    model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model = model.to(device).train()
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1)).to(device)  # M = 256 rows
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@cuda
def test_loss_trajectories_agree_across_paths(monkeypatch):
    runs = {}
    for path in ("fused", "slabs"):
        monkeypatch.setenv("NF4Q_CUDA_LORA", path)
        runs[path] = run("cuda")
    monkeypatch.delenv("NF4Q_CUDA_LORA")
    runs["cpu"] = run("cpu")
    assert runs["slabs"][-1] < runs["slabs"][0] - 0.05  # it trains
    for path in ("fused", "cpu"):
        diff = (runs[path] - runs["slabs"]).abs().max().item()
        assert diff <= 0.005, (path, runs[path].tolist(), runs["slabs"].tolist())
