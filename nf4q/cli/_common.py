"""What every subcommand shares: the one-line error, exit codes, sizes and markdown tables."""

EXIT_OK, EXIT_FAIL = 0, 1


class CliError(Exception):
    """A failure to report as one clear line on stderr with exit status 1 (no traceback)."""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _print_table(rows):
    if not rows:
        print("(no tensors)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("| " + " | ".join(c.ljust(width[c]) for c in cols) + " |")
    print("|" + "|".join("-" * (width[c] + 2) for c in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) + " |")

