import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def gen():
    """A fresh, seeded generator: every test draws its own random data."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, dtype=torch.float32, generator=None, device="cpu"):
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def kernel_launches(fn, name):
    """How many CUDA kernels whose name contains `name` fn() launches."""
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm: one-time attribute calls and allocations out of the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if name in e.key)

# tests/mutation/ is a tool run by hand (python tests/mutation/run.py), not part of the suite.
collect_ignore = ["mutation"]
