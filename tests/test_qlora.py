"""QLoRALinear (issue 4, Python side): forward and every gradient against an fp64 reference that dequantizes W
explicitly, gradcheck, dropout, merge/unmerge, gradient checkpointing, torch.compile, and QLoRA on a Llama model
quantized with nf4q.quantize_model (train, save, reload)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import nf4q
from nf4q import _reference
from peft_helpers import batch, changed_names, logits, snapshot, tiny_llama, train
from peft_layers import LoRAConfig, PeftModel, QLoRALinear, get_peft_model
from peft_layers.qlora import NF4_MAX_ROUNDING

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_layer(in_f=72, out_f=40, r=6, alpha=12, bias=True, seed=0, device="cpu", **kw):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    layer = QLoRALinear.from_linear(lin, r=r, lora_alpha=alpha, **kw).to(device)
    with torch.no_grad():  # a non-zero B so that every term is exercised
        layer.lora_B.weight.copy_(torch.randn(out_f, r, generator=g).to(device))
    return layer


def reference(layer, x, dropped=None):
    """fp64: x W^T + b + s (dropout(x) A^T) B^T with W dequantized explicitly."""
    w = layer.base_layer.dequantize(torch.float64)
    b = layer.base_layer.bias.double() if layer.base_layer.bias is not None else 0
    xl = (dropped if dropped is not None else x).double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    return x.double() @ w.t() + b + layer.scaling * (xl @ A.t()) @ B.t()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads_of(layer, x, fn, g):
    """Gradients of <fn(), g> w.r.t. x, A, B and the bias."""
    params = [x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias]
    for p in params:
        p.grad = None
    (fn() * g).sum().backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("shape", [(3,), (2, 5), (4, 7, 3)])  # M = 3 (fused CPU loop), 10, 84 (GEMM path)
def test_forward_and_all_gradients_match_fp64_reference(shape):
    layer = make_layer()
    layer.base_layer.bias.requires_grad_(True)  # every gradient the op produces
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, 72, generator=g).requires_grad_(True)
    y = layer(x)
    ref = reference(layer, x.detach())
    assert y.dtype == torch.float32 and y.shape == (*shape, 40)
    assert rel(y, ref) < 1e-4
    gy = torch.randn(y.shape, generator=g)
    ours = grads_of(layer, x, lambda: layer(x), gy)
    xd = x.detach().double().requires_grad_(True)
    w = layer.base_layer.dequantize(torch.float64)
    A = layer.lora_A.weight.detach().double().requires_grad_(True)
    B = layer.lora_B.weight.detach().double().requires_grad_(True)
    bias = layer.base_layer.bias.detach().double().requires_grad_(True)
    ref = xd @ w.t() + bias + layer.scaling * (xd @ A.t()) @ B.t()
    (ref * gy.double()).sum().backward()
    for got, want, name in zip(ours, [xd.grad, A.grad, B.grad, bias.grad], ["x", "lora_A", "lora_B", "bias"]):
        assert rel(got, want) < 1e-4, name


def test_bf16_input_within_bf16_tolerance():
    layer = make_layer()
    x = torch.randn(6, 72).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y, reference(layer, x)) < 1e-2


def test_gradcheck_fp64():
    # The CPU kernels accumulate in fp32. The output is linear in each single input element, so a finite
    # difference has no truncation error; eps=1e-3 keeps fp32 rounding (~1e-7 |y|) far below atol.
    layer = make_layer(in_f=20, out_f=12, r=3, bias=True)
    args = layer.base_layer.quantized_weight.op_args()
    bias = layer.base_layer.bias.detach().double().requires_grad_(True)
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.weight.detach().double().requires_grad_(True)
    B = layer.lora_B.weight.detach().double().requires_grad_(True)
    fn = lambda x, b, A, B: torch.ops.nf4q.lora_gemm_4bit(x, *args, b, A, B, layer.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias, A, B), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_dropout_uses_the_same_mask_as_the_reference():
    layer = make_layer(lora_dropout=0.5).train()
    x = torch.randn(5, 72, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the fused op's mask is a function of one seed drawn from torch's CPU generator
    keep = _reference.dropout_keep(nf4q.linear.draw_dropout_seed(), x.numel(), 0.5).view(x.shape)
    dropped = torch.where(keep, x.detach() / 0.5, torch.zeros(()))
    assert rel(y, reference(layer, x.detach(), dropped)) < 1e-4
    assert not torch.allclose(y.double(), reference(layer, x.detach()), rtol=1e-3)  # the mask did something
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    layer.eval()  # eval: dropout off
    assert rel(layer(x.detach()), reference(layer, x.detach())) < 1e-4


def test_init_and_scaling_follow_peft():
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, lora_alpha=16)
    assert isinstance(layer.lora_A, nn.Linear) and layer.lora_A.bias is None and layer.lora_B.bias is None
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (32, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 16, 4.0)
    assert QLoRALinear.from_linear(nn.Linear(64, 32), r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: starts as the base layer
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


def test_wraps_existing_linear4bit_and_rejects_bad_input():
    base = nf4q.Linear4bit.from_linear(nn.Linear(64, 32))
    layer = QLoRALinear.from_linear(base, r=2)
    assert layer.base_layer is base
    with pytest.raises(TypeError, match="linear"):
        QLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must"):
        QLoRALinear.from_linear(nn.Linear(8, 8), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        QLoRALinear.from_linear(nn.Linear(8, 8), lora_dropout=1.5)
    with pytest.raises(TypeError, match="base_layer"):
        QLoRALinear(nn.Linear(8, 8))


def test_merge_equals_fresh_quantization_and_unmerge_is_exact():
    layer = make_layer()
    x = torch.randn(9, 72)
    before = layer(x)
    packed = layer.base_layer.weight.clone()
    expect = nf4q.Linear4bit.from_linear(_dense(layer.base_layer.dequantize(torch.float32) + layer.delta_weight(),
                                                layer.base_layer.bias))
    with pytest.warns(UserWarning, match="requantiz"):
        layer.merge()
    assert layer.merged
    assert torch.equal(layer(x), expect(x))  # merged = quantize(dequant(W) + sBA), same blocks and table
    assert rel(layer(x), before) < 0.1  # and close to the unmerged output (one NF4 rounding)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, packed) and torch.equal(layer(x), before)


def test_merge_error_within_documented_bound():
    layer = make_layer(double_quant=False)  # fp32 absmax: the bound is exact
    target = layer.base_layer.dequantize(torch.float32) + layer.delta_weight()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    err = (layer.base_layer.dequantize(torch.float32) - target).abs().reshape(-1, 64)
    absmax = target.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert err.max() > 0 and bool((err <= NF4_MAX_ROUNDING * absmax + 1e-6).all())


def test_safe_merge_raises_on_non_finite():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    packed = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight, packed)


def _dense(w, bias):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(QLoRALinear.from_linear(nn.Linear(32, 48), r=4), nn.GELU(),
                         QLoRALinear.from_linear(nn.Linear(48, 48), r=4), nn.GELU(),
                         QLoRALinear.from_linear(nn.Linear(48, 32), r=4))


def test_forward_changes_no_python_state():
    layer = make_layer(lora_dropout=0.2)
    state = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
    for mode in (True, False):
        layer.train(mode)
        before = [copy.copy(state(m)) for m in layer.modules()]
        layer(torch.randn(3, 72)).sum().backward()
        assert before == [state(m) for m in layer.modules()]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_over_a_block(use_reentrant):
    model = mlp()
    for m in model:
        if isinstance(m, QLoRALinear):
            nn.init.normal_(m.lora_B.weight)
    x = torch.randn(6, 32, requires_grad=True)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    checkpoint(model, x, use_reentrant=use_reentrant).square().sum().backward()
    ckpt = [p.grad for p in model.parameters() if p.requires_grad] + [x.grad]
    assert len(plain) == 7
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _train_mlp(model, steps=3, device="cpu"):
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(16, 32, generator=g).to(device), torch.randn(16, 32, generator=g).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_compile_fullgraph_trains_and_matches_eager(device):
    torch._dynamo.reset()
    eager = mlp().to(device)
    compiled_src = copy.deepcopy(eager)
    # CPU: aot_eager checks the full graph capture, fake kernels and autograd without a minute of C++ codegen
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(compiled_src, fullgraph=True, backend=backend)
    l_eager, l_comp = _train_mlp(eager, device=device), _train_mlp(compiled, device=device)
    assert l_comp[-1] < l_comp[0]
    for a, b in zip(l_eager, l_comp):
        assert abs(a - b) <= 1e-5 * abs(a)
    for a, b in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_forward_and_gradients_match_reference():
    layer = make_layer(device="cuda")
    x = torch.randn(37, 72, device="cuda", requires_grad=True)
    y = layer(x)
    assert rel(y, reference(layer, x.detach())) < 1e-4
    y.square().sum().backward()
    assert layer.lora_A.weight.grad is not None and torch.isfinite(x.grad).all()
    xb = x.detach().bfloat16()
    assert rel(layer(xb), reference(layer, xb)) < 1e-2


# ---- QLoRA on a transformers Llama quantized by nf4q.quantize_model ------------------------------------------

def quantized_llama():
    return nf4q.quantize_model(tiny_llama(), progress=False)


def test_qlora_llama_trains_saves_reloads(tmp_path):
    b = batch()
    config = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = get_peft_model(quantized_llama(), config)
    lora_layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(lora_layer.base_layer, nf4q.Linear4bit) and lora_layer.is_4bit
    assert isinstance(model.get_base_model().lm_head, nn.Linear)  # the head is not targeted
    before = snapshot(model)
    losses = train(model, b, steps=6)
    assert losses[-1] < losses[0]
    changed = changed_names(before, model)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(123)  # another seed: the fresh adapter would differ if the load did nothing
    reloaded = PeftModel.from_pretrained(quantized_llama(), str(tmp_path))
    torch.testing.assert_close(logits(reloaded, b), logits(model, b), rtol=0, atol=1e-6)
    adapted = logits(model, b)
    with model.disable_adapter():
        shift = rel(logits(model, b), adapted)  # what the adapter changed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = reloaded.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nf4q.Linear4bit)
    # every linear is requantized once: a small error next to what training changed
    assert rel(logits(merged, b), adapted) < min(0.15, 0.2 * shift)
