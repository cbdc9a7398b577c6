"""LoRA through get_peft_model on Llama, GPT-2 (Conv1D), BERT, NF4 bases and a hand-made module: targeting,
parameter counts, training, merging, disabling, several adapters, modules_to_save, biases, checkpointing."""
import re
import warnings

import pytest
import torch
from torch import nn

import nf4q
from peft_helpers import (
    MODELS,
    TwoLayer,
    batch,
    changed_names,
    logits,
    perturb_adapter,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    train,
)
from peft_layers import LoRAConfig, LoRALayer, PeftConfig, QLoRALinear, get_peft_model
from peft_layers.inject import layer_index

# hidden 32, intermediate 64, 4 heads with 2 KV heads (Llama) -> k/v_proj are 32 -> 16
LLAMA_SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
GPT2_SHAPES = {"c_attn": (32, 96), "attn.c_proj": (32, 32), "c_fc": (32, 128), "mlp.c_proj": (128, 32)}
BERT_SHAPES = {"query": (32, 32), "value": (32, 32)}


def lora_count(shapes, r, layers=2):
    return layers * sum(r * (i + o) for i, o in shapes.values())


# ---- config --------------------------------------------------------------------------------------------

def test_config_round_trip_and_peft_names():
    c = LoRAConfig(r=4, lora_alpha=16, target_modules={"v_proj", "q_proj"}, init="gaussian", use_rslora=True)
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["init_lora_weights"] == "gaussian" and "init" not in d
    assert d["target_modules"] == ["q_proj", "v_proj"]
    assert PeftConfig.from_dict(d) == c
    assert LoRAConfig().to_dict()["init_lora_weights"] is True
    # a PEFT file: many keys we ignore, the ones that change the computation are refused
    assert PeftConfig.from_dict({"peft_type": "LORA", "r": 2, "use_dora": False, "megatron_core": "x"}).r == 2
    with pytest.raises(ValueError, match="lora_bias"):
        PeftConfig.from_dict({"peft_type": "LORA", "lora_bias": True}, source="f.json")


@pytest.mark.parametrize("kwargs, match", [({"r": 0}, "r must"), ({"lora_alpha": -1}, "lora_alpha"),
                                           ({"lora_dropout": 1.0}, "lora_dropout"), ({"bias": "some"}, "bias"),
                                           ({"init": "pissa"}, "init")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)
    with pytest.raises(TypeError, match="target_modules"):
        LoRAConfig(target_modules=3)


# ---- targeting -------------------------------------------------------------------------------------------

def targeted(model):
    return sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, LoRALayer))


