"""Checkpoints move both ways between nf4q and the real bitsandbytes (CPU backend)."""
import pytest
import torch

import nf4q
from conftest import DTYPES, randn

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", [(64, 64), (33, 70), (257, 129)])
def test_bytes_equal_bitsandbytes(shape, blocksize, dtype, gen):
    w = randn(*shape, dtype=dtype, generator=gen)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    qw = nf4q.quantize(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(qw.packed, packed) and torch.equal(qw.absmax, state.absmax)


def _bnb_layer(in_f, out_f):
    layer = bnb.nn.Linear4bit(in_f, out_f, compress_statistics=True, quant_type="nf4", compute_dtype=torch.float32)
    return layer.to("cpu")  # quantizes on the move


def test_bnb_checkpoint_loads_into_nf4q(gen):
    torch.manual_seed(0)
    theirs = _bnb_layer(128, 96)
    ours = nf4q.Linear4bit(128, 96)
    ours.load_state_dict(theirs.state_dict())
    expect = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.dequantize(torch.float32), expect)
    x = randn(5, 128, generator=gen)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested_map", ["fp8_e4m3", "dynamic"])
def test_nf4q_checkpoint_loads_into_bnb(nested_map, gen):
    ours = nf4q.Linear4bit(128, 96, nested_map=nested_map)
    sd = ours.state_dict()
    theirs = bnb.nn.Linear4bit(128, 96, compress_statistics=True, quant_type="nf4", compute_dtype=torch.float32)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    # the way transformers loads a pre-quantized bitsandbytes checkpoint
    theirs.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats,
                                                        requires_grad=False, device="cpu")
    theirs.bias = torch.nn.Parameter(sd["bias"])
    deq = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(deq, ours.dequantize(torch.float32))
    x = randn(5, 128, generator=gen)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
