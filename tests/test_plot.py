"""benchmarks/plot.py and `nf4q bench --plot`: a PNG from fake bench_linear / bench_train rows."""
import csv
import sys
import types

import pytest

matplotlib = pytest.importorskip("matplotlib")

from benchmarks import plot  # noqa: E402

LINEAR = [{"bench": "bench_linear", "shape": shape, "M": m, "bf16_us": 10.0 * m ** 0.5, "nf4q_us": 5.0 * m ** 0.6,
           "bnb_us": "" if m == 4096 else 20.0} for shape in ("8B q/o 4096x4096", "70B down 8192x28672")
          for m in (1, 16, 4096)]
TRAIN = [{"bench": "bench_train", "stack": s, "name": n, "tokens": 4096, "dropout": 0.0, "tok_s": t, "peak_gib": g}
         for s, n, t, g in (("a", "bf16 + peft", 9000, 40.2), ("b", "bnb + peft", 5000, 12.1),
                            ("d", "nf4q fused", 8000, 10.5))] + \
        [{"bench": "bench_train", "stack": "c", "name": "x", "tokens": 4096, "tok_s": "", "peak_gib": ""}]


def _write(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_series_from_csv_strings(tmp_path):
    rows = plot.read_csv(_write(tmp_path / "r.csv", LINEAR))
    series = plot.linear_series(rows)
    s = series["8B q/o 4096x4096"]
    assert s["M"] == [1, 16, 4096]
    assert s["nf4q"][1] == pytest.approx(10 * 4 / (5 * 16 ** 0.6)) and s["bitsandbytes"][0] == pytest.approx(0.5)
    assert s["bitsandbytes"][2] != s["bitsandbytes"][2]  # no bnb row: NaN, not a point


def test_plot_writes_png_from_a_csv(tmp_path):
    src = _write(tmp_path / "rows.csv", LINEAR + TRAIN)
    out = tmp_path / "bench.png"
    plot.main([str(src), str(out)])
    assert _is_png(out)
    assert plot.plot(plot.read_csv(src), tmp_path / "again.png") == 2 + 2  # two shapes, tokens/s + memory
    assert plot.plot([{"bench": "bench_quant", "x": 1}], tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()


def test_cli_bench_plot(monkeypatch, tmp_path, capsys):
    from nf4q import cli

    fake = types.ModuleType("benchmarks.bench_linear")
    fake.main = lambda: [{k: v for k, v in r.items() if k != "bench"} for r in LINEAR]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_linear", fake)
    out = tmp_path / "b.png"
    assert cli.main(["bench", "--only", "bench_linear", "--plot", str(out)]) == 0
    assert _is_png(out) and f"wrote {out} (2 panels)" in capsys.readouterr().out
