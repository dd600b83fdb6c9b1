"""Aspect-ratio bucketing: train on images at (close to) their own shape, no distortion, no forced square.

The NovelAI/kohya scheme: a set of bucket sizes whose sides are multiples of ``step`` (what the VAE and
UNet downsampling need) and whose area is at most ``resolution**2``, from ``max_ratio``:1 landscape to
1:``max_ratio`` portrait. Each image goes to the bucket with the nearest log aspect ratio, is scaled so it
covers the bucket and is centre-cropped by the few pixels left over. A batch only holds images of one
bucket, so nothing is padded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes, multiples of ``step``, area <= resolution**2, aspect within max_ratio."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of {step}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_ratio:
        height = min((area // width) // step * step, int(resolution * max_ratio) // step * step)
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size`` in log space; ties go to the larger area."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale ``img`` (keeping its aspect) to cover ``bucket`` and centre-crop the overflow."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    w, h = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (w - bw) // 2, (h - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


@dataclass
class BucketBatches:
    """Item indices grouped by bucket, cut into fixed-size batches in a seeded order per epoch."""

    bucket_of: list[tuple[int, int]]  # bucket of item i
    batch_size: int
    seed: int = 0
    drop_last: bool = False

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch; the same (seed, epoch) always gives the same list (exact resume)."""
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            groups.setdefault(bucket, []).append(index)
        out: list[list[int]] = []
        for bucket in sorted(groups):
            items = groups[bucket]
            rng.shuffle(items)
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        rng.shuffle(out)
        self._cached = (epoch, out)  # the loop asks once per micro-batch
        return out
