"""gemm_4bit_group and the grouping of sibling Linear4bit layers (nf4q/grouping.py). The op on every device against
one gemm_4bit per weight and the fp64 oracle; the group's rules on CPU (grouping is for CUDA: the tests let it run on
CPU too); the one-launch CUDA kernel bit for bit, in a real Llama, decoding and in a CUDA graph."""
import copy

import pytest
import torch
from torch import nn

import nf4q
from conftest import kernel_launches
from nf4q import _ops, _reference as ref, grouping

ops = torch.ops.nf4q
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def linears(sizes, k, device="cpu", double_quant=True, seed=0, dtype=torch.bfloat16):
    """Linear4bit layers of in_features k and the given (out_features, bias) with fresh random weights."""
    torch.manual_seed(seed)
    layers = []
    for n, bias in sizes:
        dense = nn.Linear(k, n, bias=bias)
        if bias:
            nn.init.normal_(dense.bias, std=0.1)
        layers.append(nf4q.Linear4bit.from_linear(dense, compute_dtype=dtype, double_quant=double_quant).to(device))
    return layers


def group_args(layers, dtype):
    return [m._w4() for m in layers], [None if m.bias is None else m.bias.to(dtype) for m in layers]


def each(x, layers, dtype):
    w4s, biases = group_args(layers, dtype)
    return [ops.gemm_4bit(x, *w4, b) for w4, b in zip(w4s, biases)]


# ---- the op --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_op_equals_one_gemm_per_weight_cpu(double_quant, dtype):
    layers = linears([(96, True), (40, False), (72, True)], 128, double_quant=double_quant)
    x = torch.randn(2, 3, 128).to(dtype)
    w4s, biases = group_args(layers, dtype)
    ys = _ops.gemm_4bit_group(x, w4s, biases)
    for y, want, oracle in zip(ys, each(x, layers, dtype), ref.gemm_4bit_group(x, w4s, biases)):
        assert y.shape == want.shape and y.dtype == dtype
        assert torch.equal(y, want)
        assert (y.double() - oracle).abs().max() < 2e-2


