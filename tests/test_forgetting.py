"""EWC and ReplayBuffer: Fisher against closed forms, the penalty's value and gradient, online decay, save/load,
reservoir uniformity (chi-square), capacity, structure, and bad input."""
import io
import warnings

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from peft_layers.forgetting import EWC, ReplayBuffer


# ---- a linear regression: loss_i = ½‖W x_i + b − y_i‖², so g_i = (r_i x_iᵀ, r_i) with r_i = W x_i + b − y_i --------
def regression(gen, n_batches=3, bs=5, last=2, d_in=4, d_out=3):
    model = nn.Linear(d_in, d_out)
    with torch.no_grad():
        model.weight.copy_(torch.randn(d_out, d_in, generator=gen))
        model.bias.copy_(torch.randn(d_out, generator=gen))
    sizes = [bs] * (n_batches - 1) + [last]  # an uneven last batch
    data = [{"x": torch.randn(s, d_in, generator=gen), "y": torch.randn(s, d_out, generator=gen)} for s in sizes]
    return model, data


def mse(model, batch):
    return 0.5 * (model(batch["x"]) - batch["y"]).pow(2).sum(-1).mean()


def per_example_grads(model, batch):
    r = (model(batch["x"]) - batch["y"]).detach()  # [B, out]
    return {"weight": r[:, :, None] * batch["x"][:, None, :], "bias": r}


def analytic_fisher(model, data, per_sample):
    total, count = None, 0
    for batch in data:
        g = per_example_grads(model, batch)
        size = batch["x"].shape[0]
        part = ({k: v.pow(2).sum(0) for k, v in g.items()} if per_sample
                else {k: v.mean(0).pow(2) * size ** 2 for k, v in g.items()})
        total = part if total is None else {k: total[k] + part[k] for k in part}
        count += size
    return {k: v / count for k, v in total.items()}


@pytest.mark.parametrize("estimator", ["per_sample", "per_batch"])
def test_fisher_matches_closed_form(gen, estimator):
    model, data = regression(gen)
    ewc = EWC(model, lam=1.0, fisher=estimator)
    got = ewc.estimate_fisher(data, mse)
    want = analytic_fisher(model, data, per_sample=estimator == "per_sample")
    assert set(got) == {"weight", "bias"} and ewc.last_estimator == estimator
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert model.weight.grad is None  # estimating never touches .grad


def test_estimators_agree_at_batch_size_one(gen):
    model, data = regression(gen, n_batches=4, bs=1, last=1)
    a = EWC(model, 1.0).estimate_fisher(data, mse, fisher="per_sample")
    b = EWC(model, 1.0).estimate_fisher(data, mse, fisher="per_batch")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_num_batches_and_trainable_subset(gen):
    model, data = regression(gen)
    model.bias.requires_grad_(False)
    ewc = EWC(model, 1.0)
    got = ewc.estimate_fisher(data, mse, num_batches=1, chunk_size=2)
    assert set(got) == {"weight"}
    torch.testing.assert_close(got["weight"], analytic_fisher(model, data[:1], True)["weight"])


