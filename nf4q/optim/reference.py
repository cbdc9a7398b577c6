"""Pure-torch oracles of nf4q::adamw_step and nf4q::adamw8bit_step, written for clarity, in the fp32
operation order of csrc/common/adamw.h. The tests hold the C++/CUDA kernels to them, and the optimizer
falls back to them where no kernel exists (a dtype or device the extension was not built for)."""
import math

import torch

QBLOCK = 256
TINY = 1e-38  # a zero block's absmax is clamped so its values scale to 0, not NaN


def hyper(lr, beta1, beta2, eps, weight_decay, step):
    """The per-call scalars, in double then rounded to fp32 once (as make_hyper does)."""
    f = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    return dict(decay=f(1.0 - lr * weight_decay), beta2=f(beta2), omb1=f(1.0 - beta1), omb2=f(1.0 - beta2),
                step_size=f(lr / (1.0 - beta1 ** step)), bc2_sqrt=f(math.sqrt(1.0 - beta2 ** step)), eps=f(eps))


def _update(p, g, m, v, h):
    """One AdamW update of fp32 tensors; returns the new (p, m, v)."""
    m = m + h["omb1"] * (g - m)
    v = v * h["beta2"] + h["omb2"] * (g * g)
    # Correctly rounded fp32 sqrt (through fp64), as the kernels take it; torch's CPU fp32 sqrt is not.
    denom = v.double().sqrt().float() / h["bc2_sqrt"] + h["eps"]
    p = p * h["decay"] - h["step_size"] * (m / denom)
    return p, m, v


def _blocks(x):
    """Flat fp32 values padded with zeros to whole blocks, shaped [blocks, 256]."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % QBLOCK
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, QBLOCK)


def quantize_state(x, code):
    """Blockwise 8-bit state: (uint8 codes shaped like x, fp32 absmax per block of 256)."""
    b = _blocks(x)
    absmax = b.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=TINY)
    scaled = (b * inv[:, None]).clamp(-1, 1)
    mids = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, mids.to(scaled.device)).to(torch.uint8)  # count of midpoints < value
    return q.reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize_state(q, absmax, code):
    """fp32 values of an 8-bit state, shaped like q."""
    idx = torch.arange(q.numel(), device=q.device) // QBLOCK
    return (code.to(q.device)[q.reshape(-1).long()] * absmax[idx]).view(q.shape)


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step):
    h = hyper(lr, beta1, beta2, eps, weight_decay, step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32, m32, v32 = _update(p.float(), g.float(), m.float(), v.float(), h)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)


@torch.no_grad()
def adamw8bit_step(params, grads, exp_avgs, exp_avg_sqs, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps,
                   weight_decay, step):
    h = hyper(lr, beta1, beta2, eps, weight_decay, step)
    for p, g, qm, qv, a1, a2 in zip(params, grads, exp_avgs, exp_avg_sqs, absmax1, absmax2):
        m = dequantize_state(qm, a1, code1)
        v = dequantize_state(qv, a2, code2)
        p32, m, v = _update(p.float(), g.float(), m, v, h)
        p.copy_(p32)
        q, a = quantize_state(m, code1)
        qm.copy_(q)
        a1.copy_(a)
        q, a = quantize_state(v, code2)
        qv.copy_(q)
        a2.copy_(a)