def test_group_op_bad_input():
    layers = linears([(32, True), (48, False)], 64)
    w4s, biases = group_args(layers, torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    a = ([w[0] for w in w4s], [w[1] for w in w4s], [w[2] for w in w4s], w4s[0][3], [w[4] for w in w4s], w4s[0][5],
         64, 256)
    with pytest.raises(ValueError, match="one entry per weight"):
        ops.gemm_4bit_group(x, *a, [32], biases)  # out_features too short
    with pytest.raises(ValueError, match="at least one weight"):
        ops.gemm_4bit_group(x, [], [], [], None, [], w4s[0][5], 64, 256, [], [])
    with pytest.raises(ValueError, match="weight 0 holds 1024 bytes"):
        ops.gemm_4bit_group(x, *a, [48, 32], biases)  # out_features swapped: the byte count disagrees
    with pytest.raises(ValueError, match="x's last dim"):
        ops.gemm_4bit_group(torch.randn(3, 65, dtype=torch.bfloat16), *a, [32, 48], biases)
    with pytest.raises(TypeError, match="uint8"):
        ops.gemm_4bit_group(x, [w4s[0][0].float(), w4s[1][0]], *a[1:], [32, 48], biases)
    with pytest.raises(ValueError, match="bias"):
        ops.gemm_4bit_group(x, *a, [32, 48], [biases[0], torch.zeros(5, dtype=torch.bfloat16)])


def test_group_op_opcheck():
    layers = linears([(48, True), (32, False)], 64, dtype=torch.float32)
    w4s, biases = group_args(layers, torch.float32)
    biases = [None if b is None else b.detach() for b in biases]
    x = torch.randn(5, 64)
    torch.library.opcheck(ops.gemm_4bit_group, (x, [w[0] for w in w4s], [w[1] for w in w4s], [w[2] for w in w4s],
                                                w4s[0][3], [w[4] for w in w4s], w4s[0][5], 64, 256, [48, 32], biases),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- the group's rules (CPU) -----------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, k=128, double_quant=True):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = linears([(128, True), (64, False), (64, True)], k,
                                                        double_quant=double_quant)
        self.o_proj = linears([(k, False)], 128, seed=1)[0]

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.o_proj(self.q_proj(x)) + self.k_proj(kv).sum(-1, keepdim=True) + self.v_proj(kv).mean(-1,
                                                                                                     keepdim=True)


@pytest.fixture
def on_cpu(monkeypatch):
    """Grouping on CPU tensors too, and a count of gemm_4bit_group calls."""
    monkeypatch.setattr(grouping, "DEVICES", ("cuda", "cpu"))
    calls = []
    real = _ops.gemm_4bit_group
    monkeypatch.setattr(_ops, "gemm_4bit_group", lambda *a: calls.append(1) or real(*a))
    return calls


def grouped_and_plain(module):
    plain = copy.deepcopy(module)
    assert nf4q.group_projections(module) == 1
    assert nf4q.group_projections(plain, siblings=()) == 0
    return module, plain


def test_group_projections_finds_siblings():
    model = nn.ModuleDict({"attn": Attention(), "mlp": nn.ModuleDict({
        "gate_proj": linears([(96, False)], 128)[0], "up_proj": linears([(96, False)], 128, seed=2)[0],
        "down_proj": linears([(128, False)], 96)[0]})})
    assert nf4q.group_projections(model) == 2
    assert model.attn.q_proj._projection_group[0] is model.attn.v_proj._projection_group[0]
    assert model.attn.o_proj._projection_group is None and model.mlp.down_proj._projection_group is None
    assert model.mlp.up_proj._projection_group[1] == 1
    mixed = Attention()
    mixed.k_proj = linears([(64, False)], 96)[0]  # another in_features: q and v only
    assert nf4q.group_projections(mixed) == 1 and mixed.k_proj._projection_group is None


def test_grouped_forward_is_one_call_and_equal(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        for rows in (1, 3, 8, 9, 64):
            x = torch.randn(rows, 128)
            before = len(on_cpu)
            assert torch.equal(grouped(x), plain(x))
            assert len(on_cpu) == before + 1  # q, k and v in one call
        with pytest.raises(ValueError, match="last dim"):  # gemm_4bit's own error, not one of the group's
            grouped.q_proj(torch.tensor(1.0))
        x = torch.randn(65, 128)  # more rows than the grouped kernels take: each layer alone
        before = len(on_cpu)
        assert torch.equal(grouped(x), plain(x)) and len(on_cpu) == before
    assert grouped.q_proj._projection_group[0].enabled


def test_sibling_with_another_input_turns_the_group_off(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        x, enc = torch.randn(1, 128), torch.randn(1, 128)
        assert torch.equal(grouped(x, enc), plain(x, enc))  # cross-attention: k and v read enc
        group = grouped.q_proj._projection_group[0]
        assert not group.enabled
        calls = len(on_cpu)
        assert torch.equal(grouped(x, enc), plain(x, enc)) and len(on_cpu) == calls


def test_input_changed_in_place_is_recomputed(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        x = torch.randn(2, 128)
        grouped.q_proj(x)
        x.mul_(2)  # after q read it: k's pending output is stale
        assert torch.equal(grouped.k_proj(x), plain.k_proj(x))
        assert not grouped.q_proj._projection_group[0].enabled


def test_skipped_siblings_turn_the_group_off(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        x = torch.randn(1, 128)
        grouped.q_proj(x)  # k and v never called with x
        y = torch.randn(1, 128)
        assert torch.equal(grouped.q_proj(y), plain.q_proj(y))
        assert not grouped.q_proj._projection_group[0].enabled


def test_autograd_and_inference_tensors_are_not_grouped(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    x = torch.randn(2, 128, requires_grad=True)
    grouped(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    plain(x).sum().backward()
    assert torch.equal(g, x.grad) and on_cpu == []
    with torch.inference_mode():
        x = torch.randn(2, 128)
        assert torch.equal(grouped(x), plain(x)) and on_cpu == []


def test_unequal_code_tables_are_not_grouped(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        for m in (grouped.k_proj, plain.k_proj):  # another (valid) table: k must be decoded with its own
            m.weight_nested_code = nn.Parameter(nf4q.dynamic_map(), requires_grad=False)
        x = torch.randn(1, 128)
        assert torch.equal(grouped(x), plain(x)) and on_cpu == []
        assert not grouped.q_proj._projection_group[0].enabled


def test_replaced_equal_tables_are_checked_again(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    with torch.no_grad():
        x = torch.randn(1, 128)
        grouped(x)
        grouped.load_state_dict(plain.state_dict())  # new parameters, equal tables: still one call
        calls = len(on_cpu)
        assert torch.equal(grouped(x), plain(x)) and len(on_cpu) == calls + 1


def test_compiled_module_does_not_group(on_cpu):
    grouped, plain = grouped_and_plain(Attention())
    compiled = torch.compile(grouped, backend="eager", fullgraph=True)
    with torch.no_grad():
        x = torch.randn(1, 128)
        assert torch.equal(compiled(x), plain(x)) and on_cpu == []


def tiny_llama(device, layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return nf4q.quantize_model(model, progress=False, compute_dtype=torch.bfloat16).to(device).eval()


def decode(model, prompt, tokens):
    out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_quantize_model_groups_a_llama_and_decodes_the_same(on_cpu):
    model = tiny_llama("cpu")
    plain = copy.deepcopy(model)
    nf4q.group_projections(plain, siblings=())
    assert nf4q.group_projections(model) == 4  # q/k/v and gate/up of two layers (regrouped)
    prompt = torch.randint(0, 128, (1, 5))
    seq, logits = decode(model, prompt, 6)
    seq0, logits0 = decode(plain, prompt, 6)
    assert torch.equal(seq, seq0) and torch.equal(logits, logits0)
    assert len(on_cpu) == 4 * 6  # every generated token after the prompt: 2 groups x 2 layers


def groups(model):
    return {id(m._projection_group[0]) for m in model.modules() if getattr(m, "_projection_group", None)}


def test_every_loader_groups(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    loaded = nf4q.from_pretrained(tmp_path / "m", device="cpu", progress=False)
    assert len(groups(loaded)) == 4
    nf4q.save_quantized(loaded, tmp_path / "q", progress=False)
    assert len(groups(nf4q.load_quantized(tmp_path / "q"))) == 4
    model = transformers.LlamaForCausalLM(cfg)
    assert len(groups(nf4q.quantize_model(model, progress=False, group=False))) == 0


# ---- the one-launch CUDA kernel ----------------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 16, 31, 64])
def test_group_kernel_bit_for_bit(dtype, double_quant, M):
    """The decode kernel (M <= 8) and the swapped one (9..64): sizes off the 16- and 128-row tiles (the last tile of
    each weight partial), biases on some, a non-contiguous x; K split into different numbers of parts per weight, and
    (M = 64) one weight not split beside one that is."""
    cases = [([(1000, True), (264, False), (264, True)], 1024), ([(520, False), (4100, True)], 2304)]
    if M == 64:
        cases.append(([(33800, False), (264, True)], 1024))
    for sizes, k in cases:
        layers = linears(sizes, k, "cuda", double_quant, seed=M, dtype=dtype)
        xfull = torch.randn(M, 2 * k, device="cuda").to(dtype)
        x = xfull[:, ::2]
        w4s, biases = group_args(layers, dtype)
        torch.full((1 << 22,), float("nan"), device="cuda")  # poison the allocator's next blocks
        ys = _ops.gemm_4bit_group(x, w4s, biases)
        for y, want, oracle in zip(ys, each(x, layers, dtype), ref.gemm_4bit_group(x, w4s, biases)):
            assert y.dtype == dtype and torch.equal(y, want)
            err = ((y.double() - oracle).norm() / oracle.norm()).item()
            assert err < 1e-2


@cuda
@pytest.mark.parametrize("M, kernel", [(1, "decode_unit_kernel"), (16, "swap_gemm_kernel"),
                                       (64, "swap_gemm_kernel")])
def test_group_kernel_is_one_launch(M, kernel):
    layers = linears([(1000, True), (264, False), (264, True)], 1024, "cuda", seed=M)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    w4s, biases = group_args(layers, x.dtype)
    assert kernel_launches(lambda: each(x, layers, x.dtype), kernel) == 3
    assert kernel_launches(lambda: _ops.gemm_4bit_group(x, w4s, biases), kernel) == 1


@cuda
def test_group_kernel_fallbacks_equal_gemm():
    """Where one launch does not apply (fp32, M past the grouped kernels, a block size of 128 at M = 1): one
    gemm_4bit per weight."""
    layers = linears([(512, True), (256, False)], 1024, "cuda")
    for x in (torch.randn(2, 1024, device="cuda"), torch.randn(65, 1024, device="cuda", dtype=torch.bfloat16)):
        ys = _ops.gemm_4bit_group(x, *group_args(layers, x.dtype))
        assert all(torch.equal(y, w) for y, w in zip(ys, each(x, layers, x.dtype)))
    wide = [nf4q.Linear4bit.from_linear(nn.Linear(1024, n), compute_dtype=torch.bfloat16, blocksize=128).cuda()
            for n in (256, 96)]
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    ys = _ops.gemm_4bit_group(x, *group_args(wide, x.dtype))
    assert all(torch.equal(y, w) for y, w in zip(ys, each(x, wide, x.dtype)))


@cuda
def test_grouped_llama_decodes_bit_for_bit_and_in_a_cuda_graph():
    model = tiny_llama("cuda", layers=3)
    plain = copy.deepcopy(model)
    nf4q.group_projections(plain, siblings=())
    prompt = torch.randint(0, 128, (1, 7), device="cuda")
    seq, logits = decode(model, prompt, 8)
    seq0, logits0 = decode(plain, prompt, 8)
    assert torch.equal(seq, seq0) and torch.equal(logits, logits0)
    assert all(m._projection_group[0].enabled for m in model.modules()
               if getattr(m, "_projection_group", None) is not None)

    layer = model.model.layers[0].mlp  # gate/up grouped, captured and replayed
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, plain.model.layers[0].mlp(x))
