"""The wgmma fused dequant GEMM (csrc/cuda/fused_gemm.cu): gemm_4bit, gemm_4bit_dx, lora_gemm_4bit and
lora_gemm_4bit_dx against the fp64 oracles, and proof that the dequantized W never reaches global memory."""
import pytest
import torch
import torch.nn.functional as F

import nf4q
from nf4q import _ops, _reference as ref
from test_cuda_kernels import poison_allocator, rel_err

HAS_WGMMA = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and nf4q.has_cuda_kernels()
pytestmark = pytest.mark.skipif(not HAS_WGMMA, reason="needs a compute-capability-9.0 GPU (wgmma, sm_90a)")
ops = torch.ops.nf4q
TOL = {torch.float16: 5e-3, torch.bfloat16: 1e-2}


def weight(n, k, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nf4q.quantize(torch.randn(n, k, generator=g) * 0.05, blocksize=blocksize, double_quant=double_quant).cuda()


def data(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize,double_quant", [(32, True), (64, True), (64, False), (128, True), (256, False)])
@pytest.mark.parametrize("M", [1, 17, 129, 300])
def test_gemm_and_dx_match_reference(dtype, blocksize, double_quant, M, monkeypatch):
    monkeypatch.setenv("NF4Q_CUDA_GEMM", "fused")  # also at M = 1, below the automatic threshold
    for N, K in [(256, 384), (384, 640)]:
        qw = weight(N, K, blocksize, double_quant, seed=M + N)
        x, bias = data(M, K, dtype=dtype, seed=1), data(N, dtype=dtype, seed=2, scale=0.1)
        poison_allocator(M * max(N, K) * 2)
        y = ops.gemm_4bit(x, *qw.op_args(), bias)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref.gemm_4bit(x, *qw.op_args(), bias=bias)) < TOL[dtype], (N, K, "fwd")
        g = data(M, N, dtype=dtype, seed=3)
        poison_allocator(M * max(N, K) * 2)
        dx = ops.gemm_4bit_dx(g, *qw.op_args())
        assert torch.isfinite(dx).all()
        assert rel_err(dx, ref.gemm_4bit_dx(g, *qw.op_args())) < TOL[dtype], (N, K, "dx")


def test_fused_agrees_with_the_dequant_path(monkeypatch):
    """Same dequantized bf16 values as dequantize_4bit, so only the fp32 summation order differs."""
    qw = weight(512, 1024, seed=5)
    x, g = data(257, 1024, dtype=torch.bfloat16, seed=6), data(257, 512, dtype=torch.bfloat16, seed=7)
    outs = {}
    for path in ("fused", "dequant"):
        monkeypatch.setenv("NF4Q_CUDA_GEMM", path)
        outs[path] = (ops.gemm_4bit(x, *qw.op_args(), None), ops.gemm_4bit_dx(g, *qw.op_args()))
    assert rel_err(outs["fused"][0], outs["dequant"][0]) < 4e-3
    assert rel_err(outs["fused"][1], outs["dequant"][1]) < 4e-3


def test_non_contiguous_and_leading_dims():
    qw = weight(256, 512, seed=8)
    x = data(3, 512, 100, dtype=torch.bfloat16, seed=9).transpose(1, 2)  # [3, 100, 512], stride 1 on dim 1
    y = ops.gemm_4bit(x, *qw.op_args(), None)
    assert y.shape == (3, 100, 256)
    assert rel_err(y, ref.gemm_4bit(x.contiguous(), *qw.op_args())) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 8, 16, 70])  # 70: two extra 64-wide steps, the second mostly zero padding
