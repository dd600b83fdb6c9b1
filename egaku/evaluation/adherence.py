"""Prompt adherence on the shapes world: generate from captions, let the judge read the images back.

For a fixed prompt set (``seen`` training combinations, ``held_out`` colour+shape pairs never trained
on, and ``star`` prompts for the shape the base model never saw) we generate one image per prompt with
per-image seeds, ask the ``ShapesJudge`` for every attribute, and report per-attribute accuracy and
all-attributes accuracy (every attribute right at once) for each split. A Fréchet distance between
judge features of the generated images and of real renders of the same prompts measures how
render-like the images are; the same distance between two independent real render sets is reported
beside it as the floor.

Python use, e.g. to measure a LoRA-taught concept::

    from egaku.evaluation.adherence import measure_concept
    report = measure_concept(pipe, shape="star", n=40)   # {"per_attribute": ..., "all_attributes": ...}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import option, to_dict
from ..data import shapes
from ..data.images import arrays_to_tensor, image_grid
from ..errors import EgakuError
from ..inference.samplers import DEFAULT_SAMPLER, SAMPLERS, canonical_sampler, sampling_runner
from ..models.text import encode_prompt_pair, needs_chunked_encoding
from ..paths import check_output
from .judges import ShapesJudge, label_arrays, load_judge
from .metrics import frechet_distance

PROMPT_SEED = 20240  # the fixed prompt set: the same prompts for every model
SPLITS = ("seen", "held_out", "star")
_SPLIT_SOURCE = {"seen": "train", "held_out": "held_out", "star": "novel"}


@dataclasses.dataclass
class AdherenceOptions:
    model: str = option("builtin", help="builtin, a diffusers folder, a .safetensors checkpoint or a hub id")
    allow_pickle: bool = option(False, help="allow .ckpt/.pt/.bin checkpoints (read with weights_only=True)")
    judge: str | None = option(None, help="shapes judge folder (default: the one shipped with egaku)")
    out: str = option("outputs/adherence.json", help="JSON report path (a contact sheet is written beside it)")
    seen_prompts: int = option(100, help="prompts from training combinations")
    held_out_prompts: int = option(100, help="prompts from held-out colour+shape pairs")
    star_prompts: int = option(50, help="prompts with the never-trained star (reported separately)")
    steps: int = option(20, help="denoising steps")
    guidance_scale: float | None = option(None, help="classifier-free guidance scale (default: egaku generate's "
                                          "for this model: 3 for the built-in model, else 7.5)")
    sampler: str = option(DEFAULT_SAMPLER, help=f"one of {', '.join(SAMPLERS)}")
    batch_size: int = option(8, help="images denoised together")
    seed: int = option(0, help="seed of the first image; image i uses seed+i")
    device: str = option("auto", help="auto, cpu, cuda or mps", choices=["auto", "cpu", "cuda", "mps"])
    threads: int = option(2, help="torch CPU threads")

    def __post_init__(self) -> None:
        # refused here, before minutes of generating: 0 steps would score undenoised noise, and no prompts
        # would write an empty report
        counts = {"seen_prompts": self.seen_prompts, "held_out_prompts": self.held_out_prompts,
                  "star_prompts": self.star_prompts}
        for name, value in counts.items():
            if value < 0:
                raise EgakuError(f"--{name.replace('_', '-')} must be 0 or more, got {value}", param=name)
        if not any(counts.values()):
            raise EgakuError("--seen-prompts, --held-out-prompts and --star-prompts are all 0: ask for at least one "
                             "prompt (e.g. --seen-prompts 100)", param="seen_prompts")
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size)):
            if value < 1:
                raise EgakuError(f"--{name.replace('_', '-')} must be at least 1, got {value}", param=name)
        canonical_sampler(self.sampler)  # an unknown name is an error that lists the samplers


def prompt_set(split: str, n: int) -> list[shapes.ShapeSpec]:
    """The fixed prompts of ``split`` (seen, held_out or star); the same for every model."""
    if split not in _SPLIT_SOURCE:
        raise EgakuError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return shapes.sample_attributes(n, PROMPT_SEED + SPLITS.index(split), _SPLIT_SOURCE[split])


@torch.no_grad()
def generate_images(pipe, prompts: list[str], steps: int = 20, guidance_scale: float = 7.5,
                    sampler: str = DEFAULT_SAMPLER, seed: int = 0, batch_size: int = 8,
                    size: int | None = None) -> list[Image.Image]:
    """One image per prompt, image i seeded ``seed + i``, with a fresh scheduler of ``sampler``. Prompts are read
    as ``egaku generate`` reads them: A1111's emphasis, e.g. ``"a small red (star:1.3)"``, and more than 77 tokens."""
    from diffusers import StableDiffusionPipeline

    runner = sampling_runner(pipe, StableDiffusionPipeline, sampler)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(chunk))]
        kwargs = {"height": size, "width": size} if size else {}
        texts = [{"prompt": chunk}]
        if any(needs_chunked_encoding(pipe.tokenizer, p) for p in chunk):
            pairs = [encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, p, "") for p in chunk]
            if len({positive.shape for positive, _ in pairs}) == 1:
                texts = [{"prompt_embeds": torch.cat([positive for positive, _ in pairs]),
                          "negative_prompt_embeds": torch.cat([negative for _, negative in pairs])}]
            else:  # prompts of different chunk counts cannot share a batch
                texts = [{"prompt_embeds": positive, "negative_prompt_embeds": negative} for positive, negative in pairs]
        for k, text in enumerate(texts):
            batch_gens = gens if len(texts) == 1 else gens[k:k + 1]
            out = runner(**text, num_inference_steps=steps, guidance_scale=guidance_scale, generator=batch_gens,
                         **kwargs)
            images.extend(out.images)
    return images


