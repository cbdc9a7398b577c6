"""How much does fine-tuning on task B make a small causal LM forget task A, and what do EWC, replay, LoRA and
QLoRA change? CPU only, offline data, a few minutes:

    python -m benchmarks.forgetting            # 3 seeds, the table in notes/forgetting.md
    python -m benchmarks.forgetting --quick    # 1 seed, fewer steps: a smoke run

Task A: next-byte prediction on Python's documentation topics (pydoc_data.topics, English prose).
Task B: next-byte prediction on Python's standard library source (code).
Per seed: pretrain a byte-level transformer on A, then fine-tune a copy on B once per arm with the same B batches.
Losses are mean cross-entropy in nats per byte on held-out text of A and B. Last printed: a markdown table.
"""
import argparse
import copy
import glob
import math
import os
import platform
import sys
import sysconfig
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peft_layers.forgetting import EWC, ReplayBuffer


# ---- data ----------------------------------------------------------------------------------------------------
def corpus_a() -> bytes:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def corpus_b(limit: int) -> bytes:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out = bytearray()
    for path in files:  # sorted, so the same bytes on every run of one Python version
        with open(path, "rb") as f:
            out += f.read() + b"\n"
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def split(data: bytes, eval_frac=0.1):
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(t) * (1 - eval_frac))
    return t[:cut], t[cut:]


def batches(tokens, n, bs, ctx, gen):
    """n random windows batches of ctx + 1 bytes, as {"input_ids": [bs, ctx + 1]}."""
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - ctx - 1, (bs,), generator=gen)
        yield {"input_ids": torch.stack([tokens[s:s + ctx + 1] for s in starts.tolist()])}


def eval_batches(tokens, n_seq, ctx, bs):
    """Evenly spaced, non-overlapping windows: the same held-out text for every arm."""
    step = max(ctx + 1, (len(tokens) - ctx - 1) // n_seq)
    seqs = [tokens[s:s + ctx + 1] for s in range(0, len(tokens) - ctx - 1, step)][:n_seq]
    return [{"input_ids": torch.stack(seqs[i:i + bs])} for i in range(0, len(seqs), bs)]


# ---- a byte-level decoder (nn.Linear everywhere, so LoRA and quantize_model find its layers) ------------------
class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, d=128, layers=2, heads=4, ctx=64, vocab=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model, batch):
    """Mean next-byte cross-entropy over the batch: the training loss, and EWC's / replay's loss_fn."""
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, data):
    was = model.training
    model.eval()
    loss = sum(lm_loss(model, b).item() * b["input_ids"].shape[0] for b in data)
    model.train(was)
    return loss / sum(b["input_ids"].shape[0] for b in data)


def train(model, data, lr, extra_loss=None, step_hook=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = list(data)
    n = len(data)

    def schedule(i):  # 20 warmup steps, then cosine to 10%: ends of both tasks are near a minimum
        return min(1.0, (i + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * min(i, n) / n))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    for step, batch in enumerate(data, 1):
        loss = lm_loss(model, batch) if extra_loss is None else extra_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step_hook is not None:
            step_hook(step, batch)


# ---- arms ----------------------------------------------------------------------------------------------------
def add_lora(model, cfg, quantize):
    import nf4q
    import peft_layers

    if quantize:
        nf4q.quantize_model(model, skip=("lm_head",), progress=False)
    model = peft_layers.get_peft_model(model, peft_layers.LoRAConfig(
        r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                         "down_proj"]))
    return model


