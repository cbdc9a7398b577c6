"""The fused QLoRA op as training uses it: LoRA dropout inside the op (seeded mask, regenerated in backward), the
C++ autograd (what it saves, which gradients it computes), and the one backward call, on CPU and CUDA."""
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import nf4q
from nf4q import _reference as ref
from nf4q.linear import draw_dropout_seed
from peft_layers import QLoRALinear

ops = torch.ops.nf4q
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights(N=48, K=96, r=5, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = nf4q.quantize(torch.randn(N, K, generator=g).to(device))
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device)
    B = torch.randn(N, r, generator=g).to(device)
    bias = torch.randn(N, generator=g).to(device)
    return qw, A, B, bias


# ---- the mask ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_dropout_equals_reference_bit_for_bit(device, dtype, p):
    x = torch.randn(7, 33, device=device).to(dtype)
    seed = -1234567890123  # negative seeds are valid (the kernels read the bits as uint64)
    got = ops.lora_dropout(x, p, seed)
    want = ref.lora_dropout(x, p, seed)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    assert torch.equal(ops.lora_dropout(x.t(), p, seed), ref.lora_dropout(x.t().contiguous(), p, seed))


def test_keep_rate_and_independence():
    # 2^21 draws: the keep rate's standard deviation is sqrt(p(1-p)/n) = 2.1e-4 at p = 0.1; 5 sigma = 1.0e-3.
    n, p = 1 << 21, 0.1
    keep = ref.dropout_keep(12345, n, p)
    ours = ops.lora_dropout(torch.ones(n), p, 12345) != 0
    assert torch.equal(keep, ours)
    assert abs(keep.float().mean().item() - (1 - p)) < 1e-3
    # neighbouring elements are independent: P(both kept) = (1-p)^2 within 5 sigma
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    # another seed gives another mask, about p(1-p)*2 of the elements differ
    other = ref.dropout_keep(12346, n, p)
    assert abs((keep != other).float().mean().item() - 2 * p * (1 - p)) < 2e-3
    # the kept values are scaled by 1 / (1 - p): the mean is preserved
    x = torch.randn(n)
    spread = 5 * math.sqrt(n * p / (1 - p))  # 5 sigma of the sum of the dropped-and-rescaled noise
    assert abs(ops.lora_dropout(x, p, 7).double().sum().item() - x.double().sum().item()) < spread


def test_lora_dropout_rejects_bad_p():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            ops.lora_dropout(torch.randn(4), p, 0)


# ---- forward and backward with dropout -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M", [3, 130])
def test_forward_and_gradients_match_fp64_reference(device, p, M):
    qw, A, B, bias = weights(device=device)
    w4 = qw.op_args()
    x = torch.randn(M, 96, device=device, requires_grad=True)
    A.requires_grad_(True), B.requires_grad_(True), bias.requires_grad_(True)
    seed, s = 987654321, 0.75
    y = ops.lora_gemm_4bit(x, *w4, bias, A, B, s, p, seed)
    want = ref.lora_gemm_4bit(x.detach(), *w4, bias=bias.detach(), lora_A=A.detach(), lora_B=B.detach(), scale=s,
                              dropout_p=p, seed=seed)
    assert rel(y, want) < 1e-5
    g = torch.randn_like(y)
    (y * g).sum().backward()
    dx, dA, dB = ref.lora_gemm_4bit_backward(g, x.detach(), *w4, lora_A=A.detach(), lora_B=B.detach(), scale=s,
                                             dropout_p=p, seed=seed)
    for got, want, name in [(x.grad, dx, "x"), (A.grad, dA, "lora_A"), (B.grad, dB, "lora_B"),
                            (bias.grad, g.double().sum(0), "bias")]:
        assert got is not None and rel(got, want) < 1e-5, name
    if p > 0:  # the mask acted: the result differs from the one without dropout by far more than rounding
        plain = ref.lora_gemm_4bit(x.detach(), *w4, bias=bias.detach(), lora_A=A.detach(), lora_B=B.detach(),
                                   scale=s)
        assert rel(want, plain) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_computes_only_what_output_mask_asks(device):
    qw, A, B, _ = weights(device=device)
    w4 = qw.op_args()
    x, g = torch.randn(9, 96, device=device), torch.randn(9, 48, device=device)
    full = ref.lora_gemm_4bit_backward(g, x, *w4, lora_A=A, lora_B=B, scale=0.5, dropout_p=0.2, seed=3)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, True, True]):
        outs = ops.lora_gemm_4bit_backward(g, x, *w4, A, B, 0.5, 0.2, 3, mask)
        for asked, got, want in zip(mask, outs, full):
            if asked:
                assert rel(got, want) < 1e-5
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_only_the_needed_gradients_are_computed(device):
    """autograd.grad w.r.t. the LoRA factors alone must not compute dx (the op sees output_mask)."""
    qw, A, B, _ = weights(device=device)
    x = torch.randn(6, 96, device=device, requires_grad=True)
    A.requires_grad_(True)
    y = ops.lora_gemm_4bit(x, *qw.op_args(), None, A, B, 0.5, 0.0, 0)
    (dA,) = torch.autograd.grad(y.sum(), [A])
    want = ref.lora_gemm_4bit_backward(torch.ones_like(y), x.detach(), *qw.op_args(), lora_A=A.detach(), lora_B=B,
                                       scale=0.5)[1]
    assert rel(dA, want) < 1e-5 and x.grad is None


