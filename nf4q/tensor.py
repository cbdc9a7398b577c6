"""NF4Weight: a packed 4-bit weight and its quantization state, in bitsandbytes' checkpoint format."""
import json
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional, Tuple

import torch

from . import _ops, _reference
from .codebook import nested_map as _nested_map, nf4_code

NESTED_BLOCKSIZE = 256
QS_KEY = "weight.quant_state.bitsandbytes__nf4"
# The one dtype table of original weights: what quantize() takes and checkpoints name (csrc/checks.h has the
# kernels' twin, is_native_float).
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INT32_MAX = 2**31 - 1


class FormatError(ValueError):
    """A checkpoint or state dict that is not a valid NF4 weight."""


def _check_blocksize(blocksize, name="blocksize"):
    """The one NF4 blocksize rule in Python (csrc/checks.h's check_blocksize is its C++ twin; tested equal)."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if not (32 <= blocksize <= 4096) or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@dataclass
class NF4Weight:
    """A weight of `shape` quantized to NF4 in blocks of `blocksize`, optionally double-quantized.

    Tensors: `packed` (uint8, (n+1)//2 × 1, first element in the high nibble), `absmax` (fp32 per block, or
    uint8 codes with double quantization), `nested_absmax` (fp32 per 256 blocks), `nested_code` (256-entry
    table), `nested_offset` (fp32 [1]), `code` (the 16 NF4 values). `dtype` is the original weight's dtype.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    TENSOR_FIELDS: ClassVar[Tuple[str, ...]] = ("packed", "absmax", "code", "nested_absmax", "nested_code",
                                                "nested_offset")

    # ---- basic properties ---------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        """Storage per weight: codes + absmax + second-level scales (the two tables are per-tensor constants)."""
        per_block = [self.packed, self.absmax, self.nested_absmax, self.nested_offset]
        nbytes = sum(t.numel() * t.element_size() for t in per_block if t is not None)
        return 8.0 * nbytes / max(self.numel(), 1)

    def op_args(self):
        """The W4 argument group of the torch.ops.nf4q ops."""
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.nested_offset, self.code,
                self.blocksize, self.nested_blocksize, list(self.shape))

    # ---- conversions --------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return _ops.dequantize_4bit(*self.op_args(), dtype=dtype or self.dtype)

    def to(self, device) -> "NF4Weight":
        """Move every tensor; the packed data is copied as is, never requantized."""
        moved = {f: getattr(self, f).to(device) for f in self.TENSOR_FIELDS if getattr(self, f) is not None}
        return replace(self, **moved)

    def cuda(self, device=None) -> "NF4Weight":
        return self.to(device if device is not None else "cuda")

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    def __repr__(self):
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, bits_per_param={self.bits_per_param:.3f})")

    # ---- checkpoint format (bitsandbytes' keys) -------------------------------------------------
    def quant_state_json(self) -> dict:
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        if self.double_quant:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested_offset.item()))
        return meta

    def state_dict(self, prefix: str = "") -> dict:
        """Tensors under bitsandbytes' keys for a Linear4bit whose module prefix is `prefix`."""
        sd = {f"{prefix}weight": self.packed, f"{prefix}weight.absmax": self.absmax,
              f"{prefix}weight.quant_map": self.code}
        if self.double_quant:
            sd[f"{prefix}weight.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}weight.nested_quant_map"] = self.nested_code
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[prefix + QS_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "NF4Weight":
        """Read a weight written by `state_dict` or by bitsandbytes; raises FormatError (naming the key and the
        field) on anything off: every JSON field is checked for type, range and finiteness, and every tensor for
        dtype, size (consistent with the JSON) and finite values."""
        def get(key):
            if prefix + key not in sd:
                raise FormatError(f"state dict is missing key {prefix + key!r}")
            value = sd[prefix + key]
            if not isinstance(value, torch.Tensor):
                raise FormatError(f"{prefix + key!r} must be a tensor, got {type(value).__name__}")
            return value

        qs_keys = [k for k in sd if k.startswith(prefix + "weight.quant_state.")]
        if qs_keys and qs_keys != [prefix + QS_KEY]:
            raise FormatError(f"{qs_keys[0]!r}: only NF4 weights (quant_state.bitsandbytes__nf4) are supported")
        meta = _read_quant_state(get(QS_KEY), prefix + QS_KEY)
        shape, blocksize, dtype = meta["shape"], meta["blocksize"], meta["dtype"]
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        packed = get("weight")
        double_quant = prefix + "weight.nested_absmax" in sd
        if double_quant != ("nested_offset" in meta):
            raise FormatError(f"{prefix + QS_KEY!r}: the JSON {'lacks' if double_quant else 'has'} the nested fields "
                              f"but the state dict {'has' if double_quant else 'lacks'} "
                              f"{prefix + 'weight.nested_absmax'!r}")
        expect = [(packed, "weight", torch.uint8, (n + 1) // 2),
                  (get("weight.quant_map"), "weight.quant_map", torch.float32, 16)]
        kw = {}
        if double_quant:
            nbs = meta["nested_blocksize"]
            kw = dict(nested_absmax=get("weight.nested_absmax").reshape(-1).contiguous(),
                      nested_code=get("weight.nested_quant_map").reshape(-1).contiguous(), nested_blocksize=nbs)
            expect += [(get("weight.absmax"), "weight.absmax", torch.uint8, blocks),
                       (kw["nested_absmax"], "weight.nested_absmax", torch.float32, -(-blocks // nbs)),
                       (kw["nested_code"], "weight.nested_quant_map", torch.float32, 256)]
            kw["nested_offset"] = torch.tensor([meta["nested_offset"]], dtype=torch.float32, device=packed.device)
        else:
            expect.append((get("weight.absmax"), "weight.absmax", torch.float32, blocks))
        for t, key, want_dtype, want_numel in expect:
            if t.dtype != want_dtype or t.numel() != want_numel:
                raise FormatError(f"{prefix + key!r} must be {want_dtype} with {want_numel} elements for shape "
                                  f"{tuple(shape)}, got {t.dtype} with {t.numel()}")
            if t.device != packed.device:
                raise FormatError(f"{prefix + key!r} is on {t.device}, but {prefix}weight is on {packed.device}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"{prefix + key!r} holds NaN or Inf values")
        qw = cls(packed=packed.reshape(-1, 1).contiguous(), absmax=get("weight.absmax").reshape(-1).contiguous(),
                 code=get("weight.quant_map").reshape(-1).contiguous(), shape=torch.Size(shape), dtype=dtype,
                 blocksize=blocksize, **kw)
        # The scales as the kernels decode them, and their products with the code, must stay finite. (Not for
        # FSDP's sharded DTensors: a shard of absmax does not line up with the shard of nested_absmax it needs.)
        sharded = any(hasattr(t, "device_mesh") for t in (qw.absmax, qw.nested_absmax) if t is not None)
        scales = None if sharded else _reference.absmax_fp32(qw.absmax, qw.nested_absmax, qw.nested_code,
                                                             qw.nested_offset, qw.nested_blocksize)
        if n and scales is not None and not (bool(torch.isfinite(scales).all()) and
                      float(scales.abs().max()) * float(qw.code.abs().max()) <= torch.finfo(torch.float32).max):
            raise FormatError(f"{prefix + 'weight.absmax'!r}: the decoded scales overflow float32 "
                              f"(times {prefix + 'weight.quant_map'!r})")
        return qw


def _read_quant_state(blob: torch.Tensor, key: str) -> dict:
    """The quant-state JSON of `key`, every field checked (type, range, finiteness); FormatError names the
    key and the field. Returns quant_type, blocksize, dtype (a torch.dtype), shape (a list) and, when
    double-quantized, nested_blocksize and nested_offset (an fp32-representable finite float)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise FormatError(f"{key!r} must be a 1-D uint8 tensor of JSON bytes, got {blob.dtype} {tuple(blob.shape)}")
    try:
        meta = json.loads(bytes(blob.detach().cpu().numpy()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{key!r} is not a valid quant-state JSON blob ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{key!r} is not a valid quant-state JSON blob (not a JSON object)")

    def bad(field, why):
        return FormatError(f"{key!r}: field {field!r} {why}, got {meta.get(field)!r}")

    def integer(field, lo, hi):
        v = meta.get(field)
        if field not in meta:
            raise FormatError(f"{key!r}: missing field {field!r}")
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(field, "must be an integer")
        if not lo <= v <= hi:
            raise bad(field, f"must be in [{lo}, {hi}]")
        return v

    if meta.get("quant_type") != "nf4":
        raise FormatError(f"{key!r}: quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    out = {"quant_type": "nf4", "blocksize": integer("blocksize", 32, 4096)}
    try:
        _check_blocksize(out["blocksize"])
    except ValueError as e:
        raise FormatError(f"{key!r}: field 'blocksize': {e}") from None
    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in _DTYPES:
        raise bad("dtype", f"must be one of {sorted(_DTYPES)}")
    out["dtype"] = _DTYPES[meta["dtype"]]
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise bad("shape", "must be a list of integers")
    if any(s < 0 for s in shape) or math.prod(shape) >= 2**62:
        raise bad("shape", "must have non-negative dims and fewer than 2^62 elements")
    out["shape"] = shape
    nested = [f for f in ("nested_blocksize", "nested_offset") if f in meta]
    if nested:
        if len(nested) != 2:
            raise FormatError(f"{key!r}: fields 'nested_blocksize' and 'nested_offset' come together; "
                              f"only {nested[0]!r}")
        out["nested_blocksize"] = integer("nested_blocksize", 1, _INT32_MAX)
        off = meta["nested_offset"]
        if not isinstance(off, (int, float)) or isinstance(off, bool):
            raise bad("nested_offset", "must be a number")
        try:  # an integer beyond float64's range, NaN, +-Infinity (JSON's literals) or beyond fp32's range
            off = float(off)
            ok = math.isfinite(off) and math.isfinite(float(torch.tensor(off, dtype=torch.float64).float()))
        except OverflowError:
            ok = False
        if not ok:
            raise bad("nested_offset", "must be finite in float32")
        out["nested_offset"] = off
        if meta.get("nested_dtype", "float32") != "float32":
            raise bad("nested_dtype", "must be 'float32'")
    return out


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_map="fp8_e4m3") -> NF4Weight:
    """Quantize a floating-point tensor to NF4 (blockwise absmax), optionally double-quantizing the scales.

    `nested_map` is "fp8_e4m3" (default), "dynamic" (bitsandbytes' table) or a sorted 256-entry tensor.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _DTYPES.values():
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    _check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError("w is empty: there is nothing to quantize")
    w = w.detach()
    code = nf4_code(w.device)
    packed, absmax = _ops.quantize_4bit(w, code, blocksize)
    if not bool(torch.isfinite(absmax).all()):  # the kernels give a block with NaN/Inf a NaN absmax
        raise ValueError("w contains NaN or Inf values; NF4 cannot represent them")
    qw = NF4Weight(packed=packed, absmax=absmax, code=code, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        table = nested_map if isinstance(nested_map, torch.Tensor) else _nested_map(nested_map)
        if table.numel() != 256 or not bool((table[1:] >= table[:-1]).all()):
            raise ValueError("nested_map must be a sorted table of 256 values")
        table = table.to(device=w.device, dtype=torch.float32).contiguous()
        # The mean in fp64: in fp32 the sum of absmax values near the fp32 maximum overflows to Inf (an all-NaN
        # weight, as bitsandbytes gives). The mean itself, and absmax - mean, always fit fp32.
        offset = absmax.double().mean().float().view(1)
        q2, absmax2 = _ops.quantize_blockwise_8bit(absmax - offset, table, NESTED_BLOCKSIZE)
        qw = replace(qw, absmax=q2, nested_absmax=absmax2, nested_code=table, nested_offset=offset)
        # code * absmax2 + offset can still round past the fp32 maximum when the absmax values come within one
        # 8-bit step of it: refuse rather than return Inf/NaN weights.
        if not bool(torch.isfinite(_reference.absmax_fp32(q2, absmax2, table, offset, NESTED_BLOCKSIZE)).all()):
            raise ValueError("w has values too close to the float32 maximum for double quantization "
                             "(the decoded scales overflow); use double_quant=False")
    return qw


def dequantize(qw: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    return qw.dequantize(dtype)
