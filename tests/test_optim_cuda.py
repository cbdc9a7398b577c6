"""nf4q.optim on CUDA: the fused kernel against torch.optim.AdamW and the CPU kernel, paged states under a
budget (identical results, budget respected, memory returned), safety checks, no host syncs, opcheck."""
import copy
import gc

import pytest
import torch

from nf4q.optim import (
    AdamW,
    AdamW8bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedMemoryError,
    _kernels as K,
    reference as R,
    signed_map,
    unsigned_map,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not K.has_kernel("adamw_step", "cuda"),
                                reason="needs a GPU and nf4q's CUDA kernels")

SHAPES = [(37,), (129, 65), (4096 + 3,), (3, 5, 7), (8192,), (256, 384)]


def make_params(shapes, dtype=torch.float32, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in shapes]


def grads_for(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [(torch.randn(p.shape, generator=g) * (1 + i)).to(p.dtype).to(p.device) for i, p in enumerate(params)]


def run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()
    return opt


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def test_32bit_matches_torch_adamw():
    ours, ref = make_params(SHAPES), make_params(SHAPES)
    run(AdamW(ours, lr=1e-3, weight_decay=1e-2), ours, 100)
    run(torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2), ref, 100)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_kernel_matches_cpu_kernel(dtype, bits):
    shapes = [(4096,), (4099,), (300, 17), (5000,)]
    cpu = make_params(shapes, dtype, "cpu")
    base = torch.randn(4100 + 3)  # a parameter at an odd offset: the unaligned (scalar) path
    cpu.append(torch.nn.Parameter(base[3:].to(dtype)))
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu[:-1]]
    gpu.append(torch.nn.Parameter(base.to(dtype).cuda()[3:]))
    assert gpu[-1].data_ptr() % 16 != 0
    o_cpu, o_gpu = AdamW(cpu, lr=1e-2, bits=bits), AdamW(gpu, lr=1e-2, bits=bits)
    for t in range(3):
        for pc, pg, g in zip(cpu, gpu, grads_for(cpu, t)):
            pc.grad, pg.grad = g, g.cuda()
        o_cpu.step(), o_gpu.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for pc, pg in zip(cpu, gpu):
        torch.testing.assert_close(pg.cpu(), pc, **tol)
        for key, value in o_cpu.state[pc].items():
            other = o_gpu.state[pg][key]
            if key == "step":
                assert other == value
            elif value.dtype == torch.uint8:  # codes: only values at a rounding tie may land one apart
                diff = (other.cpu().int() - value.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
            else:
                torch.testing.assert_close(other.cpu(), value, rtol=1e-4, atol=1e-7)


def test_one_fused_launch_per_bucket():
    params = make_params([(1000,)] * 10 + [(5000,)] * 5)
    opt = AdamW8bit(params)
    run(opt, params, 1)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "adamw_kernel" in e.name]
    assert len(names) == 2, names  # 10 small tensors with 32-bit states + 5 with 8-bit states


def test_no_host_sync_during_steps():
    params = make_params(SHAPES)
    for opt in (AdamW8bit(params), PagedAdamW(make_params(SHAPES), gpu_budget_bytes=900_000)):
        ps = [p for g in opt.param_groups for p in g["params"]]
        run(opt, ps, 1)  # the first step allocates (and asks the driver for free memory)
        grads = grads_for(ps, 1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                for p, g in zip(ps, grads):
                    p.grad = g
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_under_budget_identical_and_within_budget(bits):
    shapes = [(512, 512)] * 6 + [(1000,), (4096 + 5,)]
    ref, ours = make_params(shapes), make_params(shapes)
    plain = run(AdamW(ref, lr=1e-2, bits=bits), ref, 6)
    total = state_bytes(plain)
    budget = total // 3
    paged = run(AdamW(ours, lr=1e-2, bits=bits, paged=True, gpu_budget_bytes=budget), ours, 6)
    pager = paged.page_manager(ours[0].device)
    assert 0 < pager.peak_resident_bytes <= budget
    assert pager.bytes_to_host > total  # states really went back and forth
    torch.cuda.synchronize()
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
        for key, value in plain.state[a].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(paged.state[b][key]))
    assert pager.resident_bytes <= budget


def test_paged_splits_a_parameter_larger_than_the_budget():
    ref, ours = make_params([(1000, 1003), (77,)]), make_params([(1000, 1003), (77,)])
    plain = run(AdamW8bit(ref, lr=1e-2), ref, 4)
    budget = state_bytes(plain) // 4  # one parameter's states are 4x the budget
    paged = run(PagedAdamW8bit(ours, lr=1e-2, gpu_budget_bytes=budget), ours, 4)
    pager = paged.page_manager(ours[0].device)
    assert 0 < pager.peak_resident_bytes <= budget and pager.bytes_to_host > 0
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
        assert torch.equal(plain.state[a]["exp_avg_sq"], paged.state[b]["exp_avg_sq"])


