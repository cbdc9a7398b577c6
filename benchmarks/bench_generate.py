"""Greedy decoding end to end: ms per generated token of a random-weight Llama-shaped transformers model whose
decoder linears are bf16 nn.Linear, nf4q Linear4bit or bitsandbytes Linear4bit (NF4, double quant, bf16 compute;
lm_head stays bf16 in all three, as transformers' quantizers leave it).

Two ways per stack, after a prompt of --prompt tokens:
  eager   the transformers forward once per token with its DynamicCache: host time included (Python, dispatch,
          launches), which is what model.generate() costs without compilation;
  graph   a StaticCache and one decode step captured in a CUDA graph and replayed: the GPU time per token, what
          torch.compile(mode="reduce-overhead") or a serving engine gets.
Eager figures are the second of two runs of --tokens tokens; graph figures the median over --repeats runs
(synchronize + perf_counter each). The tests compare the kernels with references; here only speed is measured.
"""
import argparse
import statistics
import time
import warnings

import torch

import nf4q
from benchmarks.bench_train import SHAPES, _bnb, _bnb_quantize_layer, _sync, config
from benchmarks.memory_table import build_llama

STACKS = ("bf16", "nf4q", "bnb")
# nf4q-ungrouped: nf4q with every projection its own launch (nf4q.group_projections(model, siblings=())), to
# measure what grouping q/k/v and gate/up gives; asked for by name.
EXTRA_STACKS = ("nf4q-ungrouped",)


def build(stack, shape, layers, device, seed=0):
    cfg = {**config(shape, layers), "use_cache": True}
    quantize = _bnb_quantize_layer(_bnb(device)) if stack == "bnb" else stack.startswith("nf4q")
    torch.manual_seed(seed)  # the same weights for every stack
    model = build_llama(cfg, device, torch.bfloat16, quantize=quantize).eval()
    if stack == "nf4q-ungrouped":
        nf4q.group_projections(model, siblings=())
    return model


@torch.no_grad()
def eager(model, prompt, tokens):
    """Seconds per token with transformers' DynamicCache, one forward per token: the second of two runs from the
    prompt, since the first pays one-off costs per new shape (cuDNN's attention plans a kernel per KV length: ~55
    ms per token on the H200 for the first model in a process)."""
    for _ in range(2):
        out = model(input_ids=prompt, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(prompt.device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(prompt.device)
    return (time.perf_counter() - t0) / tokens


@torch.no_grad()
def static_decoder(model, prompt, tokens):
    """(restart, step, tok) for decoding after `prompt` with a StaticCache: step() computes the greedy token after
    `tok` from static buffers only (CUDA-graph safe), the caller copies it into `tok`; restart() goes back to the end
    of the prompt. The cache keeps its length in a tensor per layer (transformers 5.x) that step() advances in place:
    that is the position, saved after the prompt and restored by restart()."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens + 4)
    first = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    lengths = [(layer.cumulative_length, layer.cumulative_length.clone()) for layer in cache.layers]
    tok = first.clone()

    def restart():
        tok.copy_(first)
        for live, saved in lengths:
            live.copy_(saved)

    def step():
        return model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return restart, step, tok


@torch.no_grad()
def graphed(model, prompt, tokens, repeats):
    """Median seconds per token over `repeats` runs of static_decoder's step captured in one CUDA graph."""
    dev = prompt.device
    restart, step, tok = static_decoder(model, prompt, tokens)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(2):
            restart()
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    restart()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nxt = step()
    times = []
    for _ in range(repeats):
        restart()
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(tokens):
            graph.replay()
            tok.copy_(nxt)
        torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - t0) / tokens)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default 32: the whole 8B model)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="sequences decoded together")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per run (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="graph runs, the median kept (default 5)")
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS + EXTRA_STACKS)
    ap.add_argument("--quick", action="store_true", help="8 layers, batch 1, 16 tokens, 3 graph runs")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: cpu (eager only)
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.batches, args.tokens, args.repeats = 8, [1], 16, 3
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # newer transformers name it `cache`
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_generate needs a CUDA GPU (--device cpu runs the eager mode only)")
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, SHAPES[args.shape]["vocab_size"], (b, args.prompt), generator=gen).to(device)
               for b in args.batches}
    print(f"# bench_generate: {args.layers} layers of {args.shape} shapes, prompt {args.prompt}, {args.tokens} "
          f"greedy tokens, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", cpu"), flush=True)
    rows = []
    for stack in args.stacks:
        try:
            model = build(stack, args.shape, args.layers, device)
        except Exception as e:  # a missing bitsandbytes: its rows are skipped, the others still run
            print(f"{stack}: skipped ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        for b in args.batches:
            t_eager, t_graph = eager(model, prompts[b], args.tokens), float("nan")
            if device.type == "cuda":
                try:
                    t_graph = graphed(model, prompts[b], args.tokens, args.repeats)
                except RuntimeError as e:  # a transformers version whose decode step cannot be captured
                    print(f"{stack} batch {b}: graph mode failed ({str(e)[:200]})", flush=True)
            rows.append({"stack": stack, "batch": b, "eager_ms": 1e3 * t_eager, "graph_ms": 1e3 * t_graph})
            print(f"{stack} batch {b}: eager {1e3 * t_eager:.2f} ms/token, graph {1e3 * t_graph:.2f} ms/token",
                  flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bf16 = {r["batch"]: r for r in rows if r["stack"] == "bf16"}
    print("\n| stack | batch | eager ms/token | × bf16 | graph ms/token | graph tokens/s | × bf16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = bf16.get(r["batch"], {"eager_ms": float("nan"), "graph_ms": float("nan")})
        print(f"| {r['stack']} | {r['batch']} | {r['eager_ms']:.2f} | {ref['eager_ms'] / r['eager_ms']:.2f} | "
              f"{r['graph_ms']:.2f} | {1e3 * r['batch'] / r['graph_ms']:.0f} | {ref['graph_ms'] / r['graph_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