def judge_images(judge: ShapesJudge, images: list[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    side = shapes.SIZE
    arr = np.stack([np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
                               if im.size != (side, side) else im.convert("RGB")) for im in images])
    return judge.predict(arrays_to_tensor(arr))


def score(preds: dict[str, np.ndarray], specs: list[shapes.ShapeSpec]) -> dict:
    truth = label_arrays(specs)
    correct = {name: preds[name] == truth[name] for name in truth}
    every = np.all(np.stack(list(correct.values())), axis=0)

    def shape_accuracy(groups: dict[str, np.ndarray]) -> dict[str, float]:
        """Shape accuracy within each group (a mask over the images) that holds any image."""
        return {name: round(float(correct["shape"][mask].mean()), 4) for name, mask in groups.items() if mask.any()}

    # a small shape spans about 4x4 latent pixels: where a weak model loses the shape first; by size and shape
    # and by background show which (small triangles and gray backgrounds, for the built-in model)
    shape_by_size = shape_accuracy({size: truth["size"] == k for k, size in enumerate(shapes.SIZES)})
    shape_by_shape = shape_accuracy({f"{size} {name}": (truth["size"] == k) & (truth["shape"] == j)
                                     for (k, size), (j, name) in itertools.product(enumerate(shapes.SIZES),
                                                                                   enumerate(shapes.SHAPES))})
    shape_by_background = shape_accuracy({name: truth["background"] == j for j, name in enumerate(shapes.BACKGROUNDS)})
    # what each prompted shape was read as when it was wrong (a star drawn as a blob reads as a diamond)
    shape_read_as = {}
    for j, name in enumerate(shapes.SHAPES):
        wrong = preds["shape"][(truth["shape"] == j) & ~correct["shape"]]
        if wrong.size:
            shape_read_as[name] = {shapes.SHAPES[int(k)]: int(c) for k, c in zip(*np.unique(wrong, return_counts=True))}
    return {
        "n": len(specs),
        "per_attribute": {name: round(float(c.mean()), 4) for name, c in correct.items()},
        "all_attributes": round(float(every.mean()), 4),
        "shape_by_size": shape_by_size,
        "shape_by_shape": shape_by_shape,
        "shape_by_background": shape_by_background,
        "shape_read_as": shape_read_as,
    }


def measure_prompts(pipe, specs: list[shapes.ShapeSpec], judge: ShapesJudge | None = None,
                    prompts: list[str] | None = None, steps: int = 20, guidance_scale: float = 7.5,
                    sampler: str = DEFAULT_SAMPLER, seed: int = 0, batch_size: int = 8) -> dict:
    """Generate from ``prompts`` (default: each spec's caption) and score against ``specs``.

    Returns the score dict plus ``images`` (PIL) and ``features`` (judge features, for Fréchet distances).
    ``prompts`` lets a caller add a trigger word while the judge still checks the spec's attributes.
    """
    judge = judge or load_judge()
    prompts = prompts or [s.caption for s in specs]
    if len(prompts) != len(specs):
        raise EgakuError(f"got {len(prompts)} prompts for {len(specs)} attribute sets; give one prompt per set")
    images = generate_images(pipe, prompts, steps, guidance_scale, sampler, seed, batch_size)
    preds, feats = judge_images(judge, images)
    return {**score(preds, specs), "images": images, "features": feats}


def concept_prompts(shape: str, n: int, prompt_template: str = "{caption}", shape_weight: float = 1.0,
                    shape_text: str | None = None) -> tuple[list[shapes.ShapeSpec], list[str]]:
    """The ``n`` fixed prompts of one shape and their attribute sets. ``shape_text`` is written where the shape's
    word stands (default: the word). ``shape_weight`` other than 1 writes it with A1111's emphasis, ``(star:1.3)``:
    the weight a user gives a concept a LoRA taught weakly."""
    if shape not in shapes.SHAPES:
        raise EgakuError(f"unknown shape {shape!r}; choose from {', '.join(shapes.SHAPES)}")
    rng = np.random.default_rng(PROMPT_SEED + 97)
    pool = shapes.all_specs((shape,))
    specs = [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]
    text = shape_text or shape
    text = text if shape_weight == 1 else f"({text}:{shape_weight:g})"
    captions = [re.sub(rf"\b{shape}\b", text, s.caption) for s in specs]
    return specs, [prompt_template.format(caption=c) for c in captions]


def measure_concept(pipe, shape: str = "star", n: int = 40, judge: ShapesJudge | None = None,
                    prompt_template: str = "{caption}", shape_weight: float = 1.0, shape_text: str | None = None,
                    **kwargs) -> dict:
    """Adherence on ``n`` fixed prompts of one shape (e.g. the star a LoRA was trained on).

    ``prompt_template`` may wrap the caption, e.g. ``"sks, {caption}"``; ``shape_weight`` emphasises the shape's
    word and ``shape_text`` stands for it (see ``concept_prompts``). Returns per-attribute and all-attributes accuracy (no images), so before/after
    a LoRA can be compared on the same prompts.
    """
    specs, prompts = concept_prompts(shape, n, prompt_template, shape_weight, shape_text)
    result = measure_prompts(pipe, specs, judge=judge, prompts=prompts, **kwargs)
    return {k: v for k, v in result.items() if k not in ("images", "features")}


def evaluate_adherence(pipe, opts: AdherenceOptions, judge: ShapesJudge | None = None) -> tuple[dict, dict]:
    """(report, images by split) for ``pipe`` on the fixed prompt set."""
    from ..models.loading import recommended_guidance

    judge = judge or load_judge(opts.judge)
    if opts.guidance_scale is None:
        opts = dataclasses.replace(opts, guidance_scale=recommended_guidance(pipe))
    counts = {"seen": opts.seen_prompts, "held_out": opts.held_out_prompts, "star": opts.star_prompts}
    report: dict = {"settings": {k: v for k, v in to_dict(opts).items() if k not in ("out", "threads")}}
    images_by_split, gen_feats, real_feats, real_feats_2 = {}, [], [], []
    started = time.perf_counter()
    n_images = 0
    for i, split in enumerate(SPLITS):
        specs = prompt_set(split, counts[split])
        if not specs:
            continue
        result = measure_prompts(pipe, specs, judge, steps=opts.steps, guidance_scale=opts.guidance_scale,
                                 sampler=opts.sampler, seed=opts.seed + 100_000 * i, batch_size=opts.batch_size)
        images_by_split[split] = result.pop("images")
        feats = result.pop("features")
        n_images += len(specs)
        report[split] = result
        print(f"{split}: all-attributes {result['all_attributes']:.3f} " +
              " ".join(f"{k} {v:.3f}" for k, v in result["per_attribute"].items()), file=sys.stderr)
        if split != "star":  # the distance is about the trained world
            gen_feats.append(feats)
            # real renders of the same prompts (fresh jitter), and a second independent set as the floor
            for seed_offset, sink in ((1, real_feats), (2, real_feats_2)):
                real = [shapes.render(dataclasses.replace(s, **_jitter(k, seed_offset))) for k, s in enumerate(specs)]
                sink.append(judge_images(judge, real)[1])
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["images"] = n_images
    if gen_feats and sum(len(f) for f in gen_feats) >= 2:
        g, r, r2 = np.concatenate(gen_feats), np.concatenate(real_feats), np.concatenate(real_feats_2)
        report["frechet_distance"] = {
            "generated_vs_real": round(frechet_distance(g, r), 3),
            "real_vs_real": round(frechet_distance(r2, r), 3),
            "features": f"ShapesJudge penultimate layer ({g.shape[1]}-d), {len(g)} images per set",
        }
    return report, images_by_split


def _jitter(k: int, offset: int) -> dict:
    rng = np.random.default_rng(PROMPT_SEED * 31 + offset * 7_919 + k)
    dx, dy = rng.uniform(-shapes.JITTER, shapes.JITTER, size=2)
    return {"dx": float(dx), "dy": float(dy), "angle": float(rng.uniform(-10, 10))}


def eval_adherence_command(opts: AdherenceOptions) -> None:
    from ..models.loading import check_model_source, load_pipeline

    # 1. Check inputs (the options checked themselves) and where the report goes, before any loading or generating
    out = check_output(opts.out, folder=False)
    if out.suffix.lower() == ".png":
        raise EgakuError(f"--out {out} ends in .png, the name of the contact sheet written beside the report, which "
                         f"would replace it; give the report a .json name, such as {out.with_suffix('.json')}",
                         param="out")
    check_output(out.with_suffix(".png"), folder=False)  # the contact sheet
    check_model_source(opts.model, opts.allow_pickle)  # a missing model, or a pickle without --allow-pickle
    torch.set_num_threads(max(1, opts.threads))
    judge = load_judge(opts.judge)
    pipe = load_pipeline(opts.model, device=opts.device, dtype="float32", allow_pickle=opts.allow_pickle)
    report, images = evaluate_adherence(pipe, opts, judge)
    report["model"] = opts.model
    report_path = Path(opts.judge or "") / "report.json" if opts.judge else None
    from .judges import BUILTIN_JUDGE

    report_path = report_path or BUILTIN_JUDGE / "report.json"
    if report_path.is_file():
        report["judge_accuracy_on_renders"] = json.loads(report_path.read_text()).get("test_accuracy")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    sheet = [im for split in SPLITS for im in images.get(split, [])[:16]]
    if sheet:
        image_grid(sheet, cols=16).save(out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in report if k in (*SPLITS, "frechet_distance")}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
