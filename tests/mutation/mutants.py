"""The mutants: plausible bugs applied at run time (in a pytest subprocess), never written to the repo.

Each mutant is a function registered with @mutant(name, tests, why). It patches the already-imported code in one
of two ways:
- `edit(fn, old, new)`: recompile `fn` from its own source with one textual change (the text must occur exactly
  once, so a mutant whose code moved fails loudly as "stale" instead of silently testing nothing), then
  `install(fn, new_fn)` puts it in place of the original everywhere it is bound (module attribute, class
  attribute, `from x import fn` copies in other modules).
- `kernel(op, fn)`: replace the CPU kernel of torch.ops.nf4q.<op> by a pure-torch stand-in (a mutated copy of
  the reference in nf4q/_reference.py or nf4q/optim/reference.py), so every caller sees the bug, while the tests'
  own oracles stay correct.
`tests` are the pytest arguments (files or node ids) that should kill it: keep them few, the runs are on CPU.
"""
import importlib
import inspect
import sys
import textwrap
import types
import warnings

import torch

MUTANTS = {}  # name -> (apply, tests, why)
_LIBS = []  # torch.library.Library objects must stay alive for their kernels to stay registered


def mutant(name, tests, why):
    def register(apply):
        assert name not in MUTANTS, name
        MUTANTS[name] = (apply, list(tests), why)
        return apply
    return register


class StaleMutant(RuntimeError):
    """The text a mutant edits is no longer in the source: update the mutant."""


def edit(fn, old, new, **globals_override):
    """A copy of function `fn` compiled from its source with `old` replaced by `new` (exactly one occurrence),
    in `fn`'s module globals (plus `globals_override`). Decorators in the source are applied again."""
    target = inspect.unwrap(fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn)
    src = textwrap.dedent(inspect.getsource(target))
    if src.count(old) != 1:
        raise StaleMutant(f"{target.__qualname__}: {old!r} occurs {src.count(old)} times (expected once)")
    namespace = dict(target.__globals__, **globals_override)
    code = compile(src.replace(old, new), f"<mutant of {target.__module__}.{target.__qualname__}>", "exec")
    exec(code, namespace)
    return namespace[target.__name__]


def install(old, new):
    """Replace every binding of object `old` (module globals and class attributes of the loaded nf4q,
    peft_layers, benchmarks and test modules) by `new`. Returns how many were replaced (at least one)."""
    count = 0
    roots = ("nf4q", "peft_layers", "benchmarks", "test_", "conftest", "peft_helpers")
    for mod in list(sys.modules.values()):
        if not isinstance(mod, types.ModuleType) or not mod.__name__.startswith(roots):
            continue
        for owner in [mod] + [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]:
            for key, value in list(vars(owner).items()):
                raw = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if raw is old:
                    setattr(owner, key, new)
                    count += 1
    if not count:
        raise StaleMutant(f"no binding of {old!r} found")
    return count


def edit_in_place(fn, old, new, **globals_override):
    """edit() then install(): the usual Python-layer mutant."""
    install(fn, edit(fn, old, new, **globals_override))


