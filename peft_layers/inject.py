"""Finding the modules a method targets and swapping in wrappers: target_modules matching (list / regex /
"all-linear"), layers_to_transform, exclude_modules, modules_to_save, and the base class of every wrapper."""
import copy
import re
import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

import nf4q
from nf4q.naming import matches

from .qlora import restore_4bit_

try:  # GPT-2 style Conv1D: y = x @ W + b with W [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is optional
    Conv1D = None


# ---- what kind of layer ------------------------------------------------------------------------------

def is_conv1d(module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def is_linear_like(module) -> bool:
    return isinstance(module, (nn.Linear, nf4q.Linear4bit)) or is_conv1d(module)


def in_out_features(module):
    if isinstance(module, (nn.Linear, nf4q.Linear4bit)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"unsupported layer type {type(module).__name__}: expected nn.Linear, nf4q.Linear4bit or Conv1D")


def adapter_dtype(module) -> torch.dtype:
    """Adapters train in fp32 unless the base holds fp64 (half-precision bases keep fp32 adapters, as PEFT does)."""
    if isinstance(module, nf4q.Linear4bit):
        return torch.float32
    w = module.weight
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def module_device(module) -> torch.device:
    return next(module.parameters()).device


# ---- matching ------------------------------------------------------------------------------------------

_matches_list_or_regex = matches  # PEFT's rule, shared with nf4q.quantize_model(skip=...)


def layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """The block index in a module path: the first number segment (or the one right after a layers_pattern)."""
    if layers_pattern:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)(?:\.|$)", name)
            if m:
                return int(m.group(1))
        return None
    m = re.match(r".*?\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def output_head_names(model: nn.Module) -> set:
    """Names of the output layer (never targeted by "all-linear", as in PEFT)."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def find_targets(model: nn.Module, target_modules, *, layers_to_transform=None, layers_pattern=None,
                 exclude_modules=None, modules_to_save=None, what="target_modules") -> List[str]:
    """Module paths of `model` selected by `target_modules`; raises ValueError naming the config field when none
    match. Wrappers already inserted by peft_layers count as their base layer."""
    if target_modules is None:
        raise ValueError(f"{what} is None and there is no default for {type(model).__name__}: name the modules")
    for field, value in ((what, target_modules), ("exclude_modules", exclude_modules)):
        try:
            if isinstance(value, str):
                re.compile(value)
        except re.error as e:
            raise ValueError(f"{field}={value!r} is not a valid regular expression ({e})") from None
    heads = output_head_names(model) if target_modules == "all-linear" else set()
    found, seen_linear = [], []
    for name, module in model.named_modules():
        if not name or _inside_wrapper(model, name):
            continue
        base = module.base_layer if isinstance(module, TunerLayer) else module
        if is_linear_like(base):
            seen_linear.append(name)
        if target_modules == "all-linear":
            hit = is_linear_like(base) and name not in heads
        else:
            hit = matches(name, target_modules)
        if not hit:
            continue
        if exclude_modules and matches(name, exclude_modules):
            continue
        if modules_to_save and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save):
            continue
        if layers_to_transform is not None:
            wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
            if layer_index(name, layers_pattern) not in wanted:
                continue
        found.append(name)
    if not found:
        raise ValueError(f"{what}={target_modules!r} matched no module of {type(model).__name__}; linear modules "
                         f"are: {seen_linear[:12]}{' ...' if len(seen_linear) > 12 else ''}")
    return found


def _inside_wrapper(model, name) -> bool:
    """True for the internals of our wrappers (their base_layer, adapter weights, saved module copies)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (TunerLayer, ModulesToSaveWrapper)):
            return True
    return False


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_or_extend(model: nn.Module, path: str, layer_cls: type, adapter_name: str, config, check=None,
                   make=None) -> nn.Module:
    """Add `adapter_name` to the `layer_cls` wrapper at `path`, or wrap the module there in a new one
    (`(make or layer_cls)(module, adapter_name, config)`); `check(wrapper)` may refuse the extension. Returns the
    base layer. Another method's wrapper at `path` is a ValueError: one method per model."""
    module = model.get_submodule(path)
    if isinstance(module, layer_cls):
        if check is not None:
            check(module)
        module.update_layer(adapter_name, config)
        return module.base_layer
    if isinstance(module, TunerLayer):
        raise ValueError(f"{path} already holds a {type(module).__name__}; one method per model")
    set_module(model, path, (make or layer_cls)(module, adapter_name, config))
    return module


