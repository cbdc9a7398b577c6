"""Linear4bit, a drop-in nn.Linear with an NF4 weight, and quantize_model for whole models."""

import torch
from torch import nn

from . import _ops
from .grouping import group_projections
from .naming import matches
from .tensor import NF4Weight, quantize

# NF4Weight tensor field -> parameter name on the module. They are frozen nn.Parameters (not buffers) so
# that FSDP2 can shard them and `module.to(device)` moves them.
_PARAMS = {"packed": "weight", "absmax": "weight_absmax", "code": "weight_code",
           "nested_absmax": "weight_nested_absmax",
           "nested_code": "weight_nested_code", "nested_offset": "weight_nested_offset"}
# The parameters in the order of the ops' W4 argument group.
_W4_NAMES = tuple(_PARAMS[f] for f in ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset", "code"))


def draw_dropout_seed() -> int:
    """The seed of one fused LoRA-dropout mask, from torch's CPU generator (no GPU sync; reproducible under
    torch.manual_seed, and restored by gradient checkpointing's RNG-state handling on recomputation)."""
    return int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64))


class Linear4bit(nn.Module):
    """y = x @ dequant(W)^T + b with W stored in NF4 (+ double quantization): about 4.13 bits per weight.

    state_dict()/load_state_dict() use bitsandbytes' keys (`weight`, `weight.absmax`, ...,
    `weight.quant_state.bitsandbytes__nf4`), so checkpoints move both ways between nf4q and bitsandbytes.
    The input is cast to `compute_dtype` when one is set; the output has the input's dtype.
    """

    _projection_group = None  # (ProjectionGroup, index) once nf4q.group_projections grouped this layer

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=None,
                 blocksize: int = 64, double_quant: bool = True, nested_map="fp8_e4m3", device=None, dtype=None):
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype or torch.float32)
        self._init_from(dense.weight.data, dense.bias.data if bias else None, compute_dtype, blocksize,
                        double_quant, nested_map)

    def _init_from(self, weight, bias, compute_dtype, blocksize, double_quant, nested_map):
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.compute_dtype = compute_dtype
        self.set_quantized(quantize(weight, blocksize=blocksize, double_quant=double_quant, nested_map=nested_map))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=None, blocksize: int = 64, double_quant: bool = True,
                    nested_map="fp8_e4m3") -> "Linear4bit":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        bias = linear.bias.data if linear.bias is not None else None
        module._init_from(linear.weight.data, bias, compute_dtype, blocksize, double_quant, nested_map)
        module.train(linear.training)
        return module

    # ---- the quantized weight -----------------------------------------------------------------
    def set_quantized(self, qw: NF4Weight) -> None:
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(qw.shape)} does not match ({self.out_features}, {self.in_features})")
        for fieldname, pname in _PARAMS.items():
            t = getattr(qw, fieldname)
            self.register_parameter(pname, nn.Parameter(t, requires_grad=False) if t is not None else None)
        self.blocksize, self.nested_blocksize, self.weight_dtype = qw.blocksize, qw.nested_blocksize, qw.dtype

    @property
    def quantized_weight(self) -> NF4Weight:
        """The weight as an NF4Weight (a view over this module's parameters, no copy)."""
        return NF4Weight(**{f: (getattr(self, p).data if getattr(self, p) is not None else None)
                            for f, p in _PARAMS.items()},
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize, nested_blocksize=self.nested_blocksize)

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self.quantized_weight.dequantize(dtype)

    # The op arguments straight from _parameters (where FSDP2 swaps its unsharded tensors in too): nn.Module's
    # __getattr__ per tensor was ~6 of the ~17 µs of Python around every layer call (CPU, timeit).
    def _w4(self):
        p = self._parameters
        return (*[p[n] for n in _W4_NAMES], self.blocksize, self.nested_blocksize,
                [self.out_features, self.in_features])

    def _bias_and_input(self, x):
        """(compute dtype, bias, x) in the compute dtype, with no .to() call when nothing changes (~2 µs each)."""
        dtype = self.compute_dtype or x.dtype
        return dtype, self._bias_in(dtype), (x if x.dtype == dtype else x.to(dtype))

    def _bias_in(self, dtype):
        """The bias (or None) in `dtype`."""
        bias = self.bias
        return bias if bias is None or bias.dtype == dtype else bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._projection_group is not None and not torch.compiler.is_compiling():
            group, index = self._projection_group
            y = group.output(index, x)
            if y is not None:
                return y
        _, bias, xc = self._bias_and_input(x)
        y = _ops.gemm_4bit(xc, *self._w4(), bias=bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def lora_forward(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     dropout_p: float = 0.0) -> torch.Tensor:
        """The fused QLoRA forward: x·Wᵀ + b + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ in one op call, with one
        backward node (autograd in C++) that saves x, lora_A and lora_B only.

        lora_A is [r, in_features], lora_B [out_features, r], in any float dtype (cast to the compute dtype inside
        the op; their gradients come back in their own dtype). `dropout_p` > 0 applies LoRA dropout to the LoRA
        branch only, as PEFT's lora_dropout does (pass 0 in eval mode); its mask is drawn from torch's CPU
        generator, so `torch.manual_seed` makes it reproducible and gradient checkpointing recomputes the same one.
        Under torch.compile with dropout the unfused form runs (base + F.dropout + two matmuls), which the
        compiler fuses itself.
        """
        dtype, bias, xc = self._bias_and_input(x)
        if dropout_p > 0 and torch.compiler.is_compiling():
            h = torch.nn.functional.dropout(x, dropout_p, training=True).to(dtype)
            lora = (h @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t()
            return (_ops.gemm_4bit(xc, *self._w4(), bias=bias) + scaling * lora).to(x.dtype)
        seed = draw_dropout_seed() if dropout_p > 0 else 0
        y = _ops.lora_gemm_4bit(xc, *self._w4(), bias=bias, lora_A=lora_A, lora_B=lora_B, scale=scaling,
                                dropout_p=dropout_p, seed=seed)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.weight_nested_absmax is not None}")

    # ---- device moves keep the data packed; dtype casts (model.half()) never touch quantized tensors ----
    def _apply(self, fn, recurse=True):
        before = {n: getattr(self, n).data for n in _PARAMS.values() if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            param = getattr(self, name)
            if param.dtype != old.dtype:
                param.data = old.to(param.device)
        return self

    # ---- bitsandbytes-compatible state dict ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.quantized_weight.state_dict(prefix)
        for key, value in sd.items():
            destination[key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As nn.Linear's: missing keys, unexpected keys (with strict) and size mismatches are reported, never
        # broadcast or dropped. The weight is the group of bitsandbytes keys; a malformed group is a FormatError.
        weight_keys = {prefix + k for k in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                            "weight.nested_quant_map")}
        own = {k: v for k, v in state_dict.items()
               if k in weight_keys or k.startswith(prefix + "weight.quant_state.")}
        if not own:
            missing_keys.append(prefix + "weight")
        else:
            qw = NF4Weight.from_state_dict(own, prefix)
            if tuple(qw.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(qw.shape)} "
                                  f"from checkpoint, the shape in current model is "
                                  f"{(self.out_features, self.in_features)}.")
            else:
                device = self.weight.device
                self.set_quantized(qw if device.type == "meta" else qw.to(device))
        key = prefix + "bias"
        if self.bias is not None:
            if key not in state_dict:
                missing_keys.append(key)
            else:
                value = state_dict[key]
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or '
                                      f"Tensor-like object from checkpoint but received {type(value)}")
                elif value.shape != self.bias.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {value.shape} from "
                                      f"checkpoint, the shape in current model is {self.bias.shape}.")
                elif local_metadata.get("assign_to_params_buffers", False):
                    self.bias = nn.Parameter(value, requires_grad=self.bias.requires_grad)
                else:
                    with torch.no_grad():
                        self.bias.copy_(value)
        if strict:  # everything else under this prefix (a bias on a bias=False layer, unknown weight* keys)
            for k in state_dict:
                if k.startswith(prefix) and k not in own and (k != key or self.bias is None):
                    unexpected_keys.append(k)


def quantize_model(model: nn.Module, skip=("lm_head",), progress: bool = True, compute_dtype=None,
                   blocksize: int = 64, double_quant: bool = True, nested_map="fp8_e4m3",
                   group: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a Linear4bit, except the modules `skip` selects
    (nf4q.naming.matches: a list of names or dotted name suffixes, or one regex matching the whole name).
    `group`: also nf4q.group_projections(model) (q/k/v and gate/up decode in one launch each). Returns the model."""
    from tqdm.auto import tqdm

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, Linear4bit) and not matches(name, skip)]
    for name, linear in tqdm(targets, desc="quantizing to NF4", disable=not progress, unit="layer"):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize,
                                                      double_quant=double_quant, nested_map=nested_map))
    if group:
        group_projections(model)
    return model
