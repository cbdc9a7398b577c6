"""Issue 17 regressions, one class each: checkpoint values, strict loading, op arguments, extreme values and the
interop traps. Every bad input gets the documented ValueError / TypeError / nf4q.FormatError naming what is wrong."""
import json
import math

import pytest
import torch
from torch import nn

import nf4q
from nf4q import FormatError, NF4Weight, _reference as ref
from nf4q.tensor import QS_KEY, _check_blocksize

ops = torch.ops.nf4q
FLT_MAX = torch.finfo(torch.float32).max


# ---- checkpoint values: every quant-state JSON field is checked at load ---------------------------------------

def _sd(double_quant=True):
    torch.manual_seed(0)
    return nf4q.quantize(torch.randn(32, 64), double_quant=double_quant).state_dict("l.")


def _with_json(sd, text):
    sd = dict(sd)
    sd["l." + QS_KEY] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return sd


def _meta(sd):
    return json.loads(bytes(sd["l." + QS_KEY].numpy()))


# field, JSON text of the bad value (NaN / Infinity are JSON's non-standard literals, which json.loads accepts)
BAD_FIELDS = [
    ("nested_offset", "NaN"), ("nested_offset", "Infinity"), ("nested_offset", "-Infinity"), ("nested_offset", "1e39"),
    ("nested_offset", '"0.5"'), ("nested_offset", "true"), ("nested_offset", "null"),
    ("nested_offset", "1" + "0" * 400),
    ("blocksize", "Infinity"), ("blocksize", "64.0"), ("blocksize", '"64"'), ("blocksize", "-64"), ("blocksize", "48"),
    ("blocksize", str(2**70)), ("blocksize", "true"), ("blocksize", "NaN"),
    ("shape", "[Infinity, 64]"), ("shape", "[-32, -64]"), ("shape", "[32.0, 64]"), ("shape", '"32,64"'),
    ("shape", f"[{2**40}, {2**40}]"), ("shape", "[true, 64]"), ("shape", "64"),
    ("nested_blocksize", "0"), ("nested_blocksize", "-1"), ("nested_blocksize", str(2**40)),
    ("nested_blocksize", "256.0"), ("nested_blocksize", '"256"'), ("nested_blocksize", "Infinity"),
    ("dtype", '"int8"'), ("dtype", "5"), ("nested_dtype", '"float16"'),
]


@pytest.mark.parametrize("field,text", BAD_FIELDS)
def test_bad_json_field_is_a_format_error_naming_it(field, text):
    sd = _sd()
    meta = _meta(sd)
    meta[field] = "@@"
    blob = json.dumps(meta).replace('"@@"', text)
    with pytest.raises(FormatError, match=field):
        NF4Weight.from_state_dict(_with_json(sd, blob), "l.")


@pytest.mark.parametrize("drop", ["nested_offset", "nested_blocksize", "blocksize", "shape", "dtype"])
def test_missing_json_field(drop):
    sd = _sd()
    meta = _meta(sd)
    del meta[drop]
    with pytest.raises(FormatError, match=drop if not drop.startswith("nested") else "nested"):
        NF4Weight.from_state_dict(_with_json(sd, json.dumps(meta)), "l.")


def test_nested_fields_without_nested_tensors():
    sd, meta = _sd(False), _meta(_sd())
    with pytest.raises(FormatError, match="nested"):
        NF4Weight.from_state_dict(_with_json(sd, json.dumps(meta)), "l.")


