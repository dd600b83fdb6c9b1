"""egaku's CUDA paths on a GPU: generation in fp32, fp16 and bf16; LoRA training under each mixed precision;
the DCGAN trainer. Writes what it measured to --out (JSON); nothing here is needed to use egaku on a CPU.

    python bench/cuda_check.py --out bench/results/cuda.json

- generation: the built-in model at each dtype: images/s at 20 steps (batch 8 and 64), prompt adherence
  judged on the fixed seen prompts, and the pixel difference from the fp32 images of the same seeds;
- LoRA: the star LoRA of bench/lora_learning.py trained with --mixed-precision no/fp16/bf16: steps/s, the
  dtype of the trained and saved LoRA weights (must stay fp32), and the star accuracy it reaches;
- GAN: a conditional DCGAN trained for --gan-minutes on the GPU, then `egaku eval gan`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egaku.data import shapes  # noqa: E402
from egaku.evaluation.adherence import generate_images, measure_concept, measure_prompts, prompt_set  # noqa: E402
from egaku.evaluation.judges import load_judge  # noqa: E402
from egaku.models.loading import load_pipeline  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def images_per_second(pipe, batch: int, repeats: int = 3) -> float:
    prompts = [s.caption for s in prompt_set("seen", batch)]
    generate_images(pipe, prompts, steps=20, guidance_scale=3.0, batch_size=batch)  # warm-up
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        generate_images(pipe, prompts, steps=20, guidance_scale=3.0, batch_size=batch)
    _sync()
    return round(batch * repeats / (time.perf_counter() - t0), 2)


def check_generation(judge, prompts: int, device: str, speed_batches: list[int]) -> dict:
    results, reference = {}, None
    specs = prompt_set("seen", prompts)
    for dtype in DTYPES:
        pipe = load_pipeline("builtin", device=device, dtype=dtype)
        first = np.stack([np.asarray(im) for im in generate_images(pipe, [s.caption for s in specs[:16]],
                                                                   guidance_scale=3.0, batch_size=16)]).astype(int)
        reference = first if reference is None else reference
        scored = measure_prompts(pipe, specs, judge, guidance_scale=3.0, batch_size=50)
        results[dtype] = {
            **{f"images_per_second_batch_{b}": images_per_second(pipe, b) for b in speed_batches},
            "seen_all_attributes_cfg3": scored["all_attributes"],
            "seen_per_attribute_cfg3": scored["per_attribute"],
            "max_pixel_difference_from_fp32": int(np.abs(first - reference).max()),
            "mean_pixel_difference_from_fp32": round(float(np.abs(first - reference).mean()), 3),
            "finite": bool(np.isfinite(first).all()),
        }
        print(dtype, json.dumps(results[dtype]), flush=True)
        del pipe
    return results


def check_lora(judge, work: Path, steps: int, device: str) -> dict:
    from safetensors.torch import load_file

    from egaku.lora.apply import apply_loras, remove_loras
    from egaku.training.lora import TrainLoraOptions, train_lora

    data = work / "stars"
    shapes.write_caption_folder(shapes.sample_attributes(20, seed=11, split="novel"), data, 64, "star")
    pipe = load_pipeline("builtin", device=device, dtype="float32")
    results = {"before": measure_concept(pipe, "star", n=60, judge=judge, guidance_scale=2.0, batch_size=60)}
    for precision in ("no", "fp16", "bf16"):
        t0 = time.perf_counter()
        out = train_lora(TrainLoraOptions(data=str(data), model="builtin", out=str(work / f"lora-{precision}"),
                                          resolution=64, rank=16, lora_conv=True, learning_rate=1e-3,
                                          batch_size=4, max_steps=steps, checkpoint_every=0, min_images=20,
                                          format="diffusers", progress=False, device=device,
                                          mixed_precision=precision))
        seconds = time.perf_counter() - t0
        weights = load_file(out / "pytorch_lora_weights.safetensors")
        apply_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
        star = measure_concept(pipe, "star", n=60, judge=judge, guidance_scale=2.0, batch_size=60)
        remove_loras(pipe)
        results[precision] = {"steps": steps, "seconds_including_setup": round(seconds, 1),
                              "steps_per_second_including_setup": round(steps / seconds, 2),
                              "saved_dtypes": sorted({str(t.dtype) for t in weights.values()}),
                              "star_shape_accuracy_cfg2": star["per_attribute"]["shape"]}
        print(precision, json.dumps(results[precision]), flush=True)
    return results


def check_gan(work: Path, minutes: float, device: str) -> dict:
    out = work / "dcgan"
    t0 = time.perf_counter()
    train = subprocess.run([sys.executable, "-m", "egaku", "train-gan", "--arch", "dcgan", "--conditional",
                            "--device", device, "--max-minutes", str(minutes), "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if train.returncode:
        return {"error": train.stderr[-2000:]}
    report = out / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "egaku", "eval", "gan", "--model", str(out), "--out", str(report)],
                        capture_output=True, text=True, cwd=ROOT)
    if ev.returncode:
        return {"error": ev.stderr[-2000:]}
    return {"train_seconds": round(seconds, 1), "files": sorted(p.name for p in out.iterdir()),
            "train_log_tail": train.stderr[-600:], "eval": json.loads(report.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda.json"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--lora-steps", type=int, default=1000)
    parser.add_argument("--gan-minutes", type=float, default=1.0)
    parser.add_argument("--speed-batches", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    parser.add_argument("--checks", nargs="+", default=["generation", "lora", "gan"],
                        choices=["generation", "lora", "gan"],
                        help="which paths to check (results of the others already in --out are kept)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this benchmark checks egaku's CUDA paths")
    judge = load_judge()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                   "torch": torch.__version__})
    work = Path(tempfile.mkdtemp(prefix="egaku-cuda-"))
    for name, check in (("generation", lambda: check_generation(judge, args.prompts, args.device, args.speed_batches)),
                        ("lora", lambda: check_lora(judge, work, args.lora_steps, args.device)),
                        ("gan", lambda: check_gan(work, args.gan_minutes, args.device))):
        if name not in args.checks:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = check()
        except Exception as exc:  # one failing path must not hide the others' figures
            import traceback

            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        result[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(name, "done", result[name + "_seconds"], "s", flush=True)


if __name__ == "__main__":
    main()
