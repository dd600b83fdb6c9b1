"""Real handwritten digits for the GANs, and image folders turned into the same tensors.

The default data is scikit-learn's digits (Alpaydin & Kaynak, UCI): 1,797 real scans of handwritten
digits at 8x8, 17 grey levels, that ship inside the scikit-learn package, so training and tests need no
download. They are scaled to the model's size with bilinear interpolation and mapped to [-1, 1] with the
ink bright (as in MNIST), matching the generators' tanh output.

One fixed, stratified split is used everywhere: GANs and the digit classifier train on ``train``; the
evaluation compares against ``test``, which no model has seen.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import EgakuError
from .folder import scan_image_folder

DIGIT_LABELS = [str(d) for d in range(10)]
SPLIT_SEED = 0  # fixed forever: changing it would let models train on what earlier runs held out
TEST_FRACTION = 0.2


@dataclass
class ImageSet:
    """Images in [-1, 1] (N, C, H, W), integer labels (N,) and the name of each label."""

    images: torch.Tensor
    labels: torch.Tensor
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: the same fraction of every digit is held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) images to size x size; identity when already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    antialias = images.shape[-1] > size  # only needed when shrinking
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def load_digits_split(split: str = "train", image_size: int = 28) -> ImageSet:
    """scikit-learn's real digits, ``train`` (80%), ``test`` (20%, held out) or ``all``, at image_size."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = digits.images.astype(np.float32) / 16.0  # 0 = paper, 1 = full ink
    if split != "all":
        train_idx, test_idx = _split_indices(labels)
        keep = train_idx if split == "train" else test_idx
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images).unsqueeze(1)
    x = resize_batch(x, image_size).clamp(0, 1) * 2 - 1
    return ImageSet(x, torch.from_numpy(labels), list(DIGIT_LABELS), f"digits:{split}")


def load_image_folder(root: str | Path, image_size: int, channels: int, conditional: bool) -> ImageSet:
    """An ImageFolder tree (``root/<class>/*.png``); class folders become labels."""
    scan = scan_image_folder(root, min_images=0)
    if not scan.items:
        print(scan.report(), file=sys.stderr)  # before the error, so that the error is the last line read
        raise EgakuError(f"--data {root}: no usable images found; put images in class folders "
                         f"({root}/<class>/*.png) or use --data digits")
    for path, reason in scan.skipped:  # a run that goes ahead still says what it left out, as train-lora does
        print(f"skipped {scan.shown_path(path)}: {reason}")
    names = scan.classes
    if conditional:
        loose = [i.path for i in scan.items if i.label is None]
        if loose:
            lie = "lies" if len(loose) == 1 else "lie"
            raise EgakuError(f"--conditional needs every image in a class folder, but {len(loose)} {lie} directly in "
                             f"{root} (e.g. {loose[0].name}); move them into {root}/<class>/ or drop --conditional")
        if len(names) < 2:
            found = f"only the class {names[0]!r}" if names else "no class folders"
            raise EgakuError(f"--conditional needs at least two classes, but {root} has {found}; "
                             "add more class folders or train without --conditional")
    mode = "L" if channels == 1 else "RGB"
    arrays, labels = [], []
    for item in scan.items:
        with scan.load(item) as img:
            img = img.convert(mode)
            # centre-crop to a square so digits and faces keep their proportions
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.LANCZOS)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        labels.append(names.index(item.label) if item.label is not None else 0)
    x = torch.from_numpy(np.stack(arrays)) * 2 - 1
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), names or ["all"], str(root))


def load_gan_data(data: str, image_size: int, channels: int, conditional: bool) -> ImageSet:
    """``digits`` (the training split of the real digits) or a folder path."""
    if data == "digits":
        if channels != 1:
            raise EgakuError("--data digits is greyscale; use --channels 1 (or an RGB image folder)")
        return load_digits_split("train", image_size)
    return load_image_folder(data, image_size, channels, conditional)
