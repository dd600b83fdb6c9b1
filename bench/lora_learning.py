"""Does a LoRA teach the built-in model a new concept, without breaking what it knew?

The built-in model was trained on the ``shapes`` world without the star. We render ~20 star images
(``egaku.data.shapes``, captions in the world's grammar), train a LoRA on them with ``train_lora`` on the
CPU, and ask the shapes judge (``egaku.evaluation.judges``) before and after:

- star accuracy: on fresh star prompts (other seeds, other attribute combinations than the training
  images), the share of images the judge reads as a star;
- old-prompt adherence: on prompts of the training world, the share of images whose every attribute
  (shape, colour, size, position, background) the judge reads as the prompt says.

    .venv/bin/python bench/lora_learning.py            # writes bench/results/lora_learning.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def score(pipe, specs, steps: int, guidance: float, size: int, judge) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from egaku.data import shapes
    from egaku.evaluation.judges import to_tensor

    images = []
    for i, spec in enumerate(specs):
        out = pipe(spec.caption, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                   generator=torch.Generator().manual_seed(1000 + i), output_type="pil").images[0]
        images.append(np.asarray(out.resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BOX)))
    preds, _ = judge.predict(to_tensor(np.stack(images)))
    names = judge.attributes
    correct = {name: np.array([names[name][p] == getattr(s, name) for p, s in zip(preds[name], specs)])
               for name in preds}
    all_ok = np.logical_and.reduce([correct[n] for n in shapes.ATTRIBUTES])
    return {"star_share": float(np.mean([names["shape"][p] == "star" for p in preds["shape"]])),
            "all_attributes": float(all_ok.mean()),
            "per_attribute": {n: float(c.mean()) for n, c in correct.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_learning.json"))
    args = parser.parse_args()

    from egaku.data import shapes
    from egaku.evaluation.judges import load_judge
    from egaku.lora.apply import apply_loras, remove_loras
    from egaku.models.loading import load_pipeline
    from egaku.training.lora import TrainLoraOptions, train_lora

    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    judge = load_judge()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    work = Path(tempfile.mkdtemp(prefix="egaku-lora-learning-"))
    data = work / "stars"
    data.mkdir()
    rows = []
    for i, spec in enumerate(shapes.sample_attributes(args.images, seed=11, split="novel")):
        shapes.render(spec, size=size).save(data / f"star-{i:03d}.png")
        rows.append(json.dumps({"file_name": f"star-{i:03d}.png", "text": spec.caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    star_prompts = shapes.sample_attributes(args.eval_prompts, seed=12, split="novel")
    old_prompts = shapes.sample_attributes(args.eval_prompts, seed=13, split="train")

    started = time.perf_counter()
    before = {"star": score(pipe, star_prompts, args.sample_steps, args.guidance, size, judge),
              "old": score(pipe, old_prompts, args.sample_steps, args.guidance, size, judge)}
    print("before", json.dumps(before), flush=True)
    train_start = time.perf_counter()
    out = train_lora(TrainLoraOptions(data=str(data), model=args.model, out=str(work / "lora"), resolution=size,
                                      rank=args.rank, learning_rate=args.learning_rate, batch_size=args.batch_size,
                                      max_steps=args.train_steps, checkpoint_every=0, min_images=args.images,
                                      format="diffusers"))
    train_minutes = (time.perf_counter() - train_start) / 60
    apply_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
    after = {"star": score(pipe, star_prompts, args.sample_steps, args.guidance, size, judge),
             "old": score(pipe, old_prompts, args.sample_steps, args.guidance, size, judge)}
    remove_loras(pipe)
    result = {
        "benchmark": "star LoRA on the built-in model, judged by the shapes judge",
        "command": "python bench/lora_learning.py " + " ".join(sys.argv[1:]),
        "setup": vars(args) | {"image_size": size},
        "train_minutes": train_minutes,
        "star_accuracy_before": before["star"]["star_share"],
        "star_accuracy_after": after["star"]["star_share"],
        "old_prompt_adherence_before": before["old"]["all_attributes"],
        "old_prompt_adherence_after": after["old"]["all_attributes"],
        "old_prompt_adherence_drop_points": 100 * (before["old"]["all_attributes"] - after["old"]["all_attributes"]),
        "targets": {"star_accuracy_after": ">= 0.8", "train_minutes": "<= 10", "adherence_drop_points": "<= 5"},
        "details": {"before": before, "after": after},
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
