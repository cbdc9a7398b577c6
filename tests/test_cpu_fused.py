"""The SIMD CPU kernels (csrc/cpu/nf4_simd*.cpp) against the pure-torch reference, every ISA variant this
machine runs (forced with NF4Q_CPU_ISA) and both matmul paths (NF4Q_CPU_GEMM=fused|panel)."""
import platform

import pytest
import torch

import nf4q
from conftest import DTYPES, randn
from nf4q import _reference as ref


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _supported():
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"scalar"}
    flags = _cpu_flags()
    isas = {"scalar"}
    if {"avx2", "fma", "f16c"} <= flags:
        isas.add("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isas.add("avx512")
    return isas


ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in _supported(), reason=f"CPU lacks {i}"))
        for i in ("scalar", "avx2", "avx512")]
MS = [1, 2, 7, 8, 64, 300]
# (N, K, blocksize, double_quant): K % 32 == 0 takes the fused kernels; K % blocksize != 0 puts block boundaries
# inside rows; numel % blocksize != 0 leaves a partial last block; odd K starts rows mid-byte (panel path only).
CASES = [(33, 64, 32, False), (5, 96, 64, True), (9, 256, 256, True), (7, 128, 128, False),
         (17, 320, 256, False), (4, 47, 32, True), (6, 130, 64, False), (3, 33, 128, True)]
# Relative error bound (of the max |y|): fp32 accumulation, then the output's rounding.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def isa_env(monkeypatch):
    def set_env(isa, path=None):
        monkeypatch.setenv("NF4Q_CPU_ISA", isa)
        if path:
            monkeypatch.setenv("NF4Q_CPU_GEMM", path)
        else:
            monkeypatch.delenv("NF4Q_CPU_GEMM", raising=False)
    return set_env


def _weight(N, K, blocksize, dq, gen):
    return nf4q.quantize(randn(N, K, generator=gen), blocksize=blocksize, double_quant=dq).op_args()


def _assert_close(y, expected, dtype):
    assert y.dtype == dtype and y.shape == expected.shape
    err = (y.double() - expected).abs().max().item() if y.numel() else 0.0
    assert err <= TOL[dtype] * max(expected.abs().max().item(), 1e-6), err


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("path", ["fused", "panel"])
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_matches_reference(isa, path, M, isa_env, gen):
    isa_env(isa, path)
    for i, (N, K, bs, dq) in enumerate(CASES):
        w4 = _weight(N, K, bs, dq, gen)
        bias = randn(N, generator=gen) if i % 2 else None
        for dtype in DTYPES:
            x = randn(M, K, dtype=dtype, generator=gen)
            y = torch.ops.nf4q.gemm_4bit(x, *w4, None if bias is None else bias.to(dtype))
            expected = ref.gemm_4bit(x, *w4, bias=None if bias is None else bias.to(dtype))
            _assert_close(y, expected, dtype)


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("path", ["fused", "panel"])
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_dx_matches_reference(isa, path, M, isa_env, gen):
    isa_env(isa, path)
    for N, K, bs, dq in CASES:
        w4 = _weight(N, K, bs, dq, gen)
        for dtype in DTYPES:
            g = randn(M, N, dtype=dtype, generator=gen)
            _assert_close(torch.ops.nf4q.gemm_4bit_dx(g, *w4), ref.gemm_4bit_dx(g, *w4), dtype)


@pytest.mark.parametrize("M", [1, 8, 64])
@pytest.mark.parametrize("isa", ISAS)
def test_noncontiguous_and_batched_inputs(isa, M, isa_env, gen):
    isa_env(isa)
    w4 = _weight(40, 192, 64, True, gen)
    for dtype in DTYPES:
        x = randn(M, 2 * 192, dtype=dtype, generator=gen)[:, ::2]  # strided rows
        xt = randn(192, M, dtype=dtype, generator=gen).t()  # column-major
        x3 = randn(M, 3, 192, dtype=dtype, generator=gen).transpose(0, 1)  # [3, M, K], not contiguous
        assert not x.is_contiguous() and (M == 1 or not x3.is_contiguous())
        for xi in (x, xt, x3):
            _assert_close(torch.ops.nf4q.gemm_4bit(xi, *w4, None), ref.gemm_4bit(xi, *w4), dtype)
        g = randn(M, 80, dtype=dtype, generator=gen)[:, ::2]
        _assert_close(torch.ops.nf4q.gemm_4bit_dx(g, *w4), ref.gemm_4bit_dx(g, *w4), dtype)


@pytest.mark.parametrize("M", [1, 64])
@pytest.mark.parametrize("isa", ISAS)
def test_lora_composes_the_fused_kernels(isa, M, isa_env, gen):
    isa_env(isa)
    w4 = _weight(48, 96, 64, True, gen)
    A, B = randn(4, 96, generator=gen), randn(48, 4, generator=gen)
    for dtype in DTYPES:
        x = randn(M, 96, dtype=dtype, generator=gen)
        y = torch.ops.nf4q.lora_gemm_4bit(x, *w4, None, A.to(dtype), B.to(dtype), 0.5)
        _assert_close(y, ref.lora_gemm_4bit(x, *w4, lora_A=A.to(dtype), lora_B=B.to(dtype), scale=0.5), dtype)
        g = randn(M, 48, dtype=dtype, generator=gen)
        dx = torch.ops.nf4q.lora_gemm_4bit_dx(g, *w4, A.to(dtype), B.to(dtype), 0.5)
        _assert_close(dx, ref.lora_gemm_4bit_dx(g, *w4, lora_A=A.to(dtype), lora_B=B.to(dtype), scale=0.5), dtype)


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_bit_exact(isa, isa_env, gen):
    """Every variant's decode (aligned body, unaligned head/tail, fp32/fp16/bf16 stores) equals the reference."""
    isa_env(isa)
    for shape, bs, dq in [((4097,), 64, True), ((3, 1001), 32, False), ((64, 96), 256, True),
                          ((2, 70000), 128, True), ((1,), 32, False)]:
        qw = nf4q.quantize(randn(*shape, generator=gen) * 100, blocksize=bs, double_quant=dq)
        for dtype in DTYPES:
            assert torch.equal(qw.dequantize(dtype), ref.dequantize_4bit(*qw.op_args(), dtype))


def test_variants_agree_and_unknown_isa_falls_back(isa_env, gen):
    w4 = _weight(64, 256, 64, True, gen)
    x = randn(8, 256, generator=gen)
    isa_env("scalar")
    y_scalar = torch.ops.nf4q.gemm_4bit(x, *w4, None)
    isa_env("no-such-isa")  # ignored: the best supported variant runs
    y_best = torch.ops.nf4q.gemm_4bit(x, *w4, None)
    torch.testing.assert_close(y_best, y_scalar, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_large_weight_takes_the_panel_path(isa, isa_env, gen):
    """Above 2^21 values the panel path decodes W a panel at a time (smaller weights are decoded whole)."""
    isa_env(isa, "panel")
    w4 = _weight(1030, 2080, 64, True, gen)  # 2.14M values; 1030 rows leave a partial last panel
    for M in (3, 70):
        x = randn(M, 2080, generator=gen)
        _assert_close(torch.ops.nf4q.gemm_4bit(x, *w4, None), ref.gemm_4bit(x, *w4), torch.float32)
        g = randn(M, 1030, generator=gen)
        _assert_close(torch.ops.nf4q.gemm_4bit_dx(g, *w4), ref.gemm_4bit_dx(g, *w4), torch.float32)
