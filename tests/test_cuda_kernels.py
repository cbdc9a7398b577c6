"""CUDA kernels against the CPU kernels (bit for bit) and the fp64 oracles of nf4q/_reference.py."""
import pytest
import torch

import nf4q
from nf4q import _ops, _reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ops = torch.ops.nf4q
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
MS = [1, 2, 3, 7, 8, 16, 33, 64, 100, 512, 4096]


def rel_err(out, want):
    return ((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes):
    """Fill a freed block of the caching allocator with NaN so an unwritten output element shows up as NaN."""
    torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")


def quantized(n, k, blocksize=64, double_quant=True, nested_map="fp8_e4m3", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return nf4q.quantize(w, blocksize=blocksize, double_quant=double_quant, nested_map=nested_map).cuda()


# ---- quantize / dequantize: bit-identical to the CPU kernels -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("n", [1, 31, 4097, 70001])
def test_quantize_4bit_matches_cpu(dtype, blocksize, n):
    g = torch.Generator().manual_seed(n + blocksize)
    A = (torch.randn(n, generator=g) * 3).to(dtype)
    A[: min(n, blocksize)] *= 1e-3  # a block of small values next to ordinary ones
    if n > 2 * blocksize:
        A[blocksize:2 * blocksize] = 0  # an all-zero block: absmax 0, codes of 0
    code = nf4q.nf4_code()
    p_cpu, a_cpu = ops.quantize_4bit(A, code, blocksize)
    p_gpu, a_gpu = ops.quantize_4bit(A.cuda(), code.cuda(), blocksize)
    assert torch.equal(p_gpu.cpu(), p_cpu)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    p_ref, a_ref = ref.quantize_4bit(A, code, blocksize)
    assert torch.equal(p_gpu.cpu(), p_ref) and torch.equal(a_gpu.cpu(), a_ref)


def test_quantize_4bit_flags_nonfinite_blocks():
    A = torch.randn(256, device="cuda")
    A[70] = float("inf")
    _, absmax = ops.quantize_4bit(A, nf4q.nf4_code("cuda"), 64)
    assert torch.isnan(absmax[1]) and torch.isfinite(absmax[[0, 2, 3]]).all()
    with pytest.raises(ValueError):
        nf4q.quantize(A.view(16, 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [256, 100, 7])
@pytest.mark.parametrize("table", ["fp8_e4m3", "dynamic"])
def test_blockwise_8bit_matches_cpu(dtype, blocksize, table):
    g = torch.Generator().manual_seed(blocksize)
    A = torch.randn(10007, generator=g).to(dtype)
    code = nf4q.nested_map(table)
    q_cpu, a_cpu = ops.quantize_blockwise_8bit(A, code, blocksize)
    q_gpu, a_gpu = ops.quantize_blockwise_8bit(A.cuda(), code.cuda(), blocksize)
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(a_gpu.cpu(), a_cpu)
    for out_dtype in DTYPES:
        d_cpu = ops.dequantize_blockwise_8bit(q_cpu, a_cpu, code, blocksize, out_dtype)
        d_gpu = ops.dequantize_blockwise_8bit(q_gpu, a_gpu, code.cuda(), blocksize, out_dtype)
        assert torch.equal(d_gpu.cpu(), d_cpu)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (129, 257), (64, 4096)])
def test_dequantize_4bit_matches_cpu_and_reference(double_quant, blocksize, shape):
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    qw = nf4q.quantize(torch.randn(*shape, generator=g), blocksize=blocksize, double_quant=double_quant,
                       nested_map="dynamic" if blocksize == 32 else "fp8_e4m3")
    qg = qw.cuda()
    for dtype in DTYPES:
        want = qw.dequantize(dtype)
        got = qg.dequantize(dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(got.cpu(), want)
        assert torch.equal(got.cpu(), ref.dequantize_4bit(*qw.op_args(), dtype))
        out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # poisoned: every element must be written
        ops.dequantize_4bit.out(*qg.op_args(), dtype, out=out)
        assert torch.equal(out.cpu(), want)


def test_nested_blocksize_not_a_power_of_two():
    # The kernels shift by log2(nested_blocksize) when it is a power of two (always, from nf4q and bitsandbytes) and
    # divide otherwise: a file may carry any positive nested_blocksize.
    from dataclasses import replace
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 320, generator=g) * 0.05
    qw = nf4q.quantize(w, blocksize=64, double_quant=False)
    table = nf4q.nested_map("fp8_e4m3")
    offset = qw.absmax.mean().view(1)
    q2, absmax2 = _ops.quantize_blockwise_8bit(qw.absmax - offset, table, 100)
    qn = replace(qw, absmax=q2, nested_absmax=absmax2, nested_code=table, nested_offset=offset, nested_blocksize=100)
    qg = qn.cuda()
    for dtype in DTYPES:
        assert torch.equal(qg.dequantize(dtype).cpu(), qn.dequantize(dtype))
    x = torch.randn(5, 320, generator=g).to(torch.bfloat16)
    want = x.double() @ qn.dequantize(torch.float64).T
    for m in (1, 5):
        got = ops.gemm_4bit(x[:m].cuda(), *qg.op_args(), None)
        assert rel_err(got.cpu(), want[:m]) < TOL[torch.bfloat16]


def test_quantize_on_gpu_equals_cpu_without_double_quant():
    w = torch.randn(300, 515) * 0.02
    a, b = nf4q.quantize(w, double_quant=False), nf4q.quantize(w.cuda(), double_quant=False)
    assert torch.equal(a.packed, b.packed.cpu()) and torch.equal(a.absmax, b.absmax.cpu())
    # with double quantization only absmax.mean() (a torch reduction) may round differently on the GPU
    c = nf4q.quantize(w.cuda())
    assert rel_err(c.dequantize(torch.float32).cpu(), w) < 0.15


# ---- gemm_4bit: fp64 oracle, every M, odd shapes, non-contiguous x -------------------------------------------

SHAPES = [  # (N, K, blocksize, double_quant): K % 32 == 0 takes the fused kernel; odd K the generic path
    (257, 512, 64, True),
    (96, 333, 128, False),
    (33, 4096, 4096, True),
    (130, 160, 32, False),
]


def check_gemm(M, dtype, N, K, blocksize, double_quant, noncontig, with_bias, seed):
    qw = quantized(N, K, blocksize, double_quant, seed=seed)
    g = torch.Generator().manual_seed(seed + M)
    xfull = torch.randn(M, 2 * K if noncontig else K, generator=g).to(dtype).cuda()
    x = xfull[:, ::2] if noncontig else xfull
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype).cuda() if with_bias else None
    poison_allocator(M * N * 4)
    y = ops.gemm_4bit(x, *qw.op_args(), bias)
    want = ref.gemm_4bit(x, *qw.op_args(), bias=bias)
    assert y.shape == (M, N) and y.dtype == dtype
    assert not torch.isnan(y).any()
    err = rel_err(y, want)
    assert err < TOL[dtype], (M, N, K, dtype, err)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_4bit_vs_reference(M, dtype):
    for i, (N, K, bs, dq) in enumerate(SHAPES):
        if M >= 512 and K >= 4096:
            continue  # keep the big-M cases small
        check_gemm(M, dtype, N, K, bs, dq, noncontig=(i + M) % 2 == 1, with_bias=i % 2 == 0, seed=i)


