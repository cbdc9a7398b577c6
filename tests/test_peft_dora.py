"""DoRA (incl. QDoRA on nf4q.Linear4bit), LoftQ and PEFT's init_lora_weights values: numerics against the real
`peft` both ways (files and logits), the row-slab weight norm against a dense reference, merge == unmerged,
disabled == base, training, and bad input."""
import copy
import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

import nf4q
from peft_helpers import TwoLayer, batch, logits, perturb_adapter, same_weights, snapshot, tiny_gpt2, tiny_llama, train
from peft_layers import LoRAConfig, LoRALayer, PeftConfig, PeftModel, dora, get_peft_model, loftq

HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="the interop extra peft is not installed")
if HAVE_PEFT:
    import peft

warnings.filterwarnings("ignore", message="merging into an NF4 weight")
ATOL = 1e-5
CASES = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], False),
         "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"], True)}


def dora_model(case, **kw):
    factory, targets, _ = CASES[case]
    model = get_peft_model(factory(), LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, **kw))
    perturb_adapter(model)
    return model.eval()


def quantized_llama():
    return nf4q.quantize_model(tiny_llama(), progress=False)


# ---- config -----------------------------------------------------------------------------------------------

def test_config_new_fields_round_trip_and_alias():
    c = LoRAConfig(r=4, use_dora=True, init_lora_weights="pissa_niter_4")
    d = c.to_dict()
    assert d["use_dora"] is True and d["init_lora_weights"] == "pissa_niter_4" and "init" not in d
    assert PeftConfig.from_dict(d) == c
    assert LoRAConfig(init="gaussian").init_lora_weights == "gaussian"  # the older spelling
    assert LoRAConfig(init="default") == LoRAConfig()
    c = LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    assert PeftConfig.from_dict(c.to_dict()).loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


@pytest.mark.parametrize("kwargs, match", [
    ({"init_lora_weights": "eva"}, "init_lora_weights"), ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "loftq_config"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}, "loftq_bits"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, "loftq_iter"),
    ({"init": "gaussian", "init_lora_weights": "olora"}, "init"), ({"use_dora": 1}, "use_dora")])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


# ---- DoRA numerics against the real peft -------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_dora_files(tmp_path, case):
    ours = dora_model(case)
    ours.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    mags = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 2 * len(CASES[case][1])  # PEFT's key, no ".weight", no adapter name
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(same_weights(CASES[case][0]), str(tmp_path)).eval()
    b = batch()
    torch.testing.assert_close(logits(theirs, b), logits(ours, b), rtol=0, atol=ATOL)


@needs_peft
@pytest.mark.parametrize("case", list(CASES))
def test_we_load_peft_dora_files(tmp_path, case):
    factory, targets, fan_in_fan_out = CASES[case]
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                            fan_in_fan_out=fan_in_fan_out))
    perturb_adapter(theirs)
    theirs.eval().save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(same_weights(factory), str(tmp_path))
    b = batch()
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), rtol=0, atol=ATOL)


@needs_peft
def test_dora_magnitude_init_and_gradients_match_peft():
    """The same start (m = ‖W‖) and, from the same weights, the same gradient of m as PEFT."""
    from peft import get_peft_model_state_dict

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    ours = get_peft_model(tiny_llama(), LoRAConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    torch.testing.assert_close(ours.adapter_state_dict()[key].detach(), get_peft_model_state_dict(theirs)[key],
                               rtol=0, atol=1e-6)
    perturb_adapter(theirs)
    ours.load_adapter_state_dict("default", get_peft_model_state_dict(theirs))
    b = batch()
    ours.train(), theirs.train()
    g_ours = torch.autograd.grad(ours(**b).loss, [ours.adapter_state_dict()[key]])[0]
    p_theirs = dict(theirs.named_parameters())[key.replace("vector", "vector.default.weight")]
    g_theirs = torch.autograd.grad(theirs(**b).loss, [p_theirs])[0]
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


# ---- QDoRA: the row-slab norm and the NF4 forward ----------------------------------------------------------

@pytest.mark.parametrize("shape, blocksize, double_quant, n_slabs", [
    ((300, 128), 64, True, 3), ((33, 50), 64, False, 2), ((129, 256), 32, True, 5), ((70, 96), 64, True, 1)])
def test_nf4_row_slab_norm_matches_dense(monkeypatch, shape, blocksize, double_quant, n_slabs):
    """Slabs start on the scales' storage boundaries (a nested group of 256 blocks with double quantization)."""
    monkeypatch.setattr(dora, "SLAB_ELEMENTS", 2048)  # several slabs even on small weights
    g = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    base = nf4q.Linear4bit.from_linear(nn.Linear(in_f, out_f), blocksize=blocksize, double_quant=double_quant)
    A, B = torch.randn(3, in_f, generator=g), torch.randn(out_f, 3, generator=g)
    dense = torch.linalg.vector_norm(base.dequantize(torch.float32) + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(dora.weight_norm(base, A, B, 0.7), dense, rtol=1e-5, atol=1e-5)
    slabs = list(dora._nf4_row_slabs(base.quantized_weight))
    assert len(slabs) == n_slabs and slabs[-1][1] == out_f


def test_qdora_equals_dora_on_the_dequantized_weights():
    """QDoRA on NF4 computes what DoRA computes on a float model holding dequant(W)."""
    q = quantized_llama()
    f = tiny_llama()
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, nf4q.Linear4bit):
                f.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)
    mq, mf = get_peft_model(q, config), get_peft_model(f, config)
    perturb_adapter(mq)
    mf.load_adapter_state_dict("default", {k: v.detach() for k, v in mq.adapter_state_dict().items()})
    b = batch()
    torch.testing.assert_close(logits(mq.eval(), b), logits(mf.eval(), b), rtol=0, atol=ATOL)
    layer = mq.get_base_model().model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALayer) and layer.is_4bit