@pytest.mark.parametrize("key", ["weight.quant_map", "weight.nested_quant_map", "weight.nested_absmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tables_are_rejected(key, bad):
    sd = _sd()
    sd["l." + key] = sd["l." + key].clone()
    sd["l." + key].view(-1)[0] = bad
    with pytest.raises(FormatError, match=key):
        NF4Weight.from_state_dict(sd, "l.")


def test_json_blob_must_be_uint8():
    sd = _sd()
    sd["l." + QS_KEY] = sd["l." + QS_KEY].to(torch.int32)
    with pytest.raises(FormatError, match="uint8"):
        NF4Weight.from_state_dict(sd, "l.")


def test_valid_checkpoint_still_loads_exactly():
    for dq in (True, False):
        sd = _sd(dq)
        qw = NF4Weight.from_state_dict(sd, "l.")
        assert torch.equal(qw.dequantize(), NF4Weight.from_state_dict(qw.state_dict("l."), "l.").dequantize())


# ---- strict loading behaves as nn.Linear's --------------------------------------------------------------------

def test_bias_of_wrong_shape_is_a_size_mismatch():
    sd = nf4q.Linear4bit(64, 32).state_dict()
    sd["bias"] = torch.zeros(1)  # used to broadcast
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        nf4q.Linear4bit(64, 32).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="size mismatch for bias"):  # as nn.Linear, even without strict
        nf4q.Linear4bit(64, 32).load_state_dict(sd, strict=False)


def test_bias_on_a_bias_free_layer_is_unexpected():
    sd = nf4q.Linear4bit(64, 32).state_dict()
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        nf4q.Linear4bit(64, 32, bias=False).load_state_dict(sd)
    result = nf4q.Linear4bit(64, 32, bias=False).load_state_dict(sd, strict=False)
    dense = nn.Linear(64, 32, bias=False)  # the behaviour we copy
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        dense.load_state_dict({"weight": torch.zeros(32, 64), "bias": torch.zeros(32)})
    expect = dense.load_state_dict({"weight": torch.zeros(32, 64), "bias": torch.zeros(32)}, strict=False)
    assert result.unexpected_keys == expect.unexpected_keys == ["bias"] and result.missing_keys == []


@pytest.mark.parametrize("key", ["weight.foo", "weightx", "weight.quant_map2"])
def test_unknown_weight_keys_are_unexpected(key):
    sd = nf4q.Linear4bit(64, 32).state_dict()
    sd[key] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=f"Unexpected key.*{key}"):
        nf4q.Linear4bit(64, 32).load_state_dict(sd)


def test_weight_of_another_shape_is_a_size_mismatch():
    sd = nf4q.Linear4bit(64, 32).state_dict()
    layer = nf4q.Linear4bit(32, 64)
    before = layer.dequantize()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.dequantize(), before)


def test_missing_bias_and_good_load():
    src, dst = nf4q.Linear4bit(64, 32), nf4q.Linear4bit(64, 32)
    sd = src.state_dict()
    dst.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))
    del sd["bias"]
    assert nf4q.Linear4bit(64, 32).load_state_dict(sd, strict=False).missing_keys == ["bias"]


# ---- corrupt files --------------------------------------------------------------------------------------------

