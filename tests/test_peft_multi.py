"""Several LoRA adapters: add / set (one or a list = their sum) / delete, add_weighted_adapter (linear, cat, svd)
against the real `peft`, and mixed-adapter batches (adapter_names=) against per-row single-adapter runs and PEFT,
on nn.Linear, GPT-2 Conv1D and NF4 bases; bad input."""
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import nf4q
from peft_helpers import VOCAB, TwoLayer, batch, logits, perturb_adapter, same_weights, tiny_gpt2, tiny_llama, train
from peft_layers import LoRAConfig, LoRALayer, get_peft_model, multi_lora

HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="the interop extra peft is not installed")
if HAVE_PEFT:
    import peft

warnings.filterwarnings("ignore", message="merging into an NF4 weight")
ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def three_adapters(base, targets=TARGETS, ranks=(4, 4, 2)):
    """Adapters "default", "b", "c" (c on fewer modules and of another rank), all non-trivial; eval mode."""
    model = get_peft_model(base, LoRAConfig(r=ranks[0], lora_alpha=8, target_modules=targets))
    model.add_adapter("b", LoRAConfig(r=ranks[1], lora_alpha=4, target_modules=targets))
    model.add_adapter("c", LoRAConfig(r=ranks[2], lora_alpha=8, target_modules=targets[:1]))
    model.set_adapter(["default", "b", "c"])  # all trainable: perturb them all
    perturb_adapter(model)
    model.set_adapter("default")
    return model.eval()