def run_arm(name, pretrained, buffer, data, cfg, seed):
    """Fine-tune a copy of `pretrained` on B as arm `name`. Returns a dict: A and B loss at the start and end,
    CPU seconds (evaluations excluded) and, for plain full fine-tuning, the (B loss, A loss) trajectory."""
    torch.manual_seed(1000 + seed)  # LoRA init and anything else random inside the arm
    model = copy.deepcopy(pretrained)
    t0 = time.process_time()  # CPU seconds: wall time on an idle core, whatever the load
    lora = name.startswith(("LoRA", "QLoRA"))
    if lora:
        model = add_lora(model, cfg, quantize=name.startswith("QLoRA"))
    a0, b0 = evaluate(model, data["a_eval"]), evaluate(model, data["b_eval"])
    extra = None
    if "EWC" in name:
        ewc = EWC(model, lam=cfg.ewc_lam_lora if lora else cfg.ewc_lam)
        gen_f = torch.Generator().manual_seed(2000 + seed)
        ewc.consolidate(batches(data["a_train"], cfg.fisher_batches, cfg.bs, cfg.ctx, gen_f), lm_loss)
        extra = lambda m, b: lm_loss(m, b) + ewc.penalty()  # noqa: E731
    if "replay" in name:
        extra = lambda m, b: buffer.loss(m, lm_loss, b, lam=cfg.replay_lam, n=cfg.replay_n)  # noqa: E731
    traj, eval_s = [(b0, a0)], 0.0

    def record(step, _):  # full FT stopped early at every B loss it passes: the reference for "equal B loss"
        nonlocal eval_s
        if name == "full" and step % cfg.traj_every == 0 and step < cfg.steps_b:
            t = time.process_time()
            traj.append((evaluate(model, data["b_eval"]), evaluate(model, data["a_eval"])))
            eval_s += time.process_time() - t

    gen_b = torch.Generator().manual_seed(3000 + seed)  # the same B batches for every arm of a seed
    lr = cfg.lr_lora if lora else cfg.lr_full
    train(model, batches(data["b_train"], cfg.steps_b, cfg.bs, cfg.ctx, gen_b), lr, extra, record)
    secs = time.process_time() - t0 - eval_s
    a1, b1 = evaluate(model, data["a_eval"]), evaluate(model, data["b_eval"])
    traj.append((b1, a1))
    return {"a0": a0, "a1": a1, "b0": b0, "b1": b1, "secs": secs, "traj": traj}


def a_at_b(traj, b):
    """A loss of early-stopped full fine-tuning where its B loss first reaches b (linear interpolation between
    evaluations); None when full fine-tuning never got that far down."""
    for (b_prev, a_prev), (b_next, a_next) in zip(traj, traj[1:]):
        if b_next <= b <= b_prev and b_prev > b_next:
            return a_prev + (a_next - a_prev) * (b_prev - b) / (b_prev - b_next)
    return None


ARMS = ["full", "full + EWC", "full + replay", "LoRA", "QLoRA", "QLoRA + EWC"]


def have_peft():
    try:
        import peft_layers

        return hasattr(peft_layers, "get_peft_model") and hasattr(peft_layers, "LoRAConfig")
    except ImportError:
        return False


def load_data(cfg):
    a_train, a_eval = split(corpus_a())
    b_train, b_eval = split(corpus_b(limit=len(a_train) + len(a_eval)))  # as many bytes as A
    n_eval = 64 if cfg.quick else 128
    return {"a_train": a_train, "b_train": b_train, "a_eval": eval_batches(a_eval, n_eval, cfg.ctx, 64),
            "b_eval": eval_batches(b_eval, n_eval, cfg.ctx, 64)}


