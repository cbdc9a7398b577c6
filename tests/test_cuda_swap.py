"""The swapped wgmma GEMM (csrc/cuda/swap_gemm.cu: W dequantized in registers as wgmma's A operand, x the B
operand) forced with NF4Q_CUDA_GEMM=swap, against the fp64 oracle and the dequantize + cuBLAS path."""
import pytest
import torch

from nf4q import _reference as ref
from test_cuda_fused import HAS_WGMMA, TOL, data, weight
from test_cuda_kernels import poison_allocator, rel_err

pytestmark = pytest.mark.skipif(not HAS_WGMMA, reason="needs a compute-capability-9.0 GPU (wgmma, sm_90a)")
ops = torch.ops.nf4q


@pytest.fixture
def swap(monkeypatch):
    monkeypatch.setenv("NF4Q_CUDA_GEMM", "swap")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize,double_quant", [(32, True), (64, True), (64, False), (128, True), (256, False)])
@pytest.mark.parametrize("M", [1, 5, 16, 17, 31, 64, 97, 128, 131, 509])
def test_matches_reference(dtype, blocksize, double_quant, M, swap):
    # N not a multiple of the 128-row tile (a partial tile, rows past N), K of 5 and 16 steps (split and not)
    for N, K in [(200, 320), (384, 1024)]:
        qw = weight(N, K, blocksize, double_quant, seed=M + N + blocksize)
        x, bias = data(M, K, dtype=dtype, seed=M), data(N, dtype=dtype, seed=2, scale=0.1)
        for b in (None, bias):
            poison_allocator(4 * M * N * 16)
            y = ops.gemm_4bit(x, *qw.op_args(), b)
            assert torch.isfinite(y).all(), (N, K)
            assert rel_err(y, ref.gemm_4bit(x, *qw.op_args(), bias=b)) < TOL[dtype], (N, K, b is None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("M", [1, 33, 200, 515])
def test_every_token_tile_matches_reference(dtype, tokens, M, swap, monkeypatch):
    """Each tile width forced (NF4Q_SWAP_TOKENS) on batches smaller than, equal to and spanning several of its tiles,
    with split-K (2 or 3 row tiles of 16 or 5 steps), bias, LoRA steps (r = 24) and partial row tiles."""
    monkeypatch.setenv("NF4Q_SWAP_TOKENS", str(tokens))
    for N, K in [(200, 1024), (384, 320)]:
        qw = weight(N, K, seed=M + tokens)
        x, bias = data(M, K, dtype=dtype, seed=M), data(N, dtype=dtype, seed=3, scale=0.1)
        A, B = data(24, K, dtype=dtype, seed=4, scale=0.05), data(N, 24, dtype=dtype, seed=5, scale=0.05)
        poison_allocator(4 * M * N * 16)
        y = ops.gemm_4bit(x, *qw.op_args(), bias)
        assert torch.isfinite(y).all(), (N, K)
        assert rel_err(y, ref.gemm_4bit(x, *qw.op_args(), bias=bias)) < TOL[dtype], (N, K)
        y = ops.lora_gemm_4bit(x, *qw.op_args(), bias, A, B, 0.5, 0.0, 0)  # M > 1: LoRA as the kernel's extra steps
        want = ref.lora_gemm_4bit(x, *qw.op_args(), bias=bias, lora_A=A, lora_B=B, scale=0.5)
        assert rel_err(y, want) < TOL[dtype], (N, K, "lora")


@pytest.mark.parametrize("M", [3, 40, 200])
@pytest.mark.parametrize("K", [8192, 2368])  # 2368: 37 steps, splits of 12, 12, 12 and 1 (scales one step at a time)
def test_split_k_matches_the_dequant_path(M, K, monkeypatch):
    """Few row tiles and a long K: the kernel splits K and sums the fp32 partials in a second kernel."""
    qw = weight(256, K, seed=M)
    x, bias = data(M, K, dtype=torch.bfloat16, seed=7), data(256, dtype=torch.bfloat16, seed=8, scale=0.1)
    out = {}
    for path in ("swap", "dequant"):
        monkeypatch.setenv("NF4Q_CUDA_GEMM", path)
        poison_allocator(4 * M * 256 * 64)
        out[path] = ops.gemm_4bit(x, *qw.op_args(), bias)
    assert torch.isfinite(out["swap"]).all()
    # the same weights up to the rounding of code x scale in bf16 (the dequant path rounds the fp32 product once)
    assert rel_err(out["swap"], out["dequant"]) < 6e-3
    assert rel_err(out["swap"], ref.gemm_4bit(x, *qw.op_args(), bias=bias)) < TOL[torch.bfloat16]


def test_non_contiguous_leading_dims_and_an_odd_offset(swap):
    qw = weight(256, 512, seed=9)
    x = data(3, 512, 30, dtype=torch.bfloat16, seed=10).transpose(1, 2)  # [3, 30, 512], stride 1 on dim 1
    y = ops.gemm_4bit(x, *qw.op_args(), None)
    assert y.shape == (3, 30, 256)
    assert rel_err(y, ref.gemm_4bit(x.contiguous(), *qw.op_args())) < TOL[torch.bfloat16]
    flat = data(1 + 20 * 512, dtype=torch.bfloat16, seed=11)
    x_odd = flat[1:].view(20, 512)  # a storage offset of one element: not 16-byte aligned
    assert rel_err(ops.gemm_4bit(x_odd, *qw.op_args(), None), ref.gemm_4bit(x_odd, *qw.op_args())) < 1e-2


@pytest.mark.parametrize("double_quant", [True, False])
def test_misaligned_scales_take_the_one_step_loads(double_quant, swap):
    """Block scales starting one element past an aligned address cannot be read 4 (or 16) bytes at a time."""
    qw = weight(256, 1024, 64, double_quant, seed=15)
    args = list(qw.op_args())
    absmax = args[1]
    shifted = torch.empty(absmax.numel() + 1, dtype=absmax.dtype, device=absmax.device)[1:]
    shifted.copy_(absmax)
    args[1] = shifted
    x = data(40, 1024, dtype=torch.bfloat16, seed=16)
    assert rel_err(ops.gemm_4bit(x, *args, None), ref.gemm_4bit(x, *qw.op_args())) < TOL[torch.bfloat16]


def test_shapes_it_does_not_take_fall_back(swap):
    """K not a multiple of 64 and fp32 activations go to another path, with the same answer."""
    qw = weight(130, 96, blocksize=32, seed=12)
    for dtype in (torch.bfloat16, torch.float32):
        x = data(33, 96, dtype=dtype, seed=13)
        y = ops.gemm_4bit(x, *qw.op_args(), None)
        assert y.dtype == dtype
        assert rel_err(y, ref.gemm_4bit(x, *qw.op_args())) < TOL.get(dtype, 1e-4)


def test_automatic_choice_matches_reference():
    """Without the override, batches of 2..2048 rows take this kernel on a 9.0 GPU (128- or 256-token tiles above
    128, by estimated time), and 1 row for 8192 rows of W or more (the mma.sync kernel below that)."""
    for N, K in [(1024, 2048), (8192, 256)]:
        qw = weight(N, K, seed=14)
        for M in (1, 4, 17, 64, 256, 300, 2048):
            x = data(M, K, dtype=torch.bfloat16, seed=M)
            assert rel_err(ops.gemm_4bit(x, *qw.op_args(), None), ref.gemm_4bit(x, *qw.op_args())) < 1e-2, (N, M)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 8, 16, 70])  # 1: padded to 8; 70: two extra 64-wide steps
