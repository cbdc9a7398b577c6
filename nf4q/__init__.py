"""nf4q: 4-bit NormalFloat quantization with C++/CUDA kernels, a drop-in Linear4bit and paged optimizers."""
import torch  # noqa: F401  (the extension links against libc10: torch must be loaded first)

from . import (
    _C,  # noqa: F401  (loads the compiled ops first)
    _ops,
    optim,
)
from .checkpoint import load_quantized, save_quantized
from .codebook import dynamic_map, fp8_e4m3_map, nested_map, nf4_code
from .grouping import group_projections
from .linear import Linear4bit, quantize_model
from .loading import from_pretrained
from .tensor import FormatError, NF4Weight, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["NF4Weight", "FormatError", "Linear4bit", "quantize", "dequantize", "quantize_model", "nf4_code",
           "nested_map", "fp8_e4m3_map", "dynamic_map", "has_cuda_kernels", "load_quantized", "save_quantized",
           "from_pretrained", "group_projections"]


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("nf4q::gemm_4bit", "CUDA")
