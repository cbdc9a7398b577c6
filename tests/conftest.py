import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def gen():
    """A fresh, seeded generator: every test draws its own random data."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, dtype=torch.float32, generator=None, device="cpu"):
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

# tests/mutation/ is a tool run by hand (python tests/mutation/run.py), not part of the suite.
collect_ignore = ["mutation"]
