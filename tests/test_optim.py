"""nf4q.optim on CPU: the C++ kernels against torch.optim.AdamW and the pure-torch oracles, 8-bit training
quality, checkpoints, the torch.optim.Optimizer contract, argument errors and opcheck."""
import copy
import io
import warnings

import pytest
import torch

import nf4q
from nf4q.optim import (
    AdamW,
    AdamW8bit,
    PagedAdamW,
    PagedAdamW8bit,
    adamw as adamw_mod,
    reference as R,
    signed_map,
    unsigned_map,
)

SHAPES = [(37,), (129, 65), (4096 + 3,), (3, 5, 7), (8192,)]


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * (1 + i) for i, p in enumerate(params)]


def run(opt_factory, params, steps, start=0):
    opt = opt_factory(params)
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()
    return opt


def test_maps():
    s, u = signed_map(), unsigned_map()
    for table in (s, u):
        assert table.shape == (256,) and table.dtype == torch.float32 and (table.diff() > 0).all()
        assert table.max() == 1.0 and (table == 0).sum() == 1
    assert -1.0 < s.min() < -0.99 and u.min() == 0.0  # the dynamic map, as bitsandbytes builds it, has +1 but no -1
    # the unsigned map is twice as fine as the signed one in each decade
    assert ((u > 0.1) & (u < 1)).sum() == 2 * ((s > 0.1) & (s < 1)).sum()


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_32bit_matches_torch_adamw(wd):
    ours, ref = make_params(SHAPES), make_params(SHAPES)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    run(lambda ps: AdamW(ps, **kw), ours, 100)
    run(lambda ps: torch.optim.AdamW(ps, **kw), ref, 100)
    for a, b, start in zip(ours, ref, make_params(SHAPES)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - start).abs().max() > 0.01  # 100 steps of lr 1e-3 moved it


