"""Fake kernels (torch.compile / opcheck) and thin wrappers of the optimizer ops in csrc/nf4q.cpp.

The step ops mutate their list arguments and return nothing; managed_zeros is a factory (it has no
tensor argument, so its kernel is registered for every backend and checks the device itself).
"""
import torch

from .. import _C  # noqa: F401  (registers the ops)

ops = torch.ops.nf4q


@torch.library.register_fake("nf4q::adamw_step")
def _(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake("nf4q::adamw8bit_step")
def _(params, grads, exp_avgs, exp_avg_sqs, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps, weight_decay,
      step):
    return None


@torch.library.register_fake("nf4q::managed_zeros")
def _(nbytes, device, host_home):
    return torch.empty((nbytes,), dtype=torch.uint8, device=device)


@torch.library.register_fake("nf4q::prefetch")
def _(tensors, device):
    return None


def has_kernel(op: str, device: torch.device) -> bool:
    """True when nf4q::<op> has a compiled kernel for this device type (CUDA kernels are optional)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"nf4q::{op}", key)


def has_managed_memory() -> bool:
    """True when the extension was built with the CUDA managed-memory ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("nf4q::prefetch", "CUDA")


def managed_stats() -> tuple[int, int]:
    """(live bytes, live allocations) of nf4q's managed memory in this process; (0, 0) without CUDA ops."""
    if not has_managed_memory():
        return 0, 0
    live_bytes, live_allocs = ops.managed_stats()
    return live_bytes, live_allocs


def managed_zeros(nbytes: int, device, host_home: bool) -> torch.Tensor:
    return ops.managed_zeros(int(nbytes), torch.device(device), bool(host_home))


def prefetch(tensors, device: int) -> None:
    """Migrate managed tensors to GPU `device` (an index) or to the host (-1), async on the current stream."""
    if tensors:
        ops.prefetch(list(tensors), int(device))
