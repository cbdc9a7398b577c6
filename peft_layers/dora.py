"""DoRA (weight-decomposed LoRA) as PEFT computes it: with m = lora_magnitude_vector and the row norm
n = ‖W + s·BA‖ (per output feature, detached),  y = base(x) + (m/n − 1)·(W x) + (m/n)·s·B A x.

On an nf4q.Linear4bit base (QDoRA) n is computed from the packed NF4 weight in row slabs (a bounded slab of
dequantized rows at a time, never the whole W), and the base output comes from the base layer's own op."""
import math
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import nf4q

from .inject import is_conv1d, is_linear_like

# rows of W dequantized at once for the norm: about 4 Mi elements (16 MiB in fp32) per slab
SLAB_ELEMENTS = 1 << 22


def check_supported(base: nn.Module) -> None:
    if not is_linear_like(base):
        raise TypeError(f"use_dora=True: DoRA supports nn.Linear, nf4q.Linear4bit and GPT-2 Conv1D layers, not "
                        f"{type(base).__name__}")


# ---- the weight norm ------------------------------------------------------------------------------------

def _nf4_row_slabs(qw: nf4q.NF4Weight) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """(r0, r1, W[r0:r1] in fp32) over the NF4 weight, each slab dequantized by the library's op from slices of
    the packed bytes and scales. A slab starts on a boundary of the scales' storage (a whole nested group with
    double quantization, a whole block otherwise, and a whole byte)."""
    rows, cols = qw.shape
    align = qw.blocksize * (qw.nested_blocksize if qw.double_quant else 1)
    step = math.lcm(cols, align) // cols  # slab starts must be multiples of `step` rows
    per_slab = max(step, (SLAB_ELEMENTS // max(cols, 1)) // step * step)
    for r0 in range(0, rows, per_slab):
        r1 = min(rows, r0 + per_slab)
        start, n = r0 * cols, (r1 - r0) * cols
        b0, nblocks = start // qw.blocksize, -(-n // qw.blocksize)
        packed = qw.packed.reshape(-1)[start // 2:start // 2 + (n + 1) // 2].reshape(-1, 1)
        absmax = qw.absmax[b0:b0 + nblocks]
        nested = None
        if qw.double_quant:
            g0 = b0 // qw.nested_blocksize
            nested = qw.nested_absmax[g0:g0 + -(-nblocks // qw.nested_blocksize)]
        args = (packed, absmax, nested, qw.nested_code, qw.nested_offset, qw.code, qw.blocksize,
                qw.nested_blocksize, [r1 - r0, cols])
        yield r0, r1, nf4q._ops.dequantize_4bit(*args, dtype=torch.float32)


@torch.no_grad()
def weight_norm(base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B A‖ over each output feature's row, fp32 [out] (W as [out, in], Conv1D's transposed)."""
    A, B = lora_A.detach().float(), lora_B.detach().float()
    if isinstance(base, nf4q.Linear4bit):
        norm = torch.empty(base.out_features, device=A.device, dtype=torch.float32)
        for r0, r1, w in _nf4_row_slabs(base.quantized_weight):
            w.addmm_(B[r0:r1], A, alpha=scaling)
            norm[r0:r1] = torch.linalg.vector_norm(w, dim=1)
        return norm
    w = base.weight.detach().float()
    w = w.t() if is_conv1d(base) else w
    return torch.linalg.vector_norm(torch.addmm(w, B, A, alpha=scaling), dim=1)


def init_magnitude(base: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float) -> nn.Parameter:
    """PEFT's start: m = ‖W + s·BA‖ with the adapter as initialised, so DoRA starts as plain LoRA."""
    norm = weight_norm(base, lora_A.weight, lora_B.weight, scaling)
    return nn.Parameter(norm.to(lora_A.weight.dtype))


# ---- forward and merge ----------------------------------------------------------------------------------

def base_without_bias(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W x through the base layer's own forward (the NF4 op for Linear4bit), bias removed."""
    y = base(x)
    bias = getattr(base, "bias", None)
    return y - bias.to(y.dtype) if bias is not None else y


def dora_term(base: nn.Module, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              magnitude: torch.Tensor, norm: torch.Tensor, base_result=None) -> torch.Tensor:
    """What DoRA adds to the running output: (m/n − 1)·base_result + (m/n)·s·B A x, where base_result is the
    output so far without the bias (PEFT's rule), or W x recomputed on this (dropped-out) x when None."""
    if base_result is None:
        base_result = base_without_bias(base, x)
    else:
        bias = getattr(base, "bias", None)
        base_result = base_result - bias.to(base_result.dtype) if bias is not None else base_result
    mag_norm_scale = (magnitude / norm.detach().to(magnitude.dtype)).view(1, -1)
    lora = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora * scaling


def merge_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖ as a column [out, 1] in fp32: the merged weight is factor · (W + ΔW)."""
    return (magnitude.detach().float() / norm.float()).view(-1, 1)