def run_seed(seed, cfg, arms):
    """Pretrain on A with `seed`, then every arm; returns ((A, B) after pretraining, {arm: run_arm(...)}, CPU s)."""
    # per-sample Fisher runs attention through vmap's (correct, slower) fallback: say it once, not per batch
    warnings.filterwarnings("ignore", message="There is a performance drop")
    cpu0 = time.process_time()
    torch.set_num_threads(cfg.threads)
    data = load_data(cfg)
    torch.manual_seed(seed)
    model = TinyLM(cfg.d, cfg.layers, 4, cfg.ctx)
    buffer = ReplayBuffer(cfg.replay_capacity, seed=seed)  # sees every A batch: a uniform sample of A
    t0 = time.process_time()
    gen_a = torch.Generator().manual_seed(seed)
    train(model, batches(data["a_train"], cfg.steps_a, cfg.bs, cfg.ctx, gen_a), cfg.lr_a,
          step_hook=lambda _, b: buffer.add(b))
    pre = (evaluate(model, data["a_eval"]), evaluate(model, data["b_eval"]))
    print(f"seed {seed}: pretrained on A in {time.process_time() - t0:.1f} CPU s, A {pre[0]:.3f}, B {pre[1]:.3f}",
          file=sys.stderr, flush=True)
    out = {}
    for arm in arms:
        out[arm] = r = run_arm(arm, model, buffer, data, cfg, seed)
        print(f"  seed {seed} {arm:14s} A {r['a0']:.3f} -> {r['a1']:.3f}   B {r['b0']:.3f} -> {r['b1']:.3f}   "
              f"{r['secs']:.1f} CPU s",
              file=sys.stderr, flush=True)
    return pre, out, time.process_time() - cpu0  # CPU seconds: about the wall time on an idle core


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, fewer steps (smoke run)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--jobs", type=int, default=3,
                   help="processes, one seed each (3 on 2 cores: no core idles while the last seed runs alone)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: a tiny model gains little from more, loses much on a busy CPU)")
    p.add_argument("--steps-a", type=int, default=400)
    p.add_argument("--steps-b", type=int, default=150)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr-a", type=float, default=3e-3)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ewc-lam", type=float, default=1e4, help="chosen on seed 100 from 1e3/1e4/1e5")
    p.add_argument("--ewc-lam-lora", type=float, default=1e4)
    p.add_argument("--fisher-batches", type=int, default=8)
    p.add_argument("--replay-capacity", type=int, default=512)
    p.add_argument("--replay-n", type=int, default=8, help="replayed sequences per B step")
    p.add_argument("--replay-lam", type=float, default=1.0)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--traj-every", type=int, default=10, help="full FT: evaluate every N steps (equal-B reference)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.seeds, cfg.steps_a, cfg.steps_b = 1, 200, 60
    arms = [a.strip() for a in cfg.arms.split(",")]
    if any(a.startswith(("LoRA", "QLoRA")) for a in arms) and not have_peft():
        print("peft_layers.get_peft_model is not available yet: skipping the LoRA/QLoRA arms", file=sys.stderr)
        arms = [a for a in arms if not a.startswith(("LoRA", "QLoRA"))]

    t_start = time.perf_counter()
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    jobs = max(1, min(cfg.jobs, len(seeds)))
    if jobs == 1:
        outs = [run_seed(seed, cfg, arms) for seed in seeds]
    else:  # seeds are independent: one process each (spawned, so no OpenMP state is forked)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            outs = list(pool.map(run_seed, seeds, [cfg] * len(seeds), [arms] * len(seeds)))
    pre = [o[0] for o in outs]
    results = {a: [o[1][a] for o in outs] for a in arms}
    cpu = sum(o[2] for o in outs)
    total = time.perf_counter() - t_start

    def ms(xs):
        m = sum(xs) / len(xs)
        s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return f"{m:.3f} ± {s:.3f}" if len(xs) > 1 else f"{m:.3f}"

    n_params = sum(p.numel() for p in TinyLM(cfg.d, cfg.layers, 4, cfg.ctx).parameters())
    print(f"\nByte-level LM ({n_params / 1e3:.0f}k params, d={cfg.d}, {cfg.layers} layers, ctx {cfg.ctx}); "
          f"A = pydoc_data.topics, B = stdlib *.py; {cfg.steps_a} steps on A, {cfg.steps_b} on B, batch {cfg.bs}; "
          f"lr full {cfg.lr_full}, LoRA/QLoRA {cfg.lr_lora} (r={cfg.rank}); EWC λ={cfg.ewc_lam:g} "
          f"(LoRA/QLoRA λ={cfg.ewc_lam_lora:g}), Fisher on {cfg.fisher_batches}×{cfg.bs} A sequences; replay "
          f"{cfg.replay_n} A sequences per step (λ={cfg.replay_lam:g}, capacity {cfg.replay_capacity}). "
          f"Mean ± std over {cfg.seeds} seed(s), nats/byte on held-out text. Total {total:.0f}s wall, "
          f"{cpu:.0f} CPU s, {jobs} process(es) × {cfg.threads} thread(s), torch {torch.__version__}, "
          f"{platform.machine()}. \"full FT ΔA at this B loss\": "
          f"the forgetting of plain full fine-tuning stopped early where its B loss equals the arm's final B loss.\n")
    print(f"Pretrained on A: A loss {ms([a for a, _ in pre])}, B loss {ms([b for _, b in pre])}\n")
    print("| arm | A loss before | A loss after | forgetting ΔA | B loss before | B loss after | "
          "full FT ΔA at this B loss | CPU s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        r = results[arm]
        ref = "n/a"
        if "full" in results:
            at = [a_at_b(f["traj"], x["b1"]) for f, x in zip(results["full"], r)]
            got = [a - f["a0"] for a, f in zip(at, results["full"]) if a is not None]
            ref = "—" if not got else ms(got) + ("" if len(got) == len(r) else f" ({len(got)}/{len(r)} seeds)")
        print(f"| {arm} | {ms([x['a0'] for x in r])} | {ms([x['a1'] for x in r])} | "
              f"{ms([x['a1'] - x['a0'] for x in r])} | {ms([x['b0'] for x in r])} | {ms([x['b1'] for x in r])} | "
              f"{ref} | {sum(x['secs'] for x in r) / len(r):.1f} |")


if __name__ == "__main__":
    main()
