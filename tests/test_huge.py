"""Tensors of >= 2^31 elements on the GPU (issue 17): quantize, dequantize, gemm_4bit / gemm_4bit_dx and the
optimizer must index in 64 bits. A 65,536 x 32,800 weight has 2,149,580,800 elements; the checks compare the
elements past 2^31 (and the first ones) with the pure-torch reference on slices aligned to the nested blocks.

Needs ~60 GB of GPU memory:  pytest -m "slow and cuda" tests/test_huge.py -v
"""
import pytest
import torch

import nf4q
from nf4q import _reference as ref
from nf4q.optim import reference as R
from nf4q.optim.maps import signed_map, unsigned_map

pytestmark = [pytest.mark.slow, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and
                                 torch.cuda.get_device_properties(0).total_memory < 80 * 2**30,
                                 reason="needs 80 GB of GPU memory")]

N, K = 65536, 32800
NUMEL = N * K
ALIGN = 64 * 256  # blocksize x nested_blocksize: a slice starting here has whole absmax and nested blocks
assert NUMEL > 2**31 and 2**31 % ALIGN == 0


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qw = nf4q.quantize(w, blocksize=64, double_quant=True)
    yield w, qw
    del w, qw
    torch.cuda.empty_cache()


def _slice_w4(qw, s, e):
    """The W4 arguments of flat elements [s, e) of qw (s a multiple of ALIGN), for the reference."""
    b0, b1 = s // 64, -(-e // 64)
    return (qw.packed.view(-1)[s // 2: -(-e // 2)], qw.absmax[b0:b1], qw.nested_absmax[b0 // 256: -(-b1 // 256)],
            qw.nested_code, qw.nested_offset, qw.code, 64, 256, [e - s])


@pytest.mark.parametrize("s,e", [(0, ALIGN * 8), (2**31 - ALIGN * 4, NUMEL)])
def test_quantize_and_dequantize_past_2_31(weight, s, e):
    w, qw = weight
    flat = w.view(-1)
    packed, absmax = ref.quantize_4bit(flat[s:e], qw.code, 64)
    assert torch.equal(qw.packed.view(-1)[s // 2: e // 2], packed.view(-1))
    decoded = ref.absmax_fp32(*[qw.absmax, qw.nested_absmax, qw.nested_code, qw.nested_offset, 256])
    assert torch.isfinite(decoded).all() and decoded.numel() == -(-NUMEL // 64)
    out = qw.dequantize(torch.bfloat16)
    assert out.shape == (N, K)
    want = ref.dequantize_4bit(*_slice_w4(qw, s, e), torch.bfloat16)
    assert torch.equal(out.view(-1)[s:e], want)
    del out
    buf = torch.empty(NUMEL, dtype=torch.float16, device="cuda")
    torch.ops.nf4q.dequantize_4bit.out(*qw.op_args(), torch.float16, out=buf)
    assert torch.equal(buf[s:e], ref.dequantize_4bit(*_slice_w4(qw, s, e), torch.float16))


def _ref_rows(qw, r0, r1):
    """dequant(W)[r0:r1] in fp64 (r0 * K a multiple of ALIGN)."""
    return ref.dequantize_4bit(*_slice_w4(qw, r0 * K, r1 * K), torch.float64).view(r1 - r0, K)


@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (8, torch.float16), (300, torch.bfloat16),
                                     (5, torch.float32)])
def test_gemm_past_2_31(weight, M, dtype):
    _, qw = weight
    torch.manual_seed(M)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    y = torch.ops.nf4q.gemm_4bit(x, *qw.op_args(), bias)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for r0, r1 in ((0, 512), (N - 512, N)):  # rows past element 2^31 start at row 65,472
        want = x.double() @ _ref_rows(qw, r0, r1).t() + bias[r0:r1].double()
        got = y[:, r0:r1].double()
        assert ((got - want).norm() / want.norm()).item() < tol


def test_gemm_dx_past_2_31(weight):
    _, qw = weight
    torch.manual_seed(1)
    grad = torch.randn(4, N, device="cuda", dtype=torch.bfloat16)
    dx = torch.ops.nf4q.gemm_4bit_dx(grad, *qw.op_args())
    want = torch.zeros(4, K, device="cuda", dtype=torch.float64)
    for r0 in range(0, N, 4096):  # the reduction runs over every row, including those past 2^31
        want += grad[:, r0:r0 + 4096].double() @ _ref_rows(qw, r0, r0 + 4096)
    assert ((dx.double() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("bits,dtype", [(8, torch.bfloat16), (32, torch.float32)])
def test_optimizer_past_2_31(bits, dtype):
    torch.cuda.empty_cache()
    n = 2**31 + 4096 + 17
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype))
    opt = nf4q.optim.AdamW([p], lr=1e-2, bits=bits, weight_decay=0.1)
    s = 2**31 - 1024  # a 256-aligned slice that crosses 2^31 and runs to the partial last block
    for step in (1, 2):
        p.grad = torch.randn(n, device="cuda", dtype=dtype)
        st = opt.state[p]
        if st:
            keys = ["exp_avg", "exp_avg_sq"] + (["exp_avg_absmax", "exp_avg_sq_absmax"] if bits == 8 else [])
            before = {k: (st[k].view(-1)[s // 256:] if k.endswith("absmax") else st[k].view(-1)[s:]).clone()
                      for k in keys}
        else:
            before = None
        p_slice, g_slice = p.detach()[s:].clone(), p.grad[s:].clone()
        opt.step()
        if before is None:  # the first step starts from zero states: replay it from zeros on the slice
            zeros8 = bits == 8
            before = {"exp_avg": torch.zeros_like(p_slice, dtype=torch.uint8 if zeros8 else torch.float32),
                      "exp_avg_sq": torch.zeros_like(p_slice, dtype=torch.uint8 if zeros8 else torch.float32)}
            if zeros8:
                before.update(exp_avg_absmax=torch.zeros(-(-p_slice.numel() // 256), device="cuda"),
                              exp_avg_sq_absmax=torch.zeros(-(-p_slice.numel() // 256), device="cuda"))
        hp = (1e-2, 0.9, 0.999, 1e-8, 0.1, step)
        if bits == 8:
            R.adamw8bit_step([p_slice], [g_slice], [before["exp_avg"]], [before["exp_avg_sq"]],
                             [before["exp_avg_absmax"]], [before["exp_avg_sq_absmax"]], signed_map("cuda"),
                             unsigned_map("cuda"), *hp)
        else:
            R.adamw_step([p_slice], [g_slice], [before["exp_avg"]], [before["exp_avg_sq"]], *hp)
        torch.testing.assert_close(p.detach()[s:], p_slice, rtol=1e-2 if bits == 8 else 1e-5, atol=1e-5)
        assert torch.isfinite(p.detach()[:4096]).all()
    del opt, p
    torch.cuda.empty_cache()
