"""nf4q.from_pretrained: streaming a (sharded) safetensors checkpoint into an NF4 model equals quantize_model after a
full load, bit for bit; skip; the file errors; and (CUDA) the peak memory bound on an 8B-shaped checkpoint."""
import json

import pytest
import torch
from torch import nn

import nf4q
from nf4q.checkpoint import load_pretrained

transformers = pytest.importorskip("transformers")


def _tiny(path, tie=False, dtype=torch.float32, seed=0, shard="60KB"):
    """A 2-layer Llama saved in several shards (model.safetensors.index.json), odd intermediate size."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def _ids(seed=1):
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def _shard_files(path):
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.bfloat16), (True, torch.float32),
                                       (False, torch.bfloat16)])
def test_equals_quantize_model_after_a_full_load(tmp_path, tie, dtype):
    src = _tiny(tmp_path / "m", tie=tie, dtype=dtype, seed=int(tie))
    assert len(_shard_files(src)) >= 3
    ours = nf4q.from_pretrained(src, device="cpu", progress=False)
    ref = nf4q.quantize_model(load_pretrained(src), progress=False)
    assert torch.equal(_logits(ours), _logits(ref))
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.device.type == "cpu" and p.dtype == ref_params[name].dtype and torch.equal(p, ref_params[name]), name
    for name, b in ref.named_buffers():
        assert torch.equal(ours.get_buffer(name), b), name
    assert isinstance(ours.model.layers[1].mlp.down_proj, nf4q.Linear4bit)
    assert type(ours.lm_head) is nn.Linear
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    assert ours.model.embed_tokens.weight.dtype == dtype and not ours.training


def test_single_file_skip_and_options(tmp_path):
    src = _tiny(tmp_path / "m", shard="10GB")
    assert (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").exists()
    opts = dict(skip=("lm_head", "down_proj"), blocksize=128, double_quant=False)
    ours = nf4q.from_pretrained(src, device="cpu", progress=False, compute_dtype=torch.float32, **opts)
    ref = nf4q.quantize_model(load_pretrained(src), progress=False, compute_dtype=torch.float32, **opts)
    assert type(ours.model.layers[0].mlp.down_proj) is nn.Linear and type(ours.lm_head) is nn.Linear
    up = ours.model.layers[0].mlp.up_proj
    assert up.blocksize == 128 and up.weight_nested_absmax is None and up.compute_dtype == torch.float32
    assert torch.equal(_logits(ours), _logits(ref))


def test_tied_output_layer_quantized_when_not_skipped(tmp_path):
    src = _tiny(tmp_path / "m", tie=True)
    ours = nf4q.from_pretrained(src, device="cpu", progress=False, skip=())
    ref = nf4q.quantize_model(load_pretrained(src), progress=False, skip=())
    assert isinstance(ours.lm_head, nf4q.Linear4bit) and type(ours.model.embed_tokens) is nn.Embedding
    assert torch.equal(_logits(ours), _logits(ref))


def test_dtype_from_the_tensors_when_config_names_none(tmp_path):
    src = _tiny(tmp_path / "m", dtype=torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))
    model = nf4q.from_pretrained(src, device="cpu", progress=False)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16


def test_quantized_directory_goes_through_load_quantized(tmp_path):
    out = nf4q.save_quantized(_tiny(tmp_path / "m"), tmp_path / "nf4", progress=False)
    model = nf4q.from_pretrained(out, device="cpu", progress=False)
    assert torch.equal(_logits(model), _logits(nf4q.load_quantized(out)))


def test_missing_shard_names_file_and_tensor(tmp_path):
    src = _tiny(tmp_path / "m")
    gone = _shard_files(src)[1]
    held = [k for k, v in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].items()
            if v == gone]
    (src / gone).unlink()
    with pytest.raises(nf4q.FormatError, match=gone) as e:
        nf4q.from_pretrained(src, device="cpu", progress=False)
    assert "missing" in str(e.value) and held[0] in str(e.value)


@pytest.mark.parametrize("keep", [0.97, 0.3, 0.001])
def test_truncated_shard_names_file_and_tensor(tmp_path, keep):
    src = _tiny(tmp_path / "m")
    name = _shard_files(src)[-1]
    f = src / name
    data = f.read_bytes()
    f.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(nf4q.FormatError, match=name) as e:
        nf4q.from_pretrained(src, device="cpu", progress=False)
    held = [k for k, v in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].items()
            if v == name]
    assert any(k in str(e.value) for k in held)


@pytest.mark.parametrize("key", ["model.layers.1.post_attention_layernorm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_wrong_shape_names_file_and_tensor(tmp_path, key):
    from safetensors.torch import load_file, save_file

    src = _tiny(tmp_path / "m")
    name = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]
    sd = load_file(str(src / name))
    sd[key] = torch.randn(sd[key].shape[0] + 1, *sd[key].shape[1:])
    save_file(sd, str(src / name), metadata={"format": "pt"})
    with pytest.raises(nf4q.FormatError, match=name) as e:
        nf4q.from_pretrained(src, device="cpu", progress=False)
    assert key in str(e.value) and "shape" in str(e.value)


def test_missing_and_unknown_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _tiny(tmp_path / "m", shard="10GB")
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(nf4q.FormatError, match="model.norm.weight"):
        nf4q.from_pretrained(src, device="cpu", progress=False)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(nf4q.FormatError, match="model.extra.weight"):
        nf4q.from_pretrained(src, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        nf4q.from_pretrained(tmp_path, device="cpu")


def _write_8b_shaped(path, layers=32):
    """Llama-3-8B shapes (bf16, 32 layers), random, one shard per layer written as generated (16 GB on disk)."""
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   tie_word_embeddings=False, dtype="bfloat16",
                                   architectures=["LlamaForCausalLM"])
    path.mkdir()
    cfg.save_pretrained(path)
    g = torch.Generator("cuda").manual_seed(0)
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
              "mlp.down_proj": (4096, 14336)}
    weight_map, largest = {}, 0

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

    def shard(name, tensors):
        nonlocal largest
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        largest = max(largest, *(t.numel() * 2 for t in tensors.values()))

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(128256, 4096)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + k + ".weight": rand(*s) for k, s in shapes.items()}
        t.update({p + "input_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16)})
        shard(f"layer{i}.safetensors", t)
    shard("head.safetensors", {"model.norm.weight": torch.ones(4096, dtype=torch.bfloat16),
                               "lm_head.weight": rand(128256, 4096)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return largest


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_8b_shaped(tmp_path):
    largest = _write_8b_shaped(tmp_path / "8b")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = nf4q.from_pretrained(tmp_path / "8b", device="cuda", progress=False)
    torch.cuda.synchronize()
    peak, final = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert isinstance(model.model.layers[31].mlp.down_proj, nf4q.Linear4bit)
    # NF4 Linears (~3.5 GiB at 4.13 bits) + bf16 embeddings and lm_head (2 x 1 GiB) + norms
    assert final < 7 * 2**30
    assert peak <= 1.10 * (final + largest), (peak / 2**30, final / 2**30, largest / 2**30)
    with torch.no_grad():
        logits = model(torch.randint(0, 128256, (1, 8), device="cuda")).logits
    assert logits.shape == (1, 8, 128256) and bool(torch.isfinite(logits).all())
