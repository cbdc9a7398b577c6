"""save_quantized / load_quantized: round trip, the transformers + bitsandbytes layout, and interop both ways."""
import copy
import json

import pytest
import torch
from torch import nn

import nf4q
from nf4q.checkpoint import QS_KEY, load_pretrained, quantization_config

transformers = pytest.importorskip("transformers")

SUFFIXES = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"}


def _tiny_llama(path, tie=False, dtype=torch.float32, seed=0, intermediate_size=160):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate_size,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    (tiny / "1_Pooling").mkdir(exist_ok=True)  # side files (tokenizer, sentence-transformers) travel along
    (tiny / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (tiny / "tokenizer_config.json").write_text("{}")
    return nf4q.save_quantized(tiny, tmp_path_factory.mktemp("out") / "nf4", progress=False)


def test_side_files_are_copied(saved):
    assert (saved / "tokenizer_config.json").read_text() == "{}"
    assert "pooling_mode_mean_tokens" in (saved / "1_Pooling" / "config.json").read_text()
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["model.safetensors"]


def _ids(seed=1):
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


def test_round_trip_gives_identical_outputs(tiny, saved):
    # The in-memory quantized model (quantization is deterministic) against the one loaded from disk.
    ref = nf4q.quantize_model(load_pretrained(tiny), progress=False)
    loaded = nf4q.load_quantized(saved)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, nf4q.Linear4bit)
    assert type(loaded.lm_head) is nn.Linear  # skipped, as transformers + bitsandbytes do
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref(_ids()).logits)
    for name, mod in ref.named_modules():
        if isinstance(mod, nf4q.Linear4bit):
            got = loaded.get_submodule(name)
            assert torch.equal(got.weight, mod.weight) and torch.equal(got.weight_absmax, mod.weight_absmax)


def test_files_match_the_bitsandbytes_layout(saved):
    from safetensors import safe_open

    cfg = json.loads((saved / "config.json").read_text())
    qc = cfg["quantization_config"]
    expected = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32).to_dict()
    assert set(qc) == set(expected)
    assert {k: v for k, v in qc.items() if k != "llm_int8_skip_modules"} == \
        {k: v for k, v in expected.items() if k != "llm_int8_skip_modules"}
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    assert cfg["dtype"] == "float32" and cfg["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        blob = f.get_tensor("model.layers.0.self_attn.q_proj." + QS_KEY)
    prefixes = {k[: -len(QS_KEY)] for k in keys if k.endswith(QS_KEY)}
    assert len(prefixes) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for p in prefixes:
        assert {k[len(p):] for k in keys if k.startswith(p + "weight")} == SUFFIXES
    assert "lm_head.weight" in keys and "lm_head.weight.absmax" not in keys
    meta = json.loads(bytes(blob.numpy()).decode())
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64],
                    "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": meta["nested_offset"]}


def test_literal_config_equals_transformers(tmp_path):
    for dq, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        ours = quantization_config(dtype, dq, None)
        theirs = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=dtype).to_dict()
        assert ours == theirs


def _bnb_linears(model, cpu_bf16_repack):
    """bitsandbytes' Linear4bit modules of `model`. On CPUs with AVX512-BF16, bitsandbytes' eval forward repacks the
    weight with bf16 scales and computes in bf16 (its fast path); off, it dequantizes in fp32 like nf4q does."""
    import bitsandbytes as bnb

    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in mods:
        m.support_avx512bf16_for_cpu = cpu_bf16_repack and m.support_avx512bf16_for_cpu
    return mods


def test_transformers_bitsandbytes_loads_ours_and_we_load_theirs(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():  # the exact check transformers makes before it will load 4-bit
        pytest.skip("transformers reports bitsandbytes unusable in this environment")
    # bitsandbytes' CPU fast path (0.50.2) reshapes absmax to [out_features, in_features / blocksize]: every
    # in_features must be a multiple of the block size (64), so intermediate_size 128 here, not 160.
    tiny = _tiny_llama(tmp_path / "tiny128", intermediate_size=128)
    saved = nf4q.save_quantized(tiny, tmp_path / "nf4", progress=False)
    ours = nf4q.load_quantized(saved)
    with torch.no_grad():
        expect = ours(_ids()).logits
    # transformers + bitsandbytes load our checkpoint: with fp32 dequantization the same logits as nf4q
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    assert len(_bnb_linears(bnb_model, cpu_bf16_repack=False)) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(bnb_model(_ids()).logits, expect, rtol=1e-5, atol=1e-5)
    # and through bitsandbytes' CPU fast path where this CPU has it: scales rounded to bf16 and bf16 compute
    # (unit roundoff 2^-8 each, a few roundings per layer, 2 layers) -> within 2^-5 of the largest logit
    # (measured: 2^-8.2)
    fast = transformers.AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    if any(m.support_avx512bf16_for_cpu for m in _bnb_linears(fast, cpu_bf16_repack=True)):
        with torch.no_grad():
            got = fast(_ids()).logits
        err = (got - expect).abs().max().item()
        assert err <= 2**-5 * expect.abs().max().item()
    # the other way: a checkpoint that transformers + bitsandbytes quantized and saved loads into nf4q
    # (transformers cannot re-save a model it loaded pre-quantized, so quantize from the fp32 directory)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    bnb_q = transformers.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, device_map="cpu")
    _bnb_linears(bnb_q, cpu_bf16_repack=False)
    bnb_q.save_pretrained(tmp_path / "bnb")
    back = nf4q.load_quantized(tmp_path / "bnb")
    assert isinstance(back.model.layers[0].self_attn.v_proj, nf4q.Linear4bit)
    assert isinstance(back.model.layers[1].mlp.down_proj, nf4q.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(2)).logits, bnb_q(_ids(2)).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_and_bf16(tmp_path):
    src = _tiny_llama(tmp_path / "tied", tie=True, dtype=torch.bfloat16, seed=3)
    out = nf4q.save_quantized(src, tmp_path / "tied_nf4", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    model = nf4q.load_quantized(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = nf4q.quantize_model(load_pretrained(src), progress=False, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)


def test_in_memory_model_and_options(tiny, tmp_path):
    model = load_pretrained(tiny)
    out = nf4q.save_quantized(copy.deepcopy(model), tmp_path / "o", skip=["down_proj", "lm_head"], blocksize=128,
                              double_quant=False, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is False
    assert set(qc["llm_int8_skip_modules"]) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                "model.layers.1.mlp.down_proj"}
    loaded = nf4q.load_quantized(out)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    up = loaded.model.layers[0].mlp.up_proj
    assert up.blocksize == 128 and up.weight_nested_absmax is None
    # a single name as a str is one pattern, not a list of characters
    out = nf4q.save_quantized(copy.deepcopy(model), tmp_path / "s", skip="lm_head", progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == [
        "lm_head"]


def test_errors(tiny, saved, tmp_path):
    with pytest.raises(nf4q.FormatError, match="quantization_config"):
        nf4q.load_quantized(tiny)  # a plain model directory
    with pytest.raises(ValueError, match="already quantized"):
        nf4q.save_quantized(saved, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="config.json"):
        nf4q.save_quantized(tmp_path, tmp_path / "x")
    with pytest.raises(TypeError, match="model_or_path"):
        nf4q.save_quantized(42, tmp_path / "x")
