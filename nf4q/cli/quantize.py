"""`nf4q quantize`: a transformers model directory -> an NF4 checkpoint (safetensors + quantization_config)."""
from pathlib import Path

from ._common import EXIT_OK, CliError, _size


def cmd_quantize(args) -> int:
    import torch

    from ..checkpoint import save_quantized

    src = Path(args.in_dir)
    if not (src / "config.json").is_file():
        raise CliError(f"{src} is not a transformers model directory (no config.json)")
    compute = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    try:
        out = save_quantized(src, args.out_dir, skip=args.skip, blocksize=args.blocksize,
                             double_quant=not args.no_double_quant, nested_map=args.nested_map, compute_dtype=compute)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    before = sum(f.stat().st_size for f in src.glob("*.safetensors")) + sum(f.stat().st_size for f in src.glob("*.bin"))
    after = (out / "model.safetensors").stat().st_size
    ratio = f" ({before / after:.2f}x smaller)" if before else ""
    print(f"wrote {out / 'model.safetensors'}: {_size(before)} -> {_size(after)}{ratio}")
    print(f"load it with nf4q.load_quantized({str(out)!r}) or transformers' from_pretrained (bitsandbytes)")
    return EXIT_OK

