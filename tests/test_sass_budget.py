"""The swapped NF4 GEMM is bound by instruction issue (ncu on the H200, notes/cuda.md), so its instruction count per
64-wide K step is its speed budget. Read from the built extension's SASS (scripts/sass_budget.py): no GPU needed,
so CI checks it wherever the CUDA kernels are built for sm_90a and cuobjdump (CUDA toolkit or triton) is there.

Budget: the 16- and 32-token tiles (M <= 32: decode and small batches) count 129 and 140 instructions per step with
nvcc 13.0 and double quant (ncu counted 191 executed per step before the table lookups became one PRMT each; the
per-stage release that replaced the per-step __syncthreads added 8); a change that adds more than ~5% or makes
ptxas serialize their wgmma fails here, before anyone times it."""
import glob
import importlib.util
import os

import pytest

import nf4q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sass_budget", os.path.join(ROOT, "scripts", "sass_budget.py"))
sass_budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_budget)

BUDGET = {16: 135, 32: 145}


@pytest.fixture(scope="module")
def counts():
    so = glob.glob(os.path.join(os.path.dirname(nf4q.__file__), "_C*.so"))
    if not so or sass_budget.find_cuobjdump() is None:
        pytest.skip("needs the built extension and cuobjdump")
    found = sass_budget.budget(so[0])
    if not found:
        pytest.skip(f"no {sass_budget.CUBIN} in the extension (built without CUDA or without sm_90a)")
    return found


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("tokens", sorted(BUDGET))
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("weights", [1, 3])
def test_small_tiles_stay_within_their_instruction_budget(counts, dtype, tokens, double_quant, weights):
    """One weight, and the grouped form (q, k and v in one launch), whose steps are the same."""
    per_step, serialized = counts[(dtype, tokens, double_quant, weights)]
    assert not serialized, "ptxas serialized the wgmma of this tile (register pressure, warning C7512)"
    assert per_step <= BUDGET[tokens], f"{per_step} instructions per K step (budget {BUDGET[tokens]})"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("tokens", [128, 256])
def test_wide_tiles_keep_their_wgmma_pipelined(counts, dtype, tokens):
    """The 128/256-token tiles (M > 64) run one CTA per SM so that ptxas has the registers to keep their wgmma
    pipelined; at two CTAs per SM it serialized them (warning C7512)."""
    for double_quant in (True, False):
        assert not counts[(dtype, tokens, double_quant, 1)][1], (tokens, double_quant)


def test_every_instantiation_is_found(counts):
    """All 32 kernels (2 dtypes x double quant or not x 5 tiles for one weight, 3 grouped) are read, each with a step
    count."""
    assert len(counts) == 32
    assert all(v is not None and v[0] > 50 for v in counts.values())