def test_corrupt_safetensors_is_a_format_error_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    from nf4q.checkpoint import load_state_dict

    good = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()
    for i, bad in enumerate([data[: len(data) // 2], data[:5], b"\xff" * 64, data[:8] + b"{not json" + data[17:]]):
        f = tmp_path / f"bad{i}" / "model.safetensors"
        f.parent.mkdir()
        f.write_bytes(bad)
        with pytest.raises(FormatError, match=f"bad{i}"):
            load_state_dict(f.parent)


def test_load_quantized_rejects_a_bias_of_the_wrong_length(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "dense")
    out = nf4q.save_quantized(tmp_path / "dense", tmp_path / "nf4", progress=False)
    sd = load_file(str(out / "model.safetensors"))
    key = next(k for k in sd if k.endswith("intermediate.dense.bias"))
    sd[key] = sd[key][:-1].clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="intermediate.dense.bias"):
        nf4q.load_quantized(out)


# ---- op arguments: one check per op, shared by CPU and CUDA ---------------------------------------------------

def _w4(double_quant=True, shape=(32, 64)):
    torch.manual_seed(0)
    return list(nf4q.quantize(torch.randn(*shape), double_quant=double_quant).op_args())


def test_blocksize_rule_is_the_same_in_python_and_cpp():
    x, code = torch.randn(4096), nf4q.nf4_code()
    for bs in list(range(-2, 70)) + [96, 128, 2048, 4095, 4096, 4097, 8192, 2**31, 2**62]:
        try:
            _check_blocksize(bs)
            py = True
        except ValueError:
            py = False
        try:
            ops.quantize_4bit(x, code, bs)
            cpp = True
        except ValueError:
            cpp = False
        assert py == cpp, bs


@pytest.mark.parametrize("bias,exc", [(torch.zeros(1, 32), ValueError), (torch.zeros(33), ValueError),
                                      (torch.zeros(32, dtype=torch.int64), TypeError),
                                      (torch.zeros(2, 16), ValueError)])
def test_gemm_bias_must_be_1d_float_with_n_values(bias, exc):
    with pytest.raises(exc, match="bias"):
        ops.gemm_4bit(torch.randn(3, 64), *_w4(), bias)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_dequantize_non_float_dtype_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="dtype"):
        ops.dequantize_4bit(*_w4(), dtype)
    with pytest.raises(TypeError, match="dtype"):
        ops.dequantize_blockwise_8bit(torch.zeros(256, dtype=torch.uint8), torch.ones(1), nf4q.dynamic_map(), 256,
                                      dtype)


def test_tables_must_be_flat_and_sorted():
    w4 = _w4()
    for i, bad in [(3, w4[3].view(16, 16)), (5, w4[5].view(4, 4)), (5, w4[5][:15].contiguous()),
                   (3, torch.cat([w4[3], w4[3]])[::2])]:
        args = list(w4)
        args[i] = bad
        with pytest.raises(ValueError, match="code"):
            ops.dequantize_4bit(*args, torch.float32)
    x = torch.randn(1000)
    for table in (nf4q.dynamic_map().flip(0), nf4q.dynamic_map().view(16, 16),
                  torch.cat([nf4q.dynamic_map()[:-1], torch.tensor([float("nan")])])):
        with pytest.raises(ValueError, match="code"):
            ops.quantize_blockwise_8bit(x, table.contiguous(), 256)
    with pytest.raises(ValueError, match="code"):
        ops.quantize_4bit(x, nf4q.nf4_code().flip(0), 64)


def test_integer_overflow_is_a_value_error():
    w4 = _w4(False)
    for shape in ([2**40, 2**40], [2**62, 4], [-1, -64], [2**63 - 1, 2]):
        args = w4[:8] + [shape]
        with pytest.raises(ValueError, match="shape"):
            ops.dequantize_4bit(*args, torch.float32)
    w4 = _w4(True)
    for nbs in (2**63 - 1, 2**40, 0, -5):
        args = list(w4)
        args[7] = nbs
        with pytest.raises(ValueError, match="nested_blocksize"):
            ops.dequantize_4bit(*args, torch.float32)
    for bs in (2**63 - 1, 2**40, 0, -1):
        with pytest.raises(ValueError, match="blocksize"):
            ops.quantize_blockwise_8bit(torch.randn(100), nf4q.dynamic_map(), bs)
        with pytest.raises(ValueError, match="blocksize"):
            ops.dequantize_blockwise_8bit(torch.zeros(100, dtype=torch.uint8), torch.ones(1), nf4q.dynamic_map(), bs,
                                          torch.float32)


def test_optimizer_op_hyperparameters():
    p, g = torch.randn(300), torch.randn(300)
    for kw in (dict(step=0), dict(lr=float("nan")), dict(beta1=1.0), dict(eps=-1.0), dict(weight_decay=float("inf"))):
        args = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1) | kw
        with pytest.raises(ValueError, match=next(iter(kw)).rstrip("1")):
            ops.adamw_step([p], [g], [torch.zeros(300)], [torch.zeros(300)], *args.values())
    m, v = torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)
    a = [torch.zeros(2)]
    with pytest.raises(ValueError, match="code1"):
        ops.adamw8bit_step([p], [g], [m], [v], a, [torch.zeros(2)], nf4q.dynamic_map().flip(0).contiguous(),
                           nf4q.dynamic_map(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


# ---- extreme but finite values --------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [FLT_MAX, FLT_MAX / 2, 1e38, 1e-38, 1e-44])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_near_the_fp32_limits_with_double_quantization(scale, dtype):
    torch.manual_seed(0)
    w = (torch.rand(64, 128) * 2 - 1).mul(scale).clamp(-FLT_MAX, FLT_MAX).to(dtype)
    if not torch.isfinite(w).all():
        pytest.skip("not representable in this dtype")
    try:
        qw = nf4q.quantize(w, double_quant=True)
    except ValueError as e:  # allowed: a clear refusal, never garbage
        assert "double_quant=False" in str(e)
        return
    out = qw.dequantize(torch.float32)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref.dequantize_4bit(*qw.op_args(), torch.float32))
    plain = nf4q.quantize(w, double_quant=False).dequantize(torch.float32)
    err, base = (out - w.float()).abs().max(), (plain - w.float()).abs().max()
    assert err <= 1.5 * base + 1e-6 * scale


def test_all_weights_at_the_fp32_maximum():
    w = torch.full((16, 64), FLT_MAX)
    w[::2] *= -1
    out = nf4q.quantize(w).dequantize()
    assert torch.isfinite(out).all() and torch.allclose(out, w, rtol=1e-2)


# ---- interop traps --------------------------------------------------------------------------------------------

def _trained_8bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 2))
    opt = nf4q.optim.AdamW(model.parameters(), lr=1e-2, bits=8)
    for _ in range(2):
        model(torch.randn(4, 128)).sum().backward()
        opt.step()
    return model, opt


