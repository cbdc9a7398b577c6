"""QLoRA under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) with NF4 weights sharded in packed form.

Linear4bit keeps its quantized tensors as frozen nn.Parameters, so plain `fully_shard` shards them along dim 0
like any other parameter and all-gathers the uint8 bytes themselves (FSDP2 all-gathers a group with mixed
dtypes through a uint8 view): about 4.13 bits per weight on the wire, never bf16. Only one thing needs care,
and `shard_qlora` does it: the per-tensor constants of every Linear4bit (the 16-entry NF4 table, the 256-entry
nested table, the nested offset) and the tiny fp32 second-level scales stay replicated (`ignored_params`):
- sharding a 1-element offset leaves some ranks an empty shard, and the quant-state JSON needs its value;
- every sharded NF4 tensor is then uint8, so a MixedPrecisionPolicy(param_dtype=bf16) casts only the float
  parameters (LoRA, norms, biases) and never rounds a quantization scale.
Replicating them costs 4 bytes per 16384 weights plus ~1 KB per layer.

Checkpoints: `save_sharded`/`load_sharded` write and read torch.distributed.checkpoint directories whose keys
are bitsandbytes' (the same as a single-process `model.state_dict()`); `full_state_dict` gathers one on every rank.
"""
import math
import os
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .linear import Linear4bit
from .tensor import QS_KEY

# Linear4bit parameters kept whole on every rank (see the module docstring).
_REPLICATED = ("weight_code", "weight_nested_code", "weight_nested_offset", "weight_nested_absmax")
# FSDP2 before torch 2.12 wraps every shard as nn.Parameter(t) with requires_grad=True, which integer tensors
# refuse (seen with torch 2.11 on two H200s); there the packed bytes and absmax codes stay replicated as well.
CAN_SHARD_INTEGERS = torch.torch_version.TorchVersion(torch.__version__) >= "2.12"


def replicated_params(model: nn.Module) -> set:
    """The Linear4bit parameters to pass to fully_shard as `ignored_params` (constants and fp32 nested scales;
    on torch < 2.12 also the integer NF4 tensors)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    keep = {getattr(m, n) for m in layers for n in _REPLICATED if getattr(m, n) is not None}
    if not CAN_SHARD_INTEGERS:
        keep |= {p for m in layers for p in m.parameters(recurse=False) if not p.is_floating_point()}
    return keep


def _default_blocks(model: nn.Module):
    """Children of the largest nn.ModuleList holding Linear4bit layers (the decoder layers of a transformer)."""
    def has_nf4(m):
        return any(isinstance(x, Linear4bit) for x in m.modules())

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and has_nf4(m)]
    if not lists:
        return [c for c in model.children() if has_nf4(c)]
    return [b for b in max(lists, key=len) if has_nf4(b)]


def shard_qlora(model: nn.Module, blocks: Union[None, type, tuple, Iterable[nn.Module]] = None, *, mesh=None,
                mp_policy=None, reshard_after_forward=None, **fully_shard_kwargs) -> nn.Module:
    """Apply `fully_shard` to each block of `model`, then to `model` itself (the root); returns `model`.

    `blocks`: the modules to wrap, or a module class (or tuple of classes) to wrap every instance of; by default
    the layers of the largest nn.ModuleList that holds Linear4bit modules. One FSDP group per block means one
    all-gather per block in forward and one in backward, with every NF4 tensor of the block in the same buffer.
    Blocks, not single Linear4bit layers: peft_layers' fused QLoRA forward reads the base layer's tensors
    without calling its forward, so only a group around the whole block is sure to be gathered in time.
    `reshard_after_forward` left None keeps FSDP's default: blocks free their gathered weights after forward
    and gather again in backward, the root keeps its own. Other keyword arguments go to `fully_shard`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    if not CAN_SHARD_INTEGERS:
        warnings.warn(f"torch {torch.__version__}: FSDP2 cannot shard integer parameters before torch 2.12, so the "
                      "NF4 weights stay replicated on every rank (LoRA and float parameters are sharded)")
    if isinstance(blocks, (type, tuple)):
        blocks = [m for m in model.modules() if isinstance(m, blocks)]
    blocks = list(_default_blocks(model) if blocks is None else blocks)
    ignored = replicated_params(model)
    ignored |= set(fully_shard_kwargs.pop("ignored_params", None) or ())
    if mp_policy.param_dtype not in (None, torch.float32):
        fp32_absmax = [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight_nested_absmax is None]
        if fp32_absmax:
            raise ValueError("mp_policy.param_dtype would round the fp32 absmax of Linear4bit layers quantized "
                             "without double quantization; quantize with double_quant=True or leave "
                             "param_dtype unset and use Linear4bit(compute_dtype=...) instead")
    kw = dict(mesh=mesh, mp_policy=mp_policy, ignored_params=ignored, **fully_shard_kwargs)
    if reshard_after_forward is not None:
        kw["reshard_after_forward"] = reshard_after_forward
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    # FSDP moves the parameters it manages to the mesh's device; the replicated ones must follow.
    device = next((p.device for p in model.parameters() if p not in ignored), None)
    for p in ignored:
        if device is not None and p.device != device:
            p.data = p.data.to(device)
    return model