def kernel(op, fn):
    """Make `fn` the CPU kernel of torch.ops.nf4q.<op> (the C++ one is shadowed for this process)."""
    lib = torch.library.Library("nf4q", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
        lib.impl(op, fn, "CPU")
    _LIBS.append(lib)


def load():
    """Import everything the mutants patch, so that install() sees every binding."""
    for name in ("nf4q", "nf4q._reference", "nf4q.tensor", "nf4q.linear", "nf4q.codebook", "nf4q.optim",
                 "nf4q.optim.adamw", "nf4q.optim.reference", "peft_layers", "peft_layers.qlora",
                 "peft_layers.lora", "peft_layers.forgetting", "peft_layers.ia3"):
        importlib.import_module(name)


def apply(name):
    load()
    MUTANTS[name][0]()


# ---- the kernels, through pure-torch stand-ins -------------------------------------------------------------

def _ref():
    from nf4q import _reference
    return _reference


def _by_schema(op, ref_fn, n_w4=9, **override):
    """A CPU kernel for torch.ops.nf4q.<op> that calls the fp64 reference `ref_fn(first, *w4, **named)`: the
    arguments after the W4 group go by their schema names (so new optional arguments keep working), with
    `override` replacing some of them; the result is cast to the first argument's dtype."""
    names = [a.name for a in getattr(torch.ops.nf4q, op).default._schema.arguments]
    accepted = inspect.signature(ref_fn).parameters

    def standin(first, *args):
        named = dict(zip(names[1 + n_w4:], args[n_w4:]), **override)
        return ref_fn(first, *args[:n_w4], **{k: v for k, v in named.items() if k in accepted}).to(first.dtype)
    return standin


@mutant("kernel.quant4_ties_up", ["tests/test_quant_cpu.py"],
        "the 4-bit quantizer rounds a value halfway between two codes to the upper code (bitsandbytes: lower)")
def _():
    R = _ref()
    kernel("quantize_4bit", edit(R.quantize_4bit, "_midpoints(code.float()))", "_midpoints(code.float()), right=True)"))


@mutant("kernel.nibble_order_swapped", ["tests/test_quant_cpu.py"],
        "quantize and dequantize both put the first element in the low nibble: round trips work, the format "
        "(bitsandbytes': first element high) does not")
def _():
    R = _ref()
    kernel("quantize_4bit", edit(R.quantize_4bit, "(q[0::2] << 4) | q[1::2]", "(q[1::2] << 4) | q[0::2]"))
    kernel("dequantize_4bit", edit(R.dequantize_4bit, "[p >> 4, p & 15]", "[p & 15, p >> 4]"))


@mutant("kernel.quant4_tail_unscaled", ["tests/test_quant_cpu.py"],
        "the partial last block is not divided by its absmax")
def _():
    R = _ref()
    scale = edit(R._blockwise_scale, "flat[full:] / am.clamp(min=TINY)", "flat[full:]")
    kernel("quantize_4bit", edit(R.quantize_4bit, "absmax, scaled = ", "absmax, scaled = ",
                                 _blockwise_scale=scale))


@mutant("kernel.dequant4_scale_1pct", ["tests/test_quant_cpu.py"], "dequantize multiplies by absmax × 1.01")
def _():
    R = _ref()
    kernel("dequantize_4bit", edit(R.dequantize_4bit, "code[q] * am[idx]", "code[q] * am[idx] * 1.01"))


@mutant("kernel.dequant4_no_nested_offset", ["tests/test_quant_cpu.py"],
        "double-quantized absmax decoded without adding back the nested offset (the mean)")
def _():
    R = _ref()
    am = edit(R.absmax_fp32, "* nested_absmax[idx] + nested_offset", "* nested_absmax[idx]")
    kernel("dequantize_4bit", edit(R.dequantize_4bit, "am = absmax_fp32(", "am = absmax_fp32(", absmax_fp32=am))


@mutant("kernel.gemm4_drops_bias", ["tests/test_linear.py"], "the 4-bit gemm ignores its bias")
def _():
    R = _ref()
    kernel("gemm_4bit", _by_schema("gemm_4bit", edit(R.gemm_4bit, "return y + bias.double() if", "return y if")))


@mutant("kernel.gemm4_bf16_weight", ["tests/test_linear.py"],
        "the 4-bit gemm multiplies by a bf16 copy of the dequantized weight (precision loss)")
def _():
    R = _ref()
    kernel("gemm_4bit", _by_schema("gemm_4bit", edit(R.gemm_4bit, "w = dequantize_4bit(*w4, torch.float64)",
                                                      "w = dequantize_4bit(*w4, torch.bfloat16).double()")))


@mutant("kernel.gemm4_dx_no_nested_offset", ["tests/test_linear.py"],
        "the backward gemm decodes double-quantized scales without the nested offset")
def _():
    R = _ref()
    am = edit(R.absmax_fp32, "* nested_absmax[idx] + nested_offset", "* nested_absmax[idx]")
    deq = edit(R.dequantize_4bit, "am = absmax_fp32(", "am = absmax_fp32(", absmax_fp32=am)
    dx = edit(R.gemm_4bit_dx, "grad.double() @", "grad.double() @", dequantize_4bit=deq)
    kernel("gemm_4bit_dx", lambda grad, *w4: dx(grad, *w4).to(grad.dtype))


@mutant("kernel.lora_gemm_scale_ignored", ["tests/test_qlora.py", "tests/test_peft_lora.py"],
        "the fused NF4+LoRA forward adds B·A·x without the scale alpha/r")
def _():
    kernel("lora_gemm_4bit", _by_schema("lora_gemm_4bit", _ref().lora_gemm_4bit, scale=1.0))


@mutant("kernel.lora_gemm_dx_no_lora", ["tests/test_qlora.py", "tests/test_peft_lora.py"],
        "the fused NF4+LoRA backward returns dx of the base weight only")
def _():
    R = _ref()
    kernel("lora_gemm_4bit_dx", _by_schema("lora_gemm_4bit_dx", R.lora_gemm_4bit_dx, scale=0.0))
    try:  # the fused backward (dx, dA, dB in one op), where it exists, is what autograd calls
        names = [a.name for a in torch.ops.nf4q.lora_gemm_4bit_backward.default._schema.arguments]
    except AttributeError:
        return

    def backward(grad, x, *args):
        w4, named = args[:9], dict(zip(names[11:], args[9:]))
        mask = named.pop("output_mask")
        _, dA, dB = R.lora_gemm_4bit_backward(grad, x, *w4, **named)
        outs = (R.gemm_4bit_dx(grad, *w4).to(grad.dtype), dA.to(named["lora_A"].dtype), dB.to(named["lora_B"].dtype))
        return tuple(o if m else grad.new_empty((0,)) for o, m in zip(outs, mask))
    kernel("lora_gemm_4bit_backward", backward)


@mutant("kernel.quant8_ties_up", ["tests/test_quant_cpu.py"],
        "the 8-bit blockwise quantizer (double quantization's) rounds ties to the upper code")
def _():
    R = _ref()
    kernel("quantize_blockwise_8bit", edit(R.quantize_blockwise_8bit, "_midpoints(code.float()))",
                                           "_midpoints(code.float()), right=True)"))


@mutant("kernel.adamw8_no_weight_decay", ["tests/test_optim.py"], "the 8-bit AdamW kernel skips weight decay")
def _():
    from nf4q.optim import reference as O

    def step(*args):
        *rest, wd, t = args
        O.adamw8bit_step(*rest, 0.0, t)
    kernel("adamw8bit_step", step)


@mutant("kernel.adamw_no_bias_correction", ["tests/test_optim.py"], "the 32-bit AdamW kernel skips bias correction")
def _():
    from nf4q.optim import reference as O

    def step(*args):
        *rest, t = args
        O.adamw_step(*rest, 10 ** 6)
    kernel("adamw_step", step)


# ---- the Python layer ----------------------------------------------------------------------------------------

@mutant("linear.ignores_compute_dtype", ["tests/test_linear.py"],
        "Linear4bit computes in the input's dtype whatever compute_dtype says")
def _():
    import nf4q
    edit_in_place(nf4q.Linear4bit.forward, "dtype = self.compute_dtype or x.dtype", "dtype = x.dtype")


@mutant("linear.half_cast_touches_nf4", ["tests/test_linear.py"],
        "model.half() casts the quantized tensors too (the fp32 absmax loses precision)")
def _():
    import nf4q
    edit_in_place(nf4q.Linear4bit._apply, "if param.dtype != old.dtype:", "if False:")


@mutant("tensor.double_quant_no_offset", ["tests/test_quant_cpu.py"],
        "double quantization stores absmax without subtracting their mean (a coarser 8-bit grid)")
def _():
    from nf4q import tensor
    edit_in_place(tensor.quantize, "q2, absmax2 = _ops.quantize_blockwise_8bit(absmax - offset",
                  "offset = offset * 0; q2, absmax2 = _ops.quantize_blockwise_8bit(absmax - offset")


@mutant("tensor.nested_map_ignored", ["tests/test_quant_cpu.py", "tests/test_linear.py"],
        "quantize(nested_map='dynamic') silently uses the FP8 table")
def _():
    from nf4q import tensor
    edit_in_place(tensor.quantize, "else _nested_map(nested_map)", "else _nested_map('fp8_e4m3')")


@mutant("codebook.nf4_offset_rounded", ["tests/test_codebook.py"],
        "the NF4 table is derived from a rounded offset (0.9677 instead of 0.9677083)")
def _():
    from nf4q import codebook
    edit_in_place(codebook._nf4_cpu, "torch.linspace(NF4_OFFSET, 0.5, 9)", "torch.linspace(0.9677, 0.5, 9)")


@mutant("optim.adamw8_drops_weight_decay", ["tests/test_optim.py"],
        "AdamW(bits=8) passes weight_decay=0 to the 8-bit kernel (32-bit states unaffected)")
def _():
    from nf4q.optim import adamw
    edit_in_place(adamw.AdamW._launch, "*self._maps(device), *hp, step)", "*self._maps(device), *hp[:4], 0.0, step)")


@mutant("optim.small_tensors_get_8bit", ["tests/test_optim.py"],
        "the 4096-element threshold for 8-bit states is ignored")
def _():
    from nf4q.optim import adamw
    edit_in_place(adamw.AdamW._state_specs, "n >= MIN_8BIT_NUMEL", "n >= 1")


@mutant("optim.skips_missing_grad_step_count", ["tests/test_optim.py"],
        "a parameter without a gradient still advances its step count")
def _():
    from nf4q.optim import adamw
    edit_in_place(adamw.AdamW.step, "if p.grad is None:",
                  "if p.grad is None and (p not in self.state or self.state[p].update(step=self.state[p]['step'] + 1)"
                  " is None):")


@mutant("replay.off_by_one", ["tests/test_forgetting.py"],
        "reservoir sampling draws the slot from U{0..t-1} instead of U{0..t}: early items are under-kept")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.ReplayBuffer.add, "* (t + 1)).floor()", "* t).floor()")


