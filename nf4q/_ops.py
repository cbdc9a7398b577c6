"""Typed wrappers over torch.ops.nf4q, with fake kernels (torch.compile) and autograd formulas.

The schemas live in csrc/nf4q.cpp; a quantized weight travels as the W4 group of arguments:
(packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape).
"""

import torch

from . import _C  # noqa: F401  (registers the ops)

ops = torch.ops.nf4q


# ---- fake kernels: shapes and dtypes only ---------------------------------------------------------

@torch.library.register_fake("nf4q::quantize_4bit")
def _(A, code, blocksize):
    n = A.numel()
    return A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), A.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake("nf4q::dequantize_4bit")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("nf4q::dequantize_4bit.out")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape, dtype, *,
      out):
    return None


@torch.library.register_fake("nf4q::quantize_blockwise_8bit")
def _(A, code, blocksize):
    n = A.numel()
    return A.new_empty((n,), dtype=torch.uint8), A.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake("nf4q::dequantize_blockwise_8bit")
def _(q, absmax, code, blocksize, dtype):
    return q.new_empty((q.numel(),), dtype=dtype)


@torch.library.register_fake("nf4q::gemm_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("nf4q::gemm_4bit_dx")
def _(grad, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


@torch.library.register_fake("nf4q::lora_gemm_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape,
      bias, lora_A, lora_B, scale):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("nf4q::lora_gemm_4bit_dx")
def _(grad, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape,
      lora_A, lora_B, scale):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


# ---- autograd: gradients flow to x, bias and the LoRA factors; the NF4 weight is frozen -------------

_W4_NONE = (None,) * 9  # no gradient for any member of the W4 group


def _sum_to_bias(grad, bias):
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype) if bias is not None and bias.requires_grad else None


def _gemm_setup(ctx, inputs, output):
    x, *w4, bias = inputs
    ctx.w4, ctx.bias = w4, bias
    ctx.x_requires_grad = x.requires_grad


def _gemm_backward(ctx, grad):
    dx = ops.gemm_4bit_dx(grad, *ctx.w4) if ctx.x_requires_grad else None
    return (dx, *_W4_NONE, _sum_to_bias(grad, ctx.bias))


torch.library.register_autograd("nf4q::gemm_4bit", _gemm_backward, setup_context=_gemm_setup)


def _lora_setup(ctx, inputs, output):
    x, *w4, bias, lora_A, lora_B, scale = inputs
    ctx.w4, ctx.bias, ctx.scale = w4, bias, scale
    ctx.needs = (x.requires_grad, lora_A.requires_grad, lora_B.requires_grad)
    ctx.save_for_backward(x, lora_A, lora_B)


def _lora_backward(ctx, grad):
    x, lora_A, lora_B = ctx.saved_tensors
    s = ctx.scale
    dx = ops.lora_gemm_4bit_dx(grad, *ctx.w4, lora_A, lora_B, s) if ctx.needs[0] else None
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dA = (s * (g2 @ lora_B.to(g2.dtype)).t() @ x2).to(lora_A.dtype) if ctx.needs[1] else None
    # s scales the thin [M, r] factor: `s * g2.t()` would allocate a scaled copy of the whole gradient
    dB = (g2.t() @ (s * (x2 @ lora_A.to(x2.dtype).t()))).to(lora_B.dtype) if ctx.needs[2] else None
    return (dx, *_W4_NONE, _sum_to_bias(grad, ctx.bias), dA, dB, None)


torch.library.register_autograd("nf4q::lora_gemm_4bit", _lora_backward, setup_context=_lora_setup)


# ---- typed wrappers -------------------------------------------------------------------------------

def quantize_4bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return ops.quantize_4bit(A, code, blocksize)


def dequantize_4bit(*w4, dtype: torch.dtype) -> torch.Tensor:
    return ops.dequantize_4bit(*w4, dtype)


def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return ops.quantize_blockwise_8bit(A, code, blocksize)


def dequantize_blockwise_8bit(q, absmax, code, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    return ops.dequantize_blockwise_8bit(q, absmax, code, blocksize, dtype)


def gemm_4bit(x: torch.Tensor, *w4, bias=None) -> torch.Tensor:
    return ops.gemm_4bit(x, *w4, bias)


def lora_gemm_4bit(x, *w4, bias=None, lora_A, lora_B, scale: float) -> torch.Tensor:
    return ops.lora_gemm_4bit(x, *w4, bias, lora_A, lora_B, float(scale))


