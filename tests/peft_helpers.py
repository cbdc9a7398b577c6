"""Tiny transformers models (built from configs, nothing downloaded) and training helpers for the peft tests."""
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*(deprecated|eos_token_id|bos_token_id|pad_token_id).*")

VOCAB = 64


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def same_weights(factory, seed=0):
    """A fresh copy of factory(seed)'s weights, built under another global seed (adapters get other inits)."""
    ref = factory(seed).state_dict()
    model = factory(seed + 100)
    model.load_state_dict(ref)
    return model


def batch(kind="lm", B=2, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0  # left padding on one row: masks must be handled
    if kind == "cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, b, steps=5, lr=3e-2):
    """A few AdamW steps on one batch; returns the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def changed_names(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def perturb_adapter(model, scale=0.2, seed=1):
    """Give every trainable parameter non-trivial values (B=0 / ones would make merges and loads trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


class TwoLayer(nn.Module):
    """A hand-made module: two projections and a head."""

    def __init__(self, d=24, h=40, out=5):
        super().__init__()
        self.proj_in = nn.Linear(d, h)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(h, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(x + self.proj_out(self.act(self.proj_in(x))))
