"""add_weighted_adapter: a new LoRA adapter made from existing ones, with PEFT's three main combination types.

"cat" is exact (Σ w_i·s_i·B_i A_i at rank Σ r_i); "linear" combines A's and B's separately with √|w_i·s_i| (PEFT's
definition: not the weighted sum of the updates unless there is one adapter; the only choice for one adapter);
"svd" truncates the SVD of the weighted sum of the updates to rank svd_rank (default: the largest r)."""
import dataclasses
import math
from typing import List, Optional

import torch

from .inject import tuner_layers

COMBINATIONS = ("linear", "cat", "svd")


def _check(peft_model, adapters, weights, adapter_name, combination_type):
    if peft_model.peft_type != "LORA":
        raise ValueError(f"add_weighted_adapter combines LoRA adapters, not {peft_model.peft_type}")
    if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"adapters: unknown adapter {unknown[0]!r}; adapters: {list(peft_model.peft_config)}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)}), got {weights!r}")
    if not isinstance(adapter_name, str) or adapter_name in peft_model.peft_config:
        raise ValueError(f"adapter_name {adapter_name!r} must be a new adapter name")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if any(peft_model.peft_config[a].use_dora for a in adapters):
        raise ValueError("adapters: DoRA adapters cannot be combined by add_weighted_adapter (as in PEFT)")


def _new_rank(configs, combination_type, svd_rank):
    ranks = [c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank r, got {ranks}")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    return svd_rank or max(ranks)


@torch.no_grad()
def add_weighted_adapter(peft_model, adapters: List[str], weights: List[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None) -> None:
    _check(peft_model, adapters, weights, adapter_name, combination_type)
    configs = [peft_model.peft_config[a] for a in adapters]
    combination_type = "linear" if len(adapters) == 1 else combination_type  # as PEFT
    rank = _new_rank(configs, combination_type, svd_rank)
    layers = tuner_layers(peft_model.get_base_model())
    paths = sorted(p for p, layer in layers.items() if any(a in layer.adapter_names() for a in adapters))
    # lora_alpha = r: the new adapter's scaling is 1 and the source scalings are folded into A, B
    config = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=paths, init_lora_weights=True,
                                 layers_to_transform=None, layers_pattern=None, exclude_modules=None,
                                 modules_to_save=None, use_rslora=False, use_dora=False, loftq_config={})
    peft_model.add_adapter(adapter_name, config)
    for layer in tuner_layers(peft_model.get_base_model()).values():
        if adapter_name not in layer.adapter_names():
            continue
        present = [(a, float(w)) for a, w in zip(adapters, weights) if a in layer.adapter_names()]
        A, B = _combine(layer, present, combination_type, rank, svd_clamp, svd_full_matrices, svd_driver)
        target_A, target_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        target_A.zero_()
        target_B.zero_()
        target_A[:A.shape[0]] = A.to(target_A.dtype)
        target_B[:, :B.shape[1]] = B.to(target_B.dtype)


def _combine(layer, present, combination_type, rank, clamp, full_matrices, driver):
    """(A, B) of the combined adapter on one layer (A may have fewer rows than the rank: the rest stays 0)."""
    As = [layer.lora_A[a].weight.float() for a, _ in present]
    Bs = [layer.lora_B[a].weight.float() for a, _ in present]
    if combination_type == "cat":
        return torch.cat([A * w * layer.scaling[a] for A, (a, w) in zip(As, present)], 0), torch.cat(Bs, 1)
    if combination_type == "linear":  # √|w·s| on both sides, the sign on A's
        roots = [math.sqrt(abs(w * layer.scaling[a])) for a, w in present]
        signs = [1.0 if w * layer.scaling[a] >= 0 else -1.0 for a, w in present]
        return (sum(r * g * A for r, g, A in zip(roots, signs, As)), sum(r * B for r, B in zip(roots, Bs)))
    delta = sum(w * layer.scaling[a] * (B @ A) for (a, w), A, B in zip(present, As, Bs))  # [out, in]
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U, Vh = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh, U
