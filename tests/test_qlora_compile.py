"""A whole QLoRA training step of a transformers Llama under torch.compile (and CUDA graphs on a GPU) matches
eager: the fused op's fake kernels and C++ autograd trace, and nothing in the step needs Python between ops."""
import copy

import pytest
import torch

import nf4q
from peft_helpers import batch, tiny_llama
from peft_layers import LoRAConfig, get_peft_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def qlora_llama(device, dropout=0.0):
    model = nf4q.quantize_model(tiny_llama(), progress=False)
    model = get_peft_model(model, LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero B: every term of the op matters from the first step
            torch.nn.init.normal_(p, std=0.1)
    return model.to(device).train()


def train_steps(model, b, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager(device):
    torch._dynamo.reset()
    b = {k: v.to(device) for k, v in batch().items()}
    eager = qlora_llama(device)
    twin = copy.deepcopy(eager)
    # CPU: aot_eager traces the full graph, the fake kernels and the C++ autograd without minutes of codegen.
    # CUDA: inductor with CUDA graphs (shapes are static here).
    kw = {"backend": "aot_eager"} if device == "cpu" else {"mode": "reduce-overhead"}
    compiled = torch.compile(twin, **kw)
    l_eager, l_comp = train_steps(eager, b), train_steps(compiled, b)
    assert l_eager[-1] < l_eager[0]
    # fp32 throughout; the compiled graph may reorder fp32 reductions (inductor), so rounding-level differences
    torch.testing.assert_close(torch.tensor(l_comp), torch.tensor(l_eager), rtol=1e-4, atol=0)
    for (n, a), (_, c) in zip(eager.named_parameters(), twin.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_step_with_dropout_trains():
    """With LoRA dropout the compiled model takes the unfused form (the compiler's own dropout): it must trace
    and train; its masks are torch's, so it is not compared with eager element by element."""
    torch._dynamo.reset()
    b = batch()
    model = torch.compile(qlora_llama("cpu", dropout=0.1), backend="aot_eager")
    torch.manual_seed(0)
    losses = train_steps(model, b, steps=4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
