"""Bottleneck adapters (Houlsby, Pfeiffer): h + up(act(down(h))) on the output h of a block's attention output
projection and/or FFN output projection, before the residual add; up starts at zero so the model is unchanged."""
import re
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .inject import (
    TunerLayer,
    adapter_dtype,
    find_targets,
    in_out_features,
    is_linear_like,
    module_device,
    wrap_or_extend,
)

_ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}

# (attention output projection, FFN output projection) of common block layouts, as full-match regexes.
# Llama-like blocks: self_attn.o_proj / mlp.down_proj; GPT-2: attn.c_proj / mlp.c_proj;
# BERT-like: attention.output.dense / <layer>.output.dense (the FFN's second linear).
PLACEMENTS = [
    (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
]


class BottleneckAdapterLayer(TunerLayer):
    """Wraps an output projection: y = base(x); y + up(act(down(y)))."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig):
        super().__init__(base_layer)
        self.hidden = in_out_features(base_layer)[1] if is_linear_like(base_layer) else None
        if self.hidden is None:
            raise TypeError(f"adapters wrap a linear output projection, got {type(base_layer).__name__}")
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.non_linearity: Dict[str, str] = {}
        self.update_layer(adapter_name, config)

    def adapter_names(self) -> List[str]:
        return list(self.adapter_down.keys())

    def update_layer(self, adapter_name: str, config: AdapterConfig) -> None:
        bottleneck = max(1, self.hidden // config.reduction_factor)
        kw = dict(device=module_device(self.base_layer), dtype=adapter_dtype(self.base_layer))
        self.adapter_down[adapter_name] = nn.Linear(self.hidden, bottleneck, **kw)
        up = nn.Linear(bottleneck, self.hidden, **kw)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_up[adapter_name] = up
        self.non_linearity[adapter_name] = config.non_linearity
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._follow_mode()

    def delete_adapter(self, adapter_name: str) -> None:
        del self.adapter_down[adapter_name], self.adapter_up[adapter_name], self.non_linearity[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> Dict[str, torch.Tensor]:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self._live_adapter()
        if name is None:
            return y
        down, up = self.adapter_down[name], self.adapter_up[name]
        h = y.to(down.weight.dtype)
        return y + up(_ACTIVATIONS[self.non_linearity[name]](down(h))).to(y.dtype)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise TypeError("bottleneck adapters are non-linear and cannot be merged into the weights")

    def unmerge(self) -> None:
        pass  # never merged


def _placement(model: nn.Module, config: AdapterConfig):
    """(attention targets, FFN targets) from the config or the first known layout with matches in the model."""
    attn, ffn = config.attn_output_modules, config.ffn_output_modules
    if ffn is not None and (attn is not None or config.kind == "pfeiffer"):
        return attn, ffn
    names = [n for n, _ in model.named_modules()]
    for attn_re, ffn_re in PLACEMENTS:
        if any(re.fullmatch(ffn_re, n) for n in names):
            return (attn if attn is not None else attn_re), (ffn if ffn is not None else ffn_re)
    raise ValueError(f"cannot find the attention/FFN output projections of {type(model).__name__}: set "
                     "attn_output_modules and ffn_output_modules in AdapterConfig")


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str) -> List[str]:
    attn, ffn = _placement(model, config)
    paths = find_targets(model, ffn, modules_to_save=config.modules_to_save, what="ffn_output_modules")
    if config.kind == "houlsby":
        paths = find_targets(model, attn, modules_to_save=config.modules_to_save, what="attn_output_modules") + paths
    for path in paths:
        wrap_or_extend(model, path, BottleneckAdapterLayer, adapter_name, config)
    return paths
