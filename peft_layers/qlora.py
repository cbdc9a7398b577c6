"""LoRA over an NF4 weight (QLoRA): the fused forward through torch.ops.nf4q.lora_gemm_4bit, merging into NF4
(dequantize, add, requantize), the LoRA initialisation/scaling shared with lora.py, and QLoRALinear."""
import math
import warnings
from typing import Callable, Optional

import torch
from torch import nn

import nf4q

# Half the widest gap between neighbouring NF4 values (between -1 and -0.6962): one requantization moves a
# weight by at most this times its block's absmax (plus the 8-bit error of a double-quantized absmax).
NF4_MAX_ROUNDING = 0.1519

REQUANT_WARNING = ("merging into an NF4 weight dequantizes, adds and requantizes it: outputs change by the NF4 "
                   f"rounding error (each weight moves by up to {NF4_MAX_ROUNDING:.4f} x its block absmax)")


# ---- LoRA math shared by every LoRA layer -------------------------------------------------------------

def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """α/r, or α/√r with rank-stabilised LoRA."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def reset_lora_parameters(lora_A: nn.Linear, lora_B: nn.Linear, init: str = "default") -> None:
    """PEFT's init: A kaiming-uniform(a=√5) (or N(0, 1/r) for "gaussian"), B zeros, so ΔW starts at 0."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1.0 / lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)


def make_lora_pair(in_features: int, out_features: int, r: int, device=None, dtype=torch.float32,
                   init: str = "default"):
    lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
    lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
    reset_lora_parameters(lora_A, lora_B, init)
    return lora_A, lora_B


def dropout_p(dropout: Optional[nn.Module]) -> float:
    """The LoRA dropout probability in effect: PEFT's nn.Dropout in training mode, else 0."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


# ---- the forward on a Linear4bit base ------------------------------------------------------------------

def lora_forward_4bit(base: nf4q.Linear4bit, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """y = x·dequant(W)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ for a Linear4bit `base` and LoRA weights A [r, in], B [out, r]:
    one fused op (nf4q.Linear4bit.lora_forward), dropout included."""
    return base.lora_forward(x, lora_A, lora_B, scaling, dropout_p(dropout))


# ---- merging into NF4 ------------------------------------------------------------------------------------

def requantize_4bit_(base: nf4q.Linear4bit, update: Callable[[torch.Tensor], torch.Tensor],
                     safe_merge: bool = False, what: str = "adapter") -> nf4q.NF4Weight:
    """Replace base's weight by quantize(update(dequant(W) in fp32)) with the same blocksize and
    double-quantization table; returns the previous NF4Weight so that unmerging can restore it exactly."""
    old = base.quantized_weight
    w = update(old.dequantize(torch.float32))
    if not bool(torch.isfinite(w).all()):
        if safe_merge:
            raise ValueError(f"merging {what} produced non-finite weights; the adapter seems broken")
        raise ValueError(f"merging {what} produced NaN/Inf weights, which NF4 cannot hold")
    warnings.warn(REQUANT_WARNING, UserWarning, stacklevel=3)
    nested = old.nested_code if old.double_quant else "fp8_e4m3"
    base.set_quantized(nf4q.quantize(w.to(old.dtype), blocksize=old.blocksize, double_quant=old.double_quant,
                                     nested_map=nested))
    return old


def restore_4bit_(base: nf4q.Linear4bit, old: nf4q.NF4Weight) -> None:
    base.set_quantized(old.to(base.weight.device))


# ---- QLoRALinear ------------------------------------------------------------------------------------------

class QLoRALinear(nn.Module):
    """A frozen NF4 linear layer (`base_layer`, an nf4q.Linear4bit) plus a trainable LoRA update.

    `lora_A` [r, in] and `lora_B` [out, r] are bias-free nn.Linear modules (PEFT's layout and init),
    `scaling` = lora_alpha / r (or / √r with use_rslora). Forward runs the fused nf4q.lora_gemm_4bit op,
    LoRA dropout included. merge() folds the update into the NF4 weight (requantizing, with a
    warning); unmerge() restores the exact pre-merge weight.
    """

    def __init__(self, base_layer: nf4q.Linear4bit, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default"):
        super().__init__()
        if not isinstance(base_layer, nf4q.Linear4bit):
            raise TypeError(f"base_layer must be an nf4q.Linear4bit, got {type(base_layer).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A, self.lora_B = make_lora_pair(self.in_features, self.out_features, r,
                                                  device=base_layer.weight.device, init=init)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self._premerge = None  # the NF4 weight before merge(), restored by unmerge()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, compute_dtype=None, blocksize: int = 64,
                    double_quant: bool = True) -> "QLoRALinear":
        """Quantize an nn.Linear to NF4 (or take an nf4q.Linear4bit as is) and attach LoRA."""
        if isinstance(linear, nn.Linear):
            linear = nf4q.Linear4bit.from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize,
                                                 double_quant=double_quant)
        elif not isinstance(linear, nf4q.Linear4bit):
            raise TypeError(f"linear must be an nn.Linear or nf4q.Linear4bit, got {type(linear).__name__}")
        return cls(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return lora_forward_4bit(self.base_layer, x, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                 self.lora_dropout)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        if self.merged:
            warnings.warn("QLoRALinear is already merged; nothing to do", stacklevel=2)
            return
        delta = self.delta_weight()
        self._premerge = requantize_4bit_(self.base_layer, lambda w: w + delta, safe_merge, "the LoRA update")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("QLoRALinear is not merged; nothing to do", stacklevel=2)
            return
        restore_4bit_(self.base_layer, self._premerge)
        self._premerge, self.merged = None, False

    def extra_repr(self):
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"
