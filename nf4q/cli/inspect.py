"""`nf4q inspect`: a per-tensor table of an NF4 checkpoint; --check dequantizes and reports error statistics."""
import math
import sys
from pathlib import Path

from ._common import EXIT_FAIL, EXIT_OK, CliError, _print_table, _size


def _safetensors_files(path: Path):
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CliError(f"{path}: no .safetensors files in this directory")
        return files
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    return [path]


def _open(f: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt")
    except SafetensorError as e:
        raise CliError(f"{f}: not a readable safetensors file ({e}). The file is truncated (an interrupted "
                       f"download or copy?) or corrupt: re-download or re-create it.") from None
    except OSError as e:
        raise CliError(f"{f}: cannot read ({e})") from None


def _nested_name(table):
    import torch

    from ..codebook import nested_map

    for name in ("fp8_e4m3", "dynamic"):
        if torch.equal(table, nested_map(name)):
            return name
    return "custom"


class _Originals:
    """Tensors of the unquantized model, matched by key (or by a unique key suffix, for renamed prefixes)."""

    def __init__(self, path):
        self.handles = [(f, _open(f)) for f in _safetensors_files(Path(path))] if path else []
        self.keys = {k: h for _, h in self.handles for k in h.keys()}

    def get(self, key):
        if key in self.keys:
            return self.keys[key].get_tensor(key)
        hits = [k for k in self.keys if k.endswith("." + key) or key.endswith("." + k)]
        return self.keys[hits[0]].get_tensor(hits[0]) if len(hits) == 1 else None


def _check_stats(qw, original):
    """Dequantized-weight statistics; with the original weight, the reconstruction error too."""
    import torch

    w = qw.dequantize(torch.float32)
    if not bool(torch.isfinite(w).all()):
        return {"finite": False}
    codes = torch.stack([qw.packed.view(-1) >> 4, qw.packed.view(-1) & 15], 1).view(-1)[:qw.numel()]
    p = torch.bincount(codes.long(), minlength=16).double() / codes.numel()
    stats = {"finite": True, "mean": w.mean().item(), "std": w.std().item() if w.numel() > 1 else 0.0,
             "absmax": w.abs().max().item(), "entropy": -(p[p > 0] * p[p > 0].log2()).sum().item()}
    if original is not None:
        if tuple(original.shape) != tuple(w.shape):
            stats["error"] = f"original has shape {tuple(original.shape)}"
        else:
            ref = original.float()
            diff = w - ref
            stats["rel_err"] = (diff.norm() / ref.norm().clamp(min=1e-30)).item()
            stats["max_err"] = diff.abs().max().item()
    return stats


def cmd_inspect(args) -> int:
    from ..tensor import QS_KEY, FormatError, NF4Weight

    path = Path(args.path)
    originals = _Originals(args.original) if args.original else None
    rows, problems, totals = [], [], {"nf4": [0, 0, 0.0], "other": [0, 0]}
    for f in _safetensors_files(path):
        handle = _open(f)
        keys = list(handle.keys())
        prefixes = sorted(k[: -len(QS_KEY)] for k in keys if k.endswith(QS_KEY))
        owned = {k for k in keys for p in prefixes if k.startswith(p + "weight")}
        for prefix in prefixes:
            name = prefix + "weight"
            try:
                sd = {k: handle.get_tensor(k) for k in keys if k.startswith(name)}
                qw = NF4Weight.from_state_dict(sd, prefix)
            except (FormatError, ValueError, RuntimeError) as e:
                problems.append(f"{f.name}: {name}: {e}")
                continue
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            totals["nf4"][0] += qw.numel()
            totals["nf4"][1] += nbytes
            totals["nf4"][2] += qw.bits_per_param * qw.numel()
            row = {"tensor": name, "shape": "x".join(map(str, qw.shape)), "format": "nf4",
                   "blocksize": qw.blocksize, "double quant": _nested_name(qw.nested_code) if qw.double_quant else "no",
                   "bits/param": f"{qw.bits_per_param:.3f}", "stored": _size(nbytes)}
            if args.check:
                st = _check_stats(qw, originals.get(name) if originals else None)
                if not st["finite"]:
                    problems.append(f"{f.name}: {name}: dequantizes to NaN/Inf (corrupt absmax or scales)")
                    row["check"] = "NON-FINITE"
                else:
                    row.update({"mean": f"{st['mean']:+.2e}", "std": f"{st['std']:.2e}",
                                "max abs": f"{st['absmax']:.3g}", "code entropy": f"{st['entropy']:.2f} b"})
                    if "rel_err" in st:
                        row.update({"rel. error": f"{st['rel_err']:.4f}", "max error": f"{st['max_err']:.3g}"})
                    elif originals is not None:
                        row["rel. error"] = st.get("error", "no original")
            rows.append(row)
        for key in (k for k in keys if k not in owned):
            sl = handle.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            numel = math.prod(shape)
            itemsize = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
            totals["other"][0] += numel
            totals["other"][1] += numel * itemsize
            if args.all or not prefixes:
                rows.append({"tensor": key, "shape": "x".join(map(str, shape)), "format": dtype.lower(),
                             "blocksize": "", "double quant": "", "bits/param": f"{8 * itemsize:.3f}",
                             "stored": _size(numel * itemsize)})
    _print_table(rows)
    n_q, b_q, bits = totals["nf4"]
    n_o, b_o = totals["other"]
    print()
    if n_q:  # bits/param counts codes + scales; "stored" adds the per-tensor tables and the JSON quant state
        print(f"{sum(r['format'] == 'nf4' for r in rows)} NF4 tensors: {n_q / 1e6:.2f}M parameters at "
              f"{bits / n_q:.3f} bits/param, {_size(b_q)} stored ({8 * b_q / n_q:.3f} bits/param with tables)")
    print(f"other tensors: {n_o / 1e6:.2f}M parameters in {_size(b_o)}"
          + ("" if args.all or not n_q else " (listed with --all)"))
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is not None and cfg.is_file():
        import json

        qc = json.loads(cfg.read_text()).get("quantization_config")
        print(f"config.json quantization_config: {json.dumps(qc) if qc else 'none (not a quantized model)'}")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK

