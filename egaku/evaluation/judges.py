"""Judges: small classifiers trained by our own code that score generated images.

``ShapesJudge`` reads a 64x64 image of the ``shapes`` world and predicts each attribute (shape, star
included; colour; size; position; background) with one head per attribute on a shared CNN trunk. Its
penultimate features stand in for Inception features in a Fréchet distance (values compare only
within one judge). It trains on rendered images with mild noise and blur, so that it reads the slightly
soft images a diffusion model draws the way it reads clean renders; its accuracy is measured on fresh
renders from another seed.

Train the shipped judge (about two minutes on two cores)::

    python -m egaku.evaluation.judges --out egaku/models/builtin/shapes-judge
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..config import option, save_config
from ..data import shapes
from ..data.images import arrays_to_tensor
from ..errors import EgakuError, NotFoundError

BUILTIN_JUDGE = Path(__file__).resolve().parent.parent / "models" / "builtin" / "shapes-judge"


class ShapesJudge(ModelMixin, ConfigMixin):
    """A CNN with one classification head per attribute of the shapes world.

    Input: images in [-1, 1], shape [B, 3, 64, 64]. ``forward`` returns ``{attribute: logits}``;
    ``features`` returns the shared penultimate vector.
    """

    @register_to_config
    def __init__(self, attributes: dict[str, list[str]] | None = None, channels: tuple[int, ...] = (32, 64, 128, 128),
                 feature_dim: int = 256, image_size: int = 64):
        super().__init__()
        attributes = attributes or {k: list(v) for k, v in shapes.ATTRIBUTES.items()}
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            # each stage halves the resolution first (cheap on CPU); all but the first then look again
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            if i > 0:
                layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        # Flatten rather than pool: position is an attribute, so the head must see where things are.
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes)) for name, classes in attributes.items()})

    @property
    def attributes(self) -> dict[str, list[str]]:
        return dict(self.config.attributes or {k: list(v) for k, v in shapes.ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.trunk(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(attribute -> predicted class indices, features) for images in [-1, 1]."""
        self.eval()
        preds: dict[str, list[np.ndarray]] = {name: [] for name in self.heads}
        feats = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].float()
            f = self.features(x)
            feats.append(f.numpy())
            for name, head in self.heads.items():
                preds[name].append(head(f).argmax(1).numpy())
        return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)


def label_arrays(specs: list[shapes.ShapeSpec]) -> dict[str, np.ndarray]:
    labels = [s.labels() for s in specs]
    return {name: np.array([lab[name] for lab in labels], dtype=np.int64) for name in shapes.ATTRIBUTES}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise: generated images are softer and grainier than renders."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen) * 0.8
    x = x * (1 - mix) + blur * mix
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.08)
    return x.clamp(-1, 1)


@dataclasses.dataclass
class JudgeOptions:
    out: str = option("egaku/models/builtin/shapes-judge", help="folder to save the judge in (safetensors + config)")
    train_images: int = option(20000, help="rendered training images (all attributes, star included)")
    test_images: int = option(4000, help="fresh renders from another seed to measure accuracy on")
    steps: int = option(700, help="optimizer steps")
    width: int = option(32, help="channels of the first stage; later stages have 2x, 4x, 4x")
    batch_size: int = option(128, help="images per step")
    lr: float = option(2e-3, help="peak AdamW learning rate (one-cycle schedule)")
    seed: int = option(0, help="seed of the training renders and of the initialisation")
    threads: int = option(2, help="torch CPU threads")


def evaluate_judge(judge: ShapesJudge, n: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy of ``judge`` on ``n`` fresh renders of the whole world."""
    images, specs = shapes.make_dataset(n, seed, "all")
    preds, _ = judge.predict(arrays_to_tensor(images))
    truth = label_arrays(specs)
    return {name: float((preds[name] == truth[name]).mean()) for name in truth}


def train_shapes_judge(opts: JudgeOptions, progress: bool = True) -> tuple[ShapesJudge, dict]:
    """Train a judge on renders of the whole world; return it with its held-out accuracy report."""
    if opts.train_images < opts.batch_size:
        raise EgakuError(f"--train-images {opts.train_images} is smaller than --batch-size {opts.batch_size}")
    started = time.time()
    torch.manual_seed(opts.seed)
    images, specs = shapes.make_dataset(opts.train_images, opts.seed, "all")
    x_all, y_all = arrays_to_tensor(images), {k: torch.from_numpy(v) for k, v in label_arrays(specs).items()}
    judge = ShapesJudge(attributes={k: list(v) for k, v in shapes.ATTRIBUTES.items()},
                        channels=(opts.width, 2 * opts.width, 4 * opts.width, 4 * opts.width),
                        feature_dim=8 * opts.width)
    optim = torch.optim.AdamW(judge.parameters(), lr=opts.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=opts.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(opts.seed)
    judge.train()
    for step in range(1, opts.steps + 1):
        idx = torch.randint(0, len(x_all), (opts.batch_size,), generator=gen)
        logits = judge(_augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in logits)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        if progress and (step % 100 == 0 or step == opts.steps):
            print(f"judge step {step}/{opts.steps} loss {float(loss.detach()):.4f}", file=sys.stderr, flush=True)
    judge.eval()
    accuracy = evaluate_judge(judge, opts.test_images, opts.seed + 1_000_003)
    report = {"test_accuracy": accuracy, "test_images": opts.test_images, "test_seed": opts.seed + 1_000_003,
              "train_seconds": round(time.time() - started, 1)}
    return judge, report


def save_judge(judge: ShapesJudge, out: str | Path, report: dict | None = None,
               opts: JudgeOptions | None = None) -> Path:
    out = Path(out)
    judge.save_pretrained(out, safe_serialization=True)
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if opts is not None:
        save_config(opts, out / "train_config.json")
    return out


def load_judge(path: str | Path | None = None) -> ShapesJudge:
    """Load a saved judge (default: the shipped one)."""
    path = Path(path) if path else BUILTIN_JUDGE
    if not (path / "config.json").is_file():
        raise NotFoundError(f"no shapes judge at {path}; train one with "
                            f"`python -m egaku.evaluation.judges --out {path}`")
    return ShapesJudge.from_pretrained(path).eval()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..config import add_arguments, build

    parser = argparse.ArgumentParser(prog="python -m egaku.evaluation.judges", description="train the shapes judge",
                                     allow_abbrev=False)  # flags matched whole, as egaku's own commands match them
    add_arguments(parser, JudgeOptions)
    try:
        opts = build(JudgeOptions, vars(parser.parse_args(argv)))
        torch.set_num_threads(opts.threads)
        judge, report = train_shapes_judge(opts)
        save_judge(judge, opts.out, report, opts)
    except EgakuError as exc:
        print(f"egaku: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