@mutant("replay.sample_prefix", ["tests/test_forgetting.py"], "ReplayBuffer.sample returns the first n slots")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.ReplayBuffer.sample, "torch.randperm(len(self), generator=self._gen)[:n]",
                  "torch.arange(len(self))[:n]")


@mutant("ewc.per_batch_not_rescaled", ["tests/test_forgetting.py"],
        "the per-batch Fisher multiplies the squared mean gradient by B instead of B²")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.EWC._per_batch, "g.float().pow(2) * size ** 2", "g.float().pow(2) * size")


@mutant("ewc.per_sample_mean", ["tests/test_forgetting.py"], "the per-sample Fisher averages within a batch")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.EWC._per_sample, "g.float().pow(2).sum(0)", "g.float().pow(2).mean(0)")


@mutant("ewc.penalty_no_half", ["tests/test_forgetting.py"], "the penalty is λ·ΣF(θ−θ*)² instead of λ/2·…")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.EWC.penalty, "return 0.5 * self.lam * total", "return self.lam * total")


@mutant("ewc.online_no_decay", ["tests/test_forgetting.py"], "online EWC forgets to decay the old Fisher")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.EWC.consolidate, "f * self.decay for", "f for")


@mutant("lora.scaling_alpha", ["tests/test_peft_lora.py", "tests/test_peft_io.py"],
        "LoRA scaling is alpha instead of alpha / r")