@pytest.mark.parametrize("path", ["mma", "dequant"])
@pytest.mark.parametrize("M", [1, 5, 16, 40, 64, 100, 130])
def test_gemm_4bit_forced_paths(path, M, monkeypatch):
    """Both paths at every size, the fused kernel past its default range too (several M tiles)."""
    monkeypatch.setenv("NF4Q_CUDA_GEMM", path)
    for dtype in (torch.float16, torch.bfloat16):
        check_gemm(M, dtype, 1000, 1024, 64, True, noncontig=False, with_bias=True, seed=M)
        check_gemm(M, dtype, 77, 96, 32, False, noncontig=True, with_bias=False, seed=M + 1)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dq", [True, False])
def test_decode_unit_kernel_edges(M, dq, monkeypatch):
    """gemv.cu's decode_unit_kernel (M <= 8, block size 64, K % 256 == 0): rows past N (5000 and 37 are not multiples
    of 16), K of 13 and 1 groups (warps idle on a tile's last step), several tiles per persistent block (5000 rows >
    16 x the blocks a GPU holds), fp32 absmax and double quant, fp16 and bf16, non-contiguous x."""
    monkeypatch.setenv("NF4Q_CUDA_GEMM", "mma")
    for dtype in (torch.float16, torch.bfloat16):
        check_gemm(M, dtype, 5000, 256 * 13, 64, dq, noncontig=M == 3, with_bias=dq, seed=M)
        check_gemm(M, dtype, 37, 256, 64, dq, noncontig=False, with_bias=not dq, seed=M + 7)


@pytest.mark.parametrize("M,N,K", [(1, 8200, 512), (2, 8200, 2304), (3, 8200, 2304), (5, 1000, 1024)])
def test_gemm_4bit_automatic_decode_path(M, N, K):
    """The automatic choice of gemm.cu for decode (M <= 3 at any N, M <= 8 on small weights: the decode kernel on a
    GPU with Hopper's shared memory, another path elsewhere) against the reference, fp16 and bf16, with a bias."""
    for dtype in (torch.float16, torch.bfloat16):
        check_gemm(M, dtype, N, K, 64, True, noncontig=False, with_bias=True, seed=M)


def test_gemm_4bit_leading_dims_and_dynamic_nested_map():
    qw = quantized(200, 256, 64, True, nested_map="dynamic")
    x = torch.randn(2, 3, 5, 256, device="cuda", dtype=torch.bfloat16)
    y = ops.gemm_4bit(x, *qw.op_args(), None)
    assert y.shape == (2, 3, 5, 200)
    assert rel_err(y, ref.gemm_4bit(x, *qw.op_args())) < 1e-2