@pytest.mark.parametrize("M", [65, 300])
def test_lora_matches_reference(dtype, r, M, monkeypatch):
    monkeypatch.setenv("NF4Q_CUDA_LORA", "fused")
    N, K, s = 384, 512, 0.7
    qw = weight(N, K, seed=r)
    x, bias = data(M, K, dtype=dtype, seed=10), data(N, dtype=dtype, seed=11, scale=0.1)
    A, B = data(r, K, dtype=dtype, seed=12, scale=0.05), data(N, r, dtype=dtype, seed=13, scale=0.05)
    poison_allocator(M * max(N, K) * 2)
    y = ops.lora_gemm_4bit(x, *qw.op_args(), bias, A, B, s)
    want = ref.lora_gemm_4bit(x, *qw.op_args(), bias=bias, lora_A=A, lora_B=B, scale=s)
    assert rel_err(y, want) < TOL[dtype]
    # the LoRA term alone is well above the tolerance, so a dropped extra step would fail
    assert rel_err(ref.gemm_4bit(x, *qw.op_args(), bias=bias), want) > 3 * TOL[dtype] or r == 1
    g = data(M, N, dtype=dtype, seed=14)
    dx = ops.lora_gemm_4bit_dx(g, *qw.op_args(), A, B, s)
    assert rel_err(dx, ref.lora_gemm_4bit_dx(g, *qw.op_args(), lora_A=A, lora_B=B, scale=s)) < TOL[dtype]


def test_autograd_through_the_fused_path():
    M, N, K, r, s = 200, 256, 384, 8, 2.0
    qw = weight(N, K, seed=15)
    x, A, B = (data(M, K, dtype=torch.bfloat16, seed=16), data(r, K, dtype=torch.bfloat16, seed=17, scale=0.05),
               data(N, r, dtype=torch.bfloat16, seed=18, scale=0.05))
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = _ops.lora_gemm_4bit(x, *qw.op_args(), lora_A=A, lora_B=B, scale=s)
    gy = data(M, N, dtype=torch.bfloat16, seed=19)
    y.backward(gy)
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    want = xd @ qw.dequantize(torch.float64).t() + s * (xd @ Ad.t()) @ Bd.t()
    want.backward(gy.double())
    for got, exp in [(x.grad, xd.grad), (A.grad, Ad.grad), (B.grad, Bd.grad)]:
        assert rel_err(got, exp) < 1e-2


def extra_peak_bytes(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_no_dequantized_copy_of_w_in_global_memory(monkeypatch):
    """Forward and backward allocate far less than one bf16 copy of W (the output, the decoded absmax only)."""
    N = K = 4096
    qw = weight(N, K, seed=20)
    x, g = data(256, K, dtype=torch.bfloat16, seed=21), data(256, N, dtype=torch.bfloat16, seed=22)
    A, B = data(16, K, dtype=torch.bfloat16, seed=23), data(N, 16, dtype=torch.bfloat16, seed=24)
    w_bytes = N * K * 2
    monkeypatch.setenv("NF4Q_CUDA_GEMM", "fused")
    monkeypatch.setenv("NF4Q_CUDA_LORA", "fused")
    for fn in (lambda: ops.gemm_4bit(x, *qw.op_args(), None), lambda: ops.gemm_4bit_dx(g, *qw.op_args()),
               lambda: ops.lora_gemm_4bit(x, *qw.op_args(), None, A, B, 1.0),
               lambda: ops.lora_gemm_4bit_dx(g, *qw.op_args(), A, B, 1.0)):
        assert extra_peak_bytes(fn) < w_bytes / 4


def test_peak_memory_below_bitsandbytes_by_one_w_copy(monkeypatch):
    """Issue 4: forward + backward of 8192 -> 28672 at M = 4096 (r = 16) needs at least one bf16 W less than
    bitsandbytes' dequantizing matmul_4bit + LoRA."""
    bnb = pytest.importorskip("bitsandbytes")
    K, N, M, r, s = 8192, 28672, 4096, 16, 2.0
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    w4 = nf4q.quantize(W, blocksize=64, double_quant=True).op_args()
    bq, st = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    del W
    A = (torch.randn(r, K, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    B = (torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def step(layer):
        return lambda: torch.autograd.grad(layer(x), (x, A, B), gy)

    theirs = extra_peak_bytes(step(lambda t: bnb.matmul_4bit(t, bq.t(), quant_state=st)
                                   + s * F.linear(F.linear(t, A), B)))
    for path in ("fused", "slabs"):  # the wgmma kernel, and cuBLAS on slabs of at most 32 MiB
        monkeypatch.setenv("NF4Q_CUDA_LORA", path)
        ours = extra_peak_bytes(step(lambda t: _ops.lora_gemm_4bit(t, *w4, lora_A=A, lora_B=B, scale=s)))
        assert ours <= theirs - N * K * 2, (path, ours / 2**20, theirs / 2**20)
