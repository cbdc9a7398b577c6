"""NF4 checkpoints of transformers models, in the layout transformers + bitsandbytes write for 4-bit models.

save_quantized(IN_DIR or model, OUT_DIR) writes `model.safetensors` (quantized Linears under bitsandbytes' keys,
everything else as is) and `config.json` carrying the `quantization_config` that
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).to_dict()` produces, so
`AutoModel.from_pretrained(OUT_DIR)` loads it with bitsandbytes, and `load_quantized(OUT_DIR)` loads it with
nf4q's Linear4bit (checkpoints that transformers + bitsandbytes saved load the same way).
"""
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .grouping import group_projections
from .linear import Linear4bit, quantize_model
from .tensor import _DTYPES, QS_KEY, FormatError, NF4Weight, _dtype_name

WEIGHTS_NAME = "model.safetensors"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


def quantization_config(compute_dtype=torch.float32, double_quant: bool = True, skip_modules=None) -> dict:
    """The dict transformers stores under config.json's `quantization_config` for an NF4 bitsandbytes model.

    Same keys and values as transformers' BitsAndBytesConfig(...).to_dict() (checked against transformers
    5.24 in tests); written literally so that saving does not need bitsandbytes."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _offline():
    # Everything here reads local directories; never let transformers reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def load_pretrained(path, dtype="auto") -> nn.Module:
    """A local transformers model directory -> the model (class from config.architectures), offline."""
    _offline()
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{path} is already quantized; use nf4q.load_quantized({str(path)!r})")
    return _model_class(config).from_pretrained(path, dtype=dtype, local_files_only=True)


def _default_skip(model) -> list:
    """Modules transformers keeps in full precision too: the output embeddings (lm_head) and _keep_in_fp32."""
    skip = ["lm_head"]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip += [name for name, m in model.named_modules() if out is not None and m is out and name]
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def _unshare(sd: dict) -> dict:
    """safetensors refuses tensors that share memory (the NF4/nested tables are one tensor across layers, and
    tied embeddings are one Parameter): clone the repeats."""
    seen, out = set(), {}
    for key, t in sd.items():
        t = t.detach().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t.cpu()
    return out


def save_quantized(model_or_path: Union[str, Path, nn.Module], out_dir: Union[str, Path], *,
                   skip: Optional[Iterable[str]] = None, blocksize: int = 64, double_quant: bool = True,
                   nested_map="fp8_e4m3", compute_dtype=None, progress: bool = True) -> Path:
    """Quantize every nn.Linear of a transformers model (except `skip`, default: lm_head/output embeddings and
    the model's _keep_in_fp32_modules) to NF4 and write a bitsandbytes-compatible checkpoint to `out_dir`.

    `model_or_path` is a local model directory (tokenizer and other files are copied along) or a loaded
    transformers model (quantized in place). Returns the output directory."""
    from safetensors.torch import save_file

    in_dir = None
    if isinstance(model_or_path, (str, Path)):
        in_dir = Path(model_or_path)
        model = load_pretrained(in_dir)
    elif isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        raise TypeError(f"model_or_path must be a directory or an nn.Module, got {type(model_or_path).__name__}")
    if not hasattr(model, "config"):
        raise TypeError("model_or_path must be a transformers model (it needs a .config)")
    out_dir = Path(out_dir)
    if in_dir is not None and out_dir.resolve() == in_dir.resolve():
        raise ValueError("out_dir must differ from the input directory")

    # one name is one pattern (list() of a str would split it into characters)
    skip = _default_skip(model) if skip is None else [skip] if isinstance(skip, str) else list(skip)
    float_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    model_dtype = next(iter(float_dtypes)) if len(float_dtypes) == 1 else torch.float32
    compute_dtype = compute_dtype or model_dtype
    quantize_model(model, skip=tuple(skip), progress=progress, compute_dtype=compute_dtype, blocksize=blocksize,
                   double_quant=double_quant, nested_map=nested_map)
    kept = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)

    out_dir.mkdir(parents=True, exist_ok=True)
    if in_dir is not None:  # tokenizer, generation config, sentence-transformers extras ...
        for item in in_dir.rglob("*"):
            rel = item.relative_to(in_dir)
            if item.is_file() and rel != Path("config.json") and not rel.name.endswith(_WEIGHT_FILES) \
                    and not rel.name.endswith(".index.json") and not any(p.startswith(".") for p in rel.parts):
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, out_dir / rel)
    sd = model.state_dict()
    tied = _tied_duplicates(model, sd)
    save_file(_unshare({k: v for k, v in sd.items() if k not in tied}), str(out_dir / WEIGHTS_NAME),
              metadata={"format": "pt"})
    config = model.config
    config.quantization_config = quantization_config(compute_dtype, double_quant, kept)
    config.dtype = model_dtype
    config.save_pretrained(out_dir)
    return out_dir


def _tied_duplicates(model, sd) -> set:
    """Keys transformers re-ties on load (e.g. lm_head.weight = embed_tokens.weight); not written, as it does."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {t for t, s in tied.items() if t in sd and s in sd and sd[t].data_ptr() == sd[s].data_ptr()}


# ---- loading -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device (no memory) but real buffers (rotary tables,
    position ids), which a checkpoint does not hold."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_config(path: Path) -> dict:
    try:
        with open(path / "config.json") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no config.json: not a saved model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path / 'config.json'} is not a JSON object")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") \
            or qc.get("bnb_4bit_quant_type") != "nf4":
        raise FormatError(f"{path / 'config.json'}: quantization_config is not bitsandbytes 4-bit NF4 ({qc!r})")
    return cfg


