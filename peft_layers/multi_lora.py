"""Mixed-adapter batches (PEFT's `adapter_names=`): row i of the batch goes through adapter adapter_names[i], or
through the base alone for "__base__" (or for an adapter this layer lacks).

Per layer: the base output once for the whole batch (one GEMM / NF4 op), then every adapter's rows at once,
Punica-SGMV style with batched torch ops: the layer's adapters are kept stacked (A [N, r, in], B [N, out, r], zero
padded to the largest r, cast to the compute dtype, rebuilt only when a weight changes); the rows are gathered
into a [U, rows, in] block for the U adapters present (padded to the largest group), two bmm's give
s·B A x for every group (s folded into the stacked B), and one index_add_ puts them back: four kernels besides
the base op, whatever the number of adapters. The grouping is computed once per model call on the
host, from the adapter_names list itself (no device sync)."""
import operator
import weakref
from typing import Dict, List, Sequence

import torch

BASE = "__base__"
_VERSION = operator.attrgetter("_version")


class RowGroups:
    """adapter_names of one batch grouped by adapter: `rows[name]` = the batch rows that use it (no "__base__")."""

    def __init__(self, adapter_names: Sequence[str]):
        self.names = list(adapter_names)
        self.rows: Dict[str, List[int]] = {}
        for i, name in enumerate(self.names):
            if name != BASE:
                self.rows.setdefault(name, []).append(i)
        self._plans, self._present = {}, {}

    def present(self, layer_adapters: tuple) -> tuple:
        """The adapters of a layer (its order) that some row uses; cached per set of layer adapters."""
        hit = self._present.get(layer_adapters)
        if hit is None:
            hit = self._present[layer_adapters] = tuple(n for n in layer_adapters if n in self.rows)
        return hit

    def plan(self, present: tuple, device: torch.device):
        """Index tensors for the adapters `present` in a layer (cached: layers with the same adapters share them):
        gather [U * G] (each group padded to G rows with its first row), the positions of the real rows in the
        padded order (None without padding) and the batch rows they belong to."""
        key = (present, device)
        if key not in self._plans:
            groups = [self.rows[n] for n in present]
            width = max(len(g) for g in groups)
            gather = [r for g in groups for r in g + [g[0]] * (width - len(g))]
            padded = any(len(g) != width for g in groups)
            real = [u * width + j for u, g in enumerate(groups) for j in range(len(g))]
            rows = [r for g in groups for r in g]

            def tensor(v):
                return torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)

            self._plans[key] = (tensor(gather), tensor(real) if padded else None, tensor(rows), width)
        return self._plans[key]


def fingerprint(tensors) -> tuple:
    """What identifies the current values of `tensors`: the objects (weakly), storage and version counters."""
    return tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors)


def unchanged(fp: tuple, tensors) -> bool:
    """True if `tensors` are the same objects, storage and versions as when `fp` was taken (no in-place write,
    no `.data` swap, no replaced parameter whose memory got reused)."""
    return len(fp) == len(tensors) and all(r() is t and ptr == t.data_ptr() and v == t._version
                                           for (r, ptr, v), t in zip(fp, tensors))


def _marks(params) -> tuple:
    """Storage addresses and version counters (an in-place write bumps the version, a `.data` swap moves the
    storage), read with C-level iteration: this runs once per layer and call."""
    return list(map(torch.Tensor.data_ptr, params)), list(map(_VERSION, params))


