"""Optimizers: AdamW with 32-bit or 8-bit blockwise states, optionally paged in CUDA managed memory.

    nf4q.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bits=32 | 8,
                     paged=False, gpu_budget_bytes=None)

Aliases: PagedAdamW (paged), AdamW8bit (bits=8), PagedAdamW8bit (both), and bitsandbytes' AdamW32bit /
PagedAdamW32bit. See notes/optim.md for the design and measurements.
"""
from . import _kernels  # noqa: F401  (fake kernels of the optimizer ops)
from .adamw import AdamW, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit
from .maps import signed_map, unsigned_map
from .paging import PagedMemoryError, PageManager

__all__ = ["AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit", "AdamW32bit", "PagedAdamW32bit", "PageManager",
           "PagedMemoryError", "signed_map", "unsigned_map"]
