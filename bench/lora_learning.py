"""Does a LoRA teach the built-in model a new concept, without breaking what it knew?

The built-in model was trained on the ``shapes`` world without the star. We render ~20 star images
(``egaku.data.shapes``, captions in the world's grammar), train a LoRA on them with ``train_lora`` on the
CPU, and ask the shapes judge (``egaku.evaluation.judges``) before and after:

- star accuracy (``adherence.measure_concept``): on the fixed star prompts, the share of images the
  judge reads as a star (and the share with every attribute right);
- old-prompt adherence (``adherence.measure_prompts`` on the fixed ``seen`` prompt set): the share of
  images whose every attribute (shape, colour, size, position, background) the judge reads as the
  prompt says.

    .venv/bin/python bench/lora_learning.py            # writes bench/results/lora_learning.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--judge", default=None, help="shapes judge folder (default: the shipped one)")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="UNet modules to adapt (default: train-lora's, attention q/k/v/out); e.g. "
                             "attn2.to_k attn2.to_v adapts only what the text feeds the UNet (Custom Diffusion)")
    parser.add_argument("--lora-conv", action="store_true", help="adapt the UNet convolutions too")
    parser.add_argument("--train-text-encoder", action="store_true", help="adapt the text encoder too")
    parser.add_argument("--train-tokens", nargs="+", default=[],
                        help="words whose token embeddings train too (pivotal tuning), e.g. star")
    parser.add_argument("--token-lr", type=float, default=0.0, help="their learning rate (0 = --learning-rate)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prior-images", type=int, default=0,
                        help="regularization images the base model generates from training-world captions "
                             "(prior preservation; 0 = off)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="share of steps on the empty caption")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="their loss weight")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also judge the LoRA of every Nth step (its checkpoints): the curve of star accuracy "
                             "against old-prompt damage over training")
    parser.add_argument("--lora-scales", nargs="+", type=float, default=[],
                        help="also judge the final LoRA applied at these weights (<lora:name:w>)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_learning.json"))
    args = parser.parse_args()

    from egaku.data import shapes
    from egaku.evaluation.adherence import measure_concept, measure_prompts, prompt_set
    from egaku.evaluation.judges import load_judge
    from egaku.lora.apply import apply_loras, apply_token_embeddings, remove_loras
    from egaku.models.loading import load_pipeline
    from egaku.training.lora import TrainLoraOptions, train_lora
    from safetensors.torch import load_file, save_file

    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    judge = load_judge(args.judge)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    work = Path(tempfile.mkdtemp(prefix="egaku-lora-learning-"))
    data = work / "stars"
    shapes.write_caption_folder(shapes.sample_attributes(args.images, seed=11, split="novel"), data, size, "star")
    old_prompts = prompt_set("seen", args.eval_prompts)
    sampling = {"steps": args.sample_steps, "guidance_scale": args.guidance}

    def measure() -> dict:
        star = measure_concept(pipe, shape="star", n=args.eval_prompts, judge=judge, **sampling)
        old = measure_prompts(pipe, old_prompts, judge=judge, **sampling)
        return {"star": star, "old": {k: v for k, v in old.items() if k not in ("images", "features")}}

    prior = {}
    if args.prior_images:  # captions of the trained world, drawn apart from the evaluation prompts
        prompts = [s.caption for s in shapes.sample_attributes(args.prior_images, seed=23, split="train")]
        prior = dict(prior_data=str(work / "prior"), prior_images=args.prior_images, prior_prompts=prompts,
                     prior_loss_weight=args.prior_weight, prior_guidance=args.guidance)
    started = time.perf_counter()
    before = measure()
    print("before", json.dumps(before), flush=True)
    train_start = time.perf_counter()
    out = train_lora(TrainLoraOptions(data=str(data), model=args.model, out=str(work / "lora"), resolution=size,
                                      rank=args.rank, lora_conv=args.lora_conv,
                                      train_text_encoder=args.train_text_encoder,  # no flips: captions say left and right
                                      **({"target_modules": args.target_modules} if args.target_modules else {}),
                                      train_tokens=args.train_tokens, token_lr=args.token_lr,
                                      learning_rate=args.learning_rate, batch_size=args.batch_size,
                                      max_steps=args.train_steps, checkpoint_every=args.eval_every,
                                      keep_checkpoints=10**6, min_images=args.images,
                                      caption_dropout=args.caption_dropout, **prior,
                                      format="diffusers", progress=False))
    train_minutes = (time.perf_counter() - train_start) / 60
    apply_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
    after = measure()
    remove_loras(pipe)
    curve = []  # (step, LoRA weight) -> star accuracy and old-prompt adherence

    def point(lora_file: Path, step: int, weight: float, embeddings: dict | None = None) -> None:
        apply_loras(pipe, [(lora_file, weight)])
        apply_token_embeddings(pipe, embeddings or {}, source=str(lora_file))  # a checkpoint's trained words
        m = measure()
        remove_loras(pipe)
        curve.append({"step": step, "lora_weight": weight, "star_accuracy": m["star"]["per_attribute"]["shape"],
                      "old_prompt_adherence": m["old"]["all_attributes"],
                      "old_per_attribute": m["old"]["per_attribute"]})
        print("curve", json.dumps(curve[-1]), flush=True)

    if args.eval_every:
        for ckpt in sorted((work / "lora" / "checkpoints").glob("step-*"))[:-1]:  # the last one is `after`
            lora = load_file(ckpt / "unet_lora.safetensors")  # alpha = rank (the default): no metadata needed
            save_file({f"unet.{k}": v for k, v in lora.items()}, work / "ckpt_lora.safetensors")
            embeddings = load_file(ckpt / "token_embeddings.safetensors") if args.train_tokens else {}
            point(work / "ckpt_lora.safetensors", int(ckpt.name.split("-")[1]), 1.0, embeddings)
    for weight in args.lora_scales:
        point(out / "pytorch_lora_weights.safetensors", args.train_steps, weight)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "star LoRA on the built-in model, judged by the shapes judge",
        "command": "python bench/lora_learning.py " + " ".join(sys.argv[1:]),
        "setup": vars(args) | {"image_size": size},
        "train_minutes": train_minutes,
        "star_accuracy_before": before["star"]["per_attribute"]["shape"],
        "star_accuracy_after": after["star"]["per_attribute"]["shape"],
        "old_prompt_adherence_before": before["old"]["all_attributes"],
        "old_prompt_adherence_after": after["old"]["all_attributes"],
        "old_prompt_adherence_drop_points": 100 * (before["old"]["all_attributes"] - after["old"]["all_attributes"]),
        "targets": {"star_accuracy_after": ">= 0.8", "train_minutes": "<= 10", "adherence_drop_points": "<= 5"},
        "curve": curve,
        "details": {"before": before, "after": after},
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
