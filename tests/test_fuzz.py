"""Property-based fuzzing (hypothesis) of everything that takes outside input: the quantize/dequantize ops, the
matmul, Linear4bit, quant-state JSON, state dicts and safetensors bytes. The invariant everywhere: either the
documented exception (ValueError / TypeError / nf4q.FormatError, RuntimeError for nn.Module's strict-load
report) or a result equal to the pure-torch reference. Never a crash, a hang or silent garbage.

CPU only, well under a minute by default (derandomized, so CI is reproducible). Nightly:
NF4Q_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py  (random seeds, that many examples per test).
"""
import json
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import (  # noqa: E402
    HealthCheck,
    assume,
    given,
    settings,
    strategies as st,
)

import nf4q  # noqa: E402
from nf4q import FormatError, NF4Weight, _reference as ref  # noqa: E402
from nf4q.tensor import QS_KEY  # noqa: E402

ops = torch.ops.nf4q
NIGHTLY = int(os.environ.get("NF4Q_FUZZ_EXAMPLES", "0"))
FLT_MAX = torch.finfo(torch.float32).max


def fuzz(examples):
    return settings(max_examples=NIGHTLY or examples, deadline=None, derandomize=not NIGHTLY, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- strategies -----------------------------------------------------------------------------------------------

DIMS = st.sampled_from([0, 1, 2, 3, 5, 7, 13, 31, 32, 33, 61, 64, 127, 128, 257])
SHAPES = st.lists(DIMS, min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 40_000)
FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
BLOCKSIZES = st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096])
SCALES = st.sampled_from([1.0, 1e-3, 1e3, 1e-30, 1e-40, 1e30, 1e38, FLT_MAX])


