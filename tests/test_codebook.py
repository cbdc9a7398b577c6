import pytest
import torch

import nf4q

# The NF4 table as bitsandbytes hard-codes it (bitsandbytes.functional.get_4bit_type("nf4")), so that the exact
# check below runs without bitsandbytes installed.
NF4_BNB = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
           1.0]


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")  # only the live comparisons need the package


def test_nf4_table_equals_bitsandbytes_constants():
    assert torch.equal(nf4q.nf4_code(), torch.tensor(NF4_BNB, dtype=torch.float32))


def test_nf4_table_equals_bitsandbytes():
    assert torch.equal(nf4q.nf4_code(), bnb_functional().get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(nf4q.dynamic_map(), bnb_functional().create_dynamic_map())


def test_nf4_table_shape():
    code = nf4q.nf4_code()
    assert code.numel() == 16 and code[0] == -1 and code[-1] == 1 and code[7] == 0
    assert bool((code[1:] > code[:-1]).all())


@pytest.mark.parametrize("name", ["fp8_e4m3", "dynamic"])
def test_nested_maps_sorted_in_unit_range(name):
    table = nf4q.nested_map(name)
    assert table.numel() == 256 and table.min() >= -1 and table.max() == 1
    assert bool((table[1:] >= table[:-1]).all())


def test_fp8_map_holds_every_e4m3_value():
    finite = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[torch.isfinite(finite)] / 448
    assert torch.isin(finite, nf4q.fp8_e4m3_map()).all()


def test_unknown_nested_map():
    with pytest.raises(ValueError, match="nested_map"):
        nf4q.nested_map("int8")
