"""LoRA training throughput and peak memory: egaku's trainer vs the canonical diffusers loop.

The baseline is the loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: every step
loads and transforms the images (resize, centre crop, random flip, normalise), tokenizes and runs the
text encoder, runs ``vae.encode(...).latent_dist.sample()``, then the UNet with peft LoRA adapters, MSE on
epsilon, AdamW. egaku's ``train_lora`` does the same optimisation with latents and text embeddings cached
once. Same model (the tiny SD pipeline), data, batch size, resolution, rank and steps; each variant runs
in its own subprocess so its peak RSS is its own, and the variants alternate so machine load hits both.
A third variant, egaku with ``--shuffle-caption``, prices the text encoder running every step.

    .venv/bin/python bench/lora.py                 # writes bench/results/lora.json
    .venv/bin/python bench/lora.py --steps 20 --repeats 1

The "learning" figure (a star LoRA on the built-in model, judged by the shapes judge) is
``bench/lora_learning.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def save_sd_shaped_pipeline(path: Path) -> Path:
    """The tiny pipeline with a VAE shaped like SD's: four blocks, 8x downsampling, encoding at full size.

    The tiny test VAE downsamples only 2x, so its encoder is a small share of a step (~16%); SD 1.x's
    8x VAE encoder at 512 px costs about as much as a UNet forward + backward. This model sits between.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from egaku.models.tiny import tiny_components

    parts = tiny_components()
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, in_channels=3,
                                 out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                                 sample_size=256).eval()
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(path, safe_serialization=True)
    return path


def make_data(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ("red_circle", "blue_square")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(0, 255, 3)))
        box = tuple(int(v) for v in sorted(rng.integers(16, 280, 2))) * 2
        draw = ImageDraw.Draw(img)
        (draw.ellipse if cls == "red_circle" else draw.rectangle)((box[0], box[0], box[1] + 24, box[1] + 24),
                                                                 fill=(220, 30, 30) if i % 2 == 0 else (30, 30, 220))
        img.save(root / cls / f"{i}.png")
    return root