def per_row(model, b, names):
    """The reference: each row alone through its adapter (or the disabled model for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in b.items() if k != "labels"}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(logits(model, one))
        else:
            model.set_adapter(name)
            rows.append(logits(model, one))
    model.set_adapter("default")
    return torch.cat(rows)


# ---- several adapters --------------------------------------------------------------------------------------

def test_set_adapter_list_sums_and_trains_all():
    model = three_adapters(tiny_llama())
    b = batch()
    base = logits(tiny_llama(), b)
    single = {}
    for n in ("default", "b"):
        model.set_adapter(n)
        single[n] = logits(model, b)
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"] and model.active_adapter == "default"
    both = logits(model, b)
    # not linear through the whole network, but each layer adds both updates: compare one layer directly
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        expect = layer.base_layer(x) + sum(layer.scaling[n] * x @ layer.lora_A[n].weight.t()
                                           @ layer.lora_B[n].weight.t() for n in ("default", "b"))
        torch.testing.assert_close(layer(x), expect, rtol=0, atol=ATOL)
    assert not torch.allclose(both, single["default"]) and not torch.allclose(both, base)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".b.weight" in n for n in trainable) and any(".default.weight" in n for n in trainable)
    assert not any(".c.weight" in n for n in trainable)
    losses = train(model, batch(), steps=2)
    assert losses[1] < losses[0]


def test_delete_adapter_and_bad_names():
    model = three_adapters(tiny_llama())
    model.set_adapter(["b", "c"])
    model.delete_adapter("b")
    assert model.active_adapters == ["c"] and "b" not in model.peft_config
    assert not any("b" in layer.adapter_names() for layer in model.get_base_model().modules()
                   if isinstance(layer, LoRALayer))
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        model.set_adapter(["c", "zzz"])
    with pytest.raises(TypeError, match="adapter_name"):
        model.set_adapter([])


@needs_peft
def test_active_adapter_list_matches_peft(tmp_path):
    ours = three_adapters(tiny_llama())
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(same_weights(tiny_llama), str(tmp_path))
    for n in ("b", "c"):
        theirs.load_adapter(str(tmp_path / n), adapter_name=n)
    theirs.base_model.set_adapter(["default", "b", "c"])
    ours.set_adapter(["default", "b", "c"])
    b = batch()
    torch.testing.assert_close(logits(ours, b), logits(theirs.eval(), b), rtol=0, atol=ATOL)


# ---- add_weighted_adapter ---------------------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("combination_type, adapters, weights", [
    ("linear", ["default", "b"], [0.7, -0.4]), ("cat", ["default", "b", "c"], [0.5, 1.5, -1.0]),
    ("svd", ["default", "c"], [1.0, 0.6]), ("linear", ["c"], [2.0])])
def test_add_weighted_adapter_matches_peft(tmp_path, combination_type, adapters, weights):
    ours = three_adapters(tiny_llama())
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(same_weights(tiny_llama), str(tmp_path))
    for n in ("b", "c"):
        theirs.load_adapter(str(tmp_path / n), adapter_name=n)
    kw = dict(combination_type=combination_type, svd_rank=3 if combination_type == "svd" else None)
    ours.add_weighted_adapter(adapters, weights, "mix", **kw)
    theirs.add_weighted_adapter(adapters, weights, "mix", **kw)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    b = batch()
    torch.testing.assert_close(logits(ours, b), logits(theirs.eval(), b), rtol=0, atol=ATOL)


def test_weighted_cat_is_the_exact_weighted_sum_and_bad_input():
    model = three_adapters(tiny_llama())
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix", combination_type="cat")
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    expect = 0.5 * layer.delta_weight("default") - 2.0 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expect, rtol=1e-5, atol=1e-6)
    assert model.peft_config["mix"].r == 8 and "mix" not in model.active_adapters
    with pytest.raises(ValueError, match="same|one rank"):
        model.add_weighted_adapter(["default", "c"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="weights"):
        model.add_weighted_adapter(["default", "b"], [1], "x")
    with pytest.raises(ValueError, match="adapters: unknown adapter 'nope'"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties")
    with pytest.raises(ValueError, match="adapter_name 'b'"):
        model.add_weighted_adapter(["default"], [1], "b")


# ---- mixed-adapter batches ---------------------------------------------------------------------------------------

NAMES = ["b", "__base__", "default", "b", "default", "__base__", "b"]  # "c" is loaded but used by no row


def mixed_batch(n=len(NAMES), T=6):  # noqa: B008 (NAMES is a module constant)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "nf4"])
def test_mixed_batch_equals_per_row_runs(kind):
    if kind == "gpt2":
        model = three_adapters(tiny_gpt2(), targets=["c_attn", "mlp.c_proj"])
    else:
        model = three_adapters(nf4q.quantize_model(tiny_llama(), progress=False) if kind == "nf4" else tiny_llama())
    b = mixed_batch()
    expect = per_row(model, b, NAMES)
    with torch.no_grad():
        got = model(**b, adapter_names=NAMES).logits
    torch.testing.assert_close(got, expect, rtol=0, atol=ATOL)
    # the grouping is per call: afterwards no layer holds it and a plain call is the active adapter again
    assert all(getattr(m, "row_groups", None) is None for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, model(**b, adapter_names=["default"] * len(NAMES)).logits,
                                   rtol=0, atol=ATOL)


def test_mixed_batch_generate():
    model = three_adapters(tiny_llama())
    b = mixed_batch(3)
    names = ["c", "__base__", "b"]
    out = model.generate(**b, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in b.items()}
        if name == "__base__":
            with model.disable_adapter():
                ref = model.generate(**one, max_new_tokens=3, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            ref = model.generate(**one, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i:i + 1], ref)


@needs_peft
def test_mixed_batch_matches_peft(tmp_path):
    ours = three_adapters(tiny_llama())
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(same_weights(tiny_llama), str(tmp_path))
    for n in ("b", "c"):
        theirs.load_adapter(str(tmp_path / n), adapter_name=n)
    b = mixed_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b, adapter_names=NAMES).logits,
                                   theirs.eval()(**b, adapter_names=NAMES).logits, rtol=0, atol=ATOL)


def test_mixed_batch_with_modules_to_save():
    model = get_peft_model(TwoLayer(), LoRAConfig(r=2, target_modules=["proj_in"], modules_to_save=["head"]))
    model.add_adapter("b", LoRAConfig(r=3, target_modules=["proj_in"], modules_to_save=["head"]))
    model.set_adapter(["default", "b"])
    perturb_adapter(model)
    with torch.no_grad():
        for copy_ in model.get_base_model().head.modules_to_save.values():
            copy_.weight.add_(torch.randn_like(copy_.weight))
    model.set_adapter("default")
    model.eval()
    x = torch.randn(5, 24)
    names = ["b", "__base__", "default", "b", "__base__"]
    with torch.no_grad():
        got = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    ref = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                ref = model(x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("ranks", [(1, 8, 16), (16, 64, 4)])
@pytest.mark.parametrize("shape", [(5, 24), (7, 3, 24)])
def test_layer_mixed_forward_equals_the_loop(ranks, shape):
    """Different ranks (zero padded in the stack), uneven groups (padded rows), 2-D and 3-D inputs."""
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(24, 40), "a", LoRAConfig(r=ranks[0]))
    for n, r in zip("bc", ranks[1:]):
        layer.update_layer(n, LoRAConfig(r=r, lora_alpha=3))
    for p in layer.parameters():
        nn.init.normal_(p) if p.requires_grad else None
    layer.eval()
    x = torch.randn(*shape)
    names = (["a", "c", "__base__", "c", "c", "b", "a"])[:shape[0]]
    groups = multi_lora.RowGroups(names)
    with torch.no_grad():
        got = multi_lora.mixed_forward(layer, x, groups)
        torch.testing.assert_close(got, multi_lora.loop_forward(layer, x, names), rtol=1e-5, atol=1e-5)
        for i, n in enumerate(names):
            layer.set_adapter(n if n != "__base__" else [])
            torch.testing.assert_close(got[i:i + 1], layer(x[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_stack_cache_follows_weight_changes():
    layer = LoRALayer(nn.Linear(8, 8), "a", LoRAConfig(r=2)).eval()
    x = torch.randn(2, 8)
    groups = multi_lora.RowGroups(["a", "a"])
    first = multi_lora.mixed_forward(layer, x, groups)
    with torch.no_grad():
        layer.lora_B["a"].weight.add_(1.0)
    second = multi_lora.mixed_forward(layer, x, groups)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, multi_lora.loop_forward(layer, x, ["a", "a"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("names, error, match", [
    (["default", "nope", "b", "b", "b", "b", "b"], ValueError, r"adapter_names.*unknown.*'nope'"),
    (["default", "b"], ValueError, "adapter_names has 2 entries but the batch has 7"),
    ("default", TypeError, "adapter_names must be a list"),
])
def test_mixed_batch_bad_input(names, error, match):
    model = three_adapters(tiny_llama())
    with pytest.raises(error, match=match):
        model(**mixed_batch(), adapter_names=names)


def test_mixed_batch_refused_in_training_merged_and_dora():
    model = three_adapters(tiny_llama())
    b = mixed_batch()
    model.train()
    with pytest.raises(ValueError, match="adapter_names.*training mode"):
        model(**b, adapter_names=NAMES)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="adapter_names.*merged"):
        model(**b, adapter_names=NAMES)
    model.unmerge_adapter()
    model.add_adapter("d", LoRAConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="adapter_names.*DoRA"):
        model(**b, adapter_names=["d"] * len(NAMES))
    with torch.no_grad():  # DoRA adapters loaded but not selected are fine
        model(**b, adapter_names=NAMES)


# ---- CUDA: the batched path on an NF4 base over dtypes and ranks (run by the lead on the GPU) ----------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_cuda_mixed_forward_nf4(dtype, r):
    torch.manual_seed(0)
    base = nf4q.Linear4bit.from_linear(nn.Linear(200, 136), compute_dtype=dtype).cuda()
    layer = LoRALayer(base, "a", LoRAConfig(r=r))
    for n, rr in zip("bcd", (r, max(1, r // 2), 3)):
        layer.update_layer(n, LoRAConfig(r=rr, lora_alpha=2 * rr))
    for p in layer.parameters():
        nn.init.normal_(p, std=0.1) if p.requires_grad else None
    layer.eval()
    names = ["a", "b", "__base__", "c", "a", "b", "b", "a", "c", "__base__", "a"]  # M = 11, "d" unused
    x = torch.randn(len(names), 200, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = multi_lora.mixed_forward(layer, x, multi_lora.RowGroups(names))
        ref = multi_lora.loop_forward(layer, x, names)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
