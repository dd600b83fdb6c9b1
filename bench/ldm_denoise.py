"""Where a model loses shapes: real renders noised to a level, denoised back with their caption, judged.

Each rendered image of the training world is noised to ``strength`` (img2img: 0.3 keeps most of the image,
1.0 is pure noise, the same as text-to-image) and denoised with its own caption at 20 steps of the default
sampler. The judge then reads the shape. A model that draws shapes well keeps nearly every shape at low
strengths; the strength where accuracy falls shows the noise levels its denoiser gets wrong. Small and large
shapes are scored apart, since small ones are where the built-in model fails (docs/ldm.md).

    .venv/bin/python bench/ldm_denoise.py --model builtin --model runs/ldm-lowt/model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egaku.data import shapes  # noqa: E402
from egaku.evaluation.adherence import judge_images, score  # noqa: E402
from egaku.evaluation.judges import load_judge  # noqa: E402
from egaku.inference.samplers import DEFAULT_SAMPLER, sampling_runner  # noqa: E402
from egaku.models.loading import load_pipeline  # noqa: E402


@torch.no_grad()
def round_trips(runner, images, captions: list[str], strength: float, guidance: float, seed: int, batch: int = 16):
    """img2img of each image with its caption at ``strength``; image i seeded ``seed + i``."""
    out = []
    for start in range(0, len(images), batch):
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(images[start:start + batch]))]
        out += runner(captions[start:start + batch], image=images[start:start + batch], strength=strength,
                      num_inference_steps=20, guidance_scale=guidance, generator=gens).images
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", action="append", help="model to measure (repeatable; default: builtin)")
    parser.add_argument("--images", type=int, default=96, help="renders per size")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 1.0])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ldm_denoise.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    judge = load_judge()
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    # training-world renders (seed apart from the models' own training images), the first n of each size
    arrays, specs = shapes.make_dataset(8 * args.images, 123, "train")
    chosen = {}  # size -> (specs, images)
    for size in shapes.SIZES:
        idx = [i for i, s in enumerate(specs) if s.size == size][:args.images]
        chosen[size] = ([specs[i] for i in idx], [Image.fromarray(arrays[i]) for i in idx])
    results = {"benchmark": "shape kept after an img2img round trip through noise, by noise level",
               "command": "python bench/ldm_denoise.py " + " ".join(sys.argv[1:]),
               "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out", "threads")},
               "models": {}}
    for model in args.model or ["builtin"]:
        runner = sampling_runner(load_pipeline(model, device="cpu", dtype="float32"), StableDiffusionImg2ImgPipeline,
                                 DEFAULT_SAMPLER)
        rows, started = {}, time.perf_counter()
        for strength in args.strengths:
            row = {}
            for size, (size_specs, images) in chosen.items():
                out = round_trips(runner, images, [s.caption for s in size_specs], strength, args.guidance, args.seed)
                scored = score(judge_images(judge, out)[0], size_specs)
                by_shape = scored["shape_by_shape"]  # keys "small circle", ...; absent when no image has it
                row[size] = {"shape": scored["per_attribute"]["shape"],
                             "by_shape": {sh: by_shape.get(f"{size} {sh}") for sh in shapes.TRAIN_SHAPES}}
            rows[str(strength)] = row
            print(model, strength, json.dumps({k: v["shape"] for k, v in row.items()}), flush=True)
        results["models"][model] = {"by_strength": rows, "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({m: {s: {k: v["shape"] for k, v in r.items()} for s, r in d["by_strength"].items()}
                      for m, d in results["models"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