# ---- wrappers ------------------------------------------------------------------------------------------

class TunerLayer(nn.Module):
    """Base of the method wrappers: holds `base_layer` and named adapters of one method.

    `active_adapters` lists the active adapters (LoRA sums several; the other methods use the first,
    `active_adapter`); `disabled` and `merged_adapters` are only changed by methods (set_adapter, merge, unmerge,
    the PeftModel context managers), never inside forward.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training  # new adapter modules follow via _follow_mode
        self.active_adapters: List[str] = []
        self.disabled = False
        self.merged_adapters: List[str] = []

    @property
    def active_adapter(self) -> Optional[str]:
        return self.active_adapters[0] if self.active_adapters else None

    @active_adapter.setter
    def active_adapter(self, name: Optional[str]) -> None:
        self.active_adapters = [] if name is None else [name]

    # subclasses: adapter_names(), update_layer(name, config), delete_adapter(name), adapter_state_dict(name),
    # merge(safe_merge, adapter_names) and _unmerge_one(name) (or their own unmerge())
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(). An NF4 base gets the weight (and bias) stored before the first merge back, exactly:
        subtracting would requantize again. A float base undoes each merged adapter with `_unmerge_one`."""
        if not self.merged:
            warnings.warn("already unmerged; nothing to do")
            return
        if getattr(self, "is_4bit", False):
            old, bias = self._premerge
            restore_4bit_(self.base_layer, old)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
            self._premerge = None
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _live_adapters(self) -> List[str]:
        """The adapters forward should apply ([]: plain base layer)."""
        if self.disabled or self.merged:
            return []
        have = self.adapter_names()
        return [n for n in self.active_adapters if n in have]

    def _live_adapter(self) -> Optional[str]:
        names = self._live_adapters()
        return names[0] if names else None

    def set_adapter(self, names) -> None:
        """One adapter name or a list of them."""
        self.active_adapters = [names] if isinstance(names, str) else list(names)

    def _follow_mode(self) -> None:
        """Put freshly created adapter modules (dropout!) in this layer's train/eval mode."""
        for m in self.children():
            if m is not self.base_layer:
                m.train(self.training)

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        return [p for p in self.adapter_state_dict(name).values() if isinstance(p, nn.Parameter)]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # e.g. .weight / .in_features of the wrapped layer


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: a copy per adapter beside the untouched original."""

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disabled = False
        self.row_groups = None  # set by PeftModel for adapter_names= (multi_lora.RowGroups)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            copy_ = copy.deepcopy(self.original_module)
            copy_.requires_grad_(False)
            self.modules_to_save[adapter_name] = copy_

    def forward(self, *args, **kwargs):
        if self.row_groups is not None and not self.disabled:
            return self._mixed_forward(*args, **kwargs)
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _mixed_forward(self, x, *args, **kwargs):
        """Each row through its adapter's copy (or the original): one call per adapter present in the batch,
        as PEFT does for full modules (the LoRA layers' rows are batched, see multi_lora.py)."""
        out = self.original_module(x, *args, **kwargs)
        for name, rows in self.row_groups.rows.items():
            if name in self.modules_to_save:
                idx = torch.tensor(rows, device=x.device)
                out = out.index_copy(0, idx, self.modules_to_save[name](x[idx], *args, **kwargs).to(out.dtype))
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)


def wrap_modules_to_save(model: nn.Module, names, adapter_name: str) -> List[str]:
    """Wrap every module whose path is or ends with one of `names`; returns the wrapped paths."""
    if not names:
        return []
    paths = [n for n, m in model.named_modules()
             if n and not _inside_wrapper(model, n) and any(n == k or n.endswith("." + k) for k in names)]
    if not paths:
        raise ValueError(f"modules_to_save={names!r} matched no module of {type(model).__name__}")
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            set_module(model, path, ModulesToSaveWrapper(module, adapter_name))
    return paths


def tuner_layers(model: nn.Module) -> Dict[str, TunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TunerLayer)}


def save_wrappers(model: nn.Module) -> Dict[str, ModulesToSaveWrapper]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
