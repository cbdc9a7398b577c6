"""The quantization tables: the NF4 code and the 8-bit maps used for double quantization.

NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) at evenly spaced probabilities from 0.5 to
0.9677083, eight on the positive side and seven on the negative, plus an exact zero, normalised so the
ends are exactly ±1. Derived here with scipy and equal to bitsandbytes' table bit for bit (tested).
"""
from functools import cache

import torch
from scipy.stats import norm

NF4_OFFSET = 0.9677083


@cache
def _nf4_cpu() -> torch.Tensor:
    # fp32 probabilities as QLoRA computes them, quantiles in fp64, table rounded to fp32, then normalised.
    pos = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(pos + [0.0] + neg, dtype=torch.float32).sort().values
    return values / values.max()


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, sorted (index = 4-bit code)."""
    return _nf4_cpu().to(device) if device is not None else _nf4_cpu().clone()


@cache
def _fp8_e4m3_cpu() -> torch.Tensor:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    values = torch.nan_to_num(values, nan=0.0)  # the two NaN patterns become spare zeros
    return (values / values.abs().max()).sort().values


@cache
def _dynamic_cpu() -> torch.Tensor:
    # The signed "dynamic" map of the 8-bit optimizers paper (7 exponent bits, as bitsandbytes builds it):
    # for each decade 10^(i-6), 2^i evenly spaced mantissas between 0.1 and 1, both signs, plus 0 and 1.
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


NESTED_MAPS = {"fp8_e4m3": _fp8_e4m3_cpu, "dynamic": _dynamic_cpu}


def nested_map(name: str = "fp8_e4m3", device=None) -> torch.Tensor:
    """A sorted 256-entry table in [-1, 1] for 8-bit blockwise quantization of the absmax values."""
    if name not in NESTED_MAPS:
        raise ValueError(f"nested_map must be one of {sorted(NESTED_MAPS)}, got {name!r}")
    table = NESTED_MAPS[name]()
    return table.to(device) if device is not None else table.clone()


def fp8_e4m3_map(device=None) -> torch.Tensor:
    return nested_map("fp8_e4m3", device)


def dynamic_map(device=None) -> torch.Tensor:
    return nested_map("dynamic", device)
