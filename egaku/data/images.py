"""The one place that opens image files a user gave us.

``open_image`` returns an RGB PIL image or raises ``ImageError`` with a reason a person can act on.
Real folders contain phone photos stored sideways (EXIF orientation), transparent PNGs, palette GIFs,
CMYK JPEGs, 16-bit scans, truncated downloads, zero-byte files and the odd text file: each is handled
here once, so every caller (generation's init image, LoRA and LDM datasets, the server) agrees.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

# Pillow's own bomb limit is a warning at 89M pixels; we refuse at 64M (8192x8192), well above any
# training resolution, and say so.
MAX_PIXELS = 64 * 1024 * 1024
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Pillow decodes AVIF only from 11.2 and when built with libavif (its wheels are); older ones know no such module
if "avif" in features.modules and features.check_module("avif"):
    IMAGE_SUFFIXES.add(".avif")


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if img.mode == "F" and arr.max() <= 1.0:  # floating-point images (TIFF, scientific) are usually 0..1
            hi = 1.0
        else:
            hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if "transparency" in img.info:
            # a 16-bit PNG's tRNS names one grey value in 16-bit units: mark its pixels before scaling to 8 bits,
            # where other values would round onto it
            grey.putalpha(Image.fromarray(np.where(arr == img.info["transparency"], 0, 255).astype(np.uint8), "L"))
        img = grey
    # a greyscale or RGB PNG's tRNS chunk makes one colour transparent, as an alpha channel does the others
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert to RGB; raise ``ImageError`` otherwise."""
    return to_rgb(decode_image(source, max_pixels))


def alpha_channel(img: Image.Image) -> Image.Image | None:
    """The transparency of ``img`` as an 8-bit greyscale image (255 = opaque), or None when it has none."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        return img.convert("RGBA").getchannel("A")
    return None


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """``open_image`` without the conversion to RGB: the decoded image in its own mode, EXIF orientation applied."""
    name = "upload" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: file does not exist")
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
    elif len(source) == 0:
        raise ImageError("upload: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} is over the {max_pixels:,}-pixel limit "
                                 "(refused as a possible decompression bomb); downscale it first")
            img.load()  # decode now: truncated files fail here, not in the middle of training
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: refused as a decompression bomb (too many pixels); downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: could not decode ({exc}); the file may be truncated or corrupt") from None
    return ImageOps.exif_transpose(img)


def image_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A contact sheet: images laid out row by row (cols defaults to a near-square layout)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def arrays_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]: the range of the VAE and of the shapes judge."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> greyscale (C = 1) or RGB PIL images: the inverse of ``arrays_to_tensor``."""
    arr = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if arr.shape[1] == 1:
        return [Image.fromarray(a[0], "L") for a in arr]
    return [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in arr]
