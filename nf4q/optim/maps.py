"""The 256-entry tables of the 8-bit optimizer states (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", 2022).

m (signed) uses nf4q.codebook.dynamic_map(): per decade 10^(i-6), i = 0..6, 2^i evenly spaced mantissas
in [0.1, 1] of both signs, plus 0 and 1. v is never negative, so its map spends the sign bit on twice
as many mantissas per decade (2^(i+1)): the same range with one more bit of precision.
"""
from functools import cache

import torch

from ..codebook import dynamic_map


@cache
def _unsigned_cpu() -> torch.Tensor:
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)
        data += ((10 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / 2.0)).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def signed_map(device=None) -> torch.Tensor:
    """The table of the first moment m: sorted, 256 values in [-1, 1], 0 included."""
    return dynamic_map(device)


def unsigned_map(device=None) -> torch.Tensor:
    """The table of the second moment v: sorted, 256 values in [0, 1], 0 and 1 included."""
    table = _unsigned_cpu()
    return table.to(device) if device is not None else table.clone()