def test_paged_everything_resident_identical():
    ref, ours = make_params(SHAPES), make_params(SHAPES)
    run(AdamW8bit(ref), ref, 5)
    opt = run(PagedAdamW8bit(ours), ours, 5)
    assert opt.page_manager("cuda").bytes_to_device == 0
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_create_destroy_100_optimizers_returns_memory():
    params = make_params([(256, 256), (1000,)])
    for p in params:
        p.grad = torch.randn_like(p)
    PagedAdamW8bit(params, gpu_budget_bytes=1 << 20).step()  # warm up streams, events, pinned buffers
    gc.collect()
    torch.cuda.synchronize()
    start_managed = K.managed_stats()
    start_alloc = torch.cuda.memory_allocated()
    start_free = torch.cuda.mem_get_info()[0]
    for i in range(100):
        cls = [PagedAdamW, PagedAdamW8bit][i % 2]
        opt = cls(params, gpu_budget_bytes=(1 << 20) if i % 4 < 2 else None)
        opt.step()
        assert K.managed_stats()[1] > start_managed[1]
        del opt
    gc.collect()
    torch.cuda.synchronize()
    end_managed, end_alloc, end_free = K.managed_stats(), torch.cuda.memory_allocated(), torch.cuda.mem_get_info()[0]
    assert end_managed == start_managed, (start_managed, end_managed)
    assert end_alloc == start_alloc, (start_alloc, end_alloc)
    # the driver's free memory is back (it may come back higher: it also returns some of its own caches)
    assert end_free >= start_free - (64 << 20), (start_free, end_free)


def test_state_dict_round_trip_paged_8bit():
    shapes = [(300, 40), (33,)]
    a = make_params(shapes)
    opt = run(PagedAdamW8bit(a, lr=1e-2, gpu_budget_bytes=1 << 16), a, 4)
    saved = copy.deepcopy(opt.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    run(opt, a, 4, start=4)
    opt2 = PagedAdamW8bit(b, gpu_budget_bytes=1 << 16)
    opt2.load_state_dict(saved)
    run(opt2, b, 4, start=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert opt2.page_manager(b[0].device).peak_resident_bytes <= 1 << 16


def test_refuses_more_managed_memory_than_free(monkeypatch):
    params = make_params([(512, 512)])
    params[0].grad = torch.randn_like(params[0])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    with pytest.raises(PagedMemoryError, match="gpu_budget_bytes"):
        PagedAdamW(params).step()
    with pytest.raises(ValueError, match="gpu_budget_bytes"):
        PagedAdamW(params, gpu_budget_bytes=1 << 25).step()
    with pytest.raises(ValueError, match="gpu_budget_bytes"):  # one parameter's states exceed the budget
        monkeypatch.undo()
        PagedAdamW(params, gpu_budget_bytes=1 << 10).step()


def test_8bit_training_on_cuda_within_2_percent():
    losses = {}
    for bits in (32, 8):  # the noisy regression of test_optim.py::_train
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64)).cuda()
        x = torch.randn(1024, 128)
        y = (torch.tanh(x @ torch.randn(64, 128).t() / 128 ** 0.5) @ torch.randn(64, 64) / 8
             + 0.3 * torch.randn(1024, 64))
        x, y = x.cuda(), y.cuda()
        opt = AdamW(model.parameters(), lr=1e-2, bits=bits, paged=True, gpu_budget_bytes=40_000)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        losses[bits] = torch.nn.functional.mse_loss(model(x), y).item()
    assert abs(losses[8] - losses[32]) <= 0.02 * losses[32], losses


def test_opcheck_adamw8bit_step_cuda():
    p = [torch.randn(4096 + 7, device="cuda"), torch.randn(300, 17, device="cuda")]
    s, u = signed_map("cuda"), unsigned_map("cuda")
    ms, a1 = zip(*[R.quantize_state(torch.randn_like(x) * 0.1, s) for x in p])
    vs, a2 = zip(*[R.quantize_state(torch.rand_like(x) * 0.01, u) for x in p])
    torch.library.opcheck(torch.ops.nf4q.adamw8bit_step,
                          (p, [torch.randn_like(x) for x in p], list(ms), list(vs), list(a1), list(a2), s, u,
                           1e-3, 0.9, 0.999, 1e-8, 1e-2, 2))


def test_opcheck_adamw_step_cuda():
    p = [torch.randn(4096 + 7, device="cuda"), torch.randn(300, 17, device="cuda")]
    torch.library.opcheck(torch.ops.nf4q.adamw_step,
                          ([x.bfloat16() for x in p], [torch.randn_like(x).bfloat16() for x in p],
                           [torch.randn_like(x) for x in p], [torch.rand_like(x) for x in p],
                           1e-3, 0.9, 0.999, 1e-8, 1e-2, 2))


def test_opcheck_managed_memory_ops():
    # a factory with no tensor inputs: the autograd and AOT checks have nothing to trace
    torch.library.opcheck(torch.ops.nf4q.managed_zeros, (4096, torch.device("cuda"), True),
                          test_utils=("test_schema", "test_faketensor"))
    slab = K.managed_zeros(8192, "cuda", True)
    torch.library.opcheck(torch.ops.nf4q.prefetch, ([slab[:4096], slab[4096:]], torch.cuda.current_device()))
    K.prefetch([slab], -1)
    K.prefetch([torch.ones(10, device="cuda")], 0)  # ordinary device memory is left alone
    assert torch.equal(slab.cpu(), torch.zeros(8192, dtype=torch.uint8))
