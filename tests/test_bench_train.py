"""benchmarks/bench_train.py on a tiny Llama on the CPU (the GPU run uses the same functions), and the peak analysis
of benchmarks/train_diagnostics.py on a hand-made allocator trace."""
import csv
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import bench_train, train_diagnostics  # noqa: E402

TINY = ["--device", "cpu", "--shape", "tiny", "--layers", "2", "--batches", "1x16", "--warmup", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("bench_train") / "llama"
    return str(bench_train.make_checkpoint(path, "tiny", 2, torch.device("cpu")))


def _losses(row):
    return [float(v) for v in row["losses"].split()]


def test_stacks_c_and_d_train_and_write_the_csv(checkpoint, tmp_path, capsys):
    out = tmp_path / "train.csv"
    rows = bench_train.main(TINY + ["--in-process", "--checkpoint", checkpoint, "--stacks", "c", "d", "--dropout",
                                    "0.1", "--steps", "2", "--lr", "1e-2", "--csv", str(out), "--profile"])
    assert [(r["stack"], r["dropout"]) for r in rows] == [("c", 0.1), ("d", 0.1)]
    for r in rows:
        assert r["status"] == "ok", r
        assert "expected" not in r["notes"], r["notes"]  # every LoRA A matrix was re-seeded
        losses = _losses(r)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert r["ms_step"] > 0 and r["tok_s"] > 0 and r["tokens"] == 16
        assert losses[1] < losses[0]  # lr 1e-2 on the same batch: the step lowers the loss
    # same weights, same adapters (B = 0): the first losses differ by NF4's rounding of the weights only
    assert abs(_losses(rows[0])[0] - _losses(rows[1])[0]) < 0.05
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 2
    for col in ("stack", "dropout", "batch", "tokens", "ms_step", "tok_s", "peak_gib", "losses"):
        assert col in written[0], col
    text = capsys.readouterr().out
    assert "| stack | dropout | batch | ms/step | tok/s | peak GiB | vs (b)" in text
    assert "(d) dropout 0.1 1x16:" in text
    assert "profile of one nf4q step" in text and "top host ops by self CPU time" in text


def test_bitsandbytes_stacks_run_or_skip_with_a_reason(checkpoint):
    rows = bench_train.main(TINY + ["--in-process", "--checkpoint", checkpoint, "--stacks", "a", "b", "--dropout",
                                    "0", "--steps", "1"])
    assert [r["stack"] for r in rows] == ["a", "b"]
    for r in rows:
        if r["status"].startswith("skipped"):
            assert "bitsandbytes" in r["status"] or "peft" in r["status"], r["status"]
        else:
            assert r["status"] == "ok" and all(math.isfinite(v) for v in _losses(r)), r
    if all(r["status"] == "ok" for r in rows):
        assert rows[1]["vs_b"] == pytest.approx(1.0)


def test_layerwise_build_in_its_own_process():
    # --layerwise is what --shape 70b uses: no checkpoint, each layer quantized as it is materialized;
    # without --in-process the case runs in a child process (the GPU run's path)
    rows = bench_train.main(TINY + ["--layerwise", "--stacks", "d", "--dropout", "0", "--steps", "1"])
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert math.isfinite(_losses(rows[0])[0])


def test_parse_batch_rejects_bad_text():
    assert bench_train.parse_batch("2x2048") == (2, 2048)
    with pytest.raises(Exception, match="2x2048"):
        bench_train.parse_batch("2048")


def _frames(*names, py=None):
    frames = [{"filename": "??", "line": 0, "name": n} for n in names]
    if py:
        frames.append({"filename": f"/work/main/{py[0]}", "line": py[1], "name": py[2]})
    return frames


def test_memory_snapshot_report_finds_the_blocks_alive_at_the_peak():
    mm = _frames("c10::cuda::CUDACachingAllocator::malloc", "at::_ops::empty_memory_format::call",
                 "at::_ops::mm::call", "torch::autograd::generated::MmBackward0::apply")
    cast = _frames("at::_ops::_to_copy::call", py=("nf4q/_ops.py", 120, "forward"))
    marker = _frames(py=("benchmarks/bench_train.py", 1, train_diagnostics.MARKER))
    MiB = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 512, "frames": marker},           # forward starts
        {"action": "free_completed", "addr": 1, "size": 512, "frames": marker},
        {"action": "segment_alloc", "addr": 100, "size": 64 * MiB, "frames": []},
        {"action": "alloc", "addr": 100, "size": 8 * MiB, "frames": cast},
        {"action": "alloc", "addr": 2, "size": 512, "frames": marker},           # backward starts
        {"action": "alloc", "addr": 200, "size": 16 * MiB, "frames": mm},
        {"action": "alloc", "addr": 300, "size": 16 * MiB, "frames": mm},
        {"action": "free_completed", "addr": 999, "size": 4 * MiB, "frames": []},  # allocated before recording
        {"action": "free_completed", "addr": 200, "size": 16 * MiB, "frames": mm},
        {"action": "free_completed", "addr": 300, "size": 16 * MiB, "frames": mm},
        {"action": "alloc", "addr": 400, "size": 2 * MiB, "frames": cast},
    ]
    r = train_diagnostics.analyze({"segments": [], "device_traces": [trace]})
    assert r["peak"] == 40 * MiB and r["phase"] == "backward" and r["pre_freed"] == 0
    assert sorted(size for size, _, _ in r["live"]) == [8 * MiB, 16 * MiB, 16 * MiB]
    assert r["per_phase"] == {"forward": 8 * MiB, "backward": 40 * MiB}
    text = train_diagnostics.report({"segments": [], "device_traces": [trace]}, baseline=100 * MiB,
                                baseline_reserved=128 * MiB, top=15)
    lines = text.splitlines()
    assert "peak allocated 140.0 MiB" in lines[0] and "phase: backward" in lines[0]
    top = [line for line in lines if "node MmBackward0" in line]
    assert len(top) == 1 and "32.0 MiB" in top[0] and "op mm " in top[0] and "2x" in top[0]
    assert any("_ops.py:120 forward" in line and "op _to_copy" in line for line in lines)
    assert "reserved at the peak: 192.0 MiB" in text
    label = train_diagnostics.site(_frames("at::_ops::empty_memory_format::call", "nf4q::cuda::lora_bwd_(at::Tensor&)",
                                           "torch::autograd::CppNode<nf4q::LoraGemm4bit>::apply"))
    assert label.startswith("op empty_memory_format node CppNode nf4q::cuda::lora_bwd_ @ (no Python frame"), label
    # slim() drops the allocator/interpreter frames and keeps what the report reads
    slimmed = train_diagnostics.slim({"segments": [], "device_traces": [trace]})
    assert [f["name"] for f in slimmed["device_traces"][0][5]["frames"]] == [
        "at::_ops::empty_memory_format::call", "at::_ops::mm::call", "torch::autograd::generated::MmBackward0::apply"]
    assert train_diagnostics.report(slimmed, baseline=100 * MiB, baseline_reserved=128 * MiB, top=15) == text


def test_nf4q_bench_train_is_named_not_default(capsys):
    from nf4q import cli

    assert "bench_train" in cli.BENCHMARKS and "bench_train" in cli.ON_REQUEST
    assert cli.main(["bench", "no_such_bench"]) != 0
