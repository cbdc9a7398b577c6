"""benchmarks.clock_trace without a GPU: nvidia-smi's lines parsed, the settled half averaged, and a whole trace run
against a stand-in sampler (a Python process printing 'MHz, W' lines until it is terminated)."""
import math
import sys

import pytest

from benchmarks import clock_trace
from benchmarks.clock_trace import parse_samples, settled_mean, trace


def test_parse_skips_unavailable_and_malformed_lines():
    text = "1980, 561.32\n[N/A], [N/A]\n\n1755, 618.0\nclocks.sm, power.draw\n1340, 623.5, 7\n"
    assert parse_samples(text) == [(1980.0, 561.32), (1755.0, 618.0)]


def test_settled_mean_is_the_second_half():
    samples = [(1980.0, 300.0)] * 4 + [(1400.0, 620.0)] * 4  # ramp, then the power-capped clock
    assert settled_mean(samples) == (1400.0, 620.0)
    assert settled_mean(samples[:1]) == (1980.0, 300.0)
    assert all(math.isnan(v) for v in settled_mean([]))


def test_trace_times_the_function_and_averages_the_samplers_lines():
    # first samples at the boost clock, then the capped one, as nvidia-smi shows a GPU running into its power limit
    fake_smi = [sys.executable, "-u", "-c",
                "import time\n"
                "for i in range(100000):\n"
                "    print('1980, 400.0' if i < 3 else '1500, 620.0', flush=True)\n"
                "    time.sleep(0.005)\n"]
    calls = []
    us, mhz, watts = trace(lambda: calls.append(1), seconds=0.5, batch=5, smi=fake_smi)
    assert len(calls) >= 10 and len(calls) % 5 == 0
    assert 0 < us < 1e5
    assert mhz == 1500.0 and watts == 620.0


def test_main_without_gpu_or_sampler_exits_with_a_message(monkeypatch):
    monkeypatch.setattr(clock_trace.shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["clock_trace"])
    with pytest.raises(SystemExit, match="nvidia-smi"):
        clock_trace.main()