@pytest.mark.parametrize("M", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_4bit_dx_vs_reference(M, dtype):
    for N, K, bs, dq in SHAPES[:2]:
        qw = quantized(N, K, bs, dq, seed=M)
        grad = torch.randn(M, N, device="cuda").to(dtype)
        dx = ops.gemm_4bit_dx(grad, *qw.op_args())
        assert dx.shape == (M, K) and dx.dtype == dtype
        assert rel_err(dx, ref.gemm_4bit_dx(grad, *qw.op_args())) < TOL[dtype]


def test_bad_inputs_raise():
    qw = quantized(64, 128)
    with pytest.raises(ValueError, match="last dim"):  # argument errors: ValueError/TypeError (csrc/checks.h)
        ops.gemm_4bit(torch.randn(3, 100, device="cuda"), *qw.op_args(), None)
    with pytest.raises(ValueError, match="one device"):
        ops.gemm_4bit(torch.randn(3, 128), *qw.op_args(), None)
    with pytest.raises(ValueError, match="bias"):
        ops.gemm_4bit(torch.randn(3, 128, device="cuda"), *qw.op_args(), torch.randn(5, device="cuda"))
    with pytest.raises(ValueError, match="blocksize"):
        ops.quantize_4bit(torch.randn(100, device="cuda"), nf4q.nf4_code("cuda"), 48)


def test_opcheck_cuda_ops():
    qw = quantized(48, 96, 64, True)
    w4 = qw.op_args()
    x = torch.randn(5, 96, device="cuda", requires_grad=True)
    xh = torch.randn(3, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(5, 48, device="cuda")
    bias = torch.randn(48, device="cuda", requires_grad=True)
    A = torch.randn(4, 96, device="cuda", requires_grad=True)
    B = torch.randn(48, 4, device="cuda", requires_grad=True)
    code, dyn = nf4q.nf4_code("cuda"), nf4q.dynamic_map("cuda")
    q8 = _ops.quantize_blockwise_8bit(torch.randn(1000, device="cuda"), dyn, 256)
    cases = [
        (ops.quantize_4bit, (torch.randn(1001, device="cuda"), code, 64)),
        (ops.dequantize_4bit.default, (*w4, torch.bfloat16)),
        (ops.quantize_blockwise_8bit, (torch.randn(1000, device="cuda"), dyn, 256)),
        (ops.dequantize_blockwise_8bit, (*q8, dyn, 256, torch.float16)),
        (ops.gemm_4bit, (x, *w4, bias)),
        (ops.gemm_4bit, (xh, *w4, None)),
        (ops.gemm_4bit_dx, (g, *w4)),
        (ops.lora_gemm_4bit, (x, *w4, bias, A, B, 0.5)),
        (ops.lora_gemm_4bit_dx, (g, *w4, A.detach(), B.detach(), 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    out = torch.empty(48, 96, device="cuda")
    torch.library.opcheck(ops.dequantize_4bit.out, w4 + (torch.float32,), {"out": out})


# ---- Linear4bit on CUDA: autograd, device moves, torch.compile, CUDA graphs ------------------------------------

def test_linear4bit_forward_backward_on_cuda():
    torch.manual_seed(0)
    lin = nf4q.Linear4bit(192, 130, bias=True).cuda()
    x = torch.randn(4, 7, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    wd = lin.dequantize(torch.float64)
    want = x.double() @ wd.t() + lin.bias.double()
    assert rel_err(y, want) < 1e-2
    assert rel_err(x.grad, gy.double() @ wd) < 1e-2
    assert rel_err(lin.bias.grad, gy.double().sum((0, 1))) < 1e-2


def test_moving_keeps_the_bytes():
    lin = nf4q.Linear4bit(96, 40)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    back = lin.cuda().cpu()
    for k, v in back.state_dict().items():
        assert torch.equal(v, before[k]), k
    qw = nf4q.quantize(torch.randn(33, 64))
    moved = qw.cuda()
    assert moved.packed.is_cuda and torch.equal(moved.cpu().packed, qw.packed)
    assert torch.equal(moved.cpu().absmax, qw.absmax)
    assert torch.equal(moved.dequantize(torch.float32).cpu(), qw.dequantize(torch.float32))


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nf4q.Linear4bit(128, 256)
        self.down = nf4q.Linear4bit(256, 96, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _MLP().cuda()
    x = torch.randn(6, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_eager = model(x)
    (gx_eager,) = torch.autograd.grad(y_eager.float().square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert torch.allclose(y, y_eager, rtol=1e-2, atol=1e-2)
    assert rel_err(gx, gx_eager) < 1e-2


def test_cuda_graph_capture_uses_current_stream():
    torch.manual_seed(0)
    model = _MLP().cuda()
    static_x = torch.randn(3, 128, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            model(static_x)  # warm-up on a side stream, as capture needs
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = model(static_x)
    new_x = torch.randn(3, 128, device="cuda", dtype=torch.float16)
    static_x.copy_(new_x)
    graph.replay()
    with torch.no_grad():
        want = model(new_x)
    assert torch.equal(static_y, want)


def test_compile_reduce_overhead():
    torch.manual_seed(0)
    model = _MLP().cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
            y = compiled(x).clone()
            assert torch.allclose(y, model(x), rtol=1e-2, atol=1e-2)
