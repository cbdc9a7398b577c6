"""CUDA lora_gemm_4bit / lora_gemm_4bit_dx and their autograd against fp64 oracles (nf4q/_reference.py)."""
import pytest
import torch

import nf4q
from conftest import kernel_launches
from nf4q import _ops, _reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ops = torch.ops.nf4q
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(out, want):
    return ((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def setup(M, N, K, r, dtype, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = nf4q.quantize(torch.randn(N, K, generator=g) * 0.05, double_quant=double_quant).cuda()
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    A = (torch.randn(r, K, generator=g) * 0.05).to(dtype).cuda()
    B = (torch.randn(N, r, generator=g) * 0.05).to(dtype).cuda()
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype).cuda()
    return qw, x, A, B, bias


@pytest.mark.parametrize("path", ["auto", "fused", "slabs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 16, 100, 512])
def test_lora_forward_and_dx(path, dtype, M, monkeypatch):
    if path != "auto":
        monkeypatch.setenv("NF4Q_CUDA_LORA", path)
    for N, K, r in [(256, 192, 8), (130, 97, 16), (96, 320, 3)]:
        qw, x, A, B, bias = setup(M, N, K, r, dtype, double_quant=K % 2 == 0, seed=M + N)
        s = 0.7
        y = ops.lora_gemm_4bit(x, *qw.op_args(), bias, A, B, s)
        want = ref.lora_gemm_4bit(x, *qw.op_args(), bias=bias, lora_A=A, lora_B=B, scale=s)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel_err(y, want) < TOL[dtype], (path, M, N, K, "fwd")
        g = torch.randn(M, N, device="cuda").to(dtype)
        dx = ops.lora_gemm_4bit_dx(g, *qw.op_args(), A, B, s)
        want_dx = ref.lora_gemm_4bit_dx(g, *qw.op_args(), lora_A=A, lora_B=B, scale=s)
        assert dx.shape == (M, K) and dx.dtype == dtype
        assert rel_err(dx, want_dx) < TOL[dtype], (path, M, N, K, "dx")


def test_lora_autograd_gradients():
    M, N, K, r, s = 300, 160, 256, 8, 2.0
    qw, x, A, B, bias = setup(M, N, K, r, torch.float32)
    x, A, B, bias = (t.clone().requires_grad_() for t in (x, A, B, bias))
    y = _ops.lora_gemm_4bit(x.view(3, 100, K), *qw.op_args(), bias=bias, lora_A=A, lora_B=B, scale=s)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd, Ad, Bd, bd = (t.detach().double().requires_grad_() for t in (x, A, B, bias))
    w = qw.dequantize(torch.float64)
    want = xd @ w.t() + bd + s * (xd @ Ad.t()) @ Bd.t()
    want.backward(gy.double().view(M, N))
    for got, exp in [(x.grad, xd.grad), (A.grad, Ad.grad), (B.grad, Bd.grad), (bias.grad, bd.grad)]:
        assert rel_err(got, exp) < 1e-4


def test_lora_rank_zero_and_leading_dims():
    qw, x, A, B, bias = setup(12, 64, 96, 4, torch.bfloat16)
    y = ops.lora_gemm_4bit(x.view(3, 4, 96), *qw.op_args(), None, A[:0], B[:, :0], 1.0)
    assert y.shape == (3, 4, 64)
    assert rel_err(y, ref.gemm_4bit(x, *qw.op_args()).view(3, 4, 64)) < 1e-2


def test_lora_bad_shapes_raise():
    qw, x, A, B, bias = setup(4, 64, 96, 4, torch.float32)
    with pytest.raises(ValueError, match="one r"):
        ops.lora_gemm_4bit(x, *qw.op_args(), None, A, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        ops.lora_gemm_4bit(x, *qw.op_args(), None, A[:, :90], B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.lora_gemm_4bit(x, *qw.op_args(), None, A, B, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="device"):
        ops.lora_gemm_4bit(x, *qw.op_args(), None, A.cpu(), B, 1.0)


def test_several_slabs_match_reference_and_replay_in_a_cuda_graph(monkeypatch):
    """The cuBLAS-slab path with several slabs each way (forward: 4096 + 4096 + 384 rows of W; dx: four of 1024
    columns, one buffer reused; one dequantize launch per slab): forward with bias, dx, and the LoRA forms that
    accumulate into them, against the fp64 oracles; then the same forward captured in a CUDA graph and replayed on new
    input."""
    monkeypatch.setenv("NF4Q_CUDA_GEMM", "dequant")
    monkeypatch.setenv("NF4Q_CUDA_LORA", "slabs")
    M, N, K, r, s, dt = 33, 8576, 4096, 8, 0.5, torch.bfloat16
    qw, x, A, B, bias = setup(M, N, K, r, dt, seed=3)
    g = torch.randn(M, N, device="cuda").to(dt)
    args = qw.op_args()
    assert kernel_launches(lambda: ops.gemm_4bit(x, *args, bias), "dequant4_kernel") == 3
    assert kernel_launches(lambda: ops.gemm_4bit_dx(g, *args), "dequant4_kernel") == 4
    assert rel_err(ops.gemm_4bit(x, *args, bias), ref.gemm_4bit(x, *args, bias=bias)) < TOL[dt]
    assert rel_err(ops.gemm_4bit_dx(g, *args), ref.gemm_4bit_dx(g, *args)) < TOL[dt]
    want = ref.lora_gemm_4bit(x, *args, bias=bias, lora_A=A, lora_B=B, scale=s)
    assert rel_err(ops.lora_gemm_4bit(x, *args, bias, A, B, s), want) < TOL[dt]
    want_dx = ref.lora_gemm_4bit_dx(g, *args, lora_A=A, lora_B=B, scale=s)
    assert rel_err(ops.lora_gemm_4bit_dx(g, *args, A, B, s), want_dx) < TOL[dt]

    static_x = x.clone()
    ops.gemm_4bit(static_x, *args, bias)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.gemm_4bit(static_x, *args, bias)
    static_x.copy_(torch.randn(M, K, device="cuda").to(dt))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, ref.gemm_4bit(static_x, *args, bias=bias)) < TOL[dt]
