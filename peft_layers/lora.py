"""LoRA layers on nn.Linear, nf4q.Linear4bit (QLoRA: the fused path of qlora.py) and GPT-2's Conv1D, with
several named adapters, merge / unmerge / safe_merge, and injection into a model from a LoRAConfig."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import nf4q

from .config import LoRAConfig
from .inject import (TunerLayer, adapter_dtype, find_targets, in_out_features, is_conv1d, module_device, tuner_layers,
                     wrap_or_extend)
from .qlora import lora_forward_4bit, lora_scaling, make_lora_pair, requantize_4bit_

# PEFT's defaults when target_modules is None, by model_type
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                   "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}


class LoRALayer(TunerLayer):
    """base(x) + s·B(A(dropout(x))) for the active adapter. On an NF4 base the whole sum is one fused op
    (qlora.lora_forward_4bit), the same code path as QLoRALinear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoRAConfig):
        super().__init__(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_4bit = isinstance(base_layer, nf4q.Linear4bit)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores W as [in, out]
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self._premerge = None  # NF4 base: (weight, bias) before the first merge, restored by unmerge
        self.update_layer(adapter_name, config)

    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def update_layer(self, adapter_name: str, config: LoRAConfig) -> None:
        base = self.base_layer
        self.lora_A[adapter_name], self.lora_B[adapter_name] = make_lora_pair(
            self.in_features, self.out_features, config.r, device=module_device(base), dtype=adapter_dtype(base),
            init=config.init)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = config.r, config.lora_alpha
        self.scaling[adapter_name] = lora_scaling(config.r, config.lora_alpha, config.use_rslora)
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._follow_mode()

    def delete_adapter(self, adapter_name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> Dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}

    # ---- forward: reads flags only -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._live_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        A, B, s, drop = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name]
        if self.is_4bit:
            return lora_forward_4bit(self.base_layer, x, A, B, s, drop)
        y = self.base_layer(x, *args, **kwargs)
        return y + (s * F.linear(F.linear(drop(x.to(A.dtype)), A), B)).to(y.dtype)

    # ---- merging -------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·B·A in fp32, in the base weight's layout ([out, in], or [in, out] for Conv1D)."""
        d = self.scaling[adapter_name] * (self.lora_B[adapter_name].weight.float() @ self.lora_A[adapter_name].weight.float())
        return d.t() if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        names = [n for n in (adapter_names or [self.active_adapter]) if n not in self.merged_adapters]
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names()}")
            delta = self.delta_weight(name)
            if self.is_4bit:
                old = requantize_4bit_(self.base_layer, lambda w: w + delta, safe_merge, f"LoRA adapter {name!r}")
                self._premerge = self._premerge if self._premerge is not None else (old, None)
            else:
                weight = self.base_layer.weight
                merged = weight.float() + delta
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"merging LoRA adapter {name!r} produced non-finite weights; the adapter seems broken")
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))

    def extra_repr(self):
        return f"r={self.r}, scaling={self.scaling}, active_adapter={self.active_adapter!r}"


# ---- injection ---------------------------------------------------------------------------------------

def inject(model: nn.Module, config: LoRAConfig, adapter_name: str) -> List[str]:
    """Wrap (or add `adapter_name` to) every module the config targets; returns their paths."""
    targets = config.target_modules
    if targets is None:
        targets = DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None))
    paths = find_targets(model, targets, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern, exclude_modules=config.exclude_modules,
                         modules_to_save=config.modules_to_save)
    for path in paths:
        if is_conv1d(wrap_or_extend(model, path, LoRALayer, adapter_name, config)):
            config.fan_in_fan_out = True  # as PEFT records it for GPT-2
    return paths


def bias_parameters(model: nn.Module, config: LoRAConfig) -> Dict[str, nn.Parameter]:
    """Biases trained (and saved) with bias="all" / "lora_only", by their path in `model`."""
    if config.bias == "none":
        return {}
    if config.bias == "lora_only":
        return {f"{path}.base_layer.bias": layer.base_layer.bias for path, layer in tuner_layers(model).items()
                if isinstance(layer, LoRALayer) and getattr(layer.base_layer, "bias", None) is not None}
    return {n: p for n, p in model.named_parameters() if n.split(".")[-1] == "bias" and ".modules_to_save." not in n
            and ".original_module." not in n}
