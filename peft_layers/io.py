"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors (PEFT's key names, adapter
name removed, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight). Bad files raise ValueError
naming the file and, where there is one, the key."""
import json
import os
from typing import List, Optional

import torch

from .config import PeftConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_dir(directory: str, adapter_name: str) -> str:
    """PEFT puts the "default" adapter at the top and any other under a subfolder of its name."""
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def save_adapters(peft_model, directory: str, selected_adapters: Optional[List[str]] = None) -> None:
    from safetensors.torch import save_file

    names = selected_adapters or list(peft_model.peft_config)
    for name in names:
        if name not in peft_model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(peft_model.peft_config)}")
        out = adapter_dir(directory, name)
        os.makedirs(out, exist_ok=True)
        # copies: safetensors refuses tensors sharing storage, and the file must not alias live parameters
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in peft_model.adapter_state_dict(name).items()}
        save_file(tensors, os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"})
        config = peft_model.peft_config[name].to_dict()
        config["inference_mode"] = True  # as PEFT writes it; from_pretrained(is_trainable=True) turns it off
        with open(os.path.join(out, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def read_config(directory: str) -> PeftConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: not an adapter directory")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return PeftConfig.from_dict(data, source=path)


def read_weights(directory: str) -> tuple:
    """(tensors, path) from adapter_model.safetensors (or PEFT's older adapter_model.bin)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu"), path
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or another format?): {e}") from None
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt pickles
            raise ValueError(f"{legacy} is not a readable torch state dict: {e}") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{legacy} holds a {type(sd).__name__}, not a state dict")
        return sd, legacy
    raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def _config_for_load(directory: str, is_trainable: bool, config: Optional[PeftConfig]) -> PeftConfig:
    config = config if config is not None else read_config(directory)
    config.inference_mode = not is_trainable
    return config


def load_pretrained(cls, model, directory: str, adapter_name: str, is_trainable: bool, config=None):
    config = _config_for_load(directory, is_trainable, config)
    tensors, path = read_weights(directory)
    peft_model = cls(model, config, adapter_name=adapter_name, _from_file=True)
    try:
        peft_model.load_adapter_state_dict(adapter_name, tensors, source=path)
    except ValueError:
        peft_model.unload()  # leave the caller's model as it was
        raise
    return peft_model if is_trainable else peft_model.eval()


def load_into(peft_model, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
    config = _config_for_load(directory, is_trainable, None)
    tensors, path = read_weights(directory)
    peft_model.add_adapter(adapter_name, config, _from_file=True)
    try:
        peft_model.load_adapter_state_dict(adapter_name, tensors, source=path)
    except ValueError:
        peft_model.delete_adapter(adapter_name)
        raise