def test_8bit_state_dict_uses_keys_of_its_own():
    model, opt = _trained_8bit()
    st = opt.state_dict()["state"]
    assert set(st[0]) == {"step", "state1", "state2", "absmax1", "absmax2"} and st[0]["state1"].dtype == torch.uint8
    assert set(st[2]) == {"step", "exp_avg", "exp_avg_sq"}  # 64x2: 32-bit states, torch's keys
    assert "exp_avg" in opt.state[model[0].weight]  # the in-memory names did not change


def test_8bit_state_dict_round_trip_and_old_files():
    model, opt = _trained_8bit()
    sd = opt.state_dict()
    old = {**sd, "state": {i: ({"step": s["step"], "exp_avg": s["state1"], "exp_avg_sq": s["state2"],
                                "exp_avg_absmax": s["absmax1"], "exp_avg_sq_absmax": s["absmax2"]}
                               if "state1" in s else s) for i, s in sd["state"].items()}}
    for saved in (sd, old):
        again = nf4q.optim.AdamW(model.parameters(), lr=1e-2, bits=8)
        again.load_state_dict(saved)
        for p in model.parameters():
            for k, t in opt.state[p].items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(again.state[p][k])), k


def test_torch_adamw_cannot_silently_use_our_8bit_file():
    model, opt = _trained_8bit()
    before = [p.detach().clone() for p in model.parameters()]
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 128)).sum().backward()
    with pytest.raises(KeyError, match="exp_avg"):
        torch_opt.load_state_dict(opt.state_dict())
        torch_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_corrupt_8bit_state_is_a_value_error():
    model, opt = _trained_8bit()
    sd = opt.state_dict()
    sd["state"][0]["state1"] = sd["state"][0]["state1"][:5]
    with pytest.raises(ValueError, match="state"):
        nf4q.optim.AdamW(model.parameters(), bits=8).load_state_dict(sd)


def test_get_peft_model_twice_and_bad_regex():
    from peft_layers import LoRAConfig, get_peft_model

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, LoRAConfig(target_modules="[0-"))
    pm = get_peft_model(model, LoRAConfig(target_modules=["0"]))
    a = pm.base_model.model[0].lora_A["default"].weight.detach().clone()
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(model, LoRAConfig(target_modules=["0"]))
    assert torch.equal(pm.base_model.model[0].lora_A["default"].weight, a)
    assert not math.isnan(float(pm(torch.randn(1, 8)).sum().detach()))