def _():
    from peft_layers import qlora
    edit_in_place(qlora.lora_scaling, "float(lora_alpha) / (math.sqrt(r) if use_rslora else r)", "float(lora_alpha)")


@mutant("lora.rslora_ignored", ["tests/test_peft_lora.py", "tests/test_peft_io.py"],
        "use_rslora=True still scales by alpha / r")
def _():
    from peft_layers import qlora
    edit_in_place(qlora.lora_scaling, "(math.sqrt(r) if use_rslora else r)", "r")


@mutant("lora.merge_unscaled", ["tests/test_peft_lora.py"], "LoRALayer.merge adds B·A without the scaling")
def _():
    from peft_layers import lora
    edit_in_place(lora.LoRALayer.delta_weight, "d = self.scaling[adapter_name] * (", "d = (")


@mutant("demo.no_optimizer_step", ["tests/test_cli.py::test_demo_trains_as_the_readme_says"],
        "the demo's fine-tune loop computes losses but never steps the optimizer")
def _():
    from nf4q.cli import demo
    edit_in_place(demo._run, "        opt.step()\n", "        pass\n")


@mutant("demo.head_only", ["tests/test_cli.py::test_demo_trains_as_the_readme_says"],
        "the demo trains only the cosine head: the LoRA adapters get no optimizer")
