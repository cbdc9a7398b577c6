"""Pure-torch oracles of every op, written for clarity. The tests hold the C++ and CUDA kernels to them;
the quantizers use bitsandbytes' arithmetic so the bytes agree (see csrc/common/nf4.h)."""
import math

import torch

TINY = 1e-38


def _midpoints(code):
    return (code[:-1] + code[1:]) / 2


def _blockwise_scale(flat, blocksize):
    """absmax per block and values scaled to [-1, 1], bitsandbytes-style (partial last block divides)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)).reshape(-1)
    if full < n:
        am = flat[full:].abs().max()
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, flat[full:] / am.clamp(min=TINY)])
    return absmax, scaled.clamp(-1, 1)


def quantize_4bit(A, code, blocksize):
    flat = A.reshape(-1).float()
    absmax, scaled = _blockwise_scale(flat, blocksize)
    if scaled.numel() % 2:  # an odd tail is padded with a zero value, as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = torch.bucketize(scaled, _midpoints(code.float())).to(torch.uint8)  # count of midpoints < value
    return ((q[0::2] << 4) | q[1::2]).view(-1, 1), absmax


def quantize_blockwise_8bit(A, code, blocksize):
    flat = A.reshape(-1).float()
    absmax, scaled = _blockwise_scale(flat, blocksize)
    return torch.bucketize(scaled, _midpoints(code.float())).to(torch.uint8), absmax


def dequantize_blockwise_8bit(q, absmax, code, blocksize, dtype):
    idx = torch.arange(q.numel(), device=q.device) // blocksize
    return (code[q.reshape(-1).long()] * absmax[idx]).to(dtype)


def absmax_fp32(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize):
    if nested_absmax is None:
        return absmax
    idx = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
    return nested_code[absmax.long()] * nested_absmax[idx] + nested_offset


def dequantize_4bit(packed, absmax, nested_absmax, nested_code, nested_offset, code, blocksize,
                    nested_blocksize, shape, dtype):
    n = math.prod(shape)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n].long()
    am = absmax_fp32(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    idx = torch.arange(n, device=packed.device) // blocksize
    return (code[q] * am[idx]).to(dtype).reshape(shape)


def gemm_4bit(x, *w4, bias=None):
    """fp64 oracle of x @ dequant(W)^T + bias."""
    w = dequantize_4bit(*w4, torch.float64)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def gemm_4bit_dx(grad, *w4):
    return grad.double() @ dequantize_4bit(*w4, torch.float64)


def lora_gemm_4bit(x, *w4, bias=None, lora_A, lora_B, scale):
    return gemm_4bit(x, *w4, bias=bias) + scale * (x.double() @ lora_A.double().t()) @ lora_B.double().t()


def lora_gemm_4bit_dx(grad, *w4, lora_A, lora_B, scale):
    return gemm_4bit_dx(grad, *w4) + scale * (grad.double() @ lora_B.double()) @ lora_A.double()
