"""nf4q.optim.AdamW: AdamW with 32-bit or 8-bit blockwise states, optionally paged (CUDA managed memory
under a GPU byte budget). A standard torch.optim.Optimizer: param groups, state_dict/load_state_dict,
zero_grad, LR schedulers; parameters without a gradient are skipped.

One step launches one fused multi-tensor kernel per (device, dtype, state width, step count) bucket of a
param group (per chunk when paged under a budget), never synchronizing the device.
"""
import math
import warnings
from collections import defaultdict
from itertools import chain

import torch

from . import _kernels as K, reference as R
from .maps import signed_map, unsigned_map
from .paging import PageManager

MIN_8BIT_NUMEL = 4096  # smaller tensors keep 32-bit states (their absmax overhead and error are not worth it)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 8-bit states are saved under keys of their own (bitsandbytes' names), never under torch AdamW's exp_avg /
# exp_avg_sq: torch.optim.AdamW would cast the uint8 codes to floats and step with them. Loading such a file
# into torch's AdamW leaves the parameters alone and fails at its first step (KeyError 'exp_avg').
_SAVED_8BIT = {"exp_avg": "state1", "exp_avg_sq": "state2", "exp_avg_absmax": "absmax1", "exp_avg_sq_absmax": "absmax2"}
_LOADED_8BIT = {v: k for k, v in _SAVED_8BIT.items()}
_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _check_hparams(lr, betas, eps, weight_decay):
    def number(name, value):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)

    if number("lr", lr) < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if number("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= number("betas", b) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fused C++/CUDA kernels.

    bits: 32 keeps m and v in fp32; 8 keeps them as 8-bit codes with an fp32 absmax per block of 256
    (m: signed dynamic map, v: unsigned map), for tensors of at least 4096 elements.
    paged: on CUDA, states live in managed memory; gpu_budget_bytes (requires paged) caps how many bytes of
    them stay on the GPU, the rest being streamed from the host every step. On CPU, paged does nothing.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bits=32, paged=False,
                 gpu_budget_bytes=None):
        if isinstance(bits, bool) or bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits!r}")
        if gpu_budget_bytes is not None:
            if isinstance(gpu_budget_bytes, bool) or not isinstance(gpu_budget_bytes, int) or gpu_budget_bytes <= 0:
                raise ValueError(f"gpu_budget_bytes must be a positive int or None, got {gpu_budget_bytes!r}")
            if not paged:
                raise ValueError("gpu_budget_bytes needs paged=True")
        _check_hparams(lr, betas, eps, weight_decay)
        self.bits, self.paged, self.gpu_budget_bytes = bits, bool(paged), gpu_budget_bytes
        self._pagers = {}  # CUDA device -> PageManager
        self._codes = {}  # device -> (signed map, unsigned map)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        for p in g["params"]:
            # frozen integer tensors (Linear4bit's packed weights) are welcome: they never get a grad
            if p.requires_grad and not p.is_floating_point():
                raise TypeError(f"params must be floating point, got {p.dtype}")

    # ---- state --------------------------------------------------------------------------------------

    def page_manager(self, device):
        """The PageManager of a CUDA device (None when states there are not paged)."""
        device = torch.device(device)
        if not self.paged:
            return None
        if device.type != "cuda":
            _warn_once("cpu", "nf4q.optim: paged=True has no effect on non-CUDA parameters")
            return None
        if not K.has_managed_memory():
            _warn_once("nocuda", "nf4q.optim: the extension has no CUDA kernels; states are not paged")
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._pagers:
            self._pagers[device] = PageManager(device, self.gpu_budget_bytes)
        return self._pagers[device]

    def _state_specs(self, p):
        n = p.numel()
        if self.bits == 8 and n >= MIN_8BIT_NUMEL:
            blocks = -(-n // R.QBLOCK)
            return [("exp_avg", p.shape, torch.uint8), ("exp_avg_sq", p.shape, torch.uint8),
                    ("exp_avg_absmax", (blocks,), torch.float32), ("exp_avg_sq_absmax", (blocks,), torch.float32)]
        return [("exp_avg", p.shape, torch.float32), ("exp_avg_sq", p.shape, torch.float32)]

    def _new_state(self, p):
        specs = self._state_specs(p)
        pager = self.page_manager(p.device)
        if pager is None:
            tensors = {name: torch.zeros(shape, dtype=dtype, device=p.device) for name, shape, dtype in specs}
        else:
            tensors = pager.allocate(specs)
            for lo, hi in self._pieces(p, tensors):
                pager.register((id(p), lo), list(tensors.values()), lo, hi, p.numel())
        return {"step": 0, **tensors}

    def _pieces(self, p, state):
        """Element ranges [lo, hi) that the page manager moves as one unit: the whole tensor, or 256-aligned
        slices when a contiguous parameter's states exceed a quarter of gpu_budget_bytes."""
        n, budget = p.numel(), self.gpu_budget_bytes
        nbytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        if budget is None or nbytes <= budget // 4 or not p.is_contiguous():
            return [(0, n)]
        step = max(R.QBLOCK, int(budget // 4 * n / nbytes) // R.QBLOCK * R.QBLOCK)
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def _maps(self, device):
        if device not in self._codes:
            self._codes[device] = (signed_map(device), unsigned_map(device))
        return self._codes[device]

    # ---- the step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("nf4q.optim.AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                by_device[p.device].append((p, state))
            for device, items in by_device.items():
                pager = self.page_manager(device)
                if pager is None:
                    self._launch(group, [(p, st, 0, p.numel()) for p, st in items])
                else:
                    work = [((id(p), lo), (p, st, lo, hi)) for p, st in items for lo, hi in self._pieces(p, st)]
                    pager.run(work, lambda chunk: self._launch(group, chunk))  # noqa: B023 (runs in this iteration)
        return loss

    def _launch(self, group, items):
        """Update items (param, state, lo, hi): the [lo, hi) element range of each parameter."""
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        hp = (lr, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))
        buckets = defaultdict(list)
        for p, st, lo, hi in items:
            buckets[(p.dtype, "exp_avg_absmax" in st, st["step"])].append((p, st, lo, hi))
        for (dtype, eight, step), its in buckets.items():
            params, grads, ms, vs, a1s, a2s, writeback = [], [], [], [], [], [], []
            for p, st, lo, hi in its:
                data, grad = p.detach(), p.grad.detach().to(dtype)
                m, v, a1, a2 = st["exp_avg"], st["exp_avg_sq"], st.get("exp_avg_absmax"), st.get("exp_avg_sq_absmax")
                if lo == 0 and hi == p.numel():
                    if not data.is_contiguous():  # the kernels walk flat memory: work on a copy, write it back
                        writeback.append((data, data.contiguous()))
                        data = writeback[-1][1]
                    grad = grad.contiguous()
                else:  # a slice of a contiguous parameter (paged under a small budget); lo is 256-aligned
                    b0, b1 = lo // R.QBLOCK, -(-hi // R.QBLOCK)
                    data, grad = data.view(-1)[lo:hi], grad.contiguous().view(-1)[lo:hi]
                    m, v = m.view(-1)[lo:hi], v.view(-1)[lo:hi]
                    a1, a2 = (a1[b0:b1], a2[b0:b1]) if eight else (a1, a2)
                params.append(data), grads.append(grad), ms.append(m), vs.append(v), a1s.append(a1), a2s.append(a2)
            device = params[0].device
            native = dtype in _KERNEL_DTYPES
            if eight:
                fn = K.ops.adamw8bit_step if native and K.has_kernel("adamw8bit_step", device) else R.adamw8bit_step
                fn(params, grads, ms, vs, a1s, a2s, *self._maps(device), *hp, step)
            else:
                fn = K.ops.adamw_step if native and K.has_kernel("adamw_step", device) else R.adamw_step
                fn(params, grads, ms, vs, *hp, step)
            for dst, src in writeback:
                dst.copy_(src)

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_dict(self):
        """torch's layout; 32-bit states under torch AdamW's keys (exp_avg, exp_avg_sq), 8-bit ones under
        state1/state2 (uint8 codes) and absmax1/absmax2 (fp32 per 256 elements)."""
        sd = super().state_dict()
        sd["state"] = {pid: ({_SAVED_8BIT.get(k, k): v for k, v in st.items()} if "exp_avg_absmax" in st else st)
                       for pid, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """Loads hyperparameters and states; states are copied into this optimizer's own storage (managed
        memory when paged) keeping their dtype (8-bit codes stay uint8, fp32 moments stay fp32), and are
        converted between 8 and 32 bits when the checkpoint's width differs from this optimizer's. Reads both
        the current 8-bit keys (state1, ...) and the exp_avg/exp_avg_absmax keys of older files."""
        if not isinstance(state_dict, dict) or not {"param_groups", "state"} <= set(state_dict):
            raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # groups and hyperparameters only, no casts
        for pager in self._pagers.values():
            pager.forget()
        ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid in saved_state:
                self.state[p] = self._import_state(p, saved_state[pid])

    @torch.no_grad()
    def _import_state(self, p, saved):
        if "state1" in saved:
            saved = {_LOADED_8BIT.get(k, k): v for k, v in saved.items()}
        eight = "exp_avg_absmax" in saved
        need = ("exp_avg", "exp_avg_sq") + (("exp_avg_absmax", "exp_avg_sq_absmax") if eight else ())
        blocks = -(-p.numel() // R.QBLOCK)
        for key in need:
            t = saved.get(key)
            want = blocks if key.endswith("absmax") else p.numel()
            if not isinstance(t, torch.Tensor) or t.numel() != want:
                raise ValueError(f"optimizer state for a parameter of shape {tuple(p.shape)}: {key!r} must be a "
                                 f"tensor of {want} elements, got {t if t is None else tuple(getattr(t, 'shape', ()))}")
            if eight and (t.dtype == torch.uint8) != (key in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"optimizer state: 8-bit {key!r} has dtype {t.dtype}")
        state = self._new_state(p)
        step = saved.get("step", 0)
        state["step"] = int(step.item() if isinstance(step, torch.Tensor) else step)
        # Paged under a budget, the copies below write the host-homed states in place over the bus (they
        # stay on the host, outside the budget); unpaged or without a budget they write GPU memory.
        signed, unsigned = self._maps(p.device)
        m, v = saved["exp_avg"].to(p.device), saved["exp_avg_sq"].to(p.device)
        if "exp_avg_absmax" in saved:  # 8-bit checkpoint
            a1, a2 = saved["exp_avg_absmax"].to(p.device), saved["exp_avg_sq_absmax"].to(p.device)
            if "exp_avg_absmax" in state:
                for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("exp_avg_absmax", a1),
                                   ("exp_avg_sq_absmax", a2)):
                    state[key].copy_(value.view(state[key].shape))
                return state
            m, v = R.dequantize_state(m, a1, signed), R.dequantize_state(v, a2, unsigned)
        if "exp_avg_absmax" in state:  # a 32-bit checkpoint into 8-bit states
            for key, value, table in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
                q, absmax = R.quantize_state(value.float(), table)
                state[key].copy_(q.view(state[key].shape))
                state[key + "_absmax"].copy_(absmax)
            return state
        state["exp_avg"].copy_(m.reshape(p.shape))
        state["exp_avg_sq"].copy_(v.reshape(p.shape))
        return state


class PagedAdamW(AdamW):
    """AdamW with 32-bit states in CUDA managed memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bits=32,
                 gpu_budget_bytes=None):
        super().__init__(params, lr, betas, eps, weight_decay, bits=bits, paged=True,
                         gpu_budget_bytes=gpu_budget_bytes)


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, paged=False,
                 gpu_budget_bytes=None):
        super().__init__(params, lr, betas, eps, weight_decay, bits=8, paged=paged, gpu_budget_bytes=gpu_budget_bytes)


class PagedAdamW8bit(AdamW):
    """AdamW with 8-bit blockwise states in CUDA managed memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, gpu_budget_bytes=None):
        super().__init__(params, lr, betas, eps, weight_decay, bits=8, paged=True, gpu_budget_bytes=gpu_budget_bytes)


# bitsandbytes' names, for drop-in use.
AdamW32bit = AdamW
PagedAdamW32bit = PagedAdamW
