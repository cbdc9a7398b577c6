"""Remedies for catastrophic forgetting in fine-tuning: EWC (a Fisher-weighted pull back to old weights) and a
reservoir ReplayBuffer (rehearse a uniform sample of old examples). Both plug into a plain training loop:

    ewc = EWC(model, lam=100.0); ewc.consolidate(loader_a, loss_fn)        # after task A
    loss = loss_fn(model, batch_b) + ewc.penalty()                          # while training task B

    buf = ReplayBuffer(capacity=2000, seed=0); buf.add(batch_a)             # while training task A
    loss = buf.loss(model, loss_fn, batch_b, lam=1.0)                       # while training task B
"""
import math
import numbers
import warnings
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EWC", "ReplayBuffer"]

_ESTIMATORS = ("auto", "per_sample", "per_batch")


# ---- batches: a tensor, a tuple/list of tensors, or a dict of tensors sharing a leading dimension ------------
def _leaves(batch, name="batch"):
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        raise TypeError(f"{name} must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}")
    if not items:
        raise ValueError(f"{name} is empty")
    return items


def _batch_size(batch, name="batch", tensors_only=True) -> int:
    sizes = []
    for leaf in _leaves(batch, name):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise ValueError(f"{name} holds a 0-d tensor; every tensor needs a leading batch dimension")
            sizes.append(leaf.shape[0])
        elif tensors_only:
            raise TypeError(f"{name} must hold only tensors, got a {type(leaf).__name__}")
    if not sizes:
        raise TypeError(f"{name} holds no tensor")
    if len(set(sizes)) != 1:
        raise ValueError(f"{name}: tensors must share the leading (batch) dimension, got sizes {sizes}")
    return sizes[0]