@pytest.mark.parametrize("M,N,K", [(3, 8192, 256), (9, 200, 320), (64, 384, 512), (131, 256, 4096), (509, 384, 512),
                                   (1500, 8192, 256)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_forward_rides_as_extra_steps(dtype, r, M, N, K, dropout_p):
    """lora_gemm_4bit for 1 < M <= 2048 (and M = 1 with 8192 rows) takes this kernel by default; 256 x 4096 splits K
    (the LoRA steps run in the first split only), 200 rows leave a partial tile."""
    s = 0.7
    qw = weight(N, K, seed=r + M)
    x, bias = data(M, K, dtype=dtype, seed=10), data(N, dtype=dtype, seed=11, scale=0.1)
    A, B = data(r, K, dtype=dtype, seed=12, scale=0.05), data(N, r, dtype=dtype, seed=13, scale=0.05)
    poison_allocator(4 * M * N * 16)
    y = ops.lora_gemm_4bit(x, *qw.op_args(), bias, A, B, s, dropout_p, 1234)
    want = ref.lora_gemm_4bit(x, *qw.op_args(), bias=bias, lora_A=A, lora_B=B, scale=s, dropout_p=dropout_p,
                              seed=1234)
    assert torch.isfinite(y).all()
    assert rel_err(y, want) < TOL[dtype]
    # the LoRA term alone is well above the tolerance, so a lost extra step would fail
    assert rel_err(ref.gemm_4bit(x, *qw.op_args(), bias=bias), want) > 3 * TOL[dtype] or r == 1
