"""Compare diffusion-stage variants of the built-in model's preset at equal step counts.

Each variant is the preset (configs/ldm-builtin.toml) with a few options changed, trained on one fixed
VAE (--vae, stage 1 skipped) and judged for prompt adherence after each of --checkpoints steps (the run
is extended with --resume between them: the preset's constant learning rate allows it). Variants run as
parallel worker processes: on a GPU the whole sweep takes minutes, on these CPUs hours.
``--cpu-step-cost`` instead measures each variant's seconds per training step on this machine's CPU, so
that variants can be compared at equal CPU time, not only at equal steps.

    .venv/bin/python bench/ldm_sweep.py --device cuda --checkpoints 2000 4000 8000   # adherence
    .venv/bin/python bench/ldm_sweep.py --cpu-step-cost                               # CPU cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egaku.config import build, load_preset  # noqa: E402
from egaku.training import ldm  # noqa: E402

VARIANTS: dict[str, dict] = {
    "preset": {},
    "lr-1.2e-3": {"lr": 1.2e-3},
    "logit-normal": {"timestep_sampling": "logit_normal"},
    "logit-normal-noisier": {"timestep_sampling": "logit_normal", "logit_mean": 0.7},
    "batch-64": {"batch_size": 64},
    "batch-128": {"batch_size": 128},
    "batch-256": {"batch_size": 256},
    "cross-attention-16x16": {"unet_down_blocks": ["CrossAttnDownBlock2D"] * 3},
    "text-4-layers": {"text_layers": 4},
    "unet-64-128-128": {"unet_channels": [64, 128, 128]},
    # the retraining of bench/results/ldm_pooled_text.json changed three things; these take them apart
    "rank-merges": {"tokenizer_merges": "rank"},
    "rank-32-tokens": {"tokenizer_merges": "rank", "max_caption_tokens": 32},
    "pooled-rank-32": {"tokenizer_merges": "rank", "max_caption_tokens": 32, "unet_pooled_text": True},
    # small shapes are the weak point (judged right 46% of the time against 93% for large ones): more
    # capacity at 16x16, where a small shape is drawn
    "rank-32-unet-64-64-128": {"tokenizer_merges": "rank", "max_caption_tokens": 32, "unet_channels": [64, 64, 128]},
    "rank-32-cross-attention-16x16": {"tokenizer_merges": "rank", "max_caption_tokens": 32,
                                      "unet_down_blocks": ["CrossAttnDownBlock2D"] * 3},
    "rank-32-2-layers": {"tokenizer_merges": "rank", "max_caption_tokens": 32, "unet_layers_per_block": 2},
    "rank-32-lr-1.2e-3": {"tokenizer_merges": "rank", "max_caption_tokens": 32, "lr": 1.2e-3},
    # cheaper or faster-learning steps, to fit more learning in the CPU hour
    "32-tokens": {"max_caption_tokens": 32},
    "warmup-50": {"warmup_steps": 50},
    "text-1-layer": {"text_layers": 1},
    "lr-8e-4": {"lr": 8e-4},
    "batch-96": {"batch_size": 96},
    # the one-layer text encoder and lr 8e-4 of the second retraining, then cheaper CPU steps on top of it:
    # 2 attention heads instead of 8 (diffusers' attention_head_dim is the head count) cut a CPU step by a
    # quarter, and a narrower 4x4 level or batch 64 by more
    "t1": {"text_layers": 1, "lr": 8e-4},
    "t1-heads-2": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2},
    "t1-heads-2-unet-32-64-64": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2, "unet_channels": [32, 64, 64]},
    "t1-heads-2-batch-64": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2, "batch_size": 64},
    "t1-heads-2-min-snr-5": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2, "snr_gamma": 5.0},
    "t1-heads-2-logit-normal": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2,
                                "timestep_sampling": "logit_normal"},
    "t1-heads-2-lr-1.2e-3": {"text_layers": 1, "lr": 1.2e-3, "attention_head_dim": 2},
    "t1-heads-2-logit-normal-unet-32-64-64": {"text_layers": 1, "lr": 8e-4, "attention_head_dim": 2,
                                              "timestep_sampling": "logit_normal", "unet_channels": [32, 64, 64]},
    "t1-heads-2-logit-normal-lr-1.2e-3": {"text_layers": 1, "lr": 1.2e-3, "attention_head_dim": 2,
                                          "timestep_sampling": "logit_normal"},
}


def variant_options(name: str, out: Path, vae: str, device: str, steps: int, threads: int) -> ldm.TrainLdmOptions:
    return build(ldm.TrainLdmOptions, load_preset(ROOT / "configs" / "ldm-builtin.toml"), {
        **VARIANTS[name], "out": str(out), "vae_from": vae, "vae_steps": 0, "steps": steps, "device": device,
        "threads": threads, "progress": False, "sample_every": 0, "checkpoint_every": 10**9})


def worker(args: argparse.Namespace) -> None:
    """Train one variant to each checkpoint in turn, judging adherence after each (one JSON line each)."""
    from diffusers import StableDiffusionPipeline

    from egaku.evaluation.adherence import AdherenceOptions, evaluate_adherence
    from egaku.evaluation.judges import load_judge

    # every extension re-renders the same data set: render it once per worker
    render, rendered = ldm.load_training_images, []

    def load_once(opts):
        if not rendered:
            rendered.append(render(opts))
        return rendered[0]

    ldm.load_training_images = load_once
    deadline = args.started + 60 * args.deadline_minutes
    out = Path(args.runs) / args.worker
    log = Path(args.runs) / f"{args.worker}.jsonl"
    judge = load_judge()
    done, chunk_started = 0, time.time()
    for target in args.checkpoints:
        opts = variant_options(args.worker, out, args.vae, args.device, target, args.threads)
        if done:
            rate = (time.time() - chunk_started) / done
            if time.time() + rate * (target - done) * 1.1 > deadline:
                print(f"{args.worker}: stopping at {done} steps (deadline)", file=sys.stderr)
                break
            opts = dataclasses.replace(opts, resume="latest")
        t0 = time.time()
        model_dir = ldm.train_ldm(opts)
        done = target
        train_seconds = time.time() - t0
        pipe = StableDiffusionPipeline.from_pretrained(model_dir).to(ldm.resolve_device(args.device))
        pipe.set_progress_bar_config(disable=True)
        row = {"variant": args.worker, "steps": target, "train_seconds": round(train_seconds, 1),
               "overrides": VARIANTS[args.worker]}
        for guidance in args.guidance:
            report, _ = evaluate_adherence(pipe, AdherenceOptions(
                seen_prompts=args.prompts, held_out_prompts=args.prompts, star_prompts=0,
                guidance_scale=guidance, batch_size=args.eval_batch), judge)
            row[f"cfg{guidance:g}"] = {"seen": report["seen"], "held_out": report["held_out"],
                                       "frechet": report["frechet_distance"]["generated_vs_real"]}
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("variant", "steps", "train_seconds")}), file=sys.stderr)


def cpu_step_cost(names: list[str], threads: int, repeats: int = 6) -> dict[str, float]:
    """Median seconds per diffusion training step of each variant on this CPU (random latents), timed as
    bench/ldm.py times the preset's step (under the variant's --mixed-precision)."""
    from ldm import diffusion_step, median_seconds  # bench/ldm.py (this folder is on sys.path)

    torch.set_num_threads(threads)
    costs = {}
    for name in names:
        costs[name] = median_seconds(diffusion_step(variant_options(name, Path("unused"), "", "cpu", 1, threads)),
                                     repeats)
        print(f"{name}: {costs[name]:.3f} s/step", file=sys.stderr)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[2000, 4000, 8000])
    parser.add_argument("--guidance", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--prompts", type=int, default=100, help="seen and held-out prompts per evaluation")
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--vae", default=str(ROOT / "egaku" / "models" / "builtin" / "vae"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--parallel", type=int, default=8, help="workers at once")
    parser.add_argument("--deadline-minutes", type=float, default=60.0, help="no new chunk starts past this")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "ldm-sweep"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ldm_sweep.json"))
    parser.add_argument("--cpu-step-cost", action="store_true", help="only measure seconds per step on this CPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=time.time(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if args.cpu_step_cost:
        results["cpu_seconds_per_step"] = {"threads": args.threads, "machine": os.cpu_count(),
                                           **cpu_step_cost(args.variants, args.threads)}
        out.write_text(json.dumps(results, indent=2) + "\n")
        return

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, __file__, "--runs", str(runs), "--vae", args.vae, "--device", args.device,
            "--threads", str(args.threads), "--prompts", str(args.prompts), "--eval-batch", str(args.eval_batch),
            "--deadline-minutes", str(args.deadline_minutes), "--started", str(args.started),
            "--checkpoints", *map(str, args.checkpoints), "--guidance", *map(str, args.guidance)]
    pending, running = list(args.variants), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            logf = (runs / f"{name}.log").open("w")
            running.append(subprocess.Popen([*base, "--worker", name], stdout=logf, stderr=subprocess.STDOUT))
        time.sleep(2)
        running = [p for p in running if p.poll() is None]
    rows = [json.loads(line) for name in args.variants if (runs / f"{name}.jsonl").is_file()
            for line in (runs / f"{name}.jsonl").read_text().splitlines()]
    results["adherence"] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                            "vae": args.vae, "rows": rows}
    out.write_text(json.dumps(results, indent=2) + "\n")
    for r in rows:
        cells = " ".join(f"{k}: seen {r[k]['seen']['all_attributes']:.2f} held {r[k]['held_out']['all_attributes']:.2f}"
                         for k in r if k.startswith("cfg"))
        print(f"{r['variant']:24s} {r['steps']:6d} steps {r['train_seconds']:7.1f}s  {cells}")


if __name__ == "__main__":
    main()
