"""benchmarks.bench_generate on the CPU with a tiny Llama: the eager rows, and the static-cache decoder that graph mode
captures (restarting it must replay the same greedy tokens as transformers' own generate)."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.bench_generate import build, main, static_decoder  # noqa: E402


@pytest.mark.parametrize("stack", ["bf16", "nf4q"])
def test_static_decoder_restarts_at_the_prompt_and_matches_generate(stack):
    model = build(stack, "tiny", 2, torch.device("cpu"))
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)[:, 7:]
    restart, step, tok = static_decoder(model, prompt, 5)
    for _ in range(2):  # the second run must not continue where the first stopped
        restart()
        got = [tok.clone()]
        for _ in range(5):
            with torch.no_grad():
                got.append(step())
            tok.copy_(got[-1])
        assert torch.equal(torch.cat(got, 1), want)


def test_main_on_cpu_times_eager_decoding_only():
    rows = main(["--shape", "tiny", "--layers", "2", "--device", "cpu", "--stacks", "bf16", "nf4q",
                 "--batches", "1", "2", "--tokens", "3", "--prompt", "5"])
    assert [(r["stack"], r["batch"]) for r in rows] == [("bf16", 1), ("bf16", 2), ("nf4q", 1), ("nf4q", 2)]
    assert all(0 < r["eager_ms"] < 1e4 and math.isnan(r["graph_ms"]) for r in rows)
