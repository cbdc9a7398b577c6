import pytest
import torch

import nf4q

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def test_nf4_table_equals_bitsandbytes():
    assert torch.equal(nf4q.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(nf4q.dynamic_map(), bnb_functional.create_dynamic_map())


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