def test_gradcheck_with_dropout():
    # The CPU kernels accumulate in fp32; the output is linear in each input element, so eps = 1e-3 has no
    # truncation error and fp32 rounding (~1e-7 |y|) stays far below atol. The mask is fixed by the seed.
    # Small values (|y| ~ 0.3) keep fp32 rounding of y, divided by 2 eps, under 1e-4.
    qw = nf4q.quantize(torch.randn(12, 64) * 0.05)
    w4 = qw.op_args()
    args = [(t * 0.1).double().requires_grad_(True) for t in (torch.randn(3, 64), torch.randn(12), torch.randn(3, 64),
                                                             torch.randn(12, 3))]
    fn = lambda x, b, A, B: ops.lora_gemm_4bit(x, *w4, b, A, B, 0.5, 0.3, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=1e-3, rtol=1e-3)


# ---- the layer -----------------------------------------------------------------------------------------------

def layer(p=0.1, device="cpu"):
    torch.manual_seed(0)
    q = QLoRALinear.from_linear(nn.Linear(96, 48), r=8, lora_alpha=16, lora_dropout=p).to(device)
    nn.init.normal_(q.lora_B.weight)
    return q


@pytest.mark.parametrize("device", DEVICES)
def test_layer_dropout_is_the_seeded_reference_mask(device):
    q = layer(device=device).train()
    x = torch.randn(5, 96, device=device)
    torch.manual_seed(42)
    y = q(x)
    torch.manual_seed(42)
    seed = draw_dropout_seed()
    base = q.base_layer
    want = ref.lora_gemm_4bit(x, *base.quantized_weight.op_args(), bias=base.bias.detach(),
                              lora_A=q.lora_A.weight.detach(), lora_B=q.lora_B.weight.detach(), scale=q.scaling,
                              dropout_p=0.1, seed=seed)
    assert rel(y, want) < 1e-5
    torch.manual_seed(42)
    assert torch.equal(q(x), y)  # deterministic under torch.manual_seed
    assert not torch.equal(q(x), y)  # and a new mask on the next call
    q.eval()  # eval: no dropout
    plain = ref.lora_gemm_4bit(x, *base.quantized_weight.op_args(), bias=base.bias.detach(),
                               lora_A=q.lora_A.weight.detach(), lora_B=q.lora_B.weight.detach(), scale=q.scaling)
    assert rel(q(x), plain) < 1e-5


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_recomputes_the_same_mask(use_reentrant):
    q = layer().train()
    x = torch.randn(6, 96, requires_grad=True)
    torch.manual_seed(5)
    q(x).square().sum().backward()
    plain = [q.lora_A.weight.grad.clone(), q.lora_B.weight.grad.clone(), x.grad.clone()]
    q.zero_grad()
    x.grad = None
    torch.manual_seed(5)
    checkpoint(q, x, use_reentrant=use_reentrant).square().sum().backward()
    for a, b in zip(plain, [q.lora_A.weight.grad, q.lora_B.weight.grad, x.grad]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_tensors_are_x_A_B_only(device, p):
    """The backward node keeps x (once), lora_A and lora_B: no casts of x, no dropout mask, no LoRA factor."""
    q = layer(p, device).train()
    x = torch.randn(2, 7, 96, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    ptrs = sorted(t.data_ptr() for t in saved)
    assert ptrs == sorted([x.data_ptr(), q.lora_A.weight.data_ptr(), q.lora_B.weight.data_ptr()])
    y.sum().backward()
    assert q.lora_A.weight.grad is not None and x.grad is not None


def _cuda_kernels(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@cuda
@pytest.mark.parametrize("M", [256, 4096])
def test_kernel_launches_per_forward_backward(M):
    """One QLoRA layer forward + backward (bf16) launches about as many kernels as plain torch's bf16 Linear + LoRA
    (5 forward, 6 backward): the fused wgmma path adds the once-per-call absmax decode and transpose."""
    torch.manual_seed(0)
    q = QLoRALinear.from_linear(nn.Linear(4096, 4096, bias=False), r=16, lora_alpha=32).cuda().bfloat16()
    w = q.base_layer.dequantize(torch.bfloat16).requires_grad_(False)
    A, B = q.lora_A.weight, q.lora_B.weight
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)

    def run(f):
        for p in (x, A, B):
            p.grad = None  # no gradient accumulation kernels
        f().backward(g)

    def plain():
        return x @ w.t() + q.scaling * ((x @ A.t()) @ B.t())

    for _ in range(2):  # warm-up
        run(plain)
        run(lambda: q(x))
    base = _cuda_kernels(lambda: run(plain))
    ours = _cuda_kernels(lambda: run(lambda: q(x)))
    print(f"M={M}: plain torch {len(base)} kernels: {base}\nnf4q {len(ours)} kernels: {ours}")
    assert len(ours) <= len(base) + (2 if M <= 256 else 0), "\n".join(ours)