def _map(batch, fn):
    """Apply fn to every tensor leaf, keeping the structure (Mappings become plain dicts)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _in_dims(batch):
    """vmap in_dims for a batch: 0 for tensors, None for anything else (e.g. a flag carried with the batch)."""
    if isinstance(batch, torch.Tensor):
        return 0
    if isinstance(batch, Mapping):
        return {k: _in_dims(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_in_dims(v) for v in batch)
    return None


class _LossModule(nn.Module):
    # functional_call swaps parameters of a module it calls; wrapping (model, loss_fn) lets loss_fn call the
    # model as usual while its trainable parameters are the vmapped ones.
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017) over the trainable parameters of `model`.

    After a task, `consolidate(loader, loss_fn)` estimates the diagonal empirical Fisher F of every parameter
    with requires_grad=True at the current weights and snapshots them as θ*. `penalty()` then returns
    λ/2 · Σ_i F_i (θ_i − θ*_i)² (summed over tasks), to be added to the next task's loss. Parameters are found by
    name at every call, so the state survives `model.load_state_dict`, `model.to(...)` and any trainable subset:
    full fine-tuning, LoRA/QLoRA adapters (only the adapter parameters are trainable) or a few layers.

    mode="separate" keeps one (F, θ*) per consolidated task (memory: 2 copies of the trainable parameters per task).
    mode="online" (Schwarz et al. 2018) keeps one: F ← decay·F_old + F_new and θ* ← the latest weights.

    fisher selects the estimator (it can be overridden per consolidate call):
      "per_sample": F = mean over examples of g_i², g_i the gradient of loss_fn on example i alone, computed for
                    a whole batch at once with torch.func (functional_call + vmap(grad)). Exact empirical Fisher;
                    needs a model and loss_fn that vmap can trace (no .item(), no data-dependent Python control flow,
                    custom ops need a vmap rule); memory grows with batch × parameters (see chunk_size).
      "per_batch":  F = Σ_b B_b² g_b² / Σ_b B_b, g_b the gradient of the batch-mean loss of batch b (size B_b).
                    One backward per batch and works with any model. Near a minimum E[B·g_b²] equals the
                    per-example E[g_i²], so λ means the same with both estimators; away from one it is larger.
      "auto":       per_sample, falling back to per_batch (with a warning) when vmap fails on the first batch.
    loss_fn(model, batch) must return the mean loss over the batch's examples (leading dimension of its tensors).
    """

    def __init__(self, model: nn.Module, lam: float, mode: str = "separate", decay: float = 1.0,
                 fisher: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.lam = lam  # validated by the setter
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
            raise TypeError(f"decay must be a real number, got {type(decay).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if mode == "separate" and decay != 1.0:
            raise ValueError("decay only applies to mode='online'; leave it at 1.0 with mode='separate'")
        self.mode, self.decay = mode, float(decay)
        self.fisher = self._check_estimator(fisher)
        self.terms = []  # list of {"fisher": {name: fp32 tensor}, "star": {name: fp32 tensor}}
        self.last_estimator = None  # the estimator the last consolidate actually used

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"lam must be a real number, got {type(value).__name__}")
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"lam must be finite and >= 0, got {value}")
        self._lam = float(value)

    @staticmethod
    def _check_estimator(fisher):
        if fisher not in _ESTIMATORS:
            raise ValueError(f"fisher must be one of {_ESTIMATORS}, got {fisher!r}")
        return fisher

    # ---- estimating F ------------------------------------------------------------------------------------
    def _trainable(self):
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True) to consolidate")
        return params

    def _per_sample(self, wrapper, params, batch, chunk_size):
        names = list(params)

        def one(p, example):
            example = _map(example, lambda t: t.unsqueeze(0))  # a batch of one
            return torch.func.functional_call(wrapper, {"model." + n: v for n, v in zip(names, p)}, (example,))

        grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, _in_dims(batch)), chunk_size=chunk_size,
                                randomness="different")(tuple(p.detach() for p in params.values()), batch)
        return {n: g.float().pow(2).sum(0) for n, g in zip(names, grads)}

    @staticmethod
    def _per_batch(wrapper, params, batch, size):
        loss = wrapper(batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return {n: (torch.zeros_like(p, dtype=torch.float32) if g is None else g.float().pow(2) * size ** 2)
                for (n, p), g in zip(params.items(), grads)}

    def estimate_fisher(self, dataloader, loss_fn, num_batches=None, fisher=None, chunk_size=None) -> dict:
        """The diagonal empirical Fisher {name: fp32 tensor} of the trainable parameters (no state change)."""
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar loss")
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches <= 0):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        estimator = self._check_estimator(fisher if fisher is not None else self.fisher)
        params = self._trainable()
        wrapper = _LossModule(self.model, loss_fn)
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0
        with torch.enable_grad():
            for i, batch in enumerate(dataloader):
                if num_batches is not None and i >= num_batches:
                    break
                size = _batch_size(batch, tensors_only=False)
                if isinstance(batch, Mapping):
                    batch = dict(batch)  # e.g. a transformers BatchEncoding: vmap needs a plain pytree
                if estimator == "auto":
                    try:
                        part = self._per_sample(wrapper, params, batch, chunk_size)
                        estimator = "per_sample"
                    except Exception as err:  # vmap cannot trace this model/loss: fall back, say why
                        why = str(err).splitlines()[0][:300] if str(err) else ""
                        warnings.warn(f"EWC: per-sample Fisher failed ({type(err).__name__}: {why}); using per-batch "
                                      "squared gradients", RuntimeWarning, stacklevel=2)
                        estimator = "per_batch"
                        part = self._per_batch(wrapper, params, batch, size)
                elif estimator == "per_sample":
                    part = self._per_sample(wrapper, params, batch, chunk_size)
                else:
                    part = self._per_batch(wrapper, params, batch, size)
                for n in total:
                    total[n] += part[n]
                count += size
        if count == 0:
            raise ValueError("dataloader yielded no examples")
        self.last_estimator = estimator
        return {n: f / count for n, f in total.items()}

    def consolidate(self, dataloader, loss_fn, num_batches=None, fisher=None, chunk_size=None) -> None:
        """Estimate F on `dataloader` (first num_batches batches, or all) and snapshot θ* = the current weights.
        chunk_size bounds how many per-sample gradients are alive at once (None: the whole batch)."""
        new_f = self.estimate_fisher(dataloader, loss_fn, num_batches, fisher, chunk_size)
        params = self._trainable()
        star = {n: params[n].detach().float().clone() for n in new_f}
        if self.mode == "separate" or not self.terms:
            self.terms.append({"fisher": new_f, "star": star})
            return
        old = self.terms[0]  # online: one running term
        fisher = {n: f * self.decay for n, f in old["fisher"].items()}
        stars = dict(old["star"])
        for n, f in new_f.items():
            fisher[n] = fisher[n] + f if n in fisher else f
            stars[n] = star[n]
        self.terms[0] = {"fisher": fisher, "star": stars}

    # ---- the penalty ---------------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """λ/2 · Σ_tasks Σ_i F_i (θ_i − θ*_i)², an fp32 scalar differentiable w.r.t. the current parameters."""
        params = dict(self.model.named_parameters())
        total = None
        for term in self.terms:
            for n, f in term["fisher"].items():
                if n not in params:
                    raise KeyError(f"EWC: parameter {n!r} was consolidated but is no longer in the model")
                p = params[n]
                if f.device != p.device:  # the model moved: follow it once
                    term["fisher"][n] = f = f.to(p.device)
                    term["star"][n] = term["star"][n].to(p.device)
                s = (f * (p.float() - term["star"][n]).pow(2)).sum()
                total = s if total is None else total + s
        if total is None:
            device = next(iter(params.values())).device if params else None
            return torch.zeros((), device=device)
        return 0.5 * self.lam * total

    # ---- saving --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lam": self.lam, "mode": self.mode, "decay": self.decay, "fisher": self.fisher,
                "terms": [{"fisher": dict(t["fisher"]), "star": dict(t["star"])} for t in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, Mapping) or "terms" not in state:
            raise TypeError("state must be a dict from EWC.state_dict()")
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"state has mode={state['mode']!r} but this EWC has mode={self.mode!r}")
        params = dict(self.model.named_parameters())
        terms = []
        for t in state["terms"]:
            if set(t["fisher"]) != set(t["star"]):
                raise ValueError("state: fisher and star must name the same parameters")
            for n, f in t["fisher"].items():
                if n in params and f.shape != params[n].shape:
                    raise ValueError(f"state: {n!r} has shape {tuple(f.shape)}, the model's is "
                                     f"{tuple(params[n].shape)}")
            dev = {n: params[n].device if n in params else t["fisher"][n].device for n in t["fisher"]}
            terms.append({k: {n: v.to(dev[n], torch.float32).clone() for n, v in t[k].items()}
                          for k in ("fisher", "star")})
        decay = float(state.get("decay", self.decay))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"state: decay must be in [0, 1], got {decay}")
        self.lam = state.get("lam", self.lam)
        self.decay, self.fisher = decay, self._check_estimator(state.get("fisher", self.fisher))
        self.terms = terms


