"""Prompt adherence of one model under each sampler, at one guidance scale and 20 steps.

Each (sampler, prompts, seed) setting is judged on the fixed prompt sets of `egaku eval adherence`; a
second seed on more prompts checks whether a lead survives other noise.

    .venv/bin/python bench/ldm_samplers.py                     # built-in model, the runs of its model card
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egaku.evaluation.adherence import AdherenceOptions, evaluate_adherence  # noqa: E402
from egaku.evaluation.judges import load_judge  # noqa: E402
from egaku.models.loading import load_pipeline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--runs", nargs="+", default=["dpmpp-2m:100:0", "euler:100:0", "euler-a:100:0", "unipc:100:0",
                                                       "ddim:100:0", "euler-a:200:7", "dpmpp-2m:200:7"],
                        help="SAMPLER:PROMPTS_PER_SPLIT:SEED")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ldm_samplers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, judge = load_pipeline(args.model, device="cpu"), load_judge()
    rows = []
    for run in args.runs:
        sampler, prompts, seed = run.split(":")
        report, _ = evaluate_adherence(pipe, AdherenceOptions(
            model=args.model, seen_prompts=int(prompts), held_out_prompts=int(prompts), star_prompts=0,
            guidance_scale=args.guidance, sampler=sampler, seed=int(seed)), judge)
        rows.append({"sampler": sampler, "prompts_per_split": int(prompts), "seed": int(seed),
                     "seen": report["seen"], "held_out": report["held_out"]})
        print(f"{sampler:10s} {prompts:>4s} prompts seed {seed}: seen {report['seen']['all_attributes']:.3f} "
              f"held-out {report['held_out']['all_attributes']:.3f}", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"model": args.model, "guidance": args.guidance, "steps": 20, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
