"""Method configurations. `to_dict()`/`from_dict()` speak PEFT's adapter_config.json: the same keys and
`peft_type`, so a file written here loads in `peft` and the reverse (bottleneck adapters, which PEFT lacks,
use the same layout with our own peft_type)."""
import copy
from dataclasses import dataclass, field, fields
from typing import ClassVar, Dict, List, Optional, Union

Targets = Optional[Union[str, List[str]]]


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _as_list(value, name):
    """None, a str (regex or "all-linear") or a list of names; sets/tuples become sorted lists."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise TypeError(f"{name} must be None, a str or a list of str, got {type(value).__name__}")


@dataclass
class PeftConfig:
    """Fields every method shares (PEFT's PeftConfig). Subclasses set `peft_type`."""

    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False
    # our field name -> (PEFT's key, export fn, import fn) where they differ
    _RENAMED: ClassVar[Dict[str, tuple]] = {}
    # PEFT keys whose non-default values change what an adapter computes and that we do not implement
    _UNSUPPORTED: ClassVar[Dict[str, object]] = {}
    # constructor-only aliases of other fields: never written to or read from files
    _ALIASES: ClassVar[tuple] = ()

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        self.modules_to_save = _as_list(self.modules_to_save, "modules_to_save")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name in self._ALIASES:
                continue
            value = copy.deepcopy(getattr(self, f.name))
            if f.name in self._RENAMED:
                key, export, _ = self._RENAMED[f.name]
                out[key] = export(value)
            else:
                out[f.name] = value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "PeftConfig":
        """Build the config for d["peft_type"] (called on PeftConfig) or for `cls`. Unknown keys (PEFT writes many)
        are ignored; keys that would change the computation and that peft_layers lacks raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "peft_type" not in d:
            raise ValueError(f"{source}: missing key 'peft_type'")
        peft_type = d["peft_type"]
        target = CONFIG_CLASSES.get(peft_type) if cls is PeftConfig else cls
        if target is None:
            raise ValueError(f"{source}: 'peft_type' {peft_type!r} is not supported by peft_layers "
                             f"(supported: {sorted(CONFIG_CLASSES)})")
        if peft_type != target.peft_type:
            raise ValueError(f"{source}: 'peft_type' is {peft_type!r}, expected {target.peft_type!r}")
        for key, default in target._UNSUPPORTED.items():
            value = d.get(key, default)
            if value not in (default, None) and not (isinstance(value, (dict, list)) and not value):
                raise ValueError(f"{source}: {key!r}={value!r} is not supported by peft_layers")
        by_key = {v[0]: (name, v[2]) for name, v in target._RENAMED.items()}
        kwargs = {}
        names = {f.name for f in fields(target)}
        for key, value in d.items():
            if key in by_key:
                name, importer = by_key[key]
                kwargs[name] = importer(value)
            elif key in names and key not in target._RENAMED and key not in target._ALIASES:
                kwargs[key] = value
        try:
            return target(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


# ---- LoRA --------------------------------------------------------------------------------------------

@dataclass
class LoRAConfig(PeftConfig):
    """LoRA: W x + (α/r)·B A dropout(x), A [r, in] kaiming-uniform(a=√5), B [out, r] zeros (α/√r with rsLoRA).

    target_modules: None (a default per model type), a list of names (exact or dotted suffix), a regex
    (full match on the module path) or "all-linear" (every Linear / Linear4bit / Conv1D except the output head).
    layers_to_transform: int or list of layer indices (the first number in the module path, or the one after
    `layers_pattern`). bias: "none" | "all" | "lora_only" (those biases are trained and saved).
    init_lora_weights (PEFT's values): True (B = 0), False (A and B random: not a no-op), "gaussian",
    "pissa" / "pissa_niter_<n>" (top-r SVD of W moved into A, B), "olora" (QR of W), "loftq" (with
    loftq_config {"loftq_bits": 4, "loftq_iter": n}: the base becomes NF4 Q with Q + s·BA ≈ W). `init` is the
    older spelling ("default" = True, "gaussian"). use_dora: DoRA (a learned magnitude per output row).
    """

    peft_type: ClassVar[str] = "LORA"
    _ALIASES: ClassVar[tuple] = ("init",)
    _UNSUPPORTED: ClassVar[Dict[str, object]] = {
        "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
        "target_parameters": None, "use_qalora": False, "trainable_token_indices": None,
        "alora_invocation_tokens": None,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Targets = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    loftq_config: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    exclude_modules: Targets = None
    fan_in_fan_out: bool = False
    init: Optional[str] = None  # alias of init_lora_weights, consumed by __post_init__

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
               f"r must be a positive int, got {self.r!r}")
        _check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
               f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        _check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
               f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(self.bias in ("none", "all", "lora_only"),
               f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init is not None:
            _check(self.init in ("default", "gaussian"), f"init must be 'default' or 'gaussian', got {self.init!r}")
            alias = True if self.init == "default" else "gaussian"
            _check(self.init_lora_weights in (True, alias),
                   f"init={self.init!r} contradicts init_lora_weights={self.init_lora_weights!r}; "
                   "use init_lora_weights")
            self.init_lora_weights, self.init = alias, None
        _check(valid_init(self.init_lora_weights),
               f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or 'loftq', "
               f"got {self.init_lora_weights!r}")
        _check(isinstance(self.use_dora, bool), f"use_dora must be a bool, got {self.use_dora!r}")
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):  # PEFT's LoftQConfig dataclass
            self.loftq_config = {k: getattr(self.loftq_config, k) for k in ("loftq_bits", "loftq_iter")
                                 if hasattr(self.loftq_config, k)}
        if self.init_lora_weights == "loftq":
            _check(bool(self.loftq_config), "init_lora_weights='loftq' needs loftq_config, e.g. "
                   "{'loftq_bits': 4, 'loftq_iter': 1}")
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            _check(bits == 4, f"loftq_config['loftq_bits'] must be 4 (NF4), got {bits!r}")
            _check(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1,
                   f"loftq_config['loftq_iter'] must be a positive int, got {iters!r}")
        self.target_modules = _as_list(self.target_modules, "target_modules")
        self.exclude_modules = _as_list(self.exclude_modules, "exclude_modules")
        if self.layers_to_transform is not None and not isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]


def valid_init(value) -> bool:
    if isinstance(value, bool) or value in ("gaussian", "pissa", "olora", "loftq"):
        return True
    return isinstance(value, str) and value.startswith("pissa_niter_") and value[12:].isdigit() and int(value[12:]) > 0


# ---- IA³ ---------------------------------------------------------------------------------------------

@dataclass
class IA3Config(PeftConfig):
    """IA³: learned vectors (init ones) scaling the output of target modules, or the input of those also listed in
    `feedforward_modules`. Matching works as LoRA's target_modules."""

    peft_type: ClassVar[str] = "IA3"
    _UNSUPPORTED: ClassVar[Dict[str, object]] = {"target_parameters": None}

    target_modules: Targets = None
    feedforward_modules: Targets = None
    exclude_modules: Targets = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.target_modules = _as_list(self.target_modules, "target_modules")
        self.feedforward_modules = _as_list(self.feedforward_modules, "feedforward_modules")
        self.exclude_modules = _as_list(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = set(self.feedforward_modules) - set(self.target_modules)
            _check(not extra, f"feedforward_modules must be a subset of target_modules, extra: {sorted(extra)}")


# ---- bottleneck adapters (no PEFT format: our own peft_type, same file layout) --------------------------

@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output h, up zero-initialised.

    kind "houlsby": after the attention output projection and after the FFN output of every block;
    "pfeiffer": after the FFN output only. bottleneck = max(1, hidden // reduction_factor). The output
    projections are found for Llama-like, GPT-2 and BERT-like models; other models name them with
    attn_output_modules / ffn_output_modules (lists of names or a regex, matched like LoRA's target_modules).
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    kind: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    attn_output_modules: Targets = None
    ffn_output_modules: Targets = None

    def __post_init__(self):
        super().__post_init__()
        _check(self.kind in ("houlsby", "pfeiffer"), f"kind must be 'houlsby' or 'pfeiffer', got {self.kind!r}")
        _check(isinstance(self.reduction_factor, int) and self.reduction_factor > 0,
               f"reduction_factor must be a positive int, got {self.reduction_factor!r}")
        _check(self.non_linearity in ("relu", "swish", "gelu"),
               f"non_linearity must be 'relu', 'swish' or 'gelu', got {self.non_linearity!r}")
        self.attn_output_modules = _as_list(self.attn_output_modules, "attn_output_modules")
        self.ffn_output_modules = _as_list(self.ffn_output_modules, "ffn_output_modules")


# ---- prompt learning -------------------------------------------------------------------------------------

@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields PEFT's prompt-learning configs share; token_dim, num_layers, num_attention_heads and
    num_transformer_submodules are filled in from the model when the adapter is created."""

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
               f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt: num_virtual_tokens learned embeddings prepended to the input embeddings (attention mask
    extended with ones, labels with -100). init "random" (N(0, 1)) or "text" (embeddings of `init_text`'s
    tokens, repeated to length; pass the tokenizer to get_peft_model or set tokenizer_name_or_path)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    _RENAMED: ClassVar[Dict[str, tuple]] = {
        "init": ("prompt_tuning_init", lambda v: v.upper(), lambda v: str(v).lower()),
        "init_text": ("prompt_tuning_init_text", lambda v: v, lambda v: v),
    }

    init: str = "random"
    init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _check(self.init in ("random", "text"), f"init must be 'random' or 'text', got {self.init!r}")
        _check(self.init != "text" or self.init_text, "init='text' needs init_text")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: per-layer learned keys/values (num_virtual_tokens of them) in front of every attention's
    keys/values, through the model's KV cache; attention mask extended with ones. prefix_projection=True
    reparameterises them through a 2-layer tanh MLP (hidden encoder_hidden_size, default token_dim) while
    training; the file stores the projected prefix, as PEFT does, so the MLP is not needed to load it."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None


CONFIG_CLASSES = {c.peft_type: c for c in (LoRAConfig, IA3Config, AdapterConfig, PromptTuningConfig,
                                           PrefixTuningConfig)}
