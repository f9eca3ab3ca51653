"""`glm5 quantize IN_DIR OUT_DIR --to fp8|bf16` (wired into glm5/cli.py by `add_parser`)."""

from __future__ import annotations

import time


def cmd_quantize(args) -> int:
    from .convert import quantize_checkpoint

    t0 = time.perf_counter()
    out = quantize_checkpoint(args.input, args.output, to=args.to)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"glm5 quantize: wrote {out} ({args.to}, {size / 1e6:,.1f} MB of safetensors) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("quantize", help="convert a checkpoint to block-wise FP8 (the GLM-5-FP8 format) or to BF16")
    s.add_argument("input", help="checkpoint directory (config.json + safetensors)")
    s.add_argument("output", help="new (or empty) output directory")
    s.add_argument("--to", required=True, choices=["fp8", "bf16"],
                   help="fp8: e4m3 weights with float32 scales per 128x128 block; bf16: dequantize")
    s.set_defaults(fn=cmd_quantize)