def test_auto_falls_back_when_vmap_cannot_trace(gen):
    model, data = regression(gen)

    def loss_with_item(m, batch):  # .item() is data-dependent: vmap refuses it
        loss = mse(m, batch)
        return loss * (1.0 if loss.item() >= 0 else 0.0)

    ewc = EWC(model, 1.0, fisher="auto")
    with pytest.warns(RuntimeWarning, match="per-batch"):
        got = ewc.estimate_fisher(data, loss_with_item)
    assert ewc.last_estimator == "per_batch"
    torch.testing.assert_close(got["bias"], analytic_fisher(model, data, False)["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ewc.estimate_fisher(data, mse)
    assert ewc.last_estimator == "per_sample"


class Adapted(nn.Module):
    """A frozen base with a trainable low-rank adapter, the LoRA shape of the problem."""

    def __init__(self, gen):
        super().__init__()
        self.base = nn.Linear(4, 3)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(2, 4, generator=gen))
        self.B = nn.Parameter(torch.randn(3, 2, generator=gen))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def test_adapter_only_fisher(gen):
    model = Adapted(gen)
    _, data = regression(gen)
    ewc = EWC(model, 1.0)
    ewc.consolidate(data, mse)
    assert set(ewc.terms[0]["fisher"]) == {"A", "B"}
    # per_sample equals per_batch over single examples
    singles = [{k: v[i:i + 1] for k, v in b.items()} for b in data for i in range(b["x"].shape[0])]
    ref = ewc.estimate_fisher(singles, mse, fisher="per_batch")
    for k in ref:
        torch.testing.assert_close(ewc.terms[0]["fisher"][k], ref[k])


def test_qlora_adapter_fisher_and_penalty(gen):
    import nf4q  # our own packages: an import error must fail, not skip
    import peft_layers

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 3))
    nf4q.quantize_model(base, skip=(), progress=False)
    model = peft_layers.get_peft_model(base, peft_layers.LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():  # B starts at zero; make both factors matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=gen)
    data = [{"x": torch.randn(6, 64, generator=gen), "y": torch.randn(6, 3, generator=gen)} for _ in range(2)]
    ewc = EWC(model, lam=2.0)
    with pytest.warns(RuntimeWarning, match="per-batch"):  # the fused NF4+LoRA op cannot run under vmap
        ewc.consolidate(data, mse)
    names = set(ewc.terms[0]["fisher"])
    assert names and all("lora_" in n for n in names)
    assert all(ewc.terms[0]["fisher"][n].abs().sum() > 0 for n in names)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mse(model, data[0]).backward()
    opt.step()
    pen = ewc.penalty()
    assert pen.item() > 0
    opt.zero_grad()
    pen.backward()
    assert all((p.grad is not None) == (n in names) for n, p in model.named_parameters())


# ---- the penalty ----------------------------------------------------------------------------------------------
def test_penalty_zero_at_star_and_gradient(gen):
    model, data = regression(gen)
    ewc = EWC(model, lam=3.5)
    assert ewc.penalty().item() == 0.0  # nothing consolidated
    ewc.consolidate(data, mse)
    assert ewc.penalty().item() == 0.0
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    pen = ewc.penalty()
    pen.backward()
    fisher = ewc.terms[0]["fisher"]
    want = sum((fisher[n] * (p.detach() - star[n]).pow(2)).sum() for n, p in model.named_parameters()) * 3.5 / 2
    torch.testing.assert_close(pen.detach(), want)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3.5 * fisher[n] * (p.detach() - star[n]))


def test_large_lambda_keeps_parameters_near_star(gen):
    def train(lam):
        torch.manual_seed(0)
        model, data_a = regression(torch.Generator().manual_seed(7))
        ewc = EWC(model, lam=lam)
        ewc.consolidate(data_a, mse)
        star = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.Adam(model.parameters(), lr=0.05)  # Adam: the stiff penalty does not blow up SGD
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(8))
        task_b = {"x": x, "y": x[:, :3] * 5 + 3}  # a different target
        for _ in range(100):
            opt.zero_grad()
            (mse(model, task_b) + ewc.penalty()).backward()
            opt.step()
        return (torch.cat([p.detach().flatten() for p in model.parameters()]) - star).norm().item()

    free, held = train(0.0), train(1000.0)
    assert free > 1.0
    assert held < 0.1 * free


