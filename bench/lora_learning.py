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
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--judge", default=None, help="shapes judge folder (default: the shipped one)")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--data-split", default="novel", choices=["novel", "train"],
                        help="what the training folder shows: stars (novel), or the old world (train: a control, "
                             "fine-tuning that teaches nothing new)")
    parser.add_argument("--balanced", action="store_true",
                        help="training images spread over every size, background, colour and position (and pair of "
                             "them) instead of drawn independently (the 20 independent draws hold 6 small stars, none "
                             "on white, and no orange one)")
    parser.add_argument("--image-seed", type=int, default=11,
                        help="seed of the training images' attributes (another seed: another folder of stars)")
    parser.add_argument("--renders-per-image", type=int, default=1,
                        help="render each training image's attributes this many times, with new jitter and rotation "
                             "(what geometric augmentation of a photo gives: more images, no new combinations)")
    parser.add_argument("--small-repeats", type=int, default=1, metavar="N",
                        help="each small star written N times (copies under new names): the harder half of the folder "
                             "seen N times as often, as kohya's per-folder repeats would give it")
    parser.add_argument("--mirrored", action="store_true",
                        help="add each training image mirrored left to right, its caption's left and right swapped")
    parser.add_argument("--masks", action="store_true",
                        help="write each star image's shape mask (the renderer's) and train with them as loss masks "
                             "(--mask-dir); --set unmasked_weight=W keeps some loss on the background")
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
    parser.add_argument("--token-init", nargs="+", default=[],
                        help="initializer word per --train-tokens word (train-lora's --token-init)")
    parser.add_argument("--token-lr", type=float, default=0.0, help="their learning rate (0 = --learning-rate)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prior-images", type=int, default=0,
                        help="regularization images the base model generates from training-world captions "
                             "(prior preservation; 0 = off)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="share of steps on the empty caption")
    parser.add_argument("--prior-rendered", type=int, default=0,
                        help="regularization images rendered from the old world (real data, kohya's reg_data_dir "
                             "with real images) instead of generated by the base model")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="their loss weight")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times each star image appears per epoch, regularization images once "
                             "(kohya's num_repeats)")
    parser.add_argument("--timestep-sampling", default="uniform", choices=["uniform", "logit_normal"],
                        help="train-lora's: logit_normal trains mostly middle noise levels, where shapes form")
    parser.add_argument("--uniform-share", type=float, default=0.0, help="train-lora's (with logit_normal)")
    parser.add_argument("--logit-mean", type=float, default=0.0, help="train-lora's (with logit_normal)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                        help="train-lora's: bf16 runs the frozen base in bf16 under autocast (the LoRA stays fp32)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also judge the LoRA of every Nth step (its checkpoints): the curve of star accuracy "
                             "against old-prompt damage over training")
    parser.add_argument("--lora-scales", nargs="+", type=float, default=[],
                        help="also judge the final LoRA applied at these weights (<lora:name:w>)")
    parser.add_argument("--average-last", type=int, default=0,
                        help="also judge the mean of the last K checkpoints' LoRAs (each at weight 1/K) and token "
                             "embeddings, a stand-in for an EMA of the LoRA weights (needs --eval-every)")
    parser.add_argument("--soup", type=int, default=0, metavar="N",
                        help="also train with seeds 1..N-1 and judge the N LoRAs applied together at weight 1/N, their "
                             "trained words averaged (a model soup: the seeds' own errors average out); the training "
                             "time reported is all N runs'")
    parser.add_argument("--star-weights", nargs="+", type=float, default=[], metavar="W",
                        help="also judge the finished LoRA on the star prompts with the word written (star:W), "
                             "A1111's emphasis (the old prompts, which hold no star, are unchanged by it)")
    parser.add_argument("--star-caption-weight", type=float, default=1.0, metavar="W",
                        help="write the star images' captions with (star:W) and train with --weighted-captions")
    parser.add_argument("--star-text", default="star", metavar="TEXT",
                        help="what the star images' captions and the star prompts write for the star, e.g. 'star q': "
                             "with --train-tokens star q, the word's two trained vectors, as a two-vector embedding "
                             "(kohya's num_vectors_per_token) stands for one word")
    parser.add_argument("--token-scales", nargs="+", type=float, default=[], metavar="S",
                        help="also judge the finished LoRA on the star prompts with its trained words' input "
                             "embeddings multiplied by S (a file-side stand-in for the prompt weight)")
    parser.add_argument("--guidance-sweep", nargs="+", type=float, default=[], metavar="G",
                        help="also judge the base model and the finished LoRA at these guidance scales")
    parser.add_argument("--steps-sweep", nargs="+", type=int, default=[], metavar="N",
                        help="also judge the base model and the finished LoRA at these numbers of sampling steps")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="any other train-lora option, by its TrainLoraOptions field name (a JSON value or a "
                             "string), e.g. dropout=0.1 noise_offset=0.05 min_snr_gamma=5")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_learning.json"))
    args = parser.parse_args()

    from egaku import config
    from egaku.data import shapes
    from egaku.errors import EgakuError
    from egaku.evaluation.adherence import measure_concept, measure_prompts, prompt_set
    from egaku.evaluation.judges import load_judge
    from egaku.lora.apply import apply_loras, apply_token_embeddings, remove_loras
    from egaku.models.loading import load_pipeline
    from egaku.training.lora import TrainLoraOptions, train_lora
    from safetensors.torch import load_file, save_file

    extra = {}  # --set options: a last layer over the bench's own, checked (names and values) before any work
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    work = Path(tempfile.mkdtemp(prefix="egaku-lora-learning-"))
    data = work / "stars"
    prior = {}
    if args.prior_images:  # captions of the trained world, drawn apart from the evaluation prompts
        prompts = [s.caption for s in shapes.sample_attributes(args.prior_images, seed=23, split="train")]
        prior = dict(prior_data=str(work / "prior"), prior_images=args.prior_images, prior_prompts=prompts,
                     prior_loss_weight=args.prior_weight, prior_guidance=args.guidance)
    if args.prior_rendered:  # rendered training-world images with their captions, apart from the eval prompts
        prior = dict(prior_data=str(work / "prior"), prior_loss_weight=args.prior_weight)
    options = dict(data=str(data), model=args.model, out=str(work / "lora"),
                   rank=args.rank, lora_conv=args.lora_conv,
                   train_text_encoder=args.train_text_encoder,  # no flips: captions say left and right
                   **({"target_modules": args.target_modules} if args.target_modules else {}),
                   train_tokens=args.train_tokens, token_lr=args.token_lr, token_init=args.token_init,
                   learning_rate=args.learning_rate, batch_size=args.batch_size,
                   max_steps=args.train_steps, checkpoint_every=args.eval_every,
                   keep_checkpoints=10**6, min_images=args.images,
                   caption_dropout=args.caption_dropout, repeats=args.repeats, **prior,
                   **({"mask_dir": str(work / "masks")} if args.masks else {}),
                   timestep_sampling=args.timestep_sampling, uniform_share=args.uniform_share,
                   logit_mean=args.logit_mean, mixed_precision=args.mixed_precision,
                   format="diffusers", progress=False)
    try:
        config.build(TrainLoraOptions, options, extra)  # the --set options checked before any work
    except EgakuError as exc:
        work.rmdir()
        parser.error(str(exc))
    if "alpha" in extra and args.eval_every:
        parser.error("--set alpha=... with --eval-every: the checkpoints' LoRA files are read as alpha = rank")
    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    judge = load_judge(args.judge)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    specs = shapes.sample_attributes(args.images, seed=args.image_seed, split=args.data_split, balanced=args.balanced)
    if args.renders_per_image > 1:  # the same attributes drawn again with new jitter and rotation
        again = shapes.sample_attributes(len(specs) * (args.renders_per_image - 1), seed=12, split=args.data_split)
        specs = specs + [dataclasses.replace(specs[i % len(specs)], dx=a.dx, dy=a.dy, angle=a.angle)
                         for i, a in enumerate(again)]
    if args.mirrored:
        swap = {"left": "right", "right": "left"}
        specs = specs + [dataclasses.replace(s, position=" ".join(swap.get(w, w) for w in s.position.split()),
                                             dx=-s.dx, angle=-s.angle) for s in specs]
    if args.small_repeats > 1:
        specs = specs + [s for s in specs if s.size == "small"] * (args.small_repeats - 1)
    shapes.write_caption_folder(specs, data, size, "star" if args.data_split == "novel" else "old",
                                mask_folder=work / "masks" if args.masks else None)
    if args.star_text != "star":
        metadata = data / "metadata.jsonl"
        metadata.write_text(metadata.read_text().replace(" star ", f" {args.star_text} "))
    if args.star_caption_weight != 1:
        metadata = data / "metadata.jsonl"
        metadata.write_text(metadata.read_text().replace(f" {args.star_text} ",
                                                         f" ({args.star_text}:{args.star_caption_weight:g}) "))
        options["weighted_captions"] = True
    old_prompts = prompt_set("seen", args.eval_prompts)
    sampling = {"steps": args.sample_steps, "guidance_scale": args.guidance}

    def measure(**changed: float) -> dict:
        """Star accuracy and old-prompt adherence, sampled with the bench's settings and ``changed``."""
        at = {**sampling, **changed}
        star = measure_concept(pipe, shape="star", n=args.eval_prompts, judge=judge, shape_text=args.star_text, **at)
        old = measure_prompts(pipe, old_prompts, judge=judge, **at)
        return {"star": star, "old": {k: v for k, v in old.items() if k not in ("images", "features")}}

    if args.prior_rendered:
        shapes.write_caption_folder(shapes.sample_attributes(args.prior_rendered, seed=23, split="train"),
                                    work / "prior", size, "old")
    started = time.perf_counter()
    before = measure()
    print("before", json.dumps(before), flush=True)

    def emphasised_star(weight: float) -> dict:
        star = measure_concept(pipe, shape="star", n=args.eval_prompts, judge=judge, shape_weight=weight,
                               shape_text=args.star_text, **sampling)
        return {"star_accuracy": star["per_attribute"]["shape"], "star_all_attributes": star["all_attributes"],
                "star_per_attribute": star["per_attribute"], "star_shape_by_size": star["shape_by_size"],
                "star_read_as": star["shape_read_as"]}

    base_emphasised = {weight: emphasised_star(weight) for weight in args.star_weights}  # the word alone, no LoRA
    train_start = time.perf_counter()
    out = train_lora(config.build(TrainLoraOptions, {**options, "resolution": size}, extra))
    train_minutes = (time.perf_counter() - train_start) / 60
    apply_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
    after = measure()
    sweeps = {"guidance": [], "steps": []}  # the same LoRA and the base model sampled with other settings
    for name, value in [("guidance", g) for g in args.guidance_sweep] + [("steps", n) for n in args.steps_sweep]:
        setting = {"guidance_scale" if name == "guidance" else "steps": value}
        lora_side = measure(**setting)
        remove_loras(pipe)
        base_side = measure(**setting)
        apply_loras(pipe, [(out / "pytorch_lora_weights.safetensors", 1.0)])
        sweeps[name].append({name: value,
                             "star_accuracy_before": base_side["star"]["per_attribute"]["shape"],
                             "star_accuracy_after": lora_side["star"]["per_attribute"]["shape"],
                             "old_prompt_adherence_before": base_side["old"]["all_attributes"],
                             "old_prompt_adherence_after": lora_side["old"]["all_attributes"],
                             "star_shape_by_size_after": lora_side["star"]["shape_by_size"]})
        print(name, json.dumps(sweeps[name][-1]), flush=True)
    emphasised = []  # the finished LoRA on the star prompts written with (star:W)
    for weight in args.star_weights:
        emphasised.append({"star_weight": weight, "star_accuracy_before": base_emphasised[weight]["star_accuracy"],
                           "before": base_emphasised[weight], **emphasised_star(weight)})
        print("emphasis", json.dumps(emphasised[-1]), flush=True)
    scaled_tokens = []  # the finished LoRA with its words' embeddings scaled, plain star prompts
    if args.token_scales:
        trained = load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "token_embeddings.safetensors")
        for scale in args.token_scales:
            apply_token_embeddings(pipe, {w: v * scale for w, v in trained.items()}, source="token scale")
            scaled_tokens.append({"token_scale": scale, **emphasised_star(1.0)})
            print("token scale", json.dumps(scaled_tokens[-1]), flush=True)
        apply_token_embeddings(pipe, trained, source="trained tokens")
    remove_loras(pipe)
    curve = []  # (step, LoRA weight) -> star accuracy and old-prompt adherence

    def judged(loras: list[tuple[Path, float]], embeddings: dict) -> dict:
        """Star accuracy and old-prompt adherence with these LoRAs and trained words applied."""
        apply_loras(pipe, loras)
        apply_token_embeddings(pipe, embeddings, source=str(loras[0][0]))
        m = measure()
        remove_loras(pipe)
        return {"star_accuracy": m["star"]["per_attribute"]["shape"],
                "old_prompt_adherence": m["old"]["all_attributes"], "old_per_attribute": m["old"]["per_attribute"]}

    def point(lora_file: Path, step: int, weight: float, embeddings: dict | None = None) -> None:
        curve.append({"step": step, "lora_weight": weight, **judged([(lora_file, weight)], embeddings or {})})
        print("curve", json.dumps(curve[-1]), flush=True)

    def checkpoint_lora(ckpt: Path) -> tuple[Path, dict]:
        """A train-lora checkpoint as a LoRA file apply_loras reads, and its trained words' embeddings."""
        lora = load_file(ckpt / "unet_lora.safetensors")  # alpha = rank (the default): no metadata needed
        path = work / f"{ckpt.parents[1].name}-{ckpt.name}.safetensors"  # runs of several seeds share step names
        save_file({f"unet.{k}": v for k, v in lora.items()}, path)
        return path, (load_file(ckpt / "token_embeddings.safetensors") if args.train_tokens else {})

    checkpoints = sorted((work / "lora" / "checkpoints").glob("step-*"))  # every eval_every steps, then the last
    if args.eval_every:
        for ckpt in checkpoints[:-1]:  # the last one is `after`
            lora_file, embeddings = checkpoint_lora(ckpt)
            point(lora_file, int(ckpt.name.split("-")[1]), 1.0, embeddings)
    averaged = None
    if args.average_last:
        chosen = [checkpoint_lora(ckpt) for ckpt in checkpoints[-args.average_last:]]
        vectors = [embeddings for _, embeddings in chosen if embeddings]
        mean_words = {w: torch.stack([v[w] for v in vectors]).mean(0) for w in vectors[0]} if vectors else {}
        averaged = {"checkpoints": [c.name for c in checkpoints[-args.average_last:]],
                    **judged([(path, 1.0 / len(chosen)) for path, _ in chosen], mean_words)}
        print("averaged", json.dumps(averaged), flush=True)
    soup = None
    if args.soup > 1:
        runs = [out]
        for seed in range(1, args.soup):
            train_start = time.perf_counter()
            runs.append(train_lora(config.build(
                TrainLoraOptions, {**options, "resolution": size, "out": str(work / f"lora-seed{seed}"), "seed": seed},
                extra)))
            train_minutes += (time.perf_counter() - train_start) / 60
        chosen = [checkpoint_lora(sorted((run / "checkpoints").glob("step-*"))[-1]) for run in runs]
        vectors = [embeddings for _, embeddings in chosen if embeddings]
        mean_words = {w: torch.stack([v[w] for v in vectors]).mean(0) for w in vectors[0]} if vectors else {}
        weighted = [(path, 1.0 / len(chosen)) for path, _ in chosen]
        soup = {"seeds": list(range(args.soup)), **judged(weighted, mean_words)}
        print("soup", json.dumps(soup), flush=True)
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
        "guidance_sweep": sweeps["guidance"],
        "steps_sweep": sweeps["steps"],
        "star_weights": emphasised,
        "token_scales": scaled_tokens,
        "averaged_checkpoints": averaged,
        "soup": soup,
        "details": {"before": before, "after": after},
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