def test_32bit_kernel_equals_oracle_bitwise():
    # The CPU kernel and the oracle round every fp32 operation the same way.
    params, grads = make_params(SHAPES), grads_for(make_params(SHAPES), 0)
    ms = [torch.randn(p.shape) for p in params]
    vs = [torch.rand(p.shape) for p in params]
    ref = [t.detach().clone() for t in params], [m.clone() for m in ms], [v.clone() for v in vs]
    args = (3e-3, 0.9, 0.99, 1e-6, 0.1, 7)
    torch.ops.nf4q.adamw_step([p.detach() for p in params], grads, ms, vs, *args)
    R.adamw_step(ref[0], grads, ref[1], ref[2], *args)
    for got, want in zip(params + ms + vs, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


def _eight_bit_inputs(shapes, dtype=torch.float32, seed=0):
    params = make_params(shapes, dtype, seed)
    grads = grads_for(params, 0)
    s, u = signed_map(), unsigned_map()
    ms, vs, a1, a2 = [], [], [], []
    for p in params:
        q, a = R.quantize_state(torch.randn(p.shape) * 0.1, s)
        ms.append(q), a1.append(a)
        q, a = R.quantize_state(torch.rand(p.shape) * 0.01, u)
        vs.append(q), a2.append(a)
    return [p.detach() for p in params], grads, ms, vs, a1, a2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8bit_kernel_equals_oracle_bitwise(dtype):
    shapes = [(4096,), (4099,), (300, 17), (256 * 3,)]
    got = _eight_bit_inputs(shapes, dtype)
    want = copy.deepcopy(got)
    args = (1e-3, 0.9, 0.999, 1e-8, 1e-2, 5)
    torch.ops.nf4q.adamw8bit_step(*got, signed_map(), unsigned_map(), *args)
    R.adamw8bit_step(*want, signed_map(), unsigned_map(), *args)
    for kind, g, w in zip(["param", "grad", "m", "v", "absmax1", "absmax2"], got, want):
        for a, b in zip(g, w):
            assert torch.equal(a, b), kind
    before = _eight_bit_inputs(shapes, dtype)
    for i in (0, 2, 3, 4):  # the step changed params, codes and absmax
        assert not torch.equal(got[i][0], before[i][0])


@pytest.mark.parametrize("bits", [8, 32])
def test_weight_decay_alone_is_exact(bits):
    """With zero gradients m = v = 0, so AdamW's update is the decoupled decay alone: p ← p · fl32(1 − lr·wd),
    exactly, for 8-bit states (the 8192-element tensor) and 32-bit ones (the 37-element tensor) alike."""
    lr, wd = 0.1, 0.5
    params = make_params([(8192,), (37,)])
    start = [p.detach().clone() for p in params]
    opt = AdamW(params, lr=lr, weight_decay=wd, bits=bits)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert (opt.state[params[0]]["exp_avg"].dtype == torch.uint8) == (bits == 8)
    decay = torch.tensor(1 - lr * wd, dtype=torch.float32)
    for p, p0 in zip(params, start):
        assert torch.equal(p.detach(), p0 * decay * decay * decay)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_8bit_adamw_follows_the_oracle(wd):
    """AdamW(bits=8) itself, not just the kernel: five steps equal the 8-bit oracle bit for bit, hyperparameters
    (weight decay included) passed through, from the zero states a fresh optimizer starts with."""
    shapes = [(4096,), (70, 65)]
    ours, mine = make_params(shapes), [p.detach().clone() for p in make_params(shapes)]
    opt = AdamW(ours, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, bits=8)
    blocks = [-(-p.numel() // R.QBLOCK) for p in mine]
    ms, vs = [torch.zeros(p.shape, dtype=torch.uint8) for p in mine], [torch.zeros(p.shape, dtype=torch.uint8)
                                                                        for p in mine]
    a1, a2 = [torch.zeros(b) for b in blocks], [torch.zeros(b) for b in blocks]
    for t in range(5):
        grads = grads_for(mine, t)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        R.adamw8bit_step(mine, grads, ms, vs, a1, a2, signed_map(), unsigned_map(), 3e-3, 0.8, 0.99, 1e-6, wd, t + 1)
    for p, q, m in zip(ours, mine, ms):
        assert torch.equal(p.detach(), q)
        assert torch.equal(opt.state[p]["exp_avg"], m)


def test_bf16_params_32bit_matches_oracle():
    params = make_params(SHAPES, torch.bfloat16)
    ref = [p.detach().clone() for p in params]
    opt = run(lambda ps: AdamW(ps, lr=1e-2), params, 3)
    ms, vs = [torch.zeros(p.shape) for p in ref], [torch.zeros(p.shape) for p in ref]
    for t in range(3):
        R.adamw_step(ref, grads_for(ref, t), ms, vs, 1e-2, 0.9, 0.999, 1e-8, 1e-2, t + 1)
    for p, r, m in zip(params, ref, ms):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-6, atol=1e-8)


def _train(bits, steps=200, seed=0):
    # A small noisy regression (MLP with a tanh layer): the 64x128 and 64x64 weights get 8-bit states.
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    x = torch.randn(1024, 128)
    y = torch.tanh(x @ torch.randn(64, 128).t() / 128 ** 0.5) @ torch.randn(64, 64) / 8 + 0.3 * torch.randn(1024, 64)
    opt = AdamW(model.parameters(), lr=1e-2, bits=bits)
    first = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return first, torch.nn.functional.mse_loss(model(x), y).item(), opt, model


def test_8bit_training_loss_within_2_percent():
    first, loss32, _, _ = _train(32)
    _, loss8, opt8, model = _train(8)
    assert opt8.state[model[0].weight]["exp_avg"].dtype == torch.uint8  # 8192 elements: 8-bit states
    assert opt8.state[model[0].bias]["exp_avg"].dtype == torch.float32  # 64 elements: 32-bit states
    assert loss32 < 0.5 * first  # it did learn
    assert abs(loss8 - loss32) <= 0.02 * loss32, (loss8, loss32)


def test_8bit_states_track_32bit():
    shapes = [(64, 128), (5000,)]
    p8, p32 = make_params(shapes), make_params(shapes)
    o8 = run(lambda ps: AdamW8bit(ps, lr=1e-3), p8, 50)
    o32 = run(lambda ps: AdamW(ps, lr=1e-3), p32, 50)
    s, u = signed_map(), unsigned_map()
    for a, b in zip(p8, p32):
        st8, st32 = o8.state[a], o32.state[b]
        m = R.dequantize_state(st8["exp_avg"], st8["exp_avg_absmax"], s)
        v = R.dequantize_state(st8["exp_avg_sq"], st8["exp_avg_sq_absmax"], u)
        # within the 8-bit error: a few percent of the state's norm, and the parameters stay close
        assert (m - st32["exp_avg"]).norm() <= 0.03 * st32["exp_avg"].norm()
        assert (v - st32["exp_avg_sq"]).norm() <= 0.03 * st32["exp_avg_sq"].norm()
        assert (a - b).abs().max() < 5e-3
        assert (a - make_params(shapes)[0 if a.shape == shapes[0] else 1]).abs().max() > 1e-2  # it moved


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_round_trip_same_trajectory(bits):
    shapes = [(64, 80), (33,)]
    a = make_params(shapes)
    opt = run(lambda ps: AdamW(ps, lr=1e-2, bits=bits), a, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for t in range(5, 10):  # continue the original
        for p, g in zip(a, grads_for(a, t)):
            p.grad = g
        opt.step()
    opt2 = AdamW(b, lr=0.5, bits=bits)  # hyperparameters come from the checkpoint
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["lr"] == 1e-2
    if bits == 8:
        assert opt2.state[b[0]]["exp_avg"].dtype == torch.uint8
    for t in range(5, 10):
        for p, g in zip(b, grads_for(b, t)):
            p.grad = g
        opt2.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_load_converts_between_widths():
    a = make_params([(64, 80)])
    o32 = run(lambda ps: AdamW(ps), a, 3)
    o8 = AdamW8bit(a)
    o8.load_state_dict(o32.state_dict())
    st = o8.state[a[0]]
    m = R.dequantize_state(st["exp_avg"], st["exp_avg_absmax"], signed_map())
    assert (m - o32.state[a[0]]["exp_avg"]).norm() <= 0.02 * o32.state[a[0]]["exp_avg"].norm()
    back = AdamW(a)
    back.load_state_dict(o8.state_dict())
    torch.testing.assert_close(back.state[a[0]]["exp_avg"], m)
    assert back.state[a[0]]["step"] == 3


def test_loads_torch_adamw_checkpoint():
    a = make_params(SHAPES)
    ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3), a, 4)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamW(b, lr=1e-3)
    ours.load_state_dict(ref.state_dict())
    for t in range(4, 8):
        for pa, pb, g in zip(a, b, grads_for(a, t)):
            pa.grad, pb.grad = g, g.clone()
        ref.step()
        ours.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_optimizer_contract_groups_schedulers_and_missing_grads():
    ours, ref = make_params(SHAPES), make_params(SHAPES)
    frozen = torch.nn.Parameter(torch.randn(10))
    before = frozen.detach().clone()

    def build(cls, ps):
        return cls([{"params": ps[:2] + [frozen]}, {"params": ps[2:], "lr": 5e-3, "weight_decay": 0.0}], lr=1e-3)

    o1, o2 = build(AdamW, ours), build(torch.optim.AdamW, ref)
    s1, s2 = (torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (o1, o2))
    for t in range(10):
        for p, q, g in zip(ours, ref, grads_for(ours, t)):
            p.grad, q.grad = g, g.clone()
        if t == 4:  # a parameter without a gradient this step keeps its value and its step count
            ours[0].grad = ref[0].grad = None
        o1.step(), o2.step(), s1.step(), s2.step()
        o1.zero_grad(), o2.zero_grad()
    assert all(p.grad is None for p in ours)
    assert torch.equal(frozen, before) and frozen not in o1.state
    assert o1.state[ours[0]]["step"] == 9 and o1.state[ours[1]]["step"] == 10
    assert o1.param_groups[1]["lr"] == pytest.approx(5e-3 * 0.125)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_contiguous_param_and_closure():
    p = torch.nn.Parameter(torch.randn(40, 30).t())  # transposed view: not contiguous
    q = torch.nn.Parameter(p.detach().clone())
    o1, o2 = AdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2)
    target = torch.randn(30, 40)
    for _ in range(5):
        loss = o1.step(lambda: ((p - target) ** 2).sum().backward() or ((p - target) ** 2).sum())
        o2.step(lambda: ((q - target) ** 2).sum().backward())
        p.grad = None
        q.grad = None
    assert loss is not None and not p.is_contiguous()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_double_params_use_the_oracle():
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    o1, o2 = AdamW([p]), torch.optim.AdamW([q])
    for _ in range(3):
        p.grad = q.grad = torch.randn(100, dtype=torch.float64)
        o1.step(), o2.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_paged_on_cpu_is_a_no_op_with_one_warning():
    adamw_mod._warned.discard("cpu")
    a, b = make_params([(64, 80)]), make_params([(64, 80)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(lambda ps: PagedAdamW8bit(ps), a, 3)
        run(lambda ps: PagedAdamW(ps), make_params([(10,)]), 2)
    assert sum("paged" in str(w.message) for w in caught) == 1
    run(lambda ps: AdamW8bit(ps), b, 3)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(betas=(0.9,)), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(bits=4), "bits"), (dict(bits=16), "bits"), (dict(gpu_budget_bytes=1 << 20), "gpu_budget_bytes"),
    (dict(paged=True, gpu_budget_bytes=-5), "gpu_budget_bytes"), (dict(lr=float("nan")), "lr"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdamW(make_params([(4,)]), **kwargs)


def test_bad_group_argument_and_types():
    with pytest.raises(ValueError, match="lr"):
        AdamW([{"params": make_params([(4,)]), "lr": -1.0}])
    with pytest.raises(TypeError, match="lr"):
        AdamW(make_params([(4,)]), lr="fast")
    with pytest.raises(ValueError, match="grads"):
        torch.ops.nf4q.adamw_step([torch.zeros(4)], [torch.zeros(5)], [torch.zeros(4)], [torch.zeros(4)],
                                  1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


def test_opcheck():
    params, grads, ms, vs, a1, a2 = _eight_bit_inputs([(4096,), (300, 17)])
    torch.library.opcheck(torch.ops.nf4q.adamw8bit_step,
                          (params, grads, ms, vs, a1, a2, signed_map(), unsigned_map(), 1e-3, 0.9, 0.999, 1e-8,
                           1e-2, 3))
    p32 = [torch.randn(37), torch.randn(5, 9)]
    torch.library.opcheck(torch.ops.nf4q.adamw_step,
                          (p32, [torch.randn_like(p) for p in p32], [torch.randn_like(p) for p in p32],
                           [torch.rand_like(p) for p in p32], 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3))


def test_exported_from_nf4q():
    assert nf4q.optim.AdamW is AdamW and nf4q.optim.PagedAdamW8bit is PagedAdamW8bit


class _FakeStream:
    def wait_event(self, event):
        pass


class _FakeEvent:
    def record(self, stream=None):
        pass


@pytest.mark.parametrize("bits", [32, 8])
def test_page_manager_schedule_with_fake_cuda(monkeypatch, bits):
    """The page manager's accounting and chunking, run on the CPU: the managed-memory ops and the CUDA
    streams are replaced by fakes that record prefetches (CI has no GPU; tests/test_optim_cuda.py runs the
    real thing)."""
    import contextlib

    from nf4q.optim import _kernels as K
    from nf4q.optim.paging import PageManager

    moves = []
    monkeypatch.setattr(K, "managed_zeros", lambda nbytes, device, host_home: torch.zeros(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(K, "managed_stats", lambda: (0, 0))
    monkeypatch.setattr(K, "prefetch", lambda ts, device: moves.append((device, sum(t.nbytes for t in ts))))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 34, 1 << 35))

    def page_manager(self, device):  # a page manager for CPU tensors
        if self.paged and device not in self._pagers:
            self._pagers[device] = PageManager(torch.device("cuda", 0), self.gpu_budget_bytes)
        return self._pagers.get(device)

    shapes = [(256, 256)] * 4 + [(1000, 1003), (77,)]  # the (1000, 1003) states exceed the budget: sliced
    ref, ours = make_params(shapes), make_params(shapes)
    plain = AdamW(ref, lr=1e-2, bits=bits)
    run(lambda ps: plain, ref, 1)
    budget = sum(t.nbytes for st in plain.state.values() for t in st.values() if isinstance(t, torch.Tensor)) // 4
    monkeypatch.setattr(AdamW, "page_manager", page_manager)
    paged = AdamW(ours, lr=1e-2, bits=bits, paged=True, gpu_budget_bytes=budget)
    run(lambda ps: paged, ours, 1)
    run(lambda ps: plain, ref, 4, start=1)
    run(lambda ps: paged, ours, 4, start=1)
    pager = paged._pagers[ours[0].device]
    assert len(pager._entries) > len(shapes)  # the big parameter is paged in slices
    assert 0 < pager.peak_resident_bytes <= budget and pager.resident_bytes <= budget
    to_gpu = sum(b for d, b in moves if d == 0)
    assert to_gpu == pager.bytes_to_device and to_gpu > 3 * budget  # every step streams states in and out
    assert sum(b for d, b in moves if d == -1) == pager.bytes_to_host > 0
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
        assert torch.equal(plain.state[a]["exp_avg"], paged.state[b]["exp_avg"])
    saved = copy.deepcopy(paged.state_dict())  # loading keeps the slices registered and the budget
    again = AdamW([torch.nn.Parameter(p.detach().clone()) for p in ours], bits=bits, paged=True,
                  gpu_budget_bytes=budget)
    again.load_state_dict(saved)
    assert again._pagers[ours[0].device].resident_bytes == 0


def test_frozen_quantized_params_are_accepted_and_skipped():
    """model.parameters() of a QLoRA model holds Linear4bit's frozen uint8 tensors: accepted, never updated."""
    import peft_layers

    torch.manual_seed(0)
    model = nf4q.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)), skip=(),
                                progress=False)
    model = peft_layers.get_peft_model(model, peft_layers.LoRAConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.is_floating_point()}
    assert frozen
    opt = nf4q.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 64)
    losses = []
    for _ in range(5):
        loss = model(x).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
