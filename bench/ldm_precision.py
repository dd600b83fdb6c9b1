"""Cost of a diffusion-stage training step of the built-in preset under each --mixed-precision, on this CPU.

Times the preset's text encoder + UNet optimizer step (batch, sizes and widths of configs/ldm-builtin.toml;
random latents, a real caption) in fp32, in bf16 autocast as train-ldm runs it (attention on PyTorch's
math kernel), and in bf16 autocast with the default (flash) attention kernel, the one train-ldm avoids.
The modes are interleaved over several rounds so that a load change on this shared machine hits them
all alike; the ratios to fp32 come from the same round.

    .venv/bin/python bench/ldm_precision.py [--rounds 5] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm import ROOT, diffusion_step, median_seconds  # noqa: E402  (bench/ldm.py)

from egaku.config import build, load_preset  # noqa: E402
from egaku.training import ldm  # noqa: E402


def flash_attention_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", default=str(ROOT / "configs" / "ldm-builtin.toml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode and round (median kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ldm_precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = build(ldm.TrainLdmOptions, load_preset(args.preset))
    cpu = torch.device("cpu")
    modes = {
        "fp32": diffusion_step(preset, ldm.mixed_precision("no", cpu)[0]),
        "bf16 (train-ldm: math attention)": diffusion_step(preset, ldm.mixed_precision("bf16", cpu)[0]),
        "bf16, flash attention": diffusion_step(preset, flash_attention_bf16),
    }
    rounds = []
    for r in range(args.rounds):
        row = {name: median_seconds(step, args.repeats) for name, step in modes.items()}
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()), file=sys.stderr)
    median = {name: round(statistics.median(r[name] for r in rounds), 4) for name in modes}
    ratios = {name: round(statistics.median(r[name] / r["fp32"] for r in rounds), 3) for name in modes}
    result = {
        "what": "seconds per diffusion-stage optimizer step (text encoder + UNet forward, backward, clip, AdamW) of "
                "the built-in preset on this CPU, median of per-round medians; ratio to fp32 within each round",
        "command": "python bench/ldm_precision.py " + " ".join(sys.argv[1:]),
        "preset": str(Path(args.preset).resolve().relative_to(ROOT)) if Path(args.preset).resolve().is_relative_to(ROOT)
        else args.preset,
        "batch_size": preset.batch_size, "unet_channels": preset.unet_channels, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "torch": torch.__version__,
        "seconds_per_step": median, "ratio_to_fp32": ratios, "rounds": rounds,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"seconds_per_step": median, "ratio_to_fp32": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
