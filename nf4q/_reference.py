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


def gemm_4bit_group(x, w4s, biases):
    """fp64 oracle of gemm_4bit_group: every weight decoded with the first one's code and nested_code."""
    shared = {3: w4s[0][3], 5: w4s[0][5]}
    return [gemm_4bit(x, *[shared.get(i, a) for i, a in enumerate(w4)], bias=b) for w4, b in zip(w4s, biases)]


def gemm_4bit_dx(grad, *w4):
    return grad.double() @ dequantize_4bit(*w4, torch.float64)


_M64 = (1 << 64) - 1


def _u64(v):
    """A uint64 value as the int64 with the same bits (torch has no uint64 arithmetic; int64 wraps the same)."""
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z, k):
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def dropout_keep(seed, n, p, device=None):
    """LoRA dropout's keep mask of n elements: element i kept when the upper 32 bits of SplitMix64's output i for
    `seed` are >= round(p * 2^32) (csrc/common/dropout.h, bit for bit)."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _u64(0x9E3779B97F4A7C15) + _u64(seed)
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    draw = _shr(z ^ _shr(z, 31), 32)
    return draw >= min(max(int(p * 4294967296.0 + 0.5), 0), 1 << 32) if p > 0 else torch.ones(n, dtype=torch.bool,
                                                                                              device=device)


def lora_dropout(x, p, seed):
    """x * keep / (1 - p) in fp32 (the mask over x's elements in row-major order), rounded once to x's dtype."""
    keep = dropout_keep(seed, x.numel(), p, x.device).view(x.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    return torch.where(keep, x.float() * scale, torch.zeros((), dtype=torch.float32)).to(x.dtype)


def _dropped64(x, p, seed):
    x2 = x.reshape(-1, x.shape[-1])
    if p == 0:
        return x2.double()
    keep = dropout_keep(seed, x2.numel(), p, x.device).view(x2.shape)
    return torch.where(keep, x2.double() / (1.0 - p), torch.zeros((), dtype=torch.float64))


def lora_gemm_4bit(x, *w4, bias=None, lora_A, lora_B, scale, dropout_p=0.0, seed=0):
    """fp64 oracle of x @ W^T + bias + scale * (drop(x) @ A^T) @ B^T."""
    lora = scale * (_dropped64(x, dropout_p, seed) @ lora_A.double().t()) @ lora_B.double().t()
    return gemm_4bit(x, *w4, bias=bias) + lora.view(*x.shape[:-1], -1)


def lora_gemm_4bit_dx(grad, *w4, lora_A, lora_B, scale, dropout_p=0.0, seed=0):
    """fp64 oracle of grad @ W + drop'(scale * (grad @ B) @ A)."""
    t = scale * (grad.double() @ lora_B.double()) @ lora_A.double()
    if dropout_p > 0:
        keep = dropout_keep(seed, t.numel(), dropout_p, t.device).view(t.shape)
        t = torch.where(keep, t / (1.0 - dropout_p), torch.zeros((), dtype=torch.float64))
    return gemm_4bit_dx(grad, *w4) + t


def lora_gemm_4bit_backward(grad, x, *w4, lora_A, lora_B, scale, dropout_p=0.0, seed=0):
    """fp64 oracle of (dx, d lora_A, d lora_B)."""
    g2 = grad.reshape(-1, grad.shape[-1]).double()
    xd = _dropped64(x, dropout_p, seed)
    u = g2 @ lora_B.double()
    dA = scale * u.t() @ xd
    dB = scale * g2.t() @ (xd @ lora_A.double().t())
    dx = lora_gemm_4bit_dx(grad, *w4, lora_A=lora_A, lora_B=lora_B, scale=scale, dropout_p=dropout_p, seed=seed)
    return dx, dA, dB
