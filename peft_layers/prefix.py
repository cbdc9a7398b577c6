"""Prefix tuning: learned keys/values in front of every attention layer's own, handed to a transformers
decoder as its KV cache (so positions of real tokens start after the prefix, as in PEFT); the attention mask
is extended with ones. File layout as PEFT: `prompt_embeddings` [num_virtual_tokens, num_layers·2·token_dim]."""
import inspect
from typing import List, Tuple

import torch
from torch import nn

from .config import PrefixTuningConfig
from .prompt import cache_of, extend_mask


class PrefixEncoder(nn.Module):
    """The prefix as `embedding.weight` [nvt, L·2·token_dim], or, with `projection` (prefix_projection while
    training), embeddings [nvt, token_dim] through Linear-Tanh-Linear to that size."""

    def __init__(self, config: PrefixTuningConfig, projection: bool, device=None):
        super().__init__()
        self.projection = projection
        out = config.num_layers * 2 * config.token_dim
        if projection:
            hidden = config.encoder_hidden_size
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, out, device=device))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out, device=device)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.projection else w


def prefix_key_values(encoder: PrefixEncoder, config: PrefixTuningConfig, batch: int,
                      dtype: torch.dtype) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [batch, kv_heads, nvt, head_dim]; layer i uses rows 2i and 2i+1."""
    nvt, heads = config.num_virtual_tokens, config.num_attention_heads
    kv = encoder().to(dtype).view(nvt, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [2L, B, H, nvt, hd]
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]


def _prefix_only_layer_cls():
    from transformers.cache_utils import DynamicLayer

    class PrefixOnlyLayer(DynamicLayer):
        """Holds only the prefix: update() returns prefix + new states without storing them, so a forward can
        be recomputed (gradient checkpointing) and the prefix never grows."""

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixOnlyLayer


def build_cache(kv: List[Tuple[torch.Tensor, torch.Tensor]], frozen: bool):
    """A DynamicCache holding the prefix; `frozen` caches never grow (training, use_cache=False)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    layer_cls = _prefix_only_layer_cls() if frozen else DynamicLayer
    for k, v in kv:
        layer = layer_cls()
        DynamicLayer.update(layer, k, v)
        cache.layers.append(layer)
    return cache


def cache_argument(model: nn.Module) -> str:
    """The model's name for its KV cache argument ('cache' in transformers 5, 'past_key_values' before)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__} takes no KV cache argument, which prefix tuning needs "
                     "(it works on transformers decoder models)")


def model_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None else torch.float32


def prefix_forward(model: nn.Module, encoder: PrefixEncoder, config: PrefixTuningConfig, frozen: bool,
                   input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    key = cache_argument(model)
    if kwargs.get(key) is not None:
        raise ValueError(f"prefix tuning supplies {key!r} itself; do not pass one")
    kwargs[key] = build_cache(prefix_key_values(encoder, config, ref.shape[0], model_dtype(model)), frozen)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None
    return model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                 attention_mask=extend_mask(attention_mask, config.num_virtual_tokens), **kwargs)


def allow_checkpointing_with_cache(model: nn.Module, allow: bool) -> None:
    """transformers' checkpointed layers drop the cache argument (a growing cache is unsafe to recompute);
    ours is frozen while training, so those layers may keep it."""
    for m in model.modules():
        if hasattr(type(m), "_can_checkpoint_with_cache"):
            if allow:
                m._can_checkpoint_with_cache = True
            else:
                m.__dict__.pop("_can_checkpoint_with_cache", None)


def generation_hook(encoder: PrefixEncoder, config: PrefixTuningConfig, model: nn.Module):
    """A forward pre-hook for model.generate: puts the prefix into the (empty) cache at the first step and
    extends the attention mask at every step."""
    key = cache_argument(model)
    n = config.num_virtual_tokens

    def hook(module, args, kwargs):
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        if cache is None or cache.get_seq_length() == 0:  # first step: the prefix goes in
            kv = prefix_key_values(encoder, config, ref.shape[0], model_dtype(model))
            if cache is None:
                kwargs[key] = cache = build_cache(kv, frozen=True)
            else:
                for i, (k, v) in enumerate(kv):
                    cache.update(k, v, i)
        past, cur = cache.get_seq_length(), ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + n == past + cur:
            kwargs["attention_mask"] = extend_mask(mask, n)
        if kwargs.get("position_ids") is not None:  # generate counts without the prefix; forward() shifts them
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return args, kwargs

    return hook