def _stack(layer, dtype: torch.dtype, device: torch.device):
    """(slot of each adapter, A [N, r_max, in], s·B [N, out, r_max] (scaling folded in), picks) for all the
    layer's adapters, cached on the layer. LoRALayer drops the cache when an adapter is added or deleted; each call
    checks that no adapter weight was written in place or swapped since (`_marks`)."""
    names = tuple(layer.lora_A.keys())
    key = (names, tuple(layer.scaling[n] for n in names), dtype, device)
    cache = layer._stack_cache
    if cache is not None and cache[0] == key:
        params, marks, value = cache[1], cache[2], cache[3]
        if _marks(params) == marks:
            return value
    params = [p for n in names for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    r_max = max(layer.r[n] for n in names)
    A = torch.zeros(len(names), r_max, layer.in_features, device=device, dtype=dtype)
    B = torch.zeros(len(names), layer.out_features, r_max, device=device, dtype=dtype)
    with torch.no_grad():
        for i, n in enumerate(names):  # once per change of the weights, not per forward
            r = layer.r[n]
            A[i, :r] = layer.lora_A[n].weight
            B[i, :, :r] = layer.lora_B[n].weight.float() * layer.scaling[n]
    value = ({n: i for i, n in enumerate(names)}, A, B, {})
    layer._stack_cache = (key, params, _marks(params), value)
    return value


def compute_dtype(layer, x: torch.Tensor) -> torch.dtype:
    """The dtype the adapters run in: the NF4 op's compute dtype on an NF4 base (as the fused QLoRA path),
    the adapter's own dtype otherwise (as PEFT)."""
    if layer.is_4bit:
        return layer.base_layer.compute_dtype or x.dtype
    return next(iter(layer.lora_A.values())).weight.dtype


def mixed_forward(layer, x: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """base(x) for all rows + s·B A x for each row's adapter (a LoRALayer `layer`, eval mode, no dropout)."""
    if x.shape[0] != len(groups.names):
        raise ValueError(f"adapter_names has {len(groups.names)} entries but the input has {x.shape[0]} rows: "
                         "one adapter name per row")
    result = layer.base_layer(x).contiguous()
    dtype = compute_dtype(layer, x)
    slot, A, B, picks = _stack(layer, dtype, x.device)
    present = groups.present(tuple(slot))  # in stack order: when all are present, the stack is used as is
    if not present:
        return result
    if len(present) != len(slot):
        if present not in picks:  # the present adapters' slots, as a device tensor, cached with the stack
            picks[present] = torch.tensor([slot[n] for n in present], device=x.device)
        pick = picks[present]
        A, B = A.index_select(0, pick), B.index_select(0, pick)
    gather, real, rows, width = groups.plan(present, x.device)
    n_rows, U = x.shape[0], len(present)
    xt = x.reshape(n_rows, -1, layer.in_features)  # [rows, tokens, in]
    tokens = xt.shape[1]
    xg = xt.index_select(0, gather).to(dtype).reshape(U, width * tokens, layer.in_features)
    y = torch.bmm(torch.bmm(xg, A.transpose(1, 2)), B.transpose(1, 2)).reshape(U * width, tokens, layer.out_features)
    if real is not None:
        y = y.index_select(0, real)
    # in place: the base op's fresh output, which its backward does not keep
    result.view(n_rows, tokens, layer.out_features).index_add_(0, rows, y.to(result.dtype))
    return result


def loop_forward(layer, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
    """The reference (and PEFT's way): base(x), then a Python loop over the adapters present. Tests and the
    benchmark compare mixed_forward with it."""
    result = layer.base_layer(x)
    for name, rows in RowGroups(adapter_names).rows.items():
        if name not in layer.lora_A:
            continue
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        dtype = compute_dtype(layer, x)
        idx = torch.tensor(rows, device=x.device)
        sub = x.index_select(0, idx).to(dtype)
        delta = layer.scaling[name] * torch.nn.functional.linear(torch.nn.functional.linear(sub, A.to(dtype)),
                                                                 B.to(dtype))
        result = result.index_add(0, idx, delta.to(result.dtype))
    return result


def check_adapter_names(peft_model, adapter_names, args, kwargs) -> RowGroups:
    """PEFT's rules for adapter_names: LoRA, eval mode, known names (or "__base__"), no merged or DoRA adapter,
    one name per batch row. Bad input raises ValueError/TypeError naming `adapter_names`."""
    from .inject import tuner_layers

    if peft_model.peft_type != "LORA":
        raise ValueError(f"adapter_names works with LoRA adapters, not {peft_model.peft_type}")
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    if peft_model.training:
        raise ValueError("adapter_names cannot be used in training mode: call model.eval() first")
    unknown = sorted({n for n in adapter_names if n != BASE} - set(peft_model.peft_config))
    if unknown:
        raise ValueError(f"adapter_names holds unknown adapter(s) {unknown}; adapters: "
                         f"{list(peft_model.peft_config)} (or {BASE!r} for the base model)")
    used = {n for n in adapter_names if n != BASE}
    layers = tuner_layers(peft_model.get_base_model()).values()
    if any(layer.merged for layer in layers):
        raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first")
    if any(layer.use_dora.get(n, False) for layer in layers for n in used):
        raise ValueError("adapter_names cannot select DoRA adapters (as in PEFT): merge or set_adapter instead")
    first = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {first.shape[0]} rows: "
                         "one adapter name per row")
    return RowGroups(adapter_names)