# ---- traffic accounting -----------------------------------------------------------------------------------

def nf4_bytes(model: nn.Module) -> dict:
    """Bytes of the NF4 weights of `model` (sharded or not, counted at full size): `wire` is what FSDP
    all-gathers (packed codes + absmax), `replicated` what every rank keeps whole, `bf16` what the same
    weights would take in bf16; `bits_per_param` is wire bits per weight."""
    wire = repl = numel = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            numel += m.in_features * m.out_features
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    continue
                nbytes = p.numel() * p.element_size()  # DTensor: the global numel
                if name in _REPLICATED:
                    repl += nbytes
                else:
                    wire += nbytes
    return dict(wire=wire, replicated=repl, bf16=2 * numel, params=numel,
                bits_per_param=8.0 * wire / max(numel, 1))


def _sharded_params(model: nn.Module):
    """Every parameter FSDP manages, as its sharded DTensor (even while the module holds the gathered one)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()  # private, but the only place that knows
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch < 2.12: at most one group per module
                groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
            for group in groups:
                out += [fp.sharded_param for fp in group.fsdp_params]
    return out


def all_gather_bytes(model: nn.Module, param_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes one all-gather of every sharded parameter of `model` produces (world size × padded shard), i.e.
    the traffic of one forward with every FSDP group resharded. Float parameters count in `param_dtype` when set."""
    total = 0
    for p in _sharded_params(model):
        world = p.device_mesh.size()
        rows = -(-p.shape[0] // world) * world if p.dim() else 1  # FSDP pads dim 0 to a multiple of world
        esize = p.element_size()
        if param_dtype is not None and p.is_floating_point():
            esize = torch.empty((), dtype=param_dtype).element_size()
        total += rows * math.prod(p.shape[1:]) * esize
    return total


def _default_all_gather():
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    return DefaultAllGather


class AllGatherMeter(_default_all_gather()):
    """FSDP2's default all-gather, counting what it moves: install with `AllGatherMeter.attach(model)`.

    `bytes` is the size of every all-gather output (world size × per-rank input), `calls` their number;
    `reset()` zeroes both.
    """

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self.bytes, self.calls = 0, 0

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.bytes += output_tensor.numel() * output_tensor.element_size()
        self.calls += 1
        return super().__call__(output_tensor, input_tensor, group, async_op)

    @classmethod
    def attach(cls, model: nn.Module) -> "AllGatherMeter":
        from torch.distributed.fsdp import FSDPModule

        meter = cls()
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_custom_all_gather(meter)
        return meter


# ---- checkpoints ------------------------------------------------------------------------------------------

def save_sharded(model: nn.Module, checkpoint_id, optimizer=None) -> None:
    """Write `model.state_dict()` with torch.distributed.checkpoint into the directory `checkpoint_id`: each rank
    writes its own shards; the keys are bitsandbytes' (`dcp_to_torch_save` turns the directory into the
    single-process state dict). With `optimizer`, its state goes to the subdirectory `optimizer`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(model.state_dict(), checkpoint_id=checkpoint_id)
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(checkpoint_id, "optimizer"))


def load_sharded(model: nn.Module, checkpoint_id, optimizer=None, strict: bool = True):
    """Read a `save_sharded` directory into `model` (sharded or not, any world size) in place, and into
    `optimizer` when given; returns load_state_dict's result."""
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()
    # The quant-state JSON blob's length depends on its content (nested_offset): size it as saved.
    saved = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    for key in sd:
        if key.endswith(QS_KEY) and key in saved:
            sd[key] = torch.empty(tuple(saved[key].size), dtype=torch.uint8)
    dcp.load(sd, checkpoint_id=checkpoint_id)
    result = model.load_state_dict(sd, strict=strict)
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        osd = {"optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(osd, checkpoint_id=os.path.join(checkpoint_id, "optimizer"))
        set_optimizer_state_dict(model, optimizer, osd["optim"])
    return result


def full_state_dict(model: nn.Module, cpu: bool = True) -> dict:
    """The single-process state dict (bitsandbytes' keys, full tensors) of a sharded model, on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.cpu() if cpu else value
    return out


def load_full_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a single-process (full) state dict into a sharded model: each rank keeps its own shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = model.state_dict()
    sd = {}
    for key, value in state_dict.items():
        target = local.get(key)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
        sd[key] = value
    return model.load_state_dict(sd, strict=strict)

