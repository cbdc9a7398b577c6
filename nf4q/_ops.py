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


@torch.library.register_fake("nf4q::gemm_4bit_group")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, out_features,
      bias):
    return [x.new_empty((*x.shape[:-1], n)) for n in out_features]


@torch.library.register_fake("nf4q::gemm_4bit_dx")
def _(grad, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


@torch.library.register_fake("nf4q::lora_gemm_4bit")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape,
      bias, lora_A, lora_B, scale, dropout_p=0.0, seed=0):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("nf4q::lora_gemm_4bit_dx")
def _(grad, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape,
      lora_A, lora_B, scale, dropout_p=0.0, seed=0):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


@torch.library.register_fake("nf4q::lora_gemm_4bit_backward")
def _(grad, x, packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize, nested_blocksize, shape,
      lora_A, lora_B, scale, dropout_p, seed, output_mask):
    none = grad.new_empty((0,))  # what the kernels return for a gradient output_mask did not ask for
    dx = grad.new_empty((*grad.shape[:-1], shape[1])) if output_mask[0] else none
    dA = lora_A.new_empty(lora_A.shape) if output_mask[1] else none.clone()
    dB = lora_B.new_empty(lora_B.shape) if output_mask[2] else none.clone()
    return dx, dA, dB


@torch.library.register_fake("nf4q::lora_dropout")
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Autograd of gemm_4bit and lora_gemm_4bit is registered in C++ (csrc/autograd.cpp): one dispatcher call forward and
# one backward node per layer call, with no Python in between.


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


def gemm_4bit_group(x: torch.Tensor, w4s, biases) -> list:
    """[x @ dequant(W)^T + b for each W4 argument group of w4s and bias b], the first group's code and nested_code
    tables standing for every weight's (the caller keeps them equal); shapes [out_features, x.shape[-1]]."""
    nested_code, code, blocksize, nested_blocksize = w4s[0][3], w4s[0][5], w4s[0][6], w4s[0][7]
    return ops.gemm_4bit_group(x, [w[0] for w in w4s], [w[1] for w in w4s], [w[2] for w in w4s], nested_code,
                               [w[4] for w in w4s], code, blocksize, nested_blocksize, [w[8][0] for w in w4s],
                               list(biases))


def lora_gemm_4bit(x, *w4, bias=None, lora_A, lora_B, scale: float, dropout_p: float = 0.0, seed: int = 0):
    return ops.lora_gemm_4bit(x, *w4, bias, lora_A, lora_B, float(scale), float(dropout_p), int(seed))
