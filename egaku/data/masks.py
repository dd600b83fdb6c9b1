"""Loss masks: where in each training image the loss counts (kohya's masked loss, OneTrainer's masked training).

A mask is a greyscale image with its training image's shape: white trains fully, black not at all, grey in
between (kohya reads the red channel; so do we, which is the same thing for a grey mask). Masks come from a
folder laid out like the data folder (same sub-folder and file name, any image extension: kohya's
``conditioning_data_dir``) or from each image's own transparency (kohya's ``alpha_mask``).

The trainer weighs the squared error of each latent pixel by the mask, brought to the latent grid with the
same bucket crop and flip as its image, and divides by the mask's mean (``masked_mean``): the loss of an
image is the mean over the part it is trained on, so a small subject counts as much as a large one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import EgakuError
from .buckets import fit_to_bucket
from .folder import FolderScan, counted
from .images import IMAGE_SUFFIXES, ImageError, alpha_channel, decode_image, to_rgb


def check_mask_dir(mask_dir: str | Path) -> Path:
    """``--mask-dir`` must be a folder: said before the data is read."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise EgakuError(f"--mask-dir {str(mask_dir)!r} does not exist or is not a folder")
    return mask_dir


def find_mask_files(scan: FolderScan, mask_dir: str | Path) -> list[Path]:
    """The mask of each image of ``scan``: ``mask_dir``/same relative path, the same name or any image extension.
    Every image needs one; the error lists those that have none."""
    mask_dir = check_mask_dir(mask_dir)
    if mask_dir.resolve().is_relative_to(scan.root.resolve()):
        raise EgakuError(f"--mask-dir {str(mask_dir)!r} lies inside --data {str(scan.root)!r}, so its masks would be "
                         "read as training images too; move the masks to a folder beside the data")
    found, missing = [], []
    for item in scan.items:
        rel = item.path.relative_to(scan.root)
        # the same name first, then the other extensions (dict: a .png image's own name is not tried twice)
        candidates = dict.fromkeys([mask_dir / rel] + [(mask_dir / rel).with_suffix(s) for s in sorted(IMAGE_SUFFIXES)])
        present = [c for c in candidates if c.is_file()]
        if len(present) > 1:  # which one was meant is not ours to guess
            raise EgakuError(f"{len(present)} masks in {mask_dir} fit the image {rel}: "
                             f"{', '.join(p.name for p in present)}; keep one")
        path = present[0] if present else None
        if path is None:
            missing.append(str(rel))
        found.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        # kohya's conditioning_data_dir holds one subset's masks side by side; here they mirror the data's class folders
        flat = [rel for rel in missing if "/" in Path(rel).as_posix() and any(
            (mask_dir / Path(rel).name).with_suffix(s).is_file() for s in IMAGE_SUFFIXES)]
        hint = (f"; {len(flat)} of them have a mask of their name at the top of {mask_dir} (kohya's layout): move "
                f"those into the sub-folders of their images, as {mask_dir / flat[0]}" if flat else "")
        raise EgakuError(f"{len(missing)} of {counted(len(scan.items), 'training image')} "
                         f"{'has' if len(missing) == 1 else 'have'} no mask in {mask_dir} "
                         f"(looked for the same sub-folder and name, any image extension): {shown}{hint}. Add their "
                         "masks (white = train, black = leave out), or drop --mask-dir")
    return found


def load_mask(image_path: Path, image_size: tuple[int, int], mask_path: Path | None) -> Image.Image | None:
    """The mask of one image as an 8-bit greyscale image: ``mask_path``'s red channel, or with no path the image's
    transparency (None when it has none: the image trains everywhere). A mask must have its image's shape."""
    source = mask_path or image_path
    try:
        img = decode_image(source)
    except ImageError as exc:
        raise EgakuError(f"mask {exc}") from None
    if mask_path is None:
        return alpha_channel(img)
    if abs(img.width / img.height - image_size[0] / image_size[1]) > 0.01 * image_size[0] / image_size[1]:
        raise EgakuError(f"mask {mask_path} is {img.width}x{img.height} but its image {image_path} is "
                         f"{image_size[0]}x{image_size[1]}: a mask must have its image's shape")
    if img.mode.startswith(("I", "F")):  # 16-bit and float masks scaled to 8 bits, not clipped
        img = to_rgb(img)
    return img.convert("RGB").getchannel("R")  # transparency of a mask file is not read


def latent_mask(mask: Image.Image, bucket: tuple[int, int], flip: bool, factor: int) -> torch.Tensor:
    """A mask cropped to ``bucket`` as its image is, flipped as its image is, averaged over each ``factor`` x
    ``factor`` block: the weight of each latent pixel, (1, height / factor, width / factor) in [0, 1]."""
    arr = np.asarray(fit_to_bucket(mask, bucket), dtype=np.float32) / 255.0
    if flip:
        arr = arr[:, ::-1]
    grid = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    return F.interpolate(grid, size=(bucket[1] // factor, bucket[0] // factor), mode="area")[0]


def latent_masks(scan: FolderScan, mask_files: list[Path] | None, buckets: list[tuple[int, int]],
                 flips: tuple[bool, ...], factor: int,
                 unmasked_weight: float = 0.0) -> dict[tuple[int, bool], torch.Tensor]:
    """Each training image's mask on the latent grid, by (image index, flip): from ``mask_files`` (one per image of
    ``scan``), or with None from each image's transparency. Images without one are left out (they train
    everywhere). A mask that would train nothing of its image is an error, unless ``unmasked_weight`` > 0."""
    masks: dict[tuple[int, bool], torch.Tensor] = {}
    for i, item in enumerate(scan.items):
        mask = load_mask(item.path, item.size, mask_files[i] if mask_files else None)
        if mask is None:
            continue
        for flip in flips:
            masks[i, flip] = latent_mask(mask, buckets[i], flip, factor)
        if unmasked_weight == 0 and float(masks[i, flips[0]].max()) == 0:  # a flip moves no weight
            raise EgakuError(f"the loss mask of {item.path} is black everywhere in its {buckets[i][0]}x"
                             f"{buckets[i][1]} crop: nothing of that image would train. Fix the mask, "
                             "remove the image, or set --unmasked-weight above 0")
    return masks


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` (B, C, H, W) weighted by ``weights`` (B, 1, H, W): (B,)."""
    return (values * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3)).clamp_min(1e-12)
