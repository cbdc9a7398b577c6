"""PeftModel: a model with named adapters of one method. Freezes the base, injects the method, forwards
attribute access and `generate` to the wrapped model; merge / unmerge / merge_and_unload, disable_adapter,
add_adapter / set_adapter, parameter counts, save_pretrained / from_pretrained (see io.py)."""
import contextlib
import copy
from typing import Dict, List, Optional, Union

import torch
from torch import nn

import nf4q

from . import adapters, ia3, lora, multi_lora
from .config import LoRAConfig, PeftConfig
from .inject import save_wrappers, set_module, tuner_layers, wrap_modules_to_save
from .prefix import (
    PrefixEncoder,
    allow_checkpointing_with_cache,
    cache_argument,
    generation_hook as prefix_generation_hook,
    prefix_forward,
)
from .prompt import (
    PromptEmbedding,
    fill_prompt_learning_config,
    generation_hook as prompt_generation_hook,
    prompt_forward,
)

INJECTORS = {"LORA": lora.inject, "IA3": ia3.inject, "BOTTLENECK_ADAPTER": adapters.inject}
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _infer_task_type(model) -> Optional[str]:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), "FEATURE_EXTRACTION")


class TunerModel(nn.Module):
    """Holds the user's model as `.model` (PEFT's LoraModel layout, hence its parameter names
    `base_model.model.<path>`) and passes calls and attributes through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """`model` with adapters of one method (LoRA, IA³, bottleneck adapters, prompt or prefix tuning).

    Only the active adapter's parameters (plus modules_to_save copies and LoRA biases it asks for) train.
    Anything PeftModel does not define (config, generate's helpers, ...) comes from the wrapped model.
    """

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default", tokenizer=None,
                 _from_file: bool = False):
        super().__init__()
        if not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a peft_layers config, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.peft_config: Dict[str, PeftConfig] = {}
        self.peft_type = config.peft_type
        self.is_prompt_learning = config.is_prompt_learning
        self.active_adapter = adapter_name
        self._adapters_disabled = False
        if self.is_prompt_learning:
            self.base_model = model  # PEFT's layout: base_model.<path>, prompt_encoder.<name>
            self.prompt_encoder = nn.ModuleDict()
        else:
            self.base_model = TunerModel(model)
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config, tokenizer=tokenizer, _from_file=_from_file)
        self.train(model.training)  # keep the wrapped model's mode

    # ---- plumbing ------------------------------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder"):
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self.is_prompt_learning else self.base_model.model

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def active_adapter(self) -> str:
        """The active adapter (the first of `active_adapters` when several LoRA adapters are summed)."""
        return self.active_adapters[0]

    @active_adapter.setter
    def active_adapter(self, name: str) -> None:
        self.active_adapters = [name]

    def forward(self, *args, adapter_names: Optional[List[str]] = None, **kwargs):
        """The wrapped model's forward. adapter_names (LoRA, eval mode): one adapter name per batch row, or
        "__base__" for the base model alone (PEFT's mixed-adapter batches)."""
        if adapter_names is not None:
            with self._mixed_batch(adapter_names, args, kwargs):
                return self.base_model(*args, **kwargs)
        if not self.is_prompt_learning or self._adapters_disabled:
            return self.base_model(*args, **kwargs)
        if args:  # positional input_ids, as transformers models take them
            kwargs["input_ids"], args = args[0], args[1:]
            if args:
                raise TypeError("pass arguments other than input_ids by keyword")
        model, config = self.get_base_model(), self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        if config.peft_type == "PROMPT_TUNING":
            return prompt_forward(model, encoder, config, **kwargs)
        frozen = self.training or kwargs.get("use_cache") is False  # a cache that never grows: safe to recompute
        return prefix_forward(model, encoder, config, frozen, **kwargs)

    def generate(self, *args, adapter_names: Optional[List[str]] = None, **kwargs):
        """The wrapped model's generate; prompt methods feed their tokens/prefix in through a forward pre-hook.
        adapter_names: as in forward (repeated for each beam with num_beams > 1)."""
        model = self.get_base_model()
        if adapter_names is not None:
            beams = kwargs.get("num_beams")
            if isinstance(adapter_names, (list, tuple)) and isinstance(beams, int) and beams > 1:
                adapter_names = [n for n in adapter_names for _ in range(beams)]
            with self._mixed_batch(adapter_names, args, {}), torch.no_grad():
                return model.generate(*args, **kwargs)
        if not self.is_prompt_learning or self._adapters_disabled:
            return model.generate(*args, **kwargs)
        config, encoder = self.active_peft_config, self.prompt_encoder[self.active_adapter]
        if config.peft_type == "PROMPT_TUNING":
            hook = prompt_generation_hook(encoder, model.get_input_embeddings())
        else:
            hook = prefix_generation_hook(encoder, config, model)
        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                return model.generate(*args, **kwargs)
        finally:
            handle.remove()

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, tokenizer=None, _from_file: bool = False) -> None:
        """Add a (trainable unless config.inference_mode) adapter; it becomes active only via set_adapter
        (or when it is the first)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if config.peft_type != self.peft_type:
            raise ValueError(f"this PeftModel holds {self.peft_type} adapters; cannot add {config.peft_type}")
        config = copy.deepcopy(config)
        model = self.get_base_model()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        if config.is_prompt_learning:
            if config.task_type is None:
                config.task_type = _infer_task_type(model)
            device = next(model.parameters()).device
            if config.peft_type == "PREFIX_TUNING":
                cache_argument(model)  # raises for models without a KV cache
                fill_prompt_learning_config(config, model, kv_heads=True)
                config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
                # a checkpoint holds the projected prefix: load it directly, as PEFT does in inference mode
                project = config.prefix_projection and not config.inference_mode and not _from_file
                encoder = PrefixEncoder(config, project, device=device)
                allow_checkpointing_with_cache(model, True)
            else:
                fill_prompt_learning_config(config, model)
                encoder = PromptEmbedding(config, model.get_input_embeddings(), tokenizer)
            self.prompt_encoder[adapter_name] = encoder.train(self.training)
        else:
            INJECTORS[config.peft_type](model, config, adapter_name)
        wrap_modules_to_save(model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh()

    def set_adapter(self, adapter_name: Union[str, List[str]]) -> None:
        """Make one adapter active, or (LoRA) a list of them: their updates are summed and all of them train."""
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_name must be an adapter name or a non-empty list of names, got {adapter_name!r}")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; adapters: {list(self.peft_config)}")
        if len(names) > 1 and self.peft_type != "LORA":
            raise ValueError(f"adapter_name: several active adapters are supported for LoRA, not {self.peft_type}")
        if any(layer.merged for layer in tuner_layers(self.get_base_model()).values()):
            raise RuntimeError("unmerge_adapter() before switching adapters")
        self.active_adapters = list(dict.fromkeys(names))
        self._refresh()

    def add_weighted_adapter(self, adapters: List[str], weights: List[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None) -> None:
        """A new LoRA adapter `adapter_name` combining `adapters` with `weights`, as PEFT's: "linear" (same r;
        A = Σ √(w·s) A_i, B likewise), "cat" (rank Σ r_i: exactly Σ w_i·s_i·B_i A_i) or "svd" (rank svd_rank or
        max r_i: truncated SVD of Σ w_i·s_i·ΔW_i). It is not made active."""
        from .weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names, args, kwargs):
        """Route each batch row through its adapter (multi_lora.RowGroups on every LoRA layer) for one call."""
        groups = multi_lora.check_adapter_names(self, adapter_names, args, kwargs)
        model = self.get_base_model()
        layers = list(tuner_layers(model).values()) + list(save_wrappers(model).values())
        for m in layers:
            m.row_groups = groups
        try:
            yield
        finally:
            for m in layers:
                m.row_groups = None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}")
        model = self.get_base_model()
        for layer in tuner_layers(model).values():
            if adapter_name in layer.adapter_names():
                layer.delete_adapter(adapter_name)
        for wrapper in save_wrappers(model).values():
            wrapper.modules_to_save.pop(adapter_name, None)
        if self.is_prompt_learning:
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if remaining or not self.peft_config:
            self.active_adapters = remaining or [adapter_name]
        else:
            self.active_adapter = next(iter(self.peft_config))
        self._refresh()

    def _refresh(self) -> None:
        """Point every layer at the active adapters and let exactly their parameters train."""
        name, model = self.active_adapter, self.get_base_model()
        config = self.peft_config.get(name)
        active = {n for n in self.active_adapters if n in self.peft_config and not self.peft_config[n].inference_mode}
        train = config is not None and not config.inference_mode
        for layer in tuner_layers(model).values():
            layer.set_adapter(self.active_adapters)
            for n in layer.adapter_names():
                for p in layer.adapter_parameters(n):
                    p.requires_grad_(n in active)
        for wrapper in save_wrappers(model).values():
            wrapper.active_adapter = name
            for n, m in wrapper.modules_to_save.items():
                m.requires_grad_(train and n == name)
        if self.is_prompt_learning:
            for n, enc in self.prompt_encoder.items():
                enc.requires_grad_(train and n == name)
        if self.peft_type == "LORA":
            for cfg in self.peft_config.values():
                for p in lora.bias_parameters(model, cfg).values():
                    p.requires_grad_(False)
            for n in active:
                for p in lora.bias_parameters(model, self.peft_config[n]).values():
                    p.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, the model computes exactly the base model (merged adapters are unmerged and re-merged after)."""
        model = self.get_base_model()
        layers = tuner_layers(model).values()
        merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged}
        for layer in merged:
            layer.unmerge()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            for layer, names in merged.items():
                layer.merge(adapter_names=names)

    def _set_disabled(self, value: bool) -> None:
        self._adapters_disabled = value
        model = self.get_base_model()
        for m in list(tuner_layers(model).values()) + list(save_wrappers(model).values()):
            m.disabled = value

    # ---- merging -------------------------------------------------------------------------------------
    def _check_mergeable(self):
        if self.is_prompt_learning or self.peft_type == "BOTTLENECK_ADAPTER":
            raise TypeError(f"{self.peft_type} adapters cannot be merged into the weights")

    def merge_adapter(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False) -> None:
        """Fold the active (or the named) adapters into the base weights; safe_merge raises on non-finite results."""
        self._check_mergeable()
        names = adapter_names or list(self.active_adapters)
        for layer in tuner_layers(self.get_base_model()).values():
            present = [n for n in names if n in layer.adapter_names()]
            if present:
                layer.merge(safe_merge=safe_merge, adapter_names=present)

    def unmerge_adapter(self) -> None:
        for layer in tuner_layers(self.get_base_model()).values():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        """Merge, then return the bare model (NF4 bases are requantized, with a warning)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_copies=True)

    def unload(self) -> nn.Module:
        """Return the bare model without the adapters (unmerged first)."""
        self.unmerge_adapter()
        return self._unload(keep_copies=False)

    def _unload(self, keep_copies: bool) -> nn.Module:
        model = self.get_base_model()
        for path, layer in tuner_layers(model).items():
            set_module(model, path, layer.base_layer)
        for path, wrapper in save_wrappers(model).items():
            keep = keep_copies and wrapper.active_adapter in wrapper.modules_to_save
            set_module(model, path,
                       wrapper.modules_to_save[wrapper.active_adapter] if keep else wrapper.original_module)
        allow_checkpointing_with_cache(model, False)
        return model

    # ---- counting ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self):
        """(trainable, all): an NF4 weight counts as its out×in values, its quantization state not at all."""
        override = {}
        for m in self.modules():
            if isinstance(m, nf4q.Linear4bit):
                for pname, p in m.named_parameters(recurse=False):
                    if pname != "bias":
                        override[id(p)] = m.in_features * m.out_features if pname == "weight" else 0
        trainable = total = 0
        for _, p in self.named_parameters():
            n = override.get(id(p), p.numel())
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ---- adapter weights under PEFT's key names ----------------------------------------------------------
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The adapter's tensors keyed as in PEFT's adapter_model.safetensors (live tensors, not copies)."""
        name = adapter_name or self.active_adapter
        config, model = self.peft_config[name], self.get_base_model()
        if self.is_prompt_learning:
            sd = {"prompt_embeddings": self.prompt_encoder[name]()
                  if config.peft_type == "PREFIX_TUNING" else self.prompt_encoder[name].embedding.weight}
            prefix = "base_model."
        else:
            prefix = "base_model.model."
            sd = {}
            for path, layer in tuner_layers(model).items():
                if name in layer.adapter_names():
                    sd.update({f"{prefix}{path}.{k}": v for k, v in layer.adapter_state_dict(name).items()})
            if isinstance(config, LoRAConfig):
                sd.update({prefix + path: p for path, p in lora.bias_parameters(model, config).items()})
        for path, wrapper in save_wrappers(model).items():
            if name in wrapper.modules_to_save:
                sd.update({f"{prefix}{path}.{k}": v
                           for k, v in wrapper.modules_to_save[name].state_dict(keep_vars=True).items()})
        return sd

    @torch.no_grad()
    def load_adapter_state_dict(self, adapter_name: str, state_dict: Dict[str, torch.Tensor],
                                source: str = "state dict") -> None:
        """Copy tensors keyed as adapter_state_dict into the adapter; missing, unexpected or misshapen keys raise
        ValueError naming `source` and the key."""
        expected = self.adapter_state_dict(adapter_name)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        for keys, what in ((missing, "is missing key"), (unexpected, "has unexpected key")):
            if keys:
                more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                raise ValueError(f"{source} {what} {keys[0]!r}{more}: it does not hold a {self.peft_type} adapter "
                                 f"for this model in PEFT's layout")
        for key, target in expected.items():
            src = state_dict[key]
            if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(target.shape):
                got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise ValueError(f"{source}: {key!r} has shape {got}, expected {tuple(target.shape)}")
            target.copy_(src.to(device=target.device, dtype=target.dtype))

    # ---- files ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[List[str]] = None) -> None:
        """adapter_config.json + adapter_model.safetensors (PEFT's layout); adapters other than "default" go to
        save_directory/<name>/ as PEFT does."""
        from .io import save_adapters

        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None) -> "PeftModel":
        """Wrap `model` with the adapter saved in directory `model_id` (by peft_layers or by PEFT)."""
        from .io import load_pretrained

        return load_pretrained(cls, model, model_id, adapter_name, is_trainable, config)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False) -> None:
        from .io import load_into

        load_into(self, model_id, adapter_name, is_trainable)


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default", tokenizer=None) -> PeftModel:
    """Freeze `model`, add the method of `config` as adapter `adapter_name`, and return the PeftModel.
    `tokenizer` is used by PromptTuningConfig(init="text")."""
    if isinstance(model, PeftModel) or tuner_layers(model):  # a second call would re-initialise the first adapter
        raise ValueError("model already has peft_layers adapters (get_peft_model was called on it before): use "
                         "peft_model.add_adapter(name, config) for another adapter, or merge_and_unload() first")
    return PeftModel(model, config, adapter_name=adapter_name, tokenizer=tokenizer)
