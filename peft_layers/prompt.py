"""Prompt tuning: learned soft tokens prepended to the input embeddings (mask extended with ones, labels with
-100), PEFT's computation and file layout (`prompt_embeddings` [num_virtual_tokens, token_dim]). Also the
model facts every prompt-learning method needs (fill_prompt_learning_config)."""
import warnings
from typing import Optional

import torch
from torch import nn

from .config import PromptLearningConfig, PromptTuningConfig


def _first_attr(cfg, names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def fill_prompt_learning_config(config: PromptLearningConfig, model: nn.Module, kv_heads: bool = False) -> None:
    """Fill token_dim, num_layers, num_attention_heads and num_transformer_submodules from the model's config.
    With kv_heads (prefix tuning), heads and token_dim describe the key/value projections (GQA)."""
    mc = getattr(model, "config", None)
    if getattr(mc, "is_encoder_decoder", False):
        raise ValueError("prompt learning in peft_layers supports decoder-only and encoder-only models")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_layers is None:
        config.num_layers = _first_attr(mc, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        config.token_dim = _first_attr(mc, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        heads = _first_attr(mc, ("num_attention_heads", "n_head", "num_heads"))
        config.num_attention_heads = heads
        kv = getattr(mc, "num_key_value_heads", None)
        if kv_heads and kv is not None and heads is not None and config.token_dim is not None:
            head_dim = getattr(mc, "head_dim", None) or config.token_dim // heads
            config.token_dim, config.num_attention_heads = head_dim * kv, kv
    missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        raise ValueError(f"cannot infer {missing} from {type(model).__name__}'s config: set them in the config")


class PromptEmbedding(nn.Module):
    """`embedding.weight` [num_virtual_tokens, token_dim]: the soft prompt."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: Optional[nn.Module] = None, tokenizer=None):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        device = word_embeddings.weight.device if word_embeddings is not None else None
        self.embedding = nn.Embedding(total, config.token_dim, device=device)
        if config.init == "text" and not config.inference_mode:
            self._init_from_text(config, word_embeddings, tokenizer, total)

    @torch.no_grad()
    def _init_from_text(self, config, word_embeddings, tokenizer, total):
        if tokenizer is None:
            if not config.tokenizer_name_or_path:
                raise ValueError("init='text' needs a tokenizer: pass tokenizer= to get_peft_model or set "
                                 "tokenizer_name_or_path")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        ids = list(tokenizer(config.init_text)["input_ids"])
        if not ids:
            raise ValueError("init_text tokenizes to no tokens")
        ids = (ids * (total // len(ids) + 1))[:total]  # repeat / cut to the prompt length
        self.embedding.weight.copy_(word_embeddings(torch.tensor(ids, device=self.embedding.weight.device)).float())

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


def extend_mask(attention_mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Prepend n ones to a 2-D attention mask (what the prompt tokens may be attended with)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    ones = attention_mask.new_ones(attention_mask.shape[0], n)
    return torch.cat([ones, attention_mask], dim=1)


def drop_unsupported(kwargs: dict) -> None:
    """As PEFT: position ids and token type ids do not describe the virtual tokens, so they are dropped."""
    for key in ("position_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            warnings.warn(f"{key} are not supported with prompt tuning; ignoring them")
            kwargs[key] = None


def prompt_forward(model: nn.Module, encoder: PromptEmbedding, config: PromptTuningConfig, input_ids=None,
                   attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
    """model(inputs_embeds=[prompt, embed(input_ids)], ...) with the mask and labels extended."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        inputs_embeds = model.get_input_embeddings()(input_ids)
    n = encoder.embedding.num_embeddings
    batch = inputs_embeds.shape[0]
    drop_unsupported(kwargs)
    if labels is not None:
        if config.task_type == "CAUSAL_LM":  # token labels line up with the lengthened sequence
            labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        kwargs["labels"] = labels
    inputs_embeds = torch.cat([encoder(batch).to(inputs_embeds.dtype), inputs_embeds], dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=extend_mask(attention_mask, n), **kwargs)


def cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def generation_hook(encoder: PromptEmbedding, word_embeddings: nn.Module):
    """A forward pre-hook for model.generate: prepends the prompt at the first step (empty cache) and extends
    the attention mask at every step, so decoding sees the same sequence as forward()."""
    n = encoder.embedding.num_embeddings

    def hook(module, args, kwargs):
        cache = cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = word_embeddings(kwargs.pop("input_ids"))
            kwargs["inputs_embeds"] = torch.cat([encoder(embeds.shape[0]).to(embeds.dtype), embeds], dim=1)
            kwargs["input_ids"] = None
        cur = (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] + n == past + cur:
            kwargs["attention_mask"] = extend_mask(mask, n)
        # generate counts positions without the prompt; the model's own count from the cache is forward()'s
        kwargs.pop("position_ids", None)
        kwargs.pop("token_type_ids", None)
        return args, kwargs

    return hook
