"""Adapter files: save -> load under another seed gives the same outputs for every method, PEFT's exact key
names and config, interchange with the real `peft` package both ways, and clear errors for bad files."""
import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_helpers import batch, logits, perturb_adapter, same_weights, tiny_bert, tiny_gpt2, tiny_llama, train
from peft_layers import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    LoRALayer,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    read_config,
)

# Only the interchange tests need the real `peft` (the interop extra); the others run without it.
HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="the interop extra peft is not installed")
if HAVE_PEFT:
    import peft

OURS = {
    "lora": (tiny_llama, lambda: LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)),
    "lora-gpt2": (tiny_gpt2, lambda: LoRAConfig(r=2, target_modules="all-linear")),
    "lora-bert-save": (tiny_bert, lambda: LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                                     bias="lora_only")),
    "ia3": (tiny_llama, lambda: IA3Config()),
    "adapter": (tiny_llama, lambda: AdapterConfig(reduction_factor=8)),
    "prompt": (tiny_llama, lambda: PromptTuningConfig(num_virtual_tokens=4)),
    "prefix": (tiny_llama, lambda: PrefixTuningConfig(num_virtual_tokens=4)),
    "prefix-proj": (tiny_gpt2, lambda: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True)),
}


def saved(tmp_path, case, train_steps=0):
    factory, make = OURS[case]
    model = get_peft_model(factory(), make())
    perturb_adapter(model)
    task = "cls" if factory is tiny_bert else "lm"
    if train_steps:
        train(model, batch(task), steps=train_steps)
    model.eval()
    model.save_pretrained(str(tmp_path))
    return model, factory, task


@pytest.mark.parametrize("case", list(OURS))
def test_save_load_round_trip_under_another_seed(tmp_path, case):
    model, factory, task = saved(tmp_path, case, train_steps=1 if case == "prefix-proj" else 0)
    b = batch(task)
    expect = logits(model, b)
    torch.manual_seed(1234)  # a fresh adapter would be initialised differently
    loaded = PeftModel.from_pretrained(same_weights(factory), str(tmp_path))
    torch.testing.assert_close(logits(loaded, b), expect, rtol=0, atol=1e-6)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    trainable = PeftModel.from_pretrained(same_weights(factory), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0
    torch.testing.assert_close(logits(trainable, b), expect, rtol=0, atol=1e-6)


def test_peft_key_names_config_and_metadata(tmp_path):
    model, _, _ = saved(tmp_path, "lora")
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    expect = {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
              for i in (0, 1) for p in ("q_proj", "v_proj") for ab in "AB"}
    assert set(sd) == expect
    assert sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["init_lora_weights"] is True
    assert cfg["inference_mode"] is True and "init" not in cfg
    assert read_config(str(tmp_path)) == LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.1, inference_mode=True)


@pytest.mark.parametrize("case, keys", [
    ("ia3", {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": (16, 1),
             "base_model.model.model.layers.1.mlp.down_proj.ia3_l": (1, 64)}),
    ("prompt", {"prompt_embeddings": (4, 32)}),
    ("prefix", {"prompt_embeddings": (4, 2 * 2 * 16)}),
    ("prefix-proj", {"prompt_embeddings": (4, 2 * 2 * 32)}),  # the projected prefix, as PEFT saves it
    ("adapter", {"base_model.model.model.layers.0.mlp.down_proj.adapter_up.weight": (32, 4)}),
    ("lora-bert-save", {"base_model.model.classifier.weight": (3, 32),
                        "base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.bias": (32,)}),
])
def test_other_methods_key_names(tmp_path, case, keys):
    saved(tmp_path, case)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    for key, shape in keys.items():
        assert tuple(sd[key].shape) == shape, key
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == \
        {"ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "prefix-proj": "PREFIX_TUNING",
         "adapter": "BOTTLENECK_ADAPTER", "lora-bert-save": "LORA"}[case]


# ---- interchange with the real peft package ------------------------------------------------------------------

PEFT_CASES = {
    "lora": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "lora-gpt2": (tiny_gpt2, lambda: peft.LoraConfig(r=2, target_modules="all-linear", fan_in_fan_out=True)),
    "ia3": (tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"])),
    "prompt": (tiny_llama, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix": (tiny_llama, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
}


@needs_peft
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_loads_our_files(tmp_path, case):
    model, factory, task = saved(tmp_path, case)
    b = batch(task)
    theirs = peft.PeftModel.from_pretrained(same_weights(factory), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, b), logits(model, b), rtol=0, atol=1e-6)


@needs_peft
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_we_load_peft_files(tmp_path, case):
    factory, make = PEFT_CASES[case]
    theirs = peft.get_peft_model(factory(), make())
    perturb_adapter(theirs)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    b = batch()
    torch.manual_seed(99)
    ours = PeftModel.from_pretrained(same_weights(factory), str(tmp_path))
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), rtol=0, atol=1e-6)


# ---- several adapters --------------------------------------------------------------------------------------

def test_named_adapters_go_to_subfolders(tmp_path):
    model = get_peft_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoRAConfig(r=3, target_modules=["v_proj"]))
    model.set_adapter("other")
    perturb_adapter(model)
    b = batch()
    expect = logits(model, b)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(same_weights(tiny_llama), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, b), expect, rtol=0, atol=1e-6)


# ---- bad files -----------------------------------------------------------------------------------------------

def _fresh_lora_model():
    return same_weights(tiny_llama)


def _no_lora_left(model):
    return not any(isinstance(m, LoRALayer) for m in model.modules())


def test_truncated_and_foreign_weight_files(tmp_path):
    saved(tmp_path, "lora")
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = _fresh_lora_model()
    with pytest.raises(ValueError, match="adapter_model.safetensors.*(truncated|safetensors)"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert _no_lora_left(model)
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))


def test_wrong_keys_and_shapes_name_the_file_and_key(tmp_path):
    saved(tmp_path, "lora")
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    # a plain model state dict (adapter name still in the keys) is another format
    save_file({k.replace("lora_A.", "lora_A.default."): v for k, v in sd.items()}, str(path))
    model = _fresh_lora_model()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is missing key "
                                         r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert _no_lora_left(model)
    sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 5)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight' has shape \(16, 5\), expected \(16, 4\)"):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))
    # LoRA weights under an IA3 config: the IA3 keys are missing
    save_file(load_file(str(path)), str(path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(IA3Config().to_dict()))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is missing key '.*ia3_l'"):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))


@pytest.mark.parametrize("text, match", [
    ("{not json", r"adapter_config\.json is not valid JSON"),
    ('{"r": 4}', r"adapter_config\.json: missing key 'peft_type'"),
    ('{"peft_type": "LOHA"}', r"adapter_config\.json: 'peft_type' 'LOHA' is not supported"),
    ('{"peft_type": "LORA", "r": -2}', r"adapter_config\.json: r must be a positive int"),
    ('{"peft_type": "LORA", "lora_bias": true}', r"adapter_config\.json: 'lora_bias'=True is not supported"),
    ("[1, 2]", r"adapter_config\.json: expected a JSON object"),
])
def test_bad_config_files(tmp_path, text, match):
    saved(tmp_path, "lora")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))
    saved(tmp_path, "lora")
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(_fresh_lora_model(), str(tmp_path))
