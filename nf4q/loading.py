"""from_pretrained: a transformers model directory -> an NF4 model, streaming, without ever holding it in bf16.

The model is built from its config with parameters on the meta device; the safetensors shards (index file or one
file) are read tensor by tensor; each Linear weight is quantized on `device` as it arrives and every other tensor
is placed there. Peak device memory is the NF4 model plus about one bf16 weight; host memory one tensor at a time.
The result equals `quantize_model(load_pretrained(path))` bit for bit (same quantization, same dtypes).
Each rank of an FSDP job can call it for the shards it owns: nothing else is read.
"""
import json
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .checkpoint import _DTYPES, _model_class, _offline, _params_on_meta, load_quantized
from .grouping import group_projections
from .linear import Linear4bit
from .naming import matches
from .tensor import FormatError, quantize

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _shards(path: Path) -> dict:
    """{shard file: [tensor names]} from the index file, or from the single model.safetensors."""
    from safetensors import SafetensorError, safe_open

    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        shards = {}
        for name, fname in weight_map.items():
            shards.setdefault(path / fname, []).append(name)
        for f, names in shards.items():
            if not f.is_file():
                raise FormatError(f"{f}: shard named in {index.name} is missing (it holds {names[0]!r} and "
                                  f"{len(names) - 1} more tensors)")
        return shards
    single = path / SINGLE_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME} (only safetensors is streamed)")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {single: list(f.keys())}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{single}: not a readable safetensors file ({e})") from None


def _first_float_dtype(shards) -> torch.dtype:
    """What transformers' dtype="auto" falls back to when config.json names no dtype."""
    from safetensors import SafetensorError, safe_open

    for fname in shards:
        try:
            with safe_open(str(fname), framework="pt") as f:
                for key in f.keys():
                    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
                        f.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        except (SafetensorError, OSError):
            continue  # reported with the file and tensor names when the shard is read
    return torch.float32


def _target(names: set, key: str, base_prefix: str) -> Optional[str]:
    """The model's name for checkpoint key `key` (checkpoints of the base model lack the `model.` prefix)."""
    if key in names:
        return key
    if base_prefix and base_prefix + "." + key in names:
        return base_prefix + "." + key
    if base_prefix and key.startswith(base_prefix + ".") and key[len(base_prefix) + 1:] in names:
        return key[len(base_prefix) + 1:]
    return None


def _quantized_linear(linear: nn.Linear, weight: torch.Tensor, compute_dtype, blocksize, double_quant):
    layer = Linear4bit.__new__(Linear4bit)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features, layer.compute_dtype = linear.in_features, linear.out_features, \
        compute_dtype
    layer.set_quantized(quantize(weight, blocksize=blocksize, double_quant=double_quant))
    layer.bias = linear.bias  # still on meta when the bias comes later in the checkpoint
    layer.train(linear.training)
    return layer


def from_pretrained(path_or_dir: Union[str, Path], device="cuda", compute_dtype=None,
                    skip: Iterable[str] = ("lm_head",), blocksize: int = 64, double_quant: bool = True,
                    progress: bool = True) -> nn.Module:
    """Load a local transformers model directory (safetensors, one file or sharded) with every nn.Linear, except
    those matching `skip` (nf4q.naming.matches, as in quantize_model), quantized to NF4 on `device`.

    Directories that are already quantized (nf4q or bitsandbytes) go through nf4q.load_quantized. Errors in the
    files (a missing or truncated shard, a tensor of the wrong shape, one the model lacks or lacks one) raise
    nf4q.FormatError naming the file and tensor; no partly loaded model is returned."""
    _offline()
    from safetensors import SafetensorError, safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    path = Path(path_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    device = torch.device(device)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("quantization_config") is not None:
        return load_quantized(path, device=device, compute_dtype=compute_dtype)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    shards = _shards(path)
    dtype = _DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype")), None) or _first_float_dtype(shards)
    with _params_on_meta():
        model = _model_class(config)._from_config(config, dtype=dtype)
    model.eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, Linear4bit) and not matches(name, skip)}
    names = set(params) | set(buffers)
    base_prefix = getattr(model, "base_model_prefix", "") or ""
    loaded = set()
    with tqdm(total=sum(map(len, shards.values())), desc="loading to NF4", unit="tensor",
              disable=not progress) as bar:
        for fname, keys in shards.items():
            try:
                handle = safe_open(str(fname), framework="pt")
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{fname}: not a readable safetensors file, truncated or corrupt (it should "
                                  f"hold {keys[0]!r}; {e})") from None
            with handle:
                present = set(handle.keys())
                for key in keys:
                    if key not in present:
                        raise FormatError(f"{fname}: lacks tensor {key!r}, which the index places there")
                    name = _target(names, key, base_prefix)
                    if name is None:
                        raise FormatError(f"{fname}: tensor {key!r} is not in {type(model).__name__}")
                    if name in loaded:
                        raise FormatError(f"{fname}: tensor {key!r} appears twice in the checkpoint")
                    _place(model, handle, fname, key, name, params.get(name, buffers.get(name)), linears,
                           device, compute_dtype, blocksize, double_quant)
                    loaded.add(name)
                    bar.update(1)
    _tie_and_finish(model, path, linears, device, compute_dtype, blocksize, double_quant)
    group_projections(model)
    return model


def _place(model, handle, fname, key, name, expected, linears, device, compute_dtype, blocksize, double_quant):
    """Read one tensor, check its shape against the meta model's `expected`, quantize (Linear weight) or place it."""
    from safetensors import SafetensorError

    try:
        shape = tuple(handle.get_slice(key).get_shape())
    except SafetensorError as e:
        raise FormatError(f"{fname}: cannot read tensor {key!r} ({e})") from None
    if shape != tuple(expected.shape):
        raise FormatError(f"{fname}: tensor {key!r} has shape {shape}, {type(model).__name__} expects "
                          f"{tuple(expected.shape)}")
    try:
        tensor = handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:  # data past the end of a truncated file
        raise FormatError(f"{fname}: cannot read tensor {key!r}, the file is truncated or corrupt ({e})") from None
    # the dtype the model would have after transformers' loader (which casts floating tensors to it)
    dtype = expected.dtype if tensor.is_floating_point() else tensor.dtype
    tensor = tensor.to(device=device, dtype=dtype)
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr == "weight" and mod_name in linears:
        layer = _quantized_linear(linears[mod_name], tensor, compute_dtype, blocksize, double_quant)
        _set_module(model, mod_name, layer)
        linears[mod_name] = layer
    elif isinstance(expected, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=expected.requires_grad))
    else:
        module.register_buffer(attr, tensor, persistent=True)


def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _tie_and_finish(model, path, linears, device, compute_dtype, blocksize, double_quant):
    """Tie the output embeddings (as transformers does), quantize a tied Linear not skipped, move the buffers
    built at construction (rotary tables) to `device`, and refuse anything left on meta."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, m in list(linears.items()):
        if isinstance(m, nn.Linear) and m.weight.device.type != "meta":  # tied to a loaded tensor
            _set_module(model, name, _quantized_linear(m, m.weight.data, compute_dtype, blocksize, double_quant))
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise FormatError(f"{path}: the checkpoint lacks {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}")
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[bname] = buf.to(device)
    return model


__all__ = ["from_pretrained"]
