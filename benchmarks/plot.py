"""Pictures of the benchmark rows: speed vs bf16 against M for each bench_linear shape (nf4q, bitsandbytes; bf16 = 1),
and tokens/s and peak memory per stack for bench_train. Needs matplotlib (the `plot` extra).

    nf4q bench --plot FILE.png                       # runs the benchmarks, then draws
    python -m benchmarks.plot ROWS.csv FILE.png      # draws the rows of `nf4q bench --csv` or a benchmark's --csv

Rows are dicts as the CSV files hold them (values may be strings); `bench` says which benchmark wrote a row
(`nf4q bench --csv` adds it); rows of a single benchmark's CSV are recognised by their columns.
"""
import argparse
import csv
import math
import sys
from collections import defaultdict

LINEAR_COLUMNS = {"shape", "M", "bf16_us", "nf4q_us"}
TRAIN_COLUMNS = {"stack", "tokens", "tok_s", "peak_gib"}


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _rows_of(rows, bench, columns):
    return [r for r in rows if r.get("bench", bench) == bench and columns <= {k for k, v in r.items() if v != ""}]


def linear_series(rows):
    """{shape: {"M": [...], "nf4q": [...], "bitsandbytes": [...]}}: speed vs bf16 (bf16 µs / µs), M ascending."""
    out = {}
    for r in sorted(_rows_of(rows, "bench_linear", LINEAR_COLUMNS), key=lambda r: _num(r["M"]) or 0):
        bf16, m = _num(r["bf16_us"]), _num(r["M"])
        if not bf16 or not m:
            continue
        s = out.setdefault(r["shape"], defaultdict(list))
        s["M"].append(m)
        for label, col in (("nf4q", "nf4q_us"), ("bitsandbytes", "bnb_us")):
            t = _num(r.get(col))
            s[label].append(bf16 / t if t else float("nan"))
    return out


def plot_linear(ax, shape, series):
    ax.axhline(1.0, color="gray", linestyle="--", label="bf16 (cuBLAS) = 1")
    for label, style in (("nf4q", "o-"), ("bitsandbytes", "s-")):
        ys = series.get(label, [])
        if any(not math.isnan(y) for y in ys):
            ax.plot(series["M"], ys, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_title(shape, fontsize=9)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speed vs bf16 (×)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_train(ax_speed, ax_mem, rows):
    """bench_train rows (columns stack, tokens, tok_s, peak_gib; name and dropout when present): tokens/s and peak
    GiB per stack, one bar per (token count, dropout) setting."""
    rows = _rows_of(rows, "bench_train", TRAIN_COLUMNS)
    stacks = list(dict.fromkeys(r["stack"] for r in rows))
    names = {r["stack"]: f"{r['stack']}: {r['name']}" if r.get("name") else r["stack"] for r in rows}
    settings = sorted({(_num(r["tokens"]) or 0, _num(r.get("dropout")) or 0) for r in rows})
    width = 0.8 / max(1, len(settings))
    for j, (tok, p) in enumerate(settings):
        pick = {r["stack"]: r for r in rows if (_num(r["tokens"]) or 0, _num(r.get("dropout")) or 0) == (tok, p)}
        xs = [i + j * width for i in range(len(stacks))]
        label = f"{tok:g} tokens" + (f", dropout {p:g}" if any(q for _, q in settings) else "")
        for ax, col in ((ax_speed, "tok_s"), (ax_mem, "peak_gib")):
            ax.bar(xs, [(_num(pick[s][col]) or 0) if s in pick else 0 for s in stacks], width, label=label)
    for ax, title in ((ax_speed, "training tokens/s"), (ax_mem, "peak memory (GiB)")):
        ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(stacks))])
        ax.set_xticklabels([names[s] for s in stacks], rotation=20, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if len(settings) > 1:
            ax.legend(fontsize=7)


def plot(rows, path, title="nf4q bench"):
    """Draw every plottable group of `rows` into one PNG at `path`. Returns the number of panels drawn
    (0: nothing to plot, no file written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linear = linear_series(rows)
    has_train = bool(_rows_of(rows, "bench_train", TRAIN_COLUMNS))
    panels = len(linear) + 2 * has_train
    if not panels:
        return 0
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    axes = [a for row in axes for a in row]
    for ax, (shape, series) in zip(axes, linear.items()):
        plot_linear(ax, shape, series)
    if has_train:
        plot_train(axes[len(linear)], axes[len(linear) + 1], rows)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return panels


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None):
    ap = argparse.ArgumentParser(description="plot benchmark rows (CSV) into a PNG")
    ap.add_argument("csv", nargs="+", help="CSV files written by `nf4q bench --csv` or a benchmark's --csv")
    ap.add_argument("out", help="the PNG to write")
    args = ap.parse_args(argv)
    rows = [r for f in args.csv for r in read_csv(f)]
    n = plot(rows, args.out)
    if not n:
        sys.exit("no bench_linear or bench_train rows to plot")
    print(f"wrote {args.out} ({n} panels)")


if __name__ == "__main__":
    main()