@st.composite
def tensors(draw, shape=SHAPES, dtype=FLOATS):
    """A random tensor, sometimes a non-contiguous view (transposed or strided), at some scale."""
    shape, dtype, scale = draw(shape), draw(dtype), draw(SCALES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    view = draw(st.sampled_from(["plain", "transpose", "stride"]))
    base_shape = list(shape)
    if view == "stride":
        base_shape[-1] *= 2
    t = (torch.rand(base_shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    t = t.clamp(-FLT_MAX, FLT_MAX).to(dtype)
    if view == "stride":
        t = t[..., ::2]
    elif view == "transpose" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


# ---- quantize / dequantize ------------------------------------------------------------------------------------

@fuzz(120)
@given(w=tensors(), blocksize=BLOCKSIZES, double_quant=st.booleans(), poison=st.sampled_from([None, "nan", "inf"]))
def test_quantize_roundtrip_equals_reference(w, blocksize, double_quant, poison):
    if poison is not None and w.numel():
        w = w.clone()
        w[tuple(int(i) for i in torch.unravel_index(torch.tensor(w.numel() // 2), w.shape))] = float(poison)
    try:
        qw = nf4q.quantize(w, blocksize=blocksize, double_quant=double_quant)
    except ValueError as e:
        assert w.numel() == 0 or poison is not None or not torch.isfinite(w).all() or "double_quant=False" in str(e)
        return
    assert w.numel() and torch.isfinite(w).all()
    packed, absmax = ref.quantize_4bit(w.contiguous(), qw.code, blocksize)
    assert torch.equal(qw.packed, packed)
    if not double_quant:
        assert torch.equal(qw.absmax, absmax)
    for dtype in (w.dtype, torch.float32):
        out = qw.dequantize(dtype)
        assert out.shape == w.shape and out.dtype == dtype
        assert torch.equal(out, ref.dequantize_4bit(*qw.op_args(), dtype))
    assert torch.isfinite(qw.dequantize(torch.float32)).all()


@fuzz(60)
@given(dtype=st.sampled_from([torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]),
       blocksize=st.one_of(st.integers(-10, 9000), st.sampled_from([64.0, "64", None, True, 2**64])))
def test_quantize_bad_arguments_are_documented_errors(dtype, blocksize):
    w = torch.ones(8, 64).to(dtype)
    with pytest.raises((TypeError, ValueError)):
        nf4q.quantize(w, blocksize=blocksize)


@fuzz(100)
@given(w=tensors(shape=st.lists(DIMS, min_size=1, max_size=3).filter(lambda s: 0 < math.prod(s) <= 20_000)),
       blocksize=st.one_of(st.integers(1, 700), st.sampled_from([256, 4096, 2**20])))
def test_blockwise_8bit_equals_reference(w, blocksize):
    table = nf4q.dynamic_map()
    assume(torch.isfinite(w).all())
    q, absmax = ops.quantize_blockwise_8bit(w, table, blocksize)
    rq, rabsmax = ref.quantize_blockwise_8bit(w.contiguous(), table, blocksize)
    assert torch.equal(q, rq) and torch.equal(absmax, rabsmax)
    out = ops.dequantize_blockwise_8bit(q, absmax, table, blocksize, torch.float32)
    assert torch.equal(out, ref.dequantize_blockwise_8bit(q, absmax, table, blocksize, torch.float32))


# ---- matmul and Linear4bit ------------------------------------------------------------------------------------

@fuzz(80)
@given(lead=st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=0, max_size=2),
       n=st.sampled_from([1, 2, 7, 32, 33]), k=st.sampled_from([1, 3, 16, 64, 65, 130]), bias=st.booleans(),
       dtype=FLOATS, double_quant=st.booleans(), blocksize=st.sampled_from([32, 64, 256]),
       seed=st.integers(0, 2**31 - 1), strided=st.booleans())
def test_linear4bit_forward_equals_dense(lead, n, k, bias, dtype, double_quant, blocksize, seed, strided):
    torch.manual_seed(seed)
    layer = nf4q.Linear4bit(k, n, bias=bias, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(*lead, 2 * k if strided else k).to(dtype)
    if strided:
        x = x[..., ::2]
    y = layer(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    expect = ref.gemm_4bit(x, *layer._w4(), bias=layer.bias.detach() if bias else None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = 1 + (expect.abs().max().item() if expect.numel() else 0)
    assert torch.allclose(y.double(), expect, rtol=tol, atol=tol * scale)


# ---- checkpoints: quant-state JSON, state-dict tensors, safetensors bytes -------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 32, 64, 256, 4096]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
              st.sampled_from(["float32", "bfloat16", "nf4", "fp4"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
FIELDS = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_offset", "nested_dtype", "extra"]


def _base_sd(double_quant, seed=0):
    torch.manual_seed(seed)
    return nf4q.quantize(torch.randn(24, 64), blocksize=32, double_quant=double_quant).state_dict("m.")


def _check_loaded(qw):
    """A checkpoint that loads gives a usable, finite weight equal to the reference dequantization."""
    out = qw.dequantize(torch.float32)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref.dequantize_4bit(*qw.op_args(), torch.float32))


@fuzz(250)
@given(double_quant=st.booleans(),
       edits=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("<delete>"), JSON_VALUES)), min_size=1,
                      max_size=3))
def test_quant_state_json_mutations(double_quant, edits):
    sd = _base_sd(double_quant)
    meta = json.loads(bytes(sd["m." + QS_KEY].numpy()))
    for field, value in edits:
        if value == "<delete>":
            meta.pop(field, None)
        else:
            meta[field] = value
    sd["m." + QS_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    try:
        qw = NF4Weight.from_state_dict(sd, "m.")
    except FormatError as e:
        assert "m.weight" in str(e)  # names the key
        return
    _check_loaded(qw)


@fuzz(200)
@given(double_quant=st.booleans(), seed=st.integers(0, 2**31 - 1),
       key=st.sampled_from(["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                            "weight.nested_quant_map", QS_KEY]),
       how=st.sampled_from(["delete", "dtype", "truncate", "extend", "nan", "inf", "huge", "random", "bytes",
                            "reshape", "not_a_tensor"]))
def test_state_dict_tensor_mutations(double_quant, seed, key, how):
    sd = _base_sd(double_quant)
    k = "m." + key
    assume(k in sd)
    g = torch.Generator().manual_seed(seed)
    t = sd[k]
    if how == "delete":
        del sd[k]
    elif how == "dtype":
        sd[k] = t.to(torch.float16 if t.dtype != torch.float16 else torch.float32)
    elif how == "truncate":
        sd[k] = t.reshape(-1)[: max(0, t.numel() - 1 - int(torch.randint(0, 4, (1,), generator=g)))]
    elif how == "extend":
        sd[k] = torch.cat([t.reshape(-1), t.reshape(-1)[:3]])
    elif how in ("nan", "inf", "huge") and t.is_floating_point():
        sd[k] = t.clone()
        sd[k].view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = {"nan": math.nan, "inf": math.inf,
                                                                                 "huge": FLT_MAX}[how]
    elif how == "random":
        sd[k] = (torch.randn(t.shape, generator=g) * 10).to(t.dtype) if t.is_floating_point() else \
            torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8)
    elif how == "bytes" and t.dtype == torch.uint8 and t.numel():
        sd[k] = t.clone()
        sd[k].view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] ^= 1 << int(torch.randint(0, 8, (1,),
                                                                                                   generator=g))
    elif how == "reshape":
        sd[k] = t.reshape(1, -1)
    elif how == "not_a_tensor":
        sd[k] = t.tolist()
    try:
        qw = NF4Weight.from_state_dict(sd, "m.")
    except FormatError:
        return
    _check_loaded(qw)


@fuzz(120)
@given(seed=st.integers(0, 2**31 - 1), how=st.sampled_from(["truncate", "flip", "insert", "header"]),
       bias=st.booleans())
def test_safetensors_byte_mutations(tmp_path_factory, seed, how, bias):
    from safetensors.torch import save

    from nf4q.checkpoint import load_state_dict

    torch.manual_seed(0)
    layer = nf4q.Linear4bit(64, 16, bias=bias)
    data = bytearray(save({k: v.contiguous() for k, v in layer.state_dict().items()}))
    g = torch.Generator().manual_seed(seed)
    pos = int(torch.randint(0, len(data), (1,), generator=g))
    if how == "truncate":
        data = data[:pos]
    elif how == "flip":
        data[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
    elif how == "insert":
        data[pos:pos] = bytes(torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8).tolist())
    else:  # inside the JSON header (after the 8-byte length)
        hlen = int.from_bytes(data[:8], "little")
        data[8 + pos % max(hlen, 1)] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(bytes(data))
    try:
        sd = load_state_dict(path)
    except FormatError as e:
        assert "model.safetensors" in str(e)
        return
    other = nf4q.Linear4bit(64, 16, bias=bias)
    try:
        other.load_state_dict(sd)
    except FormatError:
        return
    except RuntimeError as e:  # nn.Module's report: missing / unexpected keys, size mismatch
        assert "Error(s) in loading state_dict" in str(e)
        return
    assert torch.isfinite(other.dequantize()).all()
    x = torch.randn(3, 64)
    expect = ref.gemm_4bit(x, *other._w4(), bias=other.bias.detach() if bias else None)
    if torch.isfinite(expect).all():
        assert torch.allclose(other(x).double(), expect, rtol=1e-4, atol=1e-4 * (1 + expect.abs().max().item()))


@fuzz(60)
@given(value=st.one_of(st.integers(-2**65, 2**65), st.floats(), st.sampled_from([None, "x", [], {}])),
       which=st.sampled_from(["lr", "eps", "weight_decay", "beta1", "beta2"]))
def test_optimizer_hyperparameters(value, which):
    p = torch.nn.Parameter(torch.randn(10))
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if which.startswith("beta"):
        kw["betas"] = (value, 0.999) if which == "beta1" else (0.9, value)
    else:
        kw[which] = value
    try:
        opt = nf4q.optim.AdamW([p], **kw)
    except (TypeError, ValueError):
        return
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(10)
    q.grad = p.grad.clone()
    try:
        opt.step()
    except ValueError as e:  # the step size lr / (1 - beta1^t) overflows float32: torch's AdamW fails too
        assert "lr" in str(e)
        with pytest.raises(RuntimeError):
            torch.optim.AdamW([q], **kw).step()
        return
    as_float = dict(lr=float(kw["lr"]), eps=float(kw["eps"]), weight_decay=float(kw["weight_decay"]),
                    betas=tuple(float(b) for b in kw["betas"]))
    torch.optim.AdamW([q], **as_float).step()  # the reference: torch's own AdamW (also for absurd but legal values)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