def run_diffusers_loop(model: str, data: str, steps: int, batch: int, resolution: int, rank: int) -> dict:
    """The canonical loop, transcribed from train_text_to_image_lora.py (fp32, no caching)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    from egaku.data.folder import scan_image_folder

    started, cpu_started = time.perf_counter(), time.process_time()
    accelerator = Accelerator(cpu=True)  # the script runs under accelerate too
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    scan = scan_image_folder(data, caption_template="a photo of {class}")
    items = [(it.path, it.caption) for it in scan.items]

    def transform(path):  # Resize(res) -> CenterCrop(res) -> RandomHorizontalFlip -> ToTensor -> Normalize([.5],[.5])
        img = Image.open(path).convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy((np.ascontiguousarray(arr.transpose(2, 0, 1)) - 0.5) / 0.5)

    unet.train()
    loop_start, loop_cpu_start = time.perf_counter(), time.process_time()
    encoder_seconds = 0.0  # VAE + text encoder: the work caching removes
    order = torch.randperm(len(items)).tolist()
    for step in range(steps):
        chosen = [items[order[(step * batch + j) % len(items)]] for j in range(batch)]
        pixel_values = torch.stack([transform(p) for p, _ in chosen])
        input_ids = tokenizer([c for _, c in chosen], max_length=tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids
        encoder_start = time.perf_counter()
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        encoder_seconds += time.perf_counter() - encoder_start
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_start = time.perf_counter()
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        encoder_seconds += time.perf_counter() - encoder_start
        pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    loop_seconds = time.perf_counter() - loop_start
    return {"total_seconds": time.perf_counter() - started, "loop_seconds": loop_seconds,
            "total_cpu_seconds": time.process_time() - cpu_started,
            "loop_cpu_seconds": time.process_time() - loop_cpu_start,
            "encoder_seconds": encoder_seconds, "final_loss": float(loss)}


def run_egaku(model: str, data: str, steps: int, batch: int, resolution: int, rank: int,
              shuffle_caption: bool = False) -> dict:
    """egaku's trainer; with ``shuffle_caption`` the captions vary each step, so the text encoder runs every
    step instead of being cached (the latents still are)."""
    import csv

    # the same libraries the baseline imports before its clock starts
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from egaku.models import loading  # noqa: F401
    from egaku.training.lora import TrainLoraOptions, train_lora
    from egaku.training.runtime import MetricsLog

    # CPU time at the end of each step (the loss log is written once per step)
    step_cpu: list[float] = []
    log_step = MetricsLog.log
    MetricsLog.log = lambda self, step, **values: (step_cpu.append(time.process_time()), log_step(self, step, **values))
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(tempfile.mkdtemp(prefix="egaku-bench-lora-"))
    train_lora(TrainLoraOptions(data=data, model=model, out=str(out), resolution=resolution, rank=rank,
                                alpha=float(rank), batch_size=batch, max_steps=steps, checkpoint_every=0,
                                random_flip=True, caption_template="a photo of {class}", format="diffusers",
                                min_images=2, progress=False, shuffle_caption=shuffle_caption))
    total, total_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    with open(out / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    shutil.rmtree(out, ignore_errors=True)
    # loss.csv stamps each step when it ends: the loop's own rate, without loading and caching
    loop_seconds = (float(rows[-1]["time"]) - float(rows[0]["time"])) * len(rows) / max(1, len(rows) - 1)
    loop_cpu = (step_cpu[-1] - step_cpu[0]) * len(step_cpu) / max(1, len(step_cpu) - 1)
    return {"total_seconds": total, "loop_seconds": loop_seconds, "total_cpu_seconds": total_cpu,
            "loop_cpu_seconds": loop_cpu, "final_loss": float(rows[-1]["loss"])}


def sd15_flops() -> dict:
    """FLOPs of one SD 1.x training step's parts at 512 px, counted on meta tensors (no weights, no time).

    The same architecture as SD 1.5 (UNet 860M, VAE encoder 34M, CLIP ViT-L text encoder 123M, configs
    from their published shapes); the UNet backward computes activation gradients only, as for LoRA.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408))
    for model in (unet, vae, text):
        model.requires_grad_(False)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    with torch.no_grad():
        vae_flops = count(lambda: vae.encode(torch.empty(1, 3, 512, 512, device="meta")).latent_dist.mean)
        text_flops = count(lambda: text(torch.zeros(1, 77, dtype=torch.long, device="meta"))[0])
    latents = torch.empty(1, 4, 64, 64, device="meta", requires_grad=True)
    unet_flops = count(lambda: unet(latents, torch.tensor([500], device="meta"),
                                    torch.empty(1, 77, 768, device="meta")).sample.sum().backward())
    share = (vae_flops + text_flops) / (vae_flops + text_flops + unet_flops)
    return {"vae_encode_tflops": vae_flops / 1e12, "text_encode_tflops": text_flops / 1e12,
            "unet_forward_backward_tflops": unet_flops / 1e12, "encoder_share": share,
            "speedup_if_only_encoders_removed": 1 / (1 - share)}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.variant == "diffusers_loop":
        result = run_diffusers_loop(args.model, args.data, args.steps, args.batch, args.resolution, args.rank)
    else:
        result = run_egaku(args.model, args.data, args.steps, args.batch, args.resolution, args.rank,
                           shuffle_caption=args.variant == "egaku_shuffle")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.json"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    from egaku.models.tiny import save_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="egaku-bench-lora-"))
    data = make_data(work / "data", args.images)
    configs = {
        "tiny": (save_tiny_pipeline(work / "tiny"), args.resolution),
        "sd_shaped_vae": (save_sd_shaped_pipeline(work / "sd-shaped"), args.resolution * 4),
    }
    results = {}
    for config, (model, resolution) in configs.items():
        runs: dict[str, list[dict]] = {"egaku": [], "diffusers_loop": [], "egaku_shuffle": []}
        for _ in range(args.repeats):
            for variant in runs:
                cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--data", str(data),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--resolution", str(resolution),
                       "--rank", str(args.rank), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                runs[variant].append(json.loads(line[7:]))
                print(config, variant, runs[variant][-1], flush=True)

        def summary(rs):
            return {"loop_steps_per_s": statistics.median(args.steps / r["loop_seconds"] for r in rs),
                    "end_to_end_steps_per_s": statistics.median(args.steps / r["total_seconds"] for r in rs),
                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs), "runs": rs}

        ours, base, shuffled = summary(runs["egaku"]), summary(runs["diffusers_loop"]), summary(runs["egaku_shuffle"])
        pairs = list(zip(runs["egaku"], runs["diffusers_loop"]))  # run back to back: same machine load
        encoder_share = statistics.median(r["encoder_seconds"] / r["loop_seconds"] for r in runs["diffusers_loop"])
        results[config] = {
            "baseline_encoder_share": encoder_share,
            "speedup_if_only_encoders_removed": 1 / (1 - encoder_share),
            "resolution": resolution,
            "egaku": ours,
            "diffusers_loop": base,
            "speedup_loop_cpu_time": statistics.median(b["loop_cpu_seconds"] / o["loop_cpu_seconds"] for o, b in pairs),
            "speedup_end_to_end_cpu_time": statistics.median(b["total_cpu_seconds"] / o["total_cpu_seconds"]
                                                             for o, b in pairs),
            "speedup_loop": ours["loop_steps_per_s"] / base["loop_steps_per_s"],
            "speedup_end_to_end": ours["end_to_end_steps_per_s"] / base["end_to_end_steps_per_s"],
            "peak_rss_ratio": ours["peak_rss_mib"] / base["peak_rss_mib"],
            # --shuffle-caption: the text encoder runs every step (its outputs cannot be cached)
            "egaku_shuffle_caption": shuffled,
            "shuffle_caption_loop_cpu_cost": statistics.median(s["loop_cpu_seconds"] / o["loop_cpu_seconds"]
                                                               for o, s in zip(runs["egaku"], runs["egaku_shuffle"])),
            "shuffle_caption_speedup_loop_cpu_time": statistics.median(
                b["loop_cpu_seconds"] / s["loop_cpu_seconds"]
                for s, b in zip(runs["egaku_shuffle"], runs["diffusers_loop"])),
        }
    result = {
        "benchmark": "LoRA training: egaku train_lora vs the diffusers train_text_to_image_lora.py loop",
        "command": "python bench/lora.py " + " ".join(sys.argv[1:]),
        "setup": {"models": {"tiny": "egaku tiny SD pipeline (UNet (32, 64), VAE 2 blocks = 2x, CLIP 2 layers)",
                             "sd_shaped_vae": "same UNet and CLIP, VAE (32, 64, 64, 64) = 8x like SD, 4x the pixels"},
                  "images": args.images, "image_size": "320x320 PNG", "batch_size": args.batch, "rank": args.rank,
                  "steps": args.steps, "repeats": args.repeats, "torch_threads": args.threads,
                  "random_flip": True, "precision": "fp32",
                  "loop_steps_per_s": "steps after the first / time between the first and last step",
                  "end_to_end_steps_per_s": "steps / (model load + caching + training + saving), imports excluded",
                  "cpu_time": "process CPU time (one thread per process): what the work costs, unlike wall "
                              "time little affected by other jobs on the machine; ratios are medians over "
                              "back-to-back pairs",
                  "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]},
        "results": results,
        "sd15_512px_flops_per_image": sd15_flops(),
        "targets": {"speedup": ">= 2x steps/s", "peak_rss_ratio": "<= 1.0"},
    }
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({c: {k: r[k] for k in ("speedup_loop_cpu_time", "speedup_end_to_end_cpu_time", "speedup_loop",
                                            "speedup_end_to_end", "peak_rss_ratio")}
                      for c, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
