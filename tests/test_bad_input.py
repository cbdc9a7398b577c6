"""Bad input gets a clear ValueError/TypeError, never a crash or silent garbage."""
import json

import pytest
import torch

import nf4q
from nf4q import FormatError, NF4Weight


@pytest.mark.parametrize("w", [torch.ones(8, 8, dtype=torch.int32), torch.ones(8, 8, dtype=torch.bool),
                               torch.ones(8, 8, dtype=torch.float64)])
def test_wrong_dtype(w):
    with pytest.raises(TypeError, match="w must be"):
        nf4q.quantize(w)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4q.quantize([[1.0, 2.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad):
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4q.quantize(w)


def test_empty():
    with pytest.raises(ValueError, match="empty"):
        nf4q.quantize(torch.empty(0, 64))


@pytest.mark.parametrize("bs", [0, 16, 48, 100, 8192])
def test_blocksize(bs):
    with pytest.raises(ValueError, match="blocksize"):
        nf4q.quantize(torch.randn(64, 64), blocksize=bs)


def test_blocksize_type():
    with pytest.raises(TypeError, match="blocksize"):
        nf4q.quantize(torch.randn(64, 64), blocksize=64.0)


def test_matmul_shape_mismatch():
    layer = nf4q.Linear4bit(64, 32)
    with pytest.raises(ValueError, match="last dim must be 64"):
        layer(torch.randn(3, 65))


def test_op_rejects_wrong_absmax_size():
    qw = nf4q.quantize(torch.randn(64, 64), double_quant=False)
    args = list(qw.op_args())
    args[1] = args[1][:-1].contiguous()
    with pytest.raises(ValueError, match="absmax"):
        torch.ops.nf4q.dequantize_4bit(*args, torch.float32)


@pytest.mark.parametrize("i,bad,exc", [(0, torch.zeros(2048, dtype=torch.int8), TypeError),
                                       (1, torch.ones(64, dtype=torch.float16), TypeError),
                                       (5, torch.ones(16, dtype=torch.float64), TypeError),
                                       (6, 48, ValueError), (8, [64, -64], ValueError)])
def test_op_argument_errors_are_value_or_type_errors(i, bad, exc):
    args = list(nf4q.quantize(torch.randn(64, 64), double_quant=False).op_args())
    args[i] = bad
    with pytest.raises(exc):
        torch.ops.nf4q.dequantize_4bit(*args, torch.float32)


@pytest.fixture
def sd():
    return nf4q.quantize(torch.randn(32, 64)).state_dict("layer.")


def test_missing_key(sd):
    del sd["layer.weight.absmax"]
    with pytest.raises(FormatError, match="missing key 'layer.weight.absmax'"):
        NF4Weight.from_state_dict(sd, "layer.")


def test_wrong_shape(sd):
    sd["layer.weight"] = sd["layer.weight"][:-1]
    with pytest.raises(FormatError, match="'layer.weight' must be torch.uint8"):
        NF4Weight.from_state_dict(sd, "layer.")


def test_wrong_dtype_in_state_dict(sd):
    sd["layer.weight.nested_absmax"] = sd["layer.weight.nested_absmax"].half()
    with pytest.raises(FormatError, match="nested_absmax"):
        NF4Weight.from_state_dict(sd, "layer.")


def test_truncated_json(sd):
    sd["layer.weight.quant_state.bitsandbytes__nf4"] = sd["layer.weight.quant_state.bitsandbytes__nf4"][:-5]
    with pytest.raises(FormatError, match="not a valid quant-state JSON"):
        NF4Weight.from_state_dict(sd, "layer.")


def test_fp4_quant_type(sd):
    blob = sd.pop("layer.weight.quant_state.bitsandbytes__nf4")
    meta = json.loads(bytes(blob.numpy()))
    meta["quant_type"] = "fp4"
    sd["layer.weight.quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(FormatError, match="only NF4"):
        NF4Weight.from_state_dict(sd, "layer.")


def test_format_error_is_value_error():
    assert issubclass(FormatError, ValueError)


def test_linear_load_missing_key():
    sd = nf4q.Linear4bit(64, 32).state_dict()
    del sd["weight.nested_quant_map"]
    with pytest.raises(FormatError, match="weight.nested_quant_map"):
        nf4q.Linear4bit(64, 32).load_state_dict(sd)


def test_from_linear_type():
    with pytest.raises(TypeError, match="nn.Linear"):
        nf4q.Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))