def load_state_dict(path: Union[str, Path]) -> dict:
    """Every tensor of a directory's *.safetensors files (or of one file), on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as e:  # safetensors' own SafetensorError, or an OSError/ValueError of a truncated file
            raise FormatError(f"{f} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return sd


def load_quantized(path: Union[str, Path], device=None, compute_dtype=None) -> nn.Module:
    """Load an NF4 checkpoint written by save_quantized (or by transformers + bitsandbytes) into its
    transformers model class, with nf4q.Linear4bit for every quantized Linear. Needs no bitsandbytes."""
    _offline()
    from transformers import AutoConfig

    path = Path(path)
    cfg = _read_config(path)
    qc = cfg["quantization_config"]
    compute_dtype = compute_dtype or _DTYPES.get(str(qc.get("bnb_4bit_compute_dtype", "float32")), torch.float32)
    sd = load_state_dict(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    del config.quantization_config  # the model is built plain; Linear4bit replaces the quantized Linears
    dtype = _DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)
    with _params_on_meta():
        model = _model_class(config)._from_config(config, dtype=dtype)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.{QS_KEY}" in sd:
            qw = NF4Weight.from_state_dict(sd, f"{name}.")
            if tuple(qw.shape) != (module.out_features, module.in_features):
                raise FormatError(f"{path}: {name}.weight has shape {tuple(qw.shape)}, the model's config says "
                                  f"({module.out_features}, {module.in_features})")
            layer = Linear4bit.__new__(Linear4bit)
            nn.Module.__init__(layer)
            layer.in_features, layer.out_features, layer.compute_dtype = module.in_features, module.out_features, \
                compute_dtype
            layer.set_quantized(qw)
            bias = sd.get(f"{name}.bias")
            if (bias is None) != (module.bias is None):
                raise FormatError(f"{name}: bias presence differs between config and checkpoint")
            if bias is not None and (bias.shape != (module.out_features,) or not bias.is_floating_point()):
                raise FormatError(f"{path}: {name}.bias must be a float tensor of shape ({module.out_features},), "
                                  f"got {bias.dtype} {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias) if bias is not None else None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            for key in [k for k in sd if k.startswith(name + ".weight") or k == name + ".bias"]:
                del sd[key]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches of the unquantized tensors
        raise FormatError(f"{path}: {e}") from None
    if unexpected:
        raise FormatError(f"{path}: tensors that {type(model).__name__} does not have: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise FormatError(f"{path}: the checkpoint lacks {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}")
    model.eval()
    group_projections(model)
    return model.to(device) if device is not None else model


__all__ = ["save_quantized", "load_quantized", "quantization_config", "load_pretrained", "load_state_dict"]
