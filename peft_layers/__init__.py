"""peft_layers: parameter-efficient fine-tuning on nf4q (LoRA, QLoRA, bottleneck adapters, prefix and prompt
tuning, IA³), reading and writing Hugging Face PEFT's adapter files."""
import torch as _torch  # noqa: F401  (nf4q's extension needs torch loaded first)

from .adapters import BottleneckAdapterLayer
from .config import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)
from .forgetting import EWC, ReplayBuffer
from .ia3 import IA3Layer
from .inject import ModulesToSaveWrapper, TunerLayer
from .io import read_config, read_weights
from .lora import LoRALayer
from .model import PeftModel, get_peft_model
from .prefix import PrefixEncoder
from .prompt import PromptEmbedding
from .qlora import QLoRALinear, lora_forward_4bit

__all__ = ["LoRAConfig", "IA3Config", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig", "PeftConfig",
           "PromptLearningConfig", "PeftModel", "get_peft_model", "QLoRALinear", "LoRALayer", "IA3Layer",
           "BottleneckAdapterLayer", "PrefixEncoder", "PromptEmbedding", "TunerLayer", "ModulesToSaveWrapper",
           "lora_forward_4bit", "read_config", "read_weights", "EWC", "ReplayBuffer"]
