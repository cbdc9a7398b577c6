import io

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nf4q
from conftest import DTYPES, randn
from nf4q import _reference as ref


def rel_err(y, expect):
    return ((y.double() - expect).norm() / expect.norm()).item()


@pytest.mark.parametrize("M", [1, 3, 4, 5, 64])
@pytest.mark.parametrize("shape", [(96, 64), (33, 130), (70, 257)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_reference(M, shape, double_quant, gen):
    N, K = shape
    layer = nf4q.Linear4bit.from_linear(nn.Linear(K, N), double_quant=double_quant)
    x = randn(2, M, K, generator=gen)
    expect = ref.gemm_4bit(x, *layer.quantized_weight.op_args(), bias=layer.bias)
    assert rel_err(layer(x), expect) < 1e-5


# Unit roundoff u of a dtype: rounding to it moves a value by at most u of its magnitude.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, gen):
    layer = nf4q.Linear4bit(64, 48)
    x = randn(7, 64, dtype=dtype, generator=gen)
    y = layer(x)
    assert y.dtype == dtype
    # The kernel accumulates in fp32 (relative error ~K·2^-24 ≈ 4e-6) and rounds each output once to `dtype`,
    # so ‖y − y_exact‖ ≤ u‖y_exact‖ + fp32 error: the bound is u (+1e-5), not a guess 20× above it.
    err = rel_err(y, ref.gemm_4bit(x, *layer.quantized_weight.op_args(), bias=layer.bias))
    assert err <= UNIT_ROUNDOFF[dtype] + 1e-5, err


def test_backward_matches_reference(gen):
    layer = nf4q.Linear4bit(65, 31)
    x = randn(3, 5, 65, generator=gen).requires_grad_()
    g = randn(3, 5, 31, generator=gen)
    layer(x).backward(g)
    w = layer.dequantize(torch.float64)
    assert rel_err(x.grad, g.double() @ w) < 1e-5
    assert rel_err(layer.bias.grad, g.double().sum((0, 1))) < 1e-5
    assert all(p.grad is None for n, p in layer.named_parameters() if n != "bias")


def test_gradcheck_input():
    layer = nf4q.Linear4bit(16, 8)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    # the op computes in fp32 on CPU, so compare gradients loosely
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_noncontiguous_input(gen):
    layer = nf4q.Linear4bit(64, 32)
    x = randn(8, 128, generator=gen)[:, ::2]
    assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype(compute_dtype, gen):
    layer = nf4q.Linear4bit(64, 32, compute_dtype=compute_dtype)
    x = randn(4, 64, generator=gen)
    y = layer(x)
    assert y.dtype == torch.float32
    # compute_dtype means: x and the bias are cast to it, the op runs in it, the result is cast back. So the
    # output is exactly that of the same layer without compute_dtype fed the cast input...
    plain = nf4q.Linear4bit(64, 32)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(y, plain(x.to(compute_dtype)).float())
    # ...which differs from the fp32 computation by the rounding of x and y to compute_dtype: between u/8 (far
    # above fp32's ~1e-6, so an fp32 computation fails here) and 2u + 1e-5 (input and output roundings).
    u = UNIT_ROUNDOFF[compute_dtype]
    err = rel_err(y, ref.gemm_4bit(x, *layer.quantized_weight.op_args(), bias=layer.bias))
    assert u / 8 < err <= 2 * u + 1e-5, err


def test_state_dict_round_trip_torch_save():
    layer = nf4q.Linear4bit(100, 60)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = nf4q.Linear4bit(100, 60)
    other.load_state_dict(torch.load(buf))
    for a, b in zip(layer.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_round_trip_safetensors(tmp_path):
    layer = nf4q.Linear4bit(100, 60, bias=False)
    save_file(layer.state_dict(), tmp_path / "w.safetensors")
    other = nf4q.Linear4bit(100, 60, bias=False)
    other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(layer.dequantize(), other.dequantize())
    assert torch.equal(layer.weight, other.weight)


def test_unexpected_key_reported():
    sd = nf4q.Linear4bit(64, 32).state_dict()
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra"):
        nf4q.Linear4bit(64, 32).load_state_dict(sd)


def test_half_cast_keeps_quantized_tensors():
    layer = nf4q.Linear4bit(64, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    assert layer.bias.dtype == torch.float16
    after = layer.state_dict()
    for k, v in before.items():
        if k != "bias":
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_quantize_model_replaces_linears():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64)), nn.Linear(64, 8))
    model.lm_head = nn.Linear(8, 8)
    x = torch.randn(4, 32)
    with torch.no_grad():
        expect = model(x)
    nf4q.quantize_model(model, skip=("lm_head",), progress=False)
    assert isinstance(model[0], nf4q.Linear4bit) and isinstance(model[2][0], nf4q.Linear4bit)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, nf4q.Linear4bit)
    with torch.no_grad():
        got = model(x)
        # exactly the fp64 network with the dequantized weights (up to fp32 rounding)...
        h = x.double()
        for layer in (model[0], torch.relu, model[2][0], model[3], model.lm_head):
            if isinstance(layer, nf4q.Linear4bit):
                h = ref.gemm_4bit(h, *layer.quantized_weight.op_args(), bias=layer.bias)
            elif isinstance(layer, nn.Linear):
                h = h @ layer.weight.double().t() + layer.bias.double()
            else:
                h = layer(h)
        assert rel_err(got, h) < 1e-5
        # ...and close to the fp32 network. NF4 moves each weight by ~9% of its norm (on nn.Linear's uniform
        # init), and the output of this unseeded network moves by 0.055 ± 0.014 (60 seeds, max 0.093): 0.12 is
        # ~5 sd above the mean. (The exact check above is the one that pins the computation.)
        assert rel_err(got, expect.double()) < 0.12