@pytest.mark.parametrize("case", ["llama", "gpt2", "nf4"])
def test_dora_merge_disable_unmerge(case):
    if case == "nf4":
        model = get_peft_model(quantized_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
        perturb_adapter(model, scale=0.05)
        model.eval()
    else:
        model = dora_model(case)
    b = batch()
    base_model = CASES.get(case, (tiny_llama,))[0]() if case != "nf4" else quantized_llama()
    expect = logits(model, b)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, b), logits(base_model, b), rtol=0, atol=1e-6)
    model.merge_adapter()
    merged = logits(model, b)
    if case == "nf4":  # requantized: the NF4 rounding error, not exact
        assert (merged - expect).abs().max() < 0.1 * expect.abs().max()
    else:
        torch.testing.assert_close(merged, expect, rtol=0, atol=ATOL)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, b), expect, rtol=0, atol=ATOL if case != "nf4" else 0)


def test_two_dora_adapters_merged_in_turn_equal_their_forward():
    model = get_peft_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("b", LoRAConfig(r=3, target_modules=["q_proj"], use_dora=True))
    model.set_adapter(["default", "b"])
    perturb_adapter(model)
    model.eval()
    b = batch()
    expect = logits(model, b)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, b), expect, rtol=0, atol=ATOL)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, b), expect, rtol=0, atol=ATOL)


def test_dora_trains_magnitude_and_lora_with_dropout():
    model = get_peft_model(quantized_llama(), LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                         lora_dropout=0.1))
    before = snapshot(model)
    losses = train(model, batch(), steps=3)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_magnitude_vector" in n for n in changed) and any("lora_B" in n for n in changed)
    assert not any("base_layer" in n for n in changed)


def test_dora_on_an_unsupported_module_raises():
    with pytest.raises(TypeError, match="use_dora.*Embedding"):
        get_peft_model(tiny_llama(), LoRAConfig(target_modules=["embed_tokens"], use_dora=True))


# ---- init_lora_weights ----------------------------------------------------------------------------------------

def test_init_false_changes_the_output_and_gaussian_does_not():
    b = batch()
    base = logits(tiny_llama(), b)
    moved = logits(get_peft_model(tiny_llama(), LoRAConfig(target_modules=["q_proj"], init_lora_weights=False)), b)
    assert (moved - base).abs().max() > 1e-4
    same = logits(get_peft_model(tiny_llama(), LoRAConfig(target_modules=["q_proj"], init_lora_weights="gaussian")), b)
    torch.testing.assert_close(same, base, rtol=0, atol=0)


@needs_peft
@pytest.mark.parametrize("how", ["pissa", "olora"])
def test_pissa_olora_match_peft(how):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=how)
    ours = get_peft_model(tiny_llama(), LoRAConfig(**config)).eval()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).eval()
    mine, sd = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ("model.layers.1.mlp.down_proj.base_layer.weight",
                 "model.layers.0.self_attn.q_proj.lora_A.default.weight",
                 "model.layers.1.mlp.down_proj.lora_B.default.weight"):
        torch.testing.assert_close(mine["base_model.model." + name], sd["base_model.model." + name],
                                   rtol=1e-4, atol=1e-5)
    b = batch()
    torch.testing.assert_close(logits(ours, b), logits(tiny_llama(), b), rtol=0, atol=ATOL)  # output kept at init


def test_pissa_on_nf4_keeps_the_output_up_to_requantization():
    b = batch()
    expect = logits(quantized_llama(), b)
    with pytest.warns(UserWarning, match="NF4"):
        model = get_peft_model(quantized_llama(), LoRAConfig(r=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert (logits(model, b) - expect).abs().max() < 0.05 * expect.abs().max()


def realistic_weight(out_f=96, in_f=128, rank=6, seed=0):
    """Low rank plus noise, as trained weights look; heavy rows make the NF4 error matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / rank
    return w + 0.05 * torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_error_below_plain_nf4(iters):
    w = realistic_weight()
    plain = (w - nf4q.quantize(w).dequantize(torch.float32)).norm()
    q, A, B = loftq.loftq(w, r=8, scaling=2.0, iters=iters)
    err = (w - (q.dequantize(torch.float32) + 2.0 * B @ A)).norm()
    assert err < 0.9 * plain, (float(err), float(plain))


def test_loftq_through_get_peft_model_quantizes_the_base():
    model = TwoLayer(d=64, h=128)
    with torch.no_grad():
        model.proj_in.weight.copy_(realistic_weight(128, 64, seed=1))
    ref = copy.deepcopy(model.proj_in)
    plain = nf4q.Linear4bit.from_linear(copy.deepcopy(ref))
    config = LoRAConfig(r=8, lora_alpha=16, target_modules=["proj_in"], init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    layer = get_peft_model(model, config).get_base_model().proj_in
    assert isinstance(layer.base_layer, nf4q.Linear4bit) and layer.is_4bit
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert (layer(x) - ref(x)).norm() < 0.8 * (plain(x) - ref(x)).norm()
    config.target_modules = ["q_proj"]
    with pytest.raises(ValueError, match="loftq.*nn.Linear"):
        get_peft_model(quantized_llama(), config)
