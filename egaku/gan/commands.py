"""`egaku sample-gan`: images and a grid from a trained GAN generator."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import option, save_config
from ..data.digits import resize_batch
from ..data.images import image_grid, to_pil_images
from ..errors import EgakuError
from ..paths import check_output
from ..training.runtime import config_writer
from .models import ARCHITECTURES, generator_dir, load_generator


def _written_by(run: Path) -> str | None:
    """The trainer (train-ldm, train-gan, train-lora) whose options ``run`` holds (config.json; train-lora's run
    folder: training_config.json), if any."""
    for name in ("config.json", "training_config.json"):
        try:
            saved = json.loads((run / name).read_text())
        except (OSError, ValueError):
            continue
        found = config_writer(saved)
        if found:
            return found
    return None


def gan_folder(model: str | Path) -> Path:
    """``generator_dir``, with a diffusion model given where a GAN goes (a train-ldm run, its model/ folder, a
    train-lora run) named as what it is and sent to the commands that read it. Reads no weights."""
    try:
        return generator_dir(model)
    except EgakuError:
        path = Path(model)
        checkpoint = (path / "state.pt").is_file()  # RUN/checkpoints/step-N
        run = path.parent.parent if checkpoint else path
        pipeline = path if (path / "model_index.json").is_file() else run / "model"
        writer = _written_by(path)
        if (pipeline / "model_index.json").is_file() and (pipeline == path or writer in (None, "train-ldm")):
            what = ("a diffusers pipeline folder" if pipeline == path else
                    "a train-ldm checkpoint" if checkpoint else "a train-ldm run")
            it = "its run's model" if checkpoint else "it"
            raise EgakuError(f"{path} is {what} (a diffusion model, not a GAN); generate from {it} with `egaku "
                             f"generate --model {pipeline}`, or score {it} with `egaku eval adherence --model "
                             f"{pipeline}`") from None
        if writer == "train-ldm":
            raise EgakuError(f"{path} is a train-ldm {'checkpoint' if checkpoint else 'run'} (a diffusion model, not "
                             f"a GAN) whose model is not written yet; when train-ldm finishes, generate with `egaku "
                             f"generate --model {pipeline}` or score it with `egaku eval adherence --model "
                             f"{pipeline}`") from None
        if writer == "train-lora":
            raise EgakuError(f"{path} is a train-lora run (a LoRA for a diffusion model, not a GAN); apply it with "
                             f"`egaku generate --lora {path}`") from None
        raise


def resolve_label(class_names: list[str] | None, digit: str | None, model: str) -> int | None:
    """The class index for ``--digit`` (None: unconditional, or every class in turn)."""
    if digit is None:
        return None
    if not class_names:
        raise EgakuError(f"{model} is an unconditional GAN, so --digit {digit} cannot be honoured; "
                         "drop --digit, or train with `egaku train-gan --conditional`")
    if digit not in class_names:
        raise EgakuError(f"--digit {digit} is not one of the labels this model was trained on "
                         f"({', '.join(class_names)}); pick one of those")
    return class_names.index(digit)


@torch.no_grad()
def sample_gan(gen: torch.nn.Module, n: int, seed: int = 0, label: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images from seeded latent vectors; conditional models get ``label`` or every class in turn."""
    z = torch.randn(n, gen.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    labels = None
    if gen.num_classes:
        labels = torch.full((n,), label) if label is not None else torch.arange(n) % gen.num_classes
    device = next(gen.parameters()).device
    return gen(z.to(device), None if labels is None else labels.to(device)).cpu(), labels


@dataclass
class SampleGanOptions:
    model: str = option("", help="a train-gan output folder (or its generator/ folder)")
    n: int = option(64, help="number of images", short="-n")
    digit: str | None = option(None, help="class to draw (a conditional model's label, e.g. 7)",
                               aliases=["--label"])
    seed: int = option(0, help="seed for the latent vectors")
    arch: str = option("auto", help="expected architecture; an error if the model is the other one",
                       choices=["auto", *ARCHITECTURES])
    out: str = option("", help="output folder (default: MODEL/samples-gan)")
    cols: int = option(0, help="grid columns (0 = near-square; a conditional model without --digit: one per class)")
    size: int = option(0, help="write the images at this side, scaled bilinearly as train-gan scales the digits "
                               "(0 = the model's own size; e.g. 28 for the 8x8 DCGAN preset)")
    overwrite: bool = option(False, help="replace the images, grid.png and config.json an earlier sample-gan run "
                                         "wrote into --out (without it, such a folder is refused)")


# What sample-gan writes into its folder: 0000.png or 0000-LABEL.png, grid.png, config.json.
_WRITTEN_HERE = re.compile(r"^(\d{4,}(-.+)?\.png|grid\.png|config\.json)$")


def _earlier_run_files(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if _WRITTEN_HERE.match(p.name) and p.is_file())


def sample_gan_command(opts: SampleGanOptions) -> None:
    # 1. Check inputs
    if not opts.model:
        raise EgakuError("sample-gan needs --model DIR, the --out folder of `egaku train-gan`")
    if opts.n < 1:
        raise EgakuError(f"-n {opts.n}: ask for at least one image")
    if opts.size < 0:
        raise EgakuError(f"--size {opts.size}: give a side in pixels, or 0 for the model's own size")
    gan_folder(opts.model)  # a diffusion model, or no model, is named before --out is judged by it
    out = check_output(opts.out if opts.out else Path(opts.model) / "samples-gan")
    gen = load_generator(opts.model, arch=opts.arch)
    label = resolve_label(gen.config.class_names, opts.digit, opts.model)
    # An earlier run's images would be mixed with these (its 0001-cats.png beside a 0001-dogs.png) and its
    # grid.png replaced; numbering on would still replace its grid and config, so the folder is refused.
    earlier = _earlier_run_files(out)
    if earlier and not opts.overwrite:
        raise EgakuError(f"{out} already holds the images of an earlier sample-gan run ({earlier[0].name} and "
                         f"{len(earlier) - 1} more); pass --overwrite to replace them, or choose another --out")
    # 2. Sample
    images, labels = sample_gan(gen, opts.n, opts.seed, label)
    if opts.size:
        images = resize_batch(images, opts.size).clamp(-1, 1)
    # 3. Write images, grid and the options used (--overwrite: in place of the earlier run's; other files stay)
    for path in earlier:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    pil = to_pil_images(images)
    names = gen.config.class_names
    for i, im in enumerate(pil):
        tag = f"-{names[int(labels[i])]}" if labels is not None else ""
        im.save(out / f"{i:04d}{tag}.png")
    cols = opts.cols or (gen.num_classes if labels is not None and label is None else None)
    image_grid(pil, cols=cols).save(out / "grid.png")
    save_config(opts, out / "config.json")
    print(f"wrote {len(pil)} images and grid.png to {out}")
