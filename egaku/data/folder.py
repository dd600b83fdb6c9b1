"""Read a user's image folder: torchvision ImageFolder layout plus captions, with a report.

Caption precedence, most specific first:
  1. ``metadata.jsonl`` / ``metadata.csv`` at the root (the diffusers layout: ``file_name`` + ``text``
     or ``caption`` column, paths relative to the root);
  2. a caption file beside the image: ``img.txt`` or ``img.caption``;
  3. the class folder name through ``caption_template`` (``"a photo of {class}"``), or the trigger word;
  4. the trigger word alone (images at the root, no caption).
With ``kohya_names`` (LoRA training), class folders named kohya's way, ``10_sks dog``, give their images 10
repeats per epoch and the class ``sks dog``: a folder laid out for kohya's trainers trains as it would there.
Elsewhere (GAN and LDM training, where ``0_airplane`` is just a class name) folder names are taken as they are.
Every file is decoded once by ``open_image``; what cannot be used is listed with its reason.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import EgakuError
from .images import IMAGE_SUFFIXES, ImageError, open_image

CAPTION_SUFFIXES = (".txt", ".caption")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # "<repeats>_<class>"


@dataclass
class FolderItem:
    path: Path
    caption: str
    label: str | None  # class folder name (None for images at the root)
    size: tuple[int, int] = (0, 0)  # decoded (width, height), after EXIF orientation
    repeats: int = 1  # times per epoch, from a kohya folder name ("10_sks dog")


@dataclass
class FolderScan:
    root: Path
    items: list[FolderItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    folder_repeats: dict[str, int] = field(default_factory=dict)  # kohya folder name -> repeats

    @property
    def classes(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})

    def report(self) -> str:
        lines = [f"{self.root}: {len(self.items)} images used, {len(self.skipped)} skipped"]
        if self.classes:
            counts = {c: sum(1 for i in self.items if i.label == c) for c in self.classes}
            lines.append("  classes: " + ", ".join(f"{c} ({n})" for c, n in counts.items()))
        if self.folder_repeats:
            lines.append("  kohya folder names: " + ", ".join(f"{name} -> {n} repeat(s) of class "
                                                           f"'{KOHYA_FOLDER.match(name)[2]}'"
                                                           for name, n in self.folder_repeats.items()))
        for path, reason in self.skipped:
            lines.append(f"  skipped {path.relative_to(self.root) if path.is_relative_to(self.root) else path}: {reason}")
        return "\n".join(lines)

    def load(self, item: FolderItem) -> Image.Image:
        return open_image(item.path)


def _read_metadata(root: Path) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    rows: list[dict] = []
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EgakuError(f"{jsonl} line {n} is not valid JSON ({exc}); fix or remove that line") from None
    elif csv_path.is_file():
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    for row in rows:
        name = row.get("file_name")
        text = row.get("text", row.get("caption"))
        if name is None or text is None:
            source = jsonl.name if jsonl.is_file() else csv_path.name
            raise EgakuError(f"{root / source}: every row needs 'file_name' and 'text' (or 'caption'), got {sorted(row)}")
        captions[(root / name).resolve()] = str(text).strip()
    return captions


def _kohya_repeats(root: Path, files: list[Path]) -> dict[str, int]:
    """``{"10_sks dog": 10}`` when every class folder is named kohya's way, ``{}`` when none is; a mix is an
    error, since the prefix would be repeats in some folders and part of the caption in others."""
    folders = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1
                      and p.suffix.lower() in IMAGE_SUFFIXES})
    named = [f for f in folders if KOHYA_FOLDER.match(f)]
    if not named:
        return {}
    plain = [f for f in folders if f not in named]
    if plain:
        raise EgakuError(f"{root}: class folder(s) {', '.join(named[:3])} are named kohya's way (<repeats>_<class>) "
                         f"but {', '.join(plain[:3])} not; rename those to 1_<name>, or drop the number prefix "
                         "from the others")
    zero = [f for f in named if int(KOHYA_FOLDER.match(f)[1]) == 0]
    if zero:
        raise EgakuError(f"{root}: class folder(s) {', '.join(zero)} ask for 0 repeats; name them 1_<class> or "
                         "more, or move them out of the data folder")
    return {f: int(KOHYA_FOLDER.match(f)[1]) for f in named}


def scan_image_folder(root: str | Path, caption_template: str = "{class}", trigger: str | None = None,
                      min_images: int = 1, max_pixels: int | None = None, kohya_names: bool = False) -> FolderScan:
    """Find, decode-check and caption every image under ``root`` (one level of class folders or flat)."""
    root = Path(root)
    if not root.is_dir():
        raise EgakuError(f"data folder {str(root)!r} does not exist or is not a folder")
    if "{class}" not in caption_template and trigger is None:
        raise EgakuError(f"--caption-template {caption_template!r} must contain {{class}}")
    metadata = _read_metadata(root)
    scan = FolderScan(root=root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    scan.folder_repeats = _kohya_repeats(root, files) if kohya_names else {}
    for path in files:
        if path.name in ("metadata.jsonl", "metadata.csv") or path.suffix.lower() in CAPTION_SUFFIXES:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            scan.skipped.append((path, f"not an image file extension ({path.suffix or 'none'})"))
            continue
        try:
            kwargs = {"max_pixels": max_pixels} if max_pixels else {}
            with open_image(path, **kwargs) as img:
                size = img.size
        except ImageError as exc:
            scan.skipped.append((path, str(exc).split(": ", 1)[-1]))
            continue
        rel = path.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        repeats = scan.folder_repeats.get(label, 1)
        if label in scan.folder_repeats:
            label = KOHYA_FOLDER.match(label)[2]
        caption = metadata.get(path.resolve())
        if caption is None:
            for suffix in CAPTION_SUFFIXES:
                side = path.with_suffix(suffix)
                if side.is_file():
                    caption = side.read_text(errors="replace").strip()
                    break
        if caption is None and label is not None:
            caption = caption_template.replace("{class}", label.replace("_", " "))
        if caption is None:
            caption = trigger or ""
        elif trigger and trigger not in caption:
            caption = f"{trigger}, {caption}"
        scan.items.append(FolderItem(path=path, caption=caption, label=label, size=size, repeats=repeats))
    if len(scan.items) < min_images:
        raise EgakuError(f"{root}: found {len(scan.items)} usable images, need at least {min_images}.\n{scan.report()}")
    return scan