def test_online_decay_and_separate_terms(gen):
    model, data = regression(gen)
    online = EWC(model, 2.0, mode="online", decay=0.25)
    separate = EWC(model, 2.0, mode="separate")
    online.consolidate(data, mse)
    separate.consolidate(data, mse)
    f1 = {k: v.clone() for k, v in online.terms[0]["fisher"].items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    f2 = online.estimate_fisher(data, mse)
    online.consolidate(data, mse)
    separate.consolidate(data, mse)
    assert len(online.terms) == 1 and len(separate.terms) == 2
    for k in f1:
        torch.testing.assert_close(online.terms[0]["fisher"][k], 0.25 * f1[k] + f2[k])
        torch.testing.assert_close(online.terms[0]["star"][k], dict(model.named_parameters())[k].detach())
    # separate mode: the penalty sums one term per task
    with torch.no_grad():
        model.bias.sub_(0.5)
    star1 = separate.terms[0]["star"]
    want = sum((f1[n] * (p.detach() - star1[n]).pow(2)).sum() + (f2[n] * (p.detach() - separate.terms[1]["star"][n])
                                                                 .pow(2)).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(separate.penalty().detach(), want)


def test_save_load_and_lookup_by_name(gen):
    model, data = regression(gen)
    ewc = EWC(model, 5.0, mode="online", decay=0.5)
    ewc.consolidate(data, mse)
    with torch.no_grad():
        model.weight.mul_(1.5)
    before = ewc.penalty().item()
    assert before > 0
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ewc": ewc.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = nn.Linear(4, 3)
    fresh.load_state_dict(saved["model"])
    restored = EWC(fresh, 1.0, mode="online")
    restored.load_state_dict(saved["ewc"])
    assert restored.lam == 5.0 and restored.decay == 0.5
    assert restored.penalty().item() == pytest.approx(before, rel=1e-6)
    # a replaced parameter with the same name is what the penalty sees
    wrapper = nn.Sequential(nn.Linear(4, 3))
    ewc2 = EWC(wrapper, 1.0)
    ewc2.consolidate(data, mse)
    wrapper[0] = nn.Linear(4, 3)
    assert ewc2.penalty().item() > 0
    with pytest.raises(ValueError, match="mode"):
        EWC(fresh, 1.0).load_state_dict(saved["ewc"])
    with pytest.raises(ValueError, match="shape"):
        EWC(nn.Linear(5, 3), 1.0, mode="online").load_state_dict(saved["ewc"])


def test_ewc_bad_input(gen):
    model, data = regression(gen)
    with pytest.raises(ValueError, match="lam"):
        EWC(model, -1.0)
    with pytest.raises(TypeError, match="lam"):
        EWC(model, "1")
    with pytest.raises(TypeError, match="model"):
        EWC(object(), 1.0)
    with pytest.raises(ValueError, match="mode"):
        EWC(model, 1.0, mode="joint")
    with pytest.raises(ValueError, match="decay"):
        EWC(model, 1.0, mode="online", decay=1.5)
    with pytest.raises(ValueError, match="decay"):
        EWC(model, 1.0, decay=0.5)  # separate mode has no decay
    with pytest.raises(ValueError, match="fisher"):
        EWC(model, 1.0, fisher="exact")
    ewc = EWC(model, 1.0)
    with pytest.raises(ValueError, match="num_batches"):
        ewc.consolidate(data, mse, num_batches=0)
    with pytest.raises(TypeError, match="loss_fn"):
        ewc.consolidate(data, None)
    with pytest.raises(ValueError, match="no examples"):
        ewc.consolidate([], mse)
    with pytest.raises(ValueError, match="leading"):
        ewc.consolidate([{"x": torch.randn(3, 4), "y": torch.randn(2, 3)}], mse)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        ewc.consolidate(data, mse)


# ---- ReplayBuffer ---------------------------------------------------------------------------------------------
def test_reservoir_is_uniform_over_everything_seen():
    n_items, capacity, trials = 60, 6, 1000
    counts = torch.zeros(n_items)
    ids = torch.arange(n_items)
    for trial in range(trials):
        buf = ReplayBuffer(capacity, seed=trial)
        for start in range(0, n_items, 7):  # uneven batches
            chunk = ids[start:start + 7]
            buf.add((chunk, chunk.float() * 2))
        assert len(buf) == capacity and buf.seen == n_items
        stored_ids, doubled = buf.sample(capacity)
        assert torch.equal(doubled, stored_ids.float() * 2)  # examples stay whole
        assert stored_ids.unique().numel() == capacity
        counts[stored_ids] += 1
    expected = trials * capacity / n_items
    assert chisquare(counts.numpy(), [expected] * n_items).pvalue > 1e-3
    # a sampler that keeps only the newest items would fail this test
    assert chisquare([0.0] * (n_items - capacity) + [trials] * capacity, [expected] * n_items).pvalue < 1e-3


def test_reservoir_has_no_off_by_one_bias():
    """Enough trials to see a one-slot bias. Each of 12 items must be kept with probability 3/12. Drawing the slot
    from U{0..t-1} instead of U{0..t} keeps the first 3 items with probability 2/11 and the others with 3/11:
    over 2000 trials that is a chi-square of about 150 on 11 degrees of freedom, where p = 1e-3 is at 31.3."""
    n_items, capacity, trials = 12, 3, 2000
    counts = torch.zeros(n_items)
    ids = torch.arange(n_items)
    for trial in range(trials):
        buf = ReplayBuffer(capacity, seed=10_000 + trial)
        for start, stop in ((0, 2), (2, 7), (7, 8), (8, 12)):  # batches smaller and larger than the capacity
            buf.add(ids[start:stop])
        counts[buf.sample(capacity)] += 1
    assert chisquare(counts.numpy()).pvalue > 1e-3
    # the first `capacity` items (stored without a draw) are kept as often as the rest: 500 expected each,
    # binomial sd ≈ 19, while the off-by-one bias above gives ≈ 364
    assert (counts[:capacity] - trials / 4).abs().max() < 5 * (trials * 0.25 * 0.75) ** 0.5


def test_sample_is_uniform_over_buffer():
    buf = ReplayBuffer(10, seed=3)
    buf.add({"id": torch.arange(10)})
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[buf.sample(3)["id"]] += 1
    assert chisquare(counts.numpy()).pvalue > 1e-3
    counts.zero_()
    counts[buf.sample(4000, replace=True)["id"]] += 1
    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_capacity_structure_mix_and_loss():
    buf = ReplayBuffer(5, seed=0)
    assert len(buf) == 0
    buf.add({"x": torch.randn(3, 2, 4), "y": torch.zeros(3, dtype=torch.long)})
    assert len(buf) == 3
    buf.add({"x": torch.randn(9, 2, 4), "y": torch.ones(9, dtype=torch.long)})
    assert len(buf) == 5 and buf.seen == 12
    s = buf.sample(4)
    assert set(s) == {"x", "y"} and s["x"].shape == (4, 2, 4) and s["y"].dtype == torch.long
    task = {"x": torch.randn(6, 2, 4), "y": torch.full((6,), 7)}
    mixed = buf.mix(task, 0.5)
    assert mixed["x"].shape == (9, 2, 4) and (mixed["y"][:6] == 7).all() and (mixed["y"][6:] != 7).all()
    assert buf.mix(task, 10.0)["x"].shape[0] == 6 + 5  # capped at what is stored
    assert ReplayBuffer(4).mix(task, 0.5) is task  # empty: nothing to replay
    tup = ReplayBuffer(4, seed=1)
    tup.add((torch.randn(2, 3), torch.randn(2)))
    assert isinstance(tup.sample(2), tuple)

    model = nn.Linear(4, 1)

    def loss_fn(m, b):
        return m(b["x"].sum(1)).pow(2).mean()

    saved = buf.state_dict()
    got = buf.loss(model, loss_fn, task, lam=0.3, n=2)
    ref = ReplayBuffer(5, seed=99)
    ref.load_state_dict(saved)  # the saved generator state replays the same draw
    torch.testing.assert_close(got, loss_fn(model, task) + 0.3 * loss_fn(model, ref.sample(2)))
    assert ReplayBuffer(3).loss(model, loss_fn, task).item() == loss_fn(model, task).item()


def test_replay_bad_input():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="capacity"):
            ReplayBuffer(bad)
    with pytest.raises(TypeError, match="capacity"):
        ReplayBuffer(2.5)
    buf = ReplayBuffer(4, seed=0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    with pytest.raises(ValueError, match="leading"):
        buf.add((torch.randn(3, 2), torch.randn(4)))
    with pytest.raises(TypeError, match="batch"):
        buf.add([torch.randn(3), "labels"])
    with pytest.raises(TypeError, match="batch"):
        buf.add(42)
    buf.add((torch.randn(3, 2), torch.randn(3)))
    with pytest.raises(ValueError, match="structure"):
        buf.add((torch.randn(3, 5), torch.randn(3)))
    with pytest.raises(ValueError, match="n="):
        buf.sample(10)
    with pytest.raises(ValueError, match="n must"):
        buf.sample(0)
    with pytest.raises(ValueError, match="ratio"):
        buf.mix((torch.randn(3, 2), torch.randn(3)), -1.0)
    with pytest.raises(ValueError, match="structure"):
        buf.mix({"a": torch.randn(3, 2)}, 1.0)
    with pytest.raises(ValueError, match="lam"):
        buf.loss(nn.Linear(2, 1), lambda m, b: m(b[0]).mean(), (torch.randn(3, 2), torch.randn(3)), lam=-1)
