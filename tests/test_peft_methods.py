"""Bottleneck adapters, prefix tuning, prompt tuning and IA³ on Llama, GPT-2 and BERT (and hand-made modules):
parameter counts against the formulas, training touches only the adapter, disabled == base, IA³ merges,
gradient checkpointing, placement, masks/labels, generate."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import nf4q
from peft_helpers import (
    MODELS,
    TwoLayer,
    batch,
    changed_names,
    logits,
    perturb_adapter,
    snapshot,
    tiny_bert,
    tiny_llama,
    train,
)
from peft_layers import (
    AdapterConfig,
    BottleneckAdapterLayer,
    IA3Config,
    IA3Layer,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

NVT = 3


def adapter_count(h, rf, n):  # down h·b + b, up b·h + h
    b = max(1, h // rf)
    return n * (2 * h * b + b + h)


# (model, config factory, formula for the trainable count, a regex every trained parameter matches)
CASES = {
    "llama-ia3": ("llama", lambda: IA3Config(), 2 * (16 + 16 + 64), r"\.ia3_l\.default$"),
    "gpt2-ia3": ("gpt2", lambda: IA3Config(), 2 * (96 + 128), r"\.ia3_l\.default$"),
    # PEFT's BERT default: "output.dense" (a suffix) is both the attention output and the FFN output
    "bert-ia3": ("bert", lambda: IA3Config(), 2 * (32 + 32 + 32 + 64), r"\.ia3_l\.default$"),
    "llama-houlsby": ("llama", lambda: AdapterConfig(), adapter_count(32, 16, 4), r"\.adapter_(up|down)\.default\."),
    "llama-pfeiffer": ("llama", lambda: AdapterConfig(kind="pfeiffer", reduction_factor=4, non_linearity="swish"),
                       adapter_count(32, 4, 2), r"\.adapter_(up|down)\.default\."),
    "gpt2-houlsby": ("gpt2", lambda: AdapterConfig(non_linearity="gelu"), adapter_count(32, 16, 4),
                     r"\.adapter_(up|down)\.default\."),
    "bert-houlsby": ("bert", lambda: AdapterConfig(), adapter_count(32, 16, 4), r"\.adapter_(up|down)\.default\."),
    "llama-prompt": ("llama", lambda: PromptTuningConfig(num_virtual_tokens=NVT), NVT * 32, r"^prompt_encoder\."),
    "bert-prompt": ("bert", lambda: PromptTuningConfig(num_virtual_tokens=NVT), NVT * 32, r"^prompt_encoder\."),
    # Llama has 2 KV heads of 8: the prefix is [nvt, layers · 2 · 16]
    "llama-prefix": ("llama", lambda: PrefixTuningConfig(num_virtual_tokens=NVT), NVT * 2 * 2 * 16,
                     r"^prompt_encoder\."),
    "llama-prefix-proj": ("llama", lambda: PrefixTuningConfig(num_virtual_tokens=NVT, prefix_projection=True,
                                                              encoder_hidden_size=8),
                          NVT * 16 + (16 * 8 + 8) + (8 * 64 + 64), r"^prompt_encoder\."),
    "gpt2-prefix": ("gpt2", lambda: PrefixTuningConfig(num_virtual_tokens=NVT), NVT * 2 * 2 * 32,
                    r"^prompt_encoder\."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_count_training_disable_merge(case):
    import re

    kind, make, expected, pattern = CASES[case]
    model = get_peft_model(MODELS[kind](), make())
    assert model.get_nb_trainable_parameters()[0] == expected
    b = batch("cls" if kind == "bert" else "lm")
    with model.disable_adapter():
        base = logits(model, b)
    torch.testing.assert_close(base, logits(MODELS[kind](), b), rtol=0, atol=0)
    before = snapshot(model)
    losses = train(model, b, steps=4)
    assert losses[-1] < losses[0], losses
    changed = changed_names(before, model)
    assert changed and all(re.search(pattern, n) for n in changed), changed
    out = logits(model, b)
    assert not torch.allclose(out[:, -base.shape[1]:] if kind != "bert" else out, base, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, b), base, rtol=0, atol=0)
    if case.endswith("ia3"):
        model.merge_adapter()
        torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, b), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(model.merge_and_unload(), b), out, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(TypeError, match="cannot be merged"):
            model.merge_adapter()


@pytest.mark.parametrize("make", [IA3Config, AdapterConfig, lambda: PromptTuningConfig(num_virtual_tokens=NVT),
                                  lambda: PrefixTuningConfig(num_virtual_tokens=NVT)],
                         ids=["ia3", "houlsby", "prompt", "prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(make):
    b = batch()
    grads = []
    for ckpt in (False, True):
        model = get_peft_model(tiny_llama(), make())
        perturb_adapter(model)
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.activation_checkpointing_enable()
        model.train()
        model(**b).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert sum(g.abs().sum() for g in grads[0].values()) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


# ---- adapters ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, attn, ffn", [("llama", "self_attn.o_proj", "mlp.down_proj"),
                                             ("gpt2", "attn.c_proj", "mlp.c_proj"),
                                             ("bert", "attention.output.dense", "0.output.dense")])
def test_adapter_placement(kind, attn, ffn):
    for cfg, want in ((AdapterConfig(), {attn, ffn}), (AdapterConfig(kind="pfeiffer"), {ffn})):
        model = get_peft_model(MODELS[kind](), cfg)
        names = [n for n, m in model.get_base_model().named_modules() if isinstance(m, BottleneckAdapterLayer)]
        assert len(names) == 2 * len(want)
        assert {w for w in want if any(n.endswith(w) for n in names)} == want
        if cfg.kind == "pfeiffer":
            assert not any(n.endswith(attn) for n in names)


def test_adapter_on_a_hand_made_module():
    with pytest.raises(ValueError, match="attn_output_modules"):
        get_peft_model(TwoLayer(), AdapterConfig())
    model = get_peft_model(TwoLayer(), AdapterConfig(kind="pfeiffer", ffn_output_modules=["proj_out"],
                                                     reduction_factor=8))
    layer = model.get_base_model().proj_out
    x = torch.randn(3, 24)
    y0 = model(x)
    torch.testing.assert_close(y0, TwoLayer.__call__(model.get_base_model(), x))
    perturb_adapter(model)
    h = layer.base_layer(model.get_base_model().act(model.get_base_model().proj_in(x)))
    expect = h + layer.adapter_up["default"](F.relu(layer.adapter_down["default"](h)))
    torch.testing.assert_close(layer(model.get_base_model().act(model.get_base_model().proj_in(x))), expect)


# ---- IA³ ---------------------------------------------------------------------------------------------------------

def test_ia3_scales_outputs_or_feedforward_inputs():
    model = get_peft_model(TwoLayer(), IA3Config(target_modules=["proj_in", "proj_out"],
                                                 feedforward_modules=["proj_out"]))
    perturb_adapter(model)
    base = model.get_base_model()
    x = torch.randn(4, 24)
    h = torch.randn(4, 40)
    l_in, l_out = base.proj_in.ia3_l["default"], base.proj_out.ia3_l["default"]
    assert l_in.shape == (40, 1) and l_out.shape == (1, 40)
    torch.testing.assert_close(base.proj_in(x), base.proj_in.base_layer(x) * l_in.flatten())
    torch.testing.assert_close(base.proj_out(h), base.proj_out.base_layer(h * l_out.flatten()))
    with pytest.raises(ValueError, match="subset"):
        IA3Config(target_modules=["a"], feedforward_modules=["b"])


def test_ia3_merge_into_nf4_is_within_rounding_and_unmerge_exact():
    model = get_peft_model(nf4q.quantize_model(tiny_llama(), progress=False), IA3Config())
    assert isinstance(model.get_base_model().model.layers[0].self_attn.k_proj, IA3Layer)
    perturb_adapter(model, scale=0.3)
    b = batch()
    out = logits(model, b)
    layers = [m for m in model.get_base_model().modules() if isinstance(m, IA3Layer)]
    assert {m.is_feedforward for m in layers} == {False, True}  # k/v scale W's rows, down_proj its columns
    expect = [nf4q.quantize(m.base_layer.dequantize(torch.float32) * m.ia3_l["default"].float()).dequantize()
              for m in layers]
    with pytest.warns(UserWarning, match="requantiz"):
        model.merge_adapter()
    merged = logits(model, b)
    assert 0 < (merged - out).norm() / out.norm() < 0.1
    for m, w in zip(layers, expect):  # exactly one NF4 rounding of l ⊙ W, on the right axis
        assert torch.equal(m.base_layer.dequantize(), w)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, b), out, rtol=0, atol=0)


# ---- prompt tuning -------------------------------------------------------------------------------------------

def test_prompt_tuning_extends_mask_and_labels():
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=NVT))
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    b = batch()
    out = model(**b)
    assert out.logits.shape == (2, NVT + 8, 64)
    # the loss only counts real tokens (the last virtual token predicts the first real one)
    shifted = out.logits[:, NVT - 1:-1].reshape(-1, 64)
    expect = F.cross_entropy(shifted, b["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expect)
    # the padded positions of row 0 are masked: changing their tokens does not change other positions
    ids2 = b["input_ids"].clone()
    ids2[0, :2] = 5
    with torch.no_grad():
        a = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, NVT + 2:]
        c = model(input_ids=ids2, attention_mask=b["attention_mask"]).logits[0, NVT + 2:]
    torch.testing.assert_close(a, c)


def test_prompt_tuning_text_init():
    class Tok:  # the tokenizer interface used: __call__(text) -> {"input_ids": [...]}
        def __call__(self, text):
            return {"input_ids": [ord(ch) % 60 + 3 for ch in text]}

    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="abc"),
                           tokenizer=Tok())
    ids = torch.tensor([ord(c) % 60 + 3 for c in "abcab"])
    expect = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expect)
    with pytest.raises(ValueError, match="tokenizer"):
        get_peft_model(tiny_llama(), PromptTuningConfig(init="text", init_text="abc"))
    with pytest.raises(ValueError, match="init_text"):
        PromptTuningConfig(init="text")


def greedy(model, ids, n):
    cur = ids
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[:, -1].argmax(-1, keepdim=True)
        cur = torch.cat([cur, nxt], 1)
    return cur


@pytest.mark.parametrize("make, use_cache", [
    (lambda: PromptTuningConfig(num_virtual_tokens=NVT), True),
    (lambda: PrefixTuningConfig(num_virtual_tokens=NVT), True),
    (lambda: PrefixTuningConfig(num_virtual_tokens=NVT), False),  # no cache: a frozen prefix cache every step
], ids=["prompt", "prefix", "prefix-no-cache"])
def test_generate_matches_greedy_forward(make, use_cache):
    model = get_peft_model(tiny_llama(), make())
    perturb_adapter(model, scale=1.0)
    ids = batch()["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         use_cache=use_cache)
    assert torch.equal(out, greedy(model, ids, 4))
    with model.disable_adapter():
        assert not torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), out)


# ---- prefix tuning -------------------------------------------------------------------------------------------

def test_prefix_tuning_needs_a_kv_cache_model():
    with pytest.raises(ValueError, match="KV cache"):
        get_peft_model(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=NVT))


def test_prefix_positions_and_mask():
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=NVT))
    perturb_adapter(model)
    b = batch()
    out = logits(model, b)
    assert out.shape == (2, 8, 64)
    ids2 = b["input_ids"].clone()
    ids2[0, :2] = 5  # masked positions must not matter
    torch.testing.assert_close(logits(model, {**b, "input_ids": ids2})[0, 2:], out[0, 2:])
    with pytest.raises(ValueError, match="supplies"):
        model(input_ids=b["input_ids"], cache=object())