def test_quantize_model_passes_its_options_to_every_layer():
    model = nn.Sequential(nn.Linear(64, 128), nn.Sequential(nn.Linear(128, 64)))
    nf4q.quantize_model(model, skip=(), progress=False, compute_dtype=torch.bfloat16, blocksize=128,
                        double_quant=True, nested_map="dynamic")
    for layer in (model[0], model[1][0]):
        assert (layer.compute_dtype, layer.blocksize) == (torch.bfloat16, 128)
        assert torch.equal(layer.weight_nested_code, nf4q.nested_map("dynamic"))
    nf4q.quantize_model(plain := nn.Sequential(nn.Linear(64, 32)), skip=(), progress=False, double_quant=False)
    assert plain[0].weight_nested_absmax is None and plain[0].compute_dtype is None


def test_quantized_weight_view_and_bits():
    layer = nf4q.Linear4bit(256, 128)
    qw = layer.quantized_weight
    assert qw.packed.data_ptr() == layer.weight.data_ptr()
    assert 4.12 < qw.bits_per_param < 4.13
    assert "NF4Weight(shape=(128, 256)" in repr(qw)


def test_nf4weight_state_dict_prefix(gen):
    qw = nf4q.quantize(randn(40, 64, generator=gen))
    sd = qw.state_dict("model.layers.0.mlp.up_proj.")
    assert set(sd) == {"model.layers.0.mlp.up_proj." + k for k in (
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4")}
    back = nf4q.NF4Weight.from_state_dict(sd, "model.layers.0.mlp.up_proj.")
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4weight_keeps_dtype(dtype, gen):
    qw = nf4q.quantize(randn(16, 64, dtype=dtype, generator=gen))
    assert qw.dtype == dtype and qw.dequantize().dtype == dtype
    assert nf4q.NF4Weight.from_state_dict(qw.state_dict()).dtype == dtype


def test_torch_compile_matches_eager(gen):
    model = nn.Sequential(nf4q.Linear4bit(64, 96), nn.GELU(), nf4q.Linear4bit(96, 32))
    x = randn(5, 64, generator=gen).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y, yc = model(x), compiled(x)
    torch.testing.assert_close(yc, y)
    g, = torch.autograd.grad(y.sum(), x)
    gc, = torch.autograd.grad(yc.sum(), x)
    torch.testing.assert_close(gc, g)
