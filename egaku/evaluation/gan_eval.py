"""`egaku eval gan`: score a GAN's samples with a digit classifier trained by our own code.

The judge is a small CNN trained on the training split of scikit-learn's real digits (the split the GANs
train on), checked on the held-out split. With no Inception weights available offline, its penultimate
features stand in for Inception's in the Fréchet distance, so distances compare only within one judge.

Metrics over generated samples (conditional models are asked for every class equally often):
- confident fraction: share of samples the judge classifies with probability > 0.9;
- class coverage: normalised entropy of the predicted classes (1 = all digits equally, 0 = one digit);
- conditional accuracy: share classified as the digit that was asked for (conditional models);
- Fréchet distance between judge features of the samples and of the held-out real digits, reported
  beside the real-vs-real value (training digits against held-out digits, same sample count).

A judge trained only on digits is confidently wrong on noise (any input lands somewhere); trained with
Outlier Exposure (Hendrycks et al. 2019: cross-entropy towards the uniform distribution on non-digit
images, here pixel noise and blurred blobs) its confidence means "looks like this digit".
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..config import option, save_config
from ..data.digits import DIGIT_LABELS, load_digits_split, resize_batch
from ..errors import EgakuError
from ..gan.commands import gan_folder
from ..gan.models import load_generator
from ..paths import check_output
from .metrics import class_coverage, frechet_distance

JUDGE_SIZE = 28
CONFIDENCE = 0.9


class DigitClassifier(ModelMixin, ConfigMixin):
    """Conv(3x3) → ReLU → pool → Conv(3x3) → ReLU → pool → Dense(feature_dim) → ReLU → Dense(10)."""

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 64, image_size: int = JUDGE_SIZE, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass
class JudgeRecipe:
    """How the judge is trained; a cached judge is reused only when its recipe is the same."""

    width: int = 32
    feature_dim: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    max_shift: int = 2  # pixels of random translation: handwriting is not centred exactly
    outlier_weight: float = 0.5
    seed: int = 0


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) batch in [-1, 1] → greyscale at the judge's size."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[1] != 1:
        images = images.mean(1, keepdim=True)
    return resize_batch(images.float(), JUDGE_SIZE).clamp(-1, 1)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    n, size = len(x), x.shape[-1]
    d = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen).float() * 2 / size
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = d
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # shifted-in border is paper (-1)


def outlier_images(n: int, gen: torch.Generator, size: int = JUDGE_SIZE) -> torch.Tensor:
    """Non-digits: half pixel noise, half blurred blobs (upsampled 4x4..7x7 noise)."""
    half = n // 2
    pixels = torch.rand(half, 1, size, size, generator=gen) * 2 - 1
    low = int(torch.randint(4, 8, (1,), generator=gen))
    blobs = torch.rand(n - half, 1, low, low, generator=gen) * 2 - 1
    blobs = F.interpolate(blobs, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([pixels, blobs])


def train_digit_classifier(recipe: JudgeRecipe = JudgeRecipe(), log=print) -> tuple[DigitClassifier, float]:
    """Train the judge on the digits' training split; return it with its held-out accuracy."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    train, test = load_digits_split("train", JUDGE_SIZE), load_digits_split("test", JUDGE_SIZE)
    model = DigitClassifier(width=recipe.width, feature_dim=recipe.feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            x = _shift(train.images[idx], recipe.max_shift, gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            if recipe.outlier_weight:
                # Outlier Exposure: push non-digits towards the uniform distribution over classes
                logp = F.log_softmax(model(outlier_images(len(idx), gen)), dim=1)
                loss = loss - recipe.outlier_weight * logp.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
    log(f"digit judge: held-out accuracy {accuracy:.4f} on {len(test)} real digits")
    return model, accuracy


def default_judge_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "egaku" / "digit-judge"


def cached_judge_report(folder: Path, recipe: JudgeRecipe = JudgeRecipe()) -> dict | None:
    """The training report of the judge in ``folder`` when it was trained with ``recipe`` (then it is only read,
    not written); None otherwise."""
    try:
        report = json.loads((folder / "training.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("recipe") == recipe.__dict__ else None


def load_or_train_judge(folder: str | Path | None = None, recipe: JudgeRecipe = JudgeRecipe(),
                        log=print) -> tuple[DigitClassifier, float]:
    """The cached judge in ``folder`` when it was trained with ``recipe``; otherwise train and save it."""
    folder = Path(folder) if folder else default_judge_dir()
    report = cached_judge_report(folder, recipe)
    if report is not None:
        return DigitClassifier.from_pretrained(folder).eval(), float(report["held_out_accuracy"])
    wanted = recipe.__dict__
    log(f"training the digit judge (once; cached in {folder})")
    model, accuracy = train_digit_classifier(recipe, log=log)
    model.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"recipe": wanted, "held_out_accuracy": accuracy,
                                       "trained_by": "egaku.evaluation.gan_eval.train_digit_classifier"}, indent=2))
    return model, accuracy


@torch.no_grad()
def judge_outputs(judge: DigitClassifier, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, features) for a batch of images in [-1, 1]."""
    judge.eval()
    probs, feats = [], []
    for start in range(0, len(images), batch):
        x = prepare_images(images[start:start + batch])
        f = judge.features(x)
        feats.append(f.numpy())
        probs.append(F.softmax(judge.head(f), dim=1).numpy())
    return np.concatenate(probs), np.concatenate(feats).astype(np.float64)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    # ReLU features include units that never fire on digits, so the covariances are singular and scipy's
    # sqrtm warns on every call; its result stays finite (frechet_distance falls back to an eps offset when
    # it is not), so the warning would only bury the report
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Matrix is singular")
        return frechet_distance(a, b)


def score_samples(judge: DigitClassifier, images: torch.Tensor, reference_features: np.ndarray,
                  requested: torch.Tensor | None = None) -> dict:
    """The metrics above for one set of images; ``requested`` = the digit asked for each image."""
    probs, feats = judge_outputs(judge, images)
    predicted = probs.argmax(1)
    result = {
        "n": int(len(images)),
        "confident_fraction": float((probs.max(1) > CONFIDENCE).mean()),
        "class_coverage": class_coverage(predicted, 10) + 0.0,  # + 0.0: one class gives -0.0
        "conditional_accuracy": None,
        "frechet_distance": _frechet(feats, reference_features),
        "predicted_counts": np.bincount(predicted, minlength=10).tolist(),
    }
    if requested is not None:
        result["conditional_accuracy"] = float((predicted == requested.numpy()).mean())
    return result


def real_reference(judge: DigitClassifier, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Held-out real features (the Fréchet reference) and the ceiling row (n: training digits, at most 1,438).

    The ceiling is the held-out digits scored like samples; its Fréchet distance, which would be 0
    against itself, is the real-vs-real value: n training digits against the held-out digits.
    """
    test = load_digits_split("test", JUDGE_SIZE)
    train = load_digits_split("train", JUDGE_SIZE)
    _, reference = judge_outputs(judge, test.images)
    ceiling = score_samples(judge, test.images, reference, requested=test.labels)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    _, train_feats = judge_outputs(judge, train.images[pick])
    ceiling["frechet_distance"] = _frechet(train_feats, reference)
    ceiling["frechet_n"] = int(len(pick))
    return reference, ceiling


def noise_floor(judge: DigitClassifier, reference: np.ndarray, n: int, seed: int = 1) -> dict:
    """Uniform pixel noise scored like samples (requested digits drawn at random)."""
    gen = torch.Generator().manual_seed(seed + 12345)  # not the judge's outlier stream
    noise = torch.rand(n, 1, JUDGE_SIZE, JUDGE_SIZE, generator=gen) * 2 - 1
    return score_samples(judge, noise, reference, requested=torch.randint(0, 10, (n,), generator=gen))


@torch.no_grad()
def sample_for_eval(gen: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples; a conditional model is asked for each of its classes in turn."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, gen.config.latent_dim, generator=g)
    labels = torch.arange(n) % gen.num_classes if gen.num_classes else None
    images = torch.cat([gen(z[i:i + 500], None if labels is None else labels[i:i + 500]) for i in range(0, n, 500)])
    return images, labels


def check_judgeable(gen: nn.Module, model: str) -> None:
    """Refuse a generator the digit judge cannot score: conditional on classes that are not digits, or
    unconditional and in colour (greyscale digits are all the judge knows; averaging colour images to grey
    would score whatever they show as digits)."""
    names = list(gen.config.class_names or []) if gen.num_classes else []
    if names and not set(names) <= set(DIGIT_LABELS):
        raise EgakuError(f"eval gan judges handwritten digits, but {model}'s classes are {names}; "
                         "evaluate a model trained with --data digits (or on digit class folders 0..9)")
    if not names and gen.config.channels != 1:
        raise EgakuError(f"eval gan judges greyscale handwritten digits, but {model} is an unconditional model of "
                         f"{gen.config.channels}-channel images, which are not the digits; evaluate a model trained "
                         "with --data digits (or, in colour, conditional on digit class folders 0..9)")


def digit_targets(gen: nn.Module, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Map a conditional model's class indices to the digits they name (``check_judgeable`` passed)."""
    if labels is None:
        return None
    names = list(gen.config.class_names or [])
    return torch.tensor([int(names[i]) for i in labels])


def collapse_warning(result: dict, threshold: float) -> str | None:
    if result["class_coverage"] >= threshold:
        return None
    counts = result["predicted_counts"]
    top = sorted(range(10), key=lambda d: -counts[d])[:3]
    return (f"possible mode collapse: class coverage {result['class_coverage']:.3f} is under {threshold}; "
            f"most samples look like {', '.join(f'{d} ({counts[d]})' for d in top)}")


def evaluate_generator(gen: nn.Module, judge: DigitClassifier, reference: np.ndarray, n: int, seed: int) -> dict:
    check_judgeable(gen, "the model")
    images, labels = sample_for_eval(gen, n, seed)
    return score_samples(judge, images, reference, requested=digit_targets(gen, labels))


@dataclass
class EvalGanOptions:
    model: str = option("", help="a train-gan output folder (or its generator/ folder)")
    n: int = option(1000, help="samples to generate and score (conditional models: every digit equally)", short="-n")
    seed: int = option(0, help="seed for the latent vectors")
    judge_dir: str = option("", help="where the digit judge is cached (trained there on first use); "
                                     "default ~/.cache/egaku/digit-judge")
    collapse_threshold: float = option(0.9, help="warn of mode collapse when class coverage is under this")
    out: str = option("", help="JSON file for the results (default: MODEL/eval-gan.json)")


def eval_gan_command(opts: EvalGanOptions) -> None:
    # 1. Check inputs and load the generator
    if not opts.model:
        raise EgakuError("eval gan needs --model DIR, the --out folder of `egaku train-gan`")
    if opts.n < 10:
        raise EgakuError(f"-n {opts.n} is too few to estimate coverage and a Fréchet distance; use at least 10")
    gan_folder(opts.model)  # a diffusion model, or no model, is named before --out is judged by it
    out = check_output(opts.out if opts.out else Path(opts.model) / "eval-gan.json", folder=False)
    check_output(out.with_name(out.stem + ".config.json"), folder=False)  # the options, written beside it
    judge_dir = Path(opts.judge_dir) if opts.judge_dir else default_judge_dir()
    if cached_judge_report(judge_dir) is None:  # trained and written there: where it is only read, it need not be writable
        check_output(judge_dir, "--judge-dir")
    gen = load_generator(opts.model)
    check_judgeable(gen, opts.model)  # before the judge, which may first train for minutes
    # 2. The judge and the real-digit reference
    judge, accuracy = load_or_train_judge(opts.judge_dir or None)
    reference, ceiling = real_reference(judge, opts.n, seed=opts.seed)
    # 3. Score the samples
    result = evaluate_generator(gen, judge, reference, opts.n, opts.seed)
    result["frechet_ratio_to_real"] = result["frechet_distance"] / max(ceiling["frechet_distance"], 1e-12)
    warning = collapse_warning(result, opts.collapse_threshold)
    report = {"model": str(opts.model), "judge_held_out_accuracy": accuracy, "samples": result,
              "real_digits": ceiling, "mode_collapse_warning": warning}
    # 4. Report
    rows = [("confident fraction", "confident_fraction"), ("class coverage", "class_coverage"),
            ("conditional accuracy", "conditional_accuracy"), ("Fréchet distance", "frechet_distance")]
    print(f"judge held-out accuracy: {accuracy:.4f}")
    print(f"{'metric':<22}{'samples':>10}{'real digits':>13}")
    for title, key in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{title:<22}{fmt(result[key]):>10}{fmt(ceiling[key]):>13}")
    print(f"predicted digits: {result['predicted_counts']}")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    save_config(opts, out.with_name(out.stem + ".config.json"))
    print(f"wrote {out}")