class ReplayBuffer:
    """A fixed-size uniform sample of every example ever added (reservoir sampling, Vitter's algorithm R).

    add(batch) stores the examples of a batch: a tensor, a tuple/list or a dict of tensors sharing the leading
    dimension (all later batches must have the same structure, per-example shapes and dtypes; pad sequences to
    one length). After n examples were added, each is in the buffer with probability min(1, capacity / n).
    sample(n) returns a batch of the same structure. Storage is preallocated on the first add, on `device`
    (default: the first batch's device).
    """

    def __init__(self, capacity: int, seed=None, device=None):
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.capacity, self.device = capacity, device
        self._gen = torch.Generator()
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed)
        self.seen = 0  # examples ever added
        self._store = None  # the batch structure, each tensor [capacity, ...]

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def _check_like(self, batch, name):
        def spec(b):
            return _map(b, lambda t: (tuple(t.shape[1:]), t.dtype))
        if spec(batch) != spec(self._store):
            raise ValueError(f"{name} does not match the stored structure: got {spec(batch)}, "
                             f"buffer holds {spec(self._store)}")

    def add(self, batch) -> None:
        size = _batch_size(batch)
        if self._store is None:
            device = self.device if self.device is not None else _leaves(batch)[0].device
            self._store = _map(batch, lambda t: torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype,
                                                            device=device))
        self._check_like(batch, "batch")
        src, dst = [], []  # (example index in batch, slot)
        fill = max(0, min(size, self.capacity - self.seen))
        src += range(fill)
        dst += range(self.seen, self.seen + fill)
        if size > fill:  # example with 0-based stream index t replaces slot j ~ U{0..t} when j < capacity
            t = torch.arange(self.seen + fill, self.seen + size, dtype=torch.float64)
            j = (torch.rand(size - fill, generator=self._gen, dtype=torch.float64) * (t + 1)).floor().long()
            for i, slot in zip(range(fill, size), j.tolist()):
                if slot < self.capacity:
                    src.append(i)
                    dst.append(slot)
        if src:
            # the last write to a slot wins, as in the sequential algorithm
            last = {slot: i for i, slot in zip(src, dst)}
            dst_t, src_t = torch.tensor(list(last)), torch.tensor(list(last.values()))
            _zip_apply(self._store, batch,
                       lambda s, b: s.index_copy_(0, dst_t.to(s.device), b.detach()[src_t.to(b.device)].to(s.device)))
        self.seen += size

    def sample(self, n: int, replace: bool = False):
        """n stored examples drawn uniformly (without replacement unless replace=True), in the added structure."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if len(self) == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer; add() examples first")
        if replace:
            idx = torch.randint(len(self), (n,), generator=self._gen)
        else:
            if n > len(self):
                raise ValueError(f"n={n} exceeds the {len(self)} stored examples; pass replace=True or a smaller n")
            idx = torch.randperm(len(self), generator=self._gen)[:n]
        return _map(self._store, lambda t: t[idx.to(t.device)])

    def mix(self, task_batch, ratio: float):
        """task_batch with round(ratio · its size) replayed examples appended (fewer if fewer are stored; none
        while the buffer is empty), on task_batch's device."""
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
        if not (ratio >= 0 and math.isfinite(ratio)):
            raise ValueError(f"ratio must be finite and >= 0, got {ratio}")
        size = _batch_size(task_batch, "task_batch")
        n = min(round(ratio * size), len(self))
        if n == 0:
            return task_batch
        self._check_like(task_batch, "task_batch")
        replay = self.sample(n)
        out = _zip_apply(task_batch, replay, lambda a, b: torch.cat([a, b.to(a.device)]), collect=True)
        return out

    def loss(self, model, loss_fn, task_batch, lam: float = 1.0, n=None) -> torch.Tensor:
        """L_task + λ·L_replay = loss_fn(model, task_batch) + lam · loss_fn(model, sample(n)); n defaults to the
        task batch size (capped at what is stored). Just L_task while the buffer is empty or lam == 0."""
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
            raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        size = _batch_size(task_batch, "task_batch", tensors_only=False)
        task_loss = loss_fn(model, task_batch)
        if len(self) == 0 or lam == 0:
            return task_loss
        n = min(size if n is None else n, len(self))
        replay = self.sample(n)
        device = next(t.device for t in _leaves(task_batch, "task_batch") if isinstance(t, torch.Tensor))
        replay = _map(replay, lambda t: t.to(device))
        return task_loss + lam * loss_fn(model, replay)

    # ---- saving --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "store": self._store,
                "rng": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, Mapping) or "seen" not in state:
            raise TypeError("state must be a dict from ReplayBuffer.state_dict()")
        if state["capacity"] != self.capacity:
            raise ValueError(f"state has capacity {state['capacity']}, this buffer {self.capacity}")
        self.seen = int(state["seen"])
        self._store = None if state["store"] is None else _map(state["store"], lambda t: t.clone())
        self._gen.set_state(state["rng"])


def _zip_apply(a, b, fn, collect=False):
    """Walk two batches of the same structure together, calling fn(tensor_a, tensor_b) on each leaf pair."""
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, Mapping):
        out = {k: _zip_apply(a[k], b[k], fn, collect) for k in a}
    else:
        out = type(a)(_zip_apply(x, y, fn, collect) for x, y in zip(a, b))
    return out if collect else None