def test_target_modules_list_regex_all_linear_layers_and_exclude():
    names = targeted(get_peft_model(tiny_llama(), LoRAConfig(target_modules=["q_proj", "self_attn.v_proj"])))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    names = targeted(get_peft_model(tiny_llama(), LoRAConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj")))
    assert names == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    names = targeted(get_peft_model(tiny_llama(), LoRAConfig(target_modules="all-linear")))
    assert len(names) == 14 and "lm_head" not in names
    names = targeted(get_peft_model(tiny_llama(), LoRAConfig(target_modules="all-linear", layers_to_transform=[1],
                                                             exclude_modules=["o_proj"])))
    assert len(names) == 6 and all(".1." in n and "o_proj" not in n for n in names)
    names = targeted(get_peft_model(tiny_llama(), LoRAConfig()))  # PEFT's default for llama
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert layer_index("model.layers.12.mlp.experts.3.up") == 12
    assert layer_index("transformer.h.3.attn", layers_pattern="h") == 3


def test_no_match_and_unsupported_type_raise():
    with pytest.raises(ValueError, match="target_modules.*matched no module"):
        get_peft_model(tiny_llama(), LoRAConfig(target_modules=["qkv"]))
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(tiny_llama(), LoRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="no default"):
        get_peft_model(TwoLayer(), LoRAConfig())


# ---- every model kind: count, training, merge, disable ------------------------------------------------------

CASES = {
    "llama": (dict(target_modules="all-linear"), LLAMA_SHAPES, "lm"),
    "gpt2": (dict(target_modules="all-linear"), GPT2_SHAPES, "lm"),
    "bert": (dict(target_modules=["query", "value"]), BERT_SHAPES, "cls"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_count_training_merge_disable(kind):
    kw, shapes, task = CASES[kind]
    model = get_peft_model(MODELS[kind](), LoRAConfig(r=4, lora_alpha=8, **kw))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == lora_count(shapes, 4)
    assert total == trainable + sum(p.numel() for p in MODELS[kind]().parameters())
    b = batch(task)
    base = logits(model, b)
    before = snapshot(model)
    losses = train(model, b, steps=4)
    assert losses[-1] < losses[0]
    changed = changed_names(before, model)
    assert changed and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in changed)
    out = logits(model, b)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, b), base, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():  # unmerges inside, re-merges after
        torch.testing.assert_close(logits(model, b), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
    bare = model.merge_and_unload()
    assert not any(isinstance(m, LoRALayer) for m in bare.modules())
    torch.testing.assert_close(logits(bare, b), out, rtol=1e-5, atol=1e-5)


def test_conv1d_merge_uses_the_transposed_update():
    model = get_peft_model(tiny_gpt2(), LoRAConfig(r=2, target_modules=["c_attn"]))
    perturb_adapter(model)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and model.peft_config["default"].fan_in_fan_out
    w = layer.base_layer.weight.clone()  # [in, out]
    layer.merge()
    expect = w + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).t()
    torch.testing.assert_close(layer.base_layer.weight, expect, rtol=1e-6, atol=1e-6)


def test_hand_made_module_and_safe_merge():
    model = get_peft_model(TwoLayer(), LoRAConfig(r=3, target_modules=["proj_in", "proj_out"], lora_dropout=0.1))
    assert model.get_nb_trainable_parameters()[0] == 3 * (24 + 40) * 2
    perturb_adapter(model)
    x = torch.randn(4, 24)
    model.eval()
    y = model(x)
    with torch.no_grad():
        model.get_base_model().proj_in.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert not model.get_base_model().proj_in.merged
    with torch.no_grad():
        model.get_base_model().proj_in.lora_B["default"].weight[0, 0] = 0.0
    model.merge_adapter(safe_merge=True)
    assert model.get_base_model().proj_out.merged
    assert torch.isfinite(model(x)).all() and not torch.equal(model(x), y)


def test_rslora_and_gaussian_init():
    m = get_peft_model(TwoLayer(), LoRAConfig(r=4, lora_alpha=8, use_rslora=True, init="gaussian",
                                              target_modules=["proj_in"]))
    layer = m.get_base_model().proj_in
    assert layer.scaling["default"] == 4.0
    # N(0, 1/r) with r = 4: the sample std of 4·24 draws has sd ≈ 0.25/√192 ≈ 0.018, so ±0.1 is 5.5 sd (no
    # flakes without a seed) and still excludes PEFT's other plausible scale 1/√r = 0.5
    assert 0.15 < layer.lora_A["default"].weight.std() < 0.35


@pytest.mark.parametrize("use_rslora, scaling", [(False, 8 / 4), (True, 8 / 4 ** 0.5)])
def test_forward_adds_the_scaled_update(use_rslora, scaling):
    """y = base(x) + s·B·A·x with s = alpha/r (alpha/√r with rsLoRA), checked on the output, not the attribute."""
    model = get_peft_model(TwoLayer(), LoRAConfig(r=4, lora_alpha=8, use_rslora=use_rslora,
                                                  target_modules=["proj_in"]))
    perturb_adapter(model)
    layer = model.get_base_model().proj_in
    x = torch.randn(5, 24)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + scaling * (x @ A.t()) @ B.t())


# ---- NF4 bases: the LoRA layer takes QLoRALinear's fused path -----------------------------------------------

def test_lora_on_linear4bit_matches_qlora_linear():
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    q = QLoRALinear.from_linear(dense, r=4, lora_alpha=8)
    holder = nn.Sequential(nf4q.Linear4bit.from_linear(dense))
    model = get_peft_model(holder, LoRAConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.get_base_model()[0]
    assert layer.is_4bit
    with torch.no_grad():
        nn.init.normal_(q.lora_B.weight)
        layer.lora_A["default"].weight.copy_(q.lora_A.weight)
        layer.lora_B["default"].weight.copy_(q.lora_B.weight)
    x = torch.randn(7, 48)
    torch.testing.assert_close(model(x), q(x), rtol=0, atol=0)
    assert model.get_nb_trainable_parameters() == (4 * (48 + 40), 48 * 40 + 40 + 4 * (48 + 40))
    with pytest.warns(UserWarning, match="requantiz"):
        model.merge_adapter()
    assert (model(x) - q(x)).norm() / q(x).norm() < 0.1  # one NF4 rounding of W + sBA
    # exactly that rounding: dequantize, add s·B·A, requantize with the same blocksize and nested table
    merged = nf4q.quantize(q.base_layer.dequantize(torch.float32) + q.delta_weight())
    assert torch.equal(layer.base_layer.dequantize(), merged.dequantize())
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), q(x), rtol=0, atol=0)  # the pre-merge NF4 weight comes back exactly


