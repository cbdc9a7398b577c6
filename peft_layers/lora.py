"""LoRA layers on nn.Linear, nf4q.Linear4bit (QLoRA: the fused path of qlora.py) and GPT-2's Conv1D, with
several named adapters (one or a sum of several active), DoRA (dora.py), PEFT's init_lora_weights (loftq.py),
mixed-adapter batches (multi_lora.py), merge / unmerge / safe_merge, and injection into a model from a LoRAConfig."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import nf4q

from . import dora, loftq, multi_lora
from .config import LoRAConfig
from .inject import (
    TunerLayer,
    adapter_dtype,
    find_targets,
    in_out_features,
    is_conv1d,
    module_device,
    tuner_layers,
    wrap_or_extend,
)
from .qlora import lora_forward_4bit, lora_scaling, make_lora_pair, requantize_4bit_

# PEFT's defaults when target_modules is None, by model_type
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                   "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}


class LoRALayer(TunerLayer):
    """base(x) + Σ s·B(A(dropout(x))) over the active adapters (DoRA adapters rescale per output feature).
    One plain adapter on an NF4 base is one fused op (qlora.lora_forward_4bit), as in QLoRALinear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoRAConfig):
        if config.use_dora:
            dora.check_supported(base_layer)
        super().__init__(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_4bit = isinstance(base_layer, nf4q.Linear4bit)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores W as [in, out]
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, PEFT's key
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.use_dora: Dict[str, bool] = {}
        self._premerge = None  # NF4 base: (weight, bias) before the first merge, restored by unmerge
        self._dora_factor: Dict[str, torch.Tensor] = {}  # float base: m/‖W+ΔW‖ at merge, for unmerge
        self._norm_cache: Dict[str, tuple] = {}  # DoRA: (fingerprint of W, A, B; scaling; ‖W + s·BA‖)
        self.row_groups: Optional[multi_lora.RowGroups] = None  # set by PeftModel for adapter_names=
        self._stack_cache = None  # multi_lora's stacked adapter weights
        self.update_layer(adapter_name, config)

    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def update_layer(self, adapter_name: str, config: LoRAConfig) -> None:
        if config.use_dora:
            dora.check_supported(self.base_layer)
        base = self.base_layer
        self.lora_A[adapter_name], self.lora_B[adapter_name] = make_lora_pair(
            self.in_features, self.out_features, config.r, device=module_device(base), dtype=adapter_dtype(base),
            init="gaussian" if config.init_lora_weights == "gaussian" else "default")
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = config.r, config.lora_alpha
        self.scaling[adapter_name] = lora_scaling(config.r, config.lora_alpha, config.use_rslora)
        self.use_dora[adapter_name] = config.use_dora
        try:
            loftq.init_adapter(self, adapter_name, config)
        except ValueError:
            self.delete_adapter(adapter_name)
            raise
        if config.use_dora:
            self.lora_magnitude_vector[adapter_name] = dora.init_magnitude(
                self.base_layer, self.lora_A[adapter_name], self.lora_B[adapter_name], self.scaling[adapter_name])
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._stack_cache = None
        self._follow_mode()

    def delete_adapter(self, adapter_name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.scaling, self.use_dora,
                  self.lora_magnitude_vector, self._norm_cache, self._dora_factor):
            if adapter_name in d:
                del d[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self._stack_cache = None

    def adapter_state_dict(self, adapter_name: str) -> Dict[str, torch.Tensor]:
        sd = {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}
        if self.use_dora[adapter_name]:
            sd["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter_name]
        return sd

    def weight_norm(self, name: str) -> torch.Tensor:
        """DoRA's ‖W + s·BA‖ (fp32, detached), recomputed only when W, A or B changed since the last call."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        tensors = (self.base_layer.weight, A, B)
        hit = self._norm_cache.get(name)
        if hit is None or not multi_lora.unchanged(hit[0], tensors) or hit[1] != self.scaling[name]:
            hit = (multi_lora.fingerprint(tensors), self.scaling[name],
                   dora.weight_norm(self.base_layer, A, B, self.scaling[name]))
            self._norm_cache[name] = hit
        return hit[2]

    # ---- forward: reads flags only -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_groups is not None and not self.disabled:
            return multi_lora.mixed_forward(self, x, self.row_groups)
        names = self._live_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.is_4bit and len(names) == 1 and not self.use_dora[names[0]]:
            n = names[0]
            return lora_forward_4bit(self.base_layer, x, self.lora_A[n].weight, self.lora_B[n].weight,
                                     self.scaling[n], self.lora_dropout[n])
        y = self.base_layer(x, *args, **kwargs)
        for n in names:
            A, B, s, drop = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n], self.lora_dropout[n]
            if not self.use_dora[n]:
                y = y + (s * F.linear(F.linear(drop(x.to(A.dtype)), A), B)).to(y.dtype)
                continue
            dropped = isinstance(drop, nn.Dropout) and self.training
            h = drop(x) if dropped else x
            y = y + dora.dora_term(self.base_layer, h, A, B, s, self.lora_magnitude_vector[n], self.weight_norm(n),
                                   base_result=None if dropped else y).to(y.dtype)
        return y

    # ---- merging -------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·B·A in fp32, in the base weight's layout ([out, in], or [in, out] for Conv1D)."""
        d = self.scaling[adapter_name] * (self.lora_B[adapter_name].weight.float()
                                          @ self.lora_A[adapter_name].weight.float())
        return d.t() if self.fan_in_fan_out else d

    def _merged_weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """fp32 W (base layout) with adapter `name` folded in: W + ΔW, or f·(W + ΔW) for DoRA with f = m/‖W₀ + ΔW‖,
        W₀ the weight without the adapters merged before (PEFT's rule: the norm forward uses)."""
        delta = self.delta_weight(name)
        if not self.use_dora[name]:
            return w + delta
        rows = self._unmerged_weight(w) + delta
        rows = rows.t() if self.fan_in_fan_out else rows
        factor = dora.merge_factor(self.lora_magnitude_vector[name], torch.linalg.vector_norm(rows, dim=1))
        self._dora_factor[name] = factor
        return (w + delta) * (factor.t() if self.fan_in_fan_out else factor)

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 W₀: `w` (the current weight) with every merged adapter taken out."""
        if not self.merged_adapters:
            return w
        if self.is_4bit:
            return self._premerge[0].dequantize(torch.float32)
        for name in reversed(self.merged_adapters):
            w = self._undo(name, w)
        return w

    def _undo(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """fp32 weight `w` with merged adapter `name` taken out (float bases; NF4 bases restore exactly)."""
        if self.use_dora[name]:
            factor = self._dora_factor[name]
            w = w / (factor.t() if self.fan_in_fan_out else factor)
        return w - self.delta_weight(name)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names()}")
            if self.is_4bit:
                old = requantize_4bit_(self.base_layer, lambda w: self._merged_weight(name, w),  # noqa: B023
                                       safe_merge,
                                       f"LoRA adapter {name!r}")
                self._premerge = self._premerge if self._premerge is not None else (old, None)
            else:
                weight = self.base_layer.weight
                merged = self._merged_weight(name, weight.float())
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"merging LoRA adapter {name!r} produced non-finite weights; "
                                     "the adapter seems broken")
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        weight = self.base_layer.weight
        weight.copy_(self._undo(name, weight.float()).to(weight.dtype))
        self._dora_factor.pop(name, None)

    def extra_repr(self):
        return f"r={self.r}, scaling={self.scaling}, active_adapters={self.active_adapters!r}"


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
