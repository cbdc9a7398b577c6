"""IA³: learned vectors (initialised to ones) scaling a layer's output (attention k/v) or, for feed-forward
modules, its input; mergeable into the weight (and into NF4 weights by requantizing)."""
import functools
from typing import Dict, List, Optional

import torch
from torch import nn

import nf4q

from .config import IA3Config
from .inject import (
    TunerLayer,
    _matches_list_or_regex,
    adapter_dtype,
    find_targets,
    in_out_features,
    is_conv1d,
    module_device,
    wrap_or_extend,
)
from .qlora import requantize_4bit_

# PEFT's defaults when target_modules / feedforward_modules are None, by model_type
DEFAULT_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                   "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                   "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                   "bert": (["key", "value", "output.dense"], ["output.dense"]),
                   "roberta": (["key", "value", "output.dense"], ["output.dense"])}


class IA3Layer(TunerLayer):
    """base(x)·l (l of size out) or, for a feed-forward module, base(x·l) (l of size in).

    ia3_l has PEFT's shapes: [out, 1], or [1, in] for feed-forward modules."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, is_feedforward: bool):
        super().__init__(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.is_feedforward = is_feedforward
        self.is_4bit = isinstance(base_layer, nf4q.Linear4bit)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.ia3_l = nn.ParameterDict()
        self._premerge = None
        self.update_layer(adapter_name, config)

    def adapter_names(self) -> List[str]:
        return list(self.ia3_l.keys())

    def update_layer(self, adapter_name: str, config: IA3Config) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vec = torch.ones(shape, device=module_device(self.base_layer), dtype=adapter_dtype(self.base_layer))
        if not config.init_ia3_weights:
            vec = vec + 0.02 * torch.randn_like(vec)  # for tests: a non-identity start
        self.ia3_l[adapter_name] = nn.Parameter(vec)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        del self.ia3_l[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> Dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[adapter_name]}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._live_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    # ---- merging: scale W's columns (feed-forward) or rows and bias ----------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """l shaped to broadcast against the base weight's layout."""
        vec = self.ia3_l[name].float()  # [out, 1] or [1, in], matching W [out, in]
        return vec.t() if self.fan_in_fan_out else vec

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        for name in [n for n in (adapter_names or [self.active_adapter]) if n not in self.merged_adapters]:
            scale = self._weight_scale(name)
            bias = getattr(self.base_layer, "bias", None)
            new_bias = (None if (self.is_feedforward or bias is None)
                        else bias.float() * self.ia3_l[name].float().flatten())
            if safe_merge and new_bias is not None and not bool(torch.isfinite(new_bias).all()):
                raise ValueError(f"merging IA3 adapter {name!r} produced non-finite biases; the adapter seems broken")
            if self.is_4bit:
                old = requantize_4bit_(self.base_layer, lambda w: w * scale,  # noqa: B023 (called right here)
                                       safe_merge, f"IA3 adapter {name!r}")
                if self._premerge is None:
                    self._premerge = (old, bias.clone() if bias is not None else None)
            else:
                weight = self.base_layer.weight
                merged = weight.float() * scale
                if safe_merge and not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"merging IA3 adapter {name!r} produced non-finite weights; "
                                     "the adapter seems broken")
                weight.copy_(merged.to(weight.dtype))
            if new_bias is not None:
                bias.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        # division is exact enough in fp32 for vectors near one; PEFT does the same
        weight = self.base_layer.weight
        weight.copy_((weight.float() / self._weight_scale(name)).to(weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if not self.is_feedforward and bias is not None:
            bias.copy_((bias.float() / self.ia3_l[name].float().flatten()).to(bias.dtype))


def inject(model: nn.Module, config: IA3Config, adapter_name: str) -> List[str]:
    targets, ff = config.target_modules, config.feedforward_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets, default_ff = DEFAULT_TARGETS.get(model_type, (None, None))
        ff = default_ff if ff is None else ff
        config.target_modules, config.feedforward_modules = targets, ff
    paths = find_targets(model, targets, exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save)
    for path in paths:
        is_ff = bool(ff) and _matches_list_or_regex(path, ff)

        def same_ff(layer, path=path, is_ff=is_ff):
            if layer.is_feedforward != is_ff:
                raise ValueError(f"{path}: feed-forward status differs from the layer's existing IA3 adapters")

        layer_cls = functools.partial(IA3Layer, is_feedforward=is_ff)
        if is_conv1d(wrap_or_extend(model, path, IA3Layer, adapter_name, config, check=same_ff, make=layer_cls)):
            config.fan_in_fan_out = True
    return paths
