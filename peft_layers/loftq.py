"""LoRA initialisations that are more than "B = 0" (PEFT's init_lora_weights values): False (A and B random),
PiSSA (the top-r singular directions of W move into A, B; the base keeps the residual), OLoRA (the same with a QR
factorisation) and LoftQ (alternating NF4 quantization and a rank-r SVD of the residual, after Li et al. 2023,
"LoftQ: LoRA-Fine-Tuning-Aware Quantization"): the base becomes the NF4 weight Q with Q + s·BA ≈ W.

All of them keep the model's output at init up to rounding: W' + s·BA = W (PiSSA, OLoRA) or ≈ W (LoftQ)."""
import dataclasses
import math
from typing import Tuple

import torch
from torch import nn

import nf4q

from .inject import is_conv1d
from .qlora import requantize_4bit_


def _weight(base: nn.Module) -> torch.Tensor:
    """The base weight as fp32 [out, in] (a copy)."""
    if isinstance(base, nf4q.Linear4bit):
        return base.dequantize(torch.float32)
    w = base.weight.detach().float()
    return (w.t() if is_conv1d(base) else w).clone()


@torch.no_grad()
def _set_weight(base: nn.Module, w: torch.Tensor, what: str) -> None:
    """Store fp32 [out, in] `w` as the base weight (requantized to NF4, with the usual warning, on an NF4 base)."""
    if isinstance(base, nf4q.Linear4bit):
        requantize_4bit_(base, lambda _: w, what=what)
        return
    base.weight.copy_((w.t() if is_conv1d(base) else w).to(base.weight.dtype))


@torch.no_grad()
def _set_lora(layer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A[name].weight.copy_(A)
    layer.lora_B[name].weight.copy_(B)


def low_rank(w: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L R the best rank-r approximation of w, √S on both sides."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def init_adapter(layer, name: str, config) -> None:
    """Apply config.init_lora_weights to adapter `name` of a LoRALayer whose A, B were just created (PEFT's
    default init: A kaiming-uniform, B zeros, or A gaussian)."""
    how = config.init_lora_weights
    if how is True or how == "gaussian":
        return
    r, s, base = layer.r[name], layer.scaling[name], layer.base_layer
    if how is False:  # PEFT keeps nn.Linear's default init for B too: a non-zero update from the start
        nn.init.kaiming_uniform_(layer.lora_B[name].weight, a=math.sqrt(5))
    elif how.startswith("pissa"):
        w = _weight(base)
        if how == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # "pissa_niter_<n>": randomized SVD with n subspace iterations
            U, S, V = torch.svd_lowrank(w, q=r, niter=int(how.split("_niter_")[1]))
            Vh = V.t()
        root = (S / s).sqrt()
        A, B = root[:, None] * Vh, U * root
        _set_lora(layer, name, A, B)
        _set_weight(base, w - s * (B @ A), f"PiSSA init of adapter {name!r}")
    elif how == "olora":
        w = _weight(base)
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
        _set_lora(layer, name, A, B)
        _set_weight(base, w - s * (B @ A), f"OLoRA init of adapter {name!r}")
    elif how == "loftq":
        loftq_init_(layer, name, config.loftq_config.get("loftq_iter", 1))


@torch.no_grad()
def loftq(w: torch.Tensor, r: int, scaling: float, iters: int, blocksize: int = 64,
          double_quant: bool = True) -> Tuple[nf4q.NF4Weight, torch.Tensor, torch.Tensor]:
    """LoftQ on fp32 w [out, in]: repeat {Q = NF4(w − s·BA); s·BA = rank-r SVD of (w − Q)} `iters` times.
    Returns (Q, A, B) with A, B divided by √s on each side so that the layer's s·BA is the SVD term."""
    lr = torch.zeros_like(w)
    for _ in range(iters):
        q = nf4q.quantize(w - lr, blocksize=blocksize, double_quant=double_quant)
        L, R = low_rank(w - q.dequantize(torch.float32), r)
        lr = L @ R
    root = 1.0 / math.sqrt(scaling)
    return q, R * root, L * root


def loftq_init_(layer, name: str, iters: int) -> None:
    """LoftQ on a full-precision nn.Linear base: the base is replaced by an nf4q.Linear4bit holding Q."""
    base = layer.base_layer
    if not isinstance(base, nn.Linear):
        raise ValueError(f"init_lora_weights='loftq' needs the full-precision weight of an nn.Linear (it quantizes "
                         f"the layer to NF4 itself), got {type(base).__name__}; apply it before quantizing")
    if len(layer.adapter_names()) > 1:
        raise ValueError("init_lora_weights='loftq' changes the base weight: it must be the layer's first adapter")
    q, A, B = loftq(base.weight.detach().float(), layer.r[name], layer.scaling[name], iters)
    half = base.weight.dtype in (torch.float16, torch.bfloat16)
    new = nf4q.Linear4bit.from_linear(base, compute_dtype=base.weight.dtype if half else None)
    new.set_quantized(dataclasses.replace(q, dtype=base.weight.dtype))  # Q itself: requantizing would change it
    new.requires_grad_(False)
    layer.base_layer, layer.is_4bit = new, True
    _set_lora(layer, name, A, B)