def _():
    from nf4q.cli import demo
    edit_in_place(demo._run, '[{"params": adapters}, {"params"', '[{"params"')


# ---- more Python-layer options that are easy to drop on the way -----------------------------------------------

@mutant("linear.quantize_model_ignores_blocksize", ["tests/test_linear.py", "tests/test_cli.py"],
        "quantize_model(blocksize=...) always quantizes in blocks of 64")
def _():
    import nf4q
    edit_in_place(nf4q.quantize_model, "compute_dtype=compute_dtype, blocksize=blocksize,",
                  "compute_dtype=compute_dtype, blocksize=64,")


@mutant("linear.quantize_model_ignores_compute_dtype", ["tests/test_linear.py", "tests/test_cli.py"],
        "quantize_model(compute_dtype=...) leaves the layers computing in the input's dtype")
def _():
    import nf4q
    edit_in_place(nf4q.quantize_model, "from_linear(linear, compute_dtype=compute_dtype,",
                  "from_linear(linear, compute_dtype=None,")


@mutant("optim.state_maps_swapped", ["tests/test_optim.py"],
        "AdamW(bits=8) passes the unsigned map for m and the signed one for v")
def _():
    from nf4q.optim import adamw
    edit_in_place(adamw.AdamW._launch, "*self._maps(device), *hp, step)", "*self._maps(device)[::-1], *hp, step)")


@mutant("replay.mix_ignores_ratio", ["tests/test_forgetting.py"], "ReplayBuffer.mix appends a full task batch")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.ReplayBuffer.mix, "n = min(round(ratio * size), len(self))", "n = min(size, len(self))")


@mutant("replay.loss_ignores_lam", ["tests/test_forgetting.py"], "ReplayBuffer.loss adds the replay loss unweighted")
def _():
    from peft_layers import forgetting
    edit_in_place(forgetting.ReplayBuffer.loss, "task_loss + lam * loss_fn(", "task_loss + loss_fn(")


@mutant("tensor.nested_blocksize_128", ["tests/test_quant_cpu.py"],
        "double quantization groups 128 absmax per second-level scale while the format says 256")
def _():
    from nf4q import tensor
    edit_in_place(tensor.quantize, "(absmax - offset, table, NESTED_BLOCKSIZE)", "(absmax - offset, table, 128)")


@mutant("ia3.merge_wrong_axis", ["tests/test_peft_methods.py"],
        "IA3 merge scales W's columns where the forward scales its outputs (rows), and vice versa")
def _():
    from peft_layers import ia3
    edit_in_place(ia3.IA3Layer._weight_scale, "return vec.t() if self.fan_in_fan_out else vec",
                  "return vec if self.fan_in_fan_out else vec.t()")