# ---- several adapters ---------------------------------------------------------------------------------------

def test_add_set_delete_adapters():
    model = get_peft_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    perturb_adapter(model)
    b = batch()
    first = logits(model, b)
    model.set_adapter("other")
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)
    perturb_adapter(model, seed=2)
    second = logits(model, b)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, b), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LoRAConfig(target_modules=["q_proj"]))
    from peft_layers import IA3Config

    with pytest.raises(ValueError, match="holds LORA"):
        model.add_adapter("x", IA3Config())
    model.delete_adapter("default")
    assert model.active_adapter == "other"
    torch.testing.assert_close(logits(model, b), second, rtol=0, atol=0)


# ---- modules_to_save, biases ---------------------------------------------------------------------------------

def test_modules_to_save_and_lora_only_bias():
    from peft_helpers import tiny_bert

    config = LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")
    model = get_peft_model(tiny_bert(), config)
    # LoRA 2·2·2·(32+32) + classifier 32·3+3 + the 4 targeted biases 4·32
    assert model.get_nb_trainable_parameters()[0] == 512 + 99 + 128
    b = batch("cls")
    base = logits(model, b)
    before = snapshot(model)
    train(model, b, steps=3)
    changed = changed_names(before, model)
    assert any("modules_to_save.default" in n for n in changed)
    assert any(n.endswith("query.base_layer.bias") for n in changed)
    assert not any("original_module" in n for n in changed)
    keys = model.adapter_state_dict()
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    # biases are shared with the base: a disabled adapter differs from the base by them (as in PEFT)
    with model.disable_adapter():
        assert not torch.equal(logits(model, b), base)


def test_bias_all_counts_every_bias():
    model = get_peft_model(TwoLayer(), LoRAConfig(r=1, target_modules=["proj_in"], bias="all"))
    assert model.get_nb_trainable_parameters()[0] == 1 * (24 + 40) + 40 + 24 + 5


# ---- gradient checkpointing, printing, forwarding ---------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients():
    b = batch()
    grads = []
    for ckpt in (False, True):
        model = get_peft_model(tiny_llama(), LoRAConfig(r=2, target_modules="all-linear"))
        perturb_adapter(model)
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.activation_checkpointing_enable()  # forwarded to the transformers model
            assert model.get_base_model().model.layers[0].gradient_checkpointing
        model.train()
        model(**b).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_print_trainable_parameters_and_attribute_forwarding(capsys):
    model = get_peft_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"]))
    model.print_trainable_parameters()
    trainable, total = 4 * 64 * 2, sum(p.numel() for p in tiny_llama().parameters()) + 4 * 64 * 2
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * trainable / total:.4f}")
    assert model.config.model_type == "llama" and model.get_input_embeddings().num_embeddings == 64
    assert model.get_base_model().model.layers[0].self_attn.q_proj.in_features == 32  # TunerLayer forwards too


def test_generate_runs_the_adapter():
    model = get_peft_model(tiny_llama(), LoRAConfig(r=4, target_modules="all-linear"))
    perturb_adapter(model, scale=0.5)
    ids = batch()["input_ids"][:1]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    cur = ids
    for _ in range(5):  # greedy by hand through forward
        with torch.no_grad():
            cur = torch.cat([cur, model(input_ids=cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, cur)
    with model.disable_adapter():
        assert not torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), out)
