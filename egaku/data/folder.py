"""Read a user's image folder: torchvision ImageFolder layout plus captions, with a report.

Caption precedence, most specific first; an image takes its caption from the first source it has:
  1. ``metadata.jsonl`` / ``metadata.csv`` at the root (the diffusers layout: ``file_name`` + ``text``
     or ``caption`` column, paths relative to the root);
  2. a caption file beside the image: ``img.txt``, else ``img.caption``;
  3. the class folder name through ``caption_template`` (``"a photo of {class}"``), or the trigger word;
  4. the trigger word alone (images at the root, no caption).
A caption file that is empty (or only whitespace) counts as absent, so the next source captions the image:
kohya's trainers stop on one, and an image of a captioned class folder should not train on nothing. Caption
files a source before them overrode, and empty ones passed over, are listed in the report.
With ``kohya_names`` (LoRA training), class folders named kohya's way, ``10_sks dog``, give their images 10
repeats per epoch and the class ``sks dog``: a folder laid out for kohya's trainers trains as it would there.
Elsewhere (GAN and LDM training, where ``0_airplane`` is just a class name) folder names are taken as they are.
Every file is decoded once by ``open_image``; what cannot be used is listed with its reason, and so is what
was read differently from how it was written: caption files not in UTF-8, caption files with several lines,
caption files overridden or empty, metadata rows that name no image, images that got no caption; and what was
not read at all: caption files of no image (``img.TXT``, ``img.png.txt``), metadata files below the root.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import EgakuError
from .images import IMAGE_SUFFIXES, ImageError, open_image

CAPTION_SUFFIXES = (".txt", ".caption")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # "<repeats>_<class>"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TEMPLATE_FIELD = "{class}"  # the one field a caption template may use
SHOWN = 5  # names a report line lists before "and N more"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 image", "4 images"."""
    return f"{n} {noun}{'s' * (n != 1)}"


def _some(names: list[str]) -> str:
    """The first few names and how many more: a folder of 5000 uncaptioned images is one readable line."""
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def decode_text(data: bytes) -> tuple[str, str]:
    """``data`` as text, and how it was read: ``"utf-8"`` or the encoding it was not UTF-8 in.

    Caption files come from every editor: Notepad writes UTF-8 with a BOM or UTF-16 ("Unicode"), older tools
    Windows-1252. A BOM says which for certain; otherwise strict UTF-8 (which random legacy bytes almost never
    pass), then Windows-1252, then Latin-1, which reads any bytes, so a caption is never lost to an error."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace"), "utf-8"  # the BOM is not text
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), "UTF-16"
        except UnicodeDecodeError:
            pass  # a stray BOM-like start: read it as the bytes it is below
    if b"\x00" in data and len(data) % 2 == 0:
        # no caption holds a NUL, UTF-16 text without a BOM has one in most characters (on the odd bytes
        # for little-endian), and as UTF-8 or cp1252 it would "decode" to the text with NULs between
        le = data[1::2].count(0) > data[0::2].count(0)
        try:
            return data.decode("utf-16-le" if le else "utf-16-be"), "UTF-16 without a BOM"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, ...)
        return data.decode("latin-1"), "Latin-1"


def read_caption_file(path: Path) -> tuple[str, str, int]:
    """(caption, encoding as ``decode_text`` says, number of non-empty lines). The caption is the first
    non-empty line, stripped, as kohya's trainers read a caption file: a second line is usually a note or a
    second caption, and a newline inside a prompt is not something the text encoder was trained on."""
    text, encoding = decode_text(path.read_bytes())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else ""), encoding, len(lines)


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` is in ``caption`` as a word of its own: 'dog' is not in 'a hotdog stand', 'sks' not
    in 'asks'. Case does not count, since CLIP's tokenizer lower-cases the prompt: 'SKS' already is the
    trigger the text encoder sees. (Lookarounds, not ``\\b``, so triggers like '<sks>' work too.)"""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


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
    metadata_file: Path | None = None  # the metadata.jsonl / metadata.csv read, if any
    unused_rows: list[tuple[str, str]] = field(default_factory=list)  # (file_name in a metadata row, why unused)
    uncaptioned: list[Path] = field(default_factory=list)  # images no source gave a caption text
    caption_encodings: list[tuple[Path, str]] = field(default_factory=list)  # caption files not in UTF-8
    multiline_captions: list[Path] = field(default_factory=list)  # caption files of which one line was used
    overridden_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, the source used)
    empty_captions: list[tuple[Path, str]] = field(default_factory=list)  # (empty caption file, the source used)
    orphan_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file no image reads, why)
    unread_metadata: list[Path] = field(default_factory=list)  # metadata files below the root, which are not read
    kohya_root: bool = False  # the folder itself is named kohya's way ("10_sks dog"), which only its parent reads

    @property
    def classes(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})

    def report(self, repeats: int = 1) -> str:
        """What was read, how, and what was not. ``repeats`` is train-lora's --repeats, which multiplies each kohya
        folder's count: the report states the repeats training uses, as ss_dataset_dirs does."""
        lines = [f"{self.root}: {counted(len(self.items), 'image')} used, {len(self.skipped)} skipped"]
        if self.classes:
            counts = {c: sum(1 for i in self.items if i.label == c) for c in self.classes}
            lines.append("  classes: " + ", ".join(f"{c} ({n})" for c, n in counts.items()))
        # the captions as training reads them (template, trigger, caption files), to check before the run is spent
        first_of_each: dict[str | None, FolderItem] = {}
        for item in self.items:
            first_of_each.setdefault(item.label, item)
        shown = list(first_of_each.values()) if self.classes else self.items
        if shown:
            lines.append(f"  captions ({'the first image of each class' if self.classes else 'the first images'}): "
                         + "; ".join(f"{self.shown_path(i.path)}: {i.caption!r}" for i in shown[:3])
                         + (f" and {len(shown) - 3} more" if len(shown) > 3 else ""))
        if self.kohya_root:
            name = Path(self.root).resolve().name
            lines.append(f"  the folder's own name {name!r} is a kohya folder name, which is read from the class "
                         f"folders inside --data: its images train once per epoch, not {KOHYA_FOLDER.match(name)[1]} "
                         f"times, with no class '{KOHYA_FOLDER.match(name)[2]}'; give its parent folder as --data "
                         "(as kohya's train_data_dir)")
        if self.folder_repeats:
            def used(n: int) -> str:  # the folder's count, and what --repeats makes of it
                return f"{n} repeat(s)" if repeats == 1 else f"{n} x --repeats {repeats} = {n * repeats} repeat(s)"
            lines.append("  kohya folder names: " + ", ".join(f"{name} -> {used(n)} of class "
                                                           f"'{KOHYA_FOLDER.match(name)[2]}'"
                                                           for name, n in self.folder_repeats.items()))
        if self.unused_rows:
            lines.append(f"  {len(self.unused_rows)} row(s) of {self.metadata_file.name} name no usable image and "
                         "were not used: " + _some([f"{name} ({why})" for name, why in self.unused_rows]))
        if self.caption_encodings:
            lines.append(f"  {len(self.caption_encodings)} caption file(s) are not UTF-8 and were read as their "
                         "encoding; check they read right, or save them as UTF-8: "
                         + _some([f"{self.shown_path(p)} ({enc})" for p, enc in self.caption_encodings]))
        if self.multiline_captions:
            lines.append(f"  {len(self.multiline_captions)} caption file(s) have more than one line; only the first "
                         "was used (as kohya's trainers do): "
                         + _some([self.shown_path(p) for p in self.multiline_captions]))
        if self.overridden_captions:
            lines.append(f"  {len(self.overridden_captions)} caption file(s) were not used: an image with several "
                         "caption sources takes the first of metadata, .txt, .caption; check the one used is the one "
                         "meant: " + _some([f"{self.shown_path(p)} (used {used})"
                                            for p, used in self.overridden_captions]))
        if self.empty_captions:
            lines.append(f"  {len(self.empty_captions)} caption file(s) are empty; the image's next caption source was "
                         "used: " + _some([f"{self.shown_path(p)} (used {used})" for p, used in self.empty_captions]))
        if self.orphan_captions:
            lines.append(f"  {len(self.orphan_captions)} caption file(s) belong to no image and were not read (an "
                         "image's caption file has its name with .txt or .caption in place of the image's extension): "
                         + _some([f"{self.shown_path(p)} ({why})" for p, why in self.orphan_captions]))
        if self.unread_metadata:
            lines.append(f"  {len(self.unread_metadata)} metadata file(s) below the data folder's root were not read "
                         "(only the root's is); move their rows into the root's, file_name relative to the root: "
                         + _some([self.shown_path(p) for p in self.unread_metadata]))
        if self.uncaptioned:
            got = next(i.caption for i in self.items if i.path == self.uncaptioned[0])
            trained_on = f"the caption {got!r}" if got else "an empty caption"
            fix = "" if got else "; caption files beside them (or train-lora's --trigger WORD) say what they show"
            lines.append(f"  {len(self.uncaptioned)} image(s) got no caption (no metadata row, caption file or class "
                         f"folder gave one, or it was empty) and train on {trained_on}: "
                         + _some([self.shown_path(p) for p in self.uncaptioned]) + fix)
        for path, reason in self.skipped:
            lines.append(f"  skipped {self.shown_path(path)}: {reason}")
        return "\n".join(lines)

    def shown_path(self, path: Path) -> str:
        """``path`` as reports show it: relative to the data folder when it lies inside it."""
        return str(path.relative_to(self.root) if path.is_relative_to(self.root) else path)

    def load(self, item: FolderItem) -> Image.Image:
        return open_image(item.path)


def _read_metadata(root: Path) -> tuple[Path | None, dict[Path, tuple[str, str]]]:
    """The metadata file read (None without one) and ``{resolved image path: (file_name as written, caption)}``."""
    captions: dict[Path, tuple[str, str]] = {}
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    source = jsonl if jsonl.is_file() else csv_path if csv_path.is_file() else None
    if source is None:
        return None, captions
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a BOM, which would otherwise stick to the first
        # column's name ('\ufefffile_name') and hide it
        text = source.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EgakuError(f"{source} is not UTF-8 (byte {exc.start}); save it as UTF-8 (in Excel: "
                         "'CSV UTF-8'), so that its captions are read as written") from None
    rows: list[tuple[int, dict]] = []  # (line number, row)
    if source == jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise EgakuError(f"{jsonl} line {n} is not valid JSON ({exc}); fix or remove that line") from None
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader]
    for n, row in rows:
        if not isinstance(row, dict):
            raise EgakuError(f"{source} line {n} is not a JSON object ({row!r}); write it as "
                             '{"file_name": ..., "text": ...}')
        name = row.get("file_name")
        column = "text" if "text" in row else "caption" if "caption" in row else None
        if name is None or column is None:
            raise EgakuError(f"{source}: every row needs 'file_name' and 'text' (or 'caption'), got {sorted(row)}")
        caption = row[column]
        if caption is None and source == csv_path:  # csv's DictReader fills a short row's missing columns with None
            raise EgakuError(f"{source} line {n}: the row of {name!r} has no {column} value; give it one (or an "
                             "empty one, \"\") in that column")
        # str() would train on a list's or number's Python repr ("['tag1', 'tag2']"); JSON has no one right
        # reading of them, so the row is refused rather than guessed at (CSV values are always strings)
        if not isinstance(caption, str):
            raise EgakuError(f"{source} line {n}: the caption of {name!r} is {json.dumps(caption)}, not a string; "
                             'write it as one string, e.g. "tag1, tag2"')
        # a path written on Windows ("10_sks dog\\img.png") names the same image everywhere: there the file system
        # reads either separator, and no image's name holds a backslash
        captions[(root / str(name).replace("\\", "/")).resolve()] = (str(name), str(caption).strip())
    return source, captions


def _unused_rows(scan: FolderScan, metadata: dict[Path, tuple[str, str]], images: list[Path]) -> list[tuple[str, str]]:
    """(file_name, why) for each metadata row no usable image took its caption from. A name that differs from
    an image's only in case is not taken as that image, even where the file system would open it (Windows,
    macOS): the same folder then trains the same on every machine, and the report points at the typo."""
    used = {item.path.resolve() for item in scan.items}
    skipped = {path.resolve(): reason for path, reason in scan.skipped}
    by_lower = {p.resolve().as_posix().lower(): p for p in images}
    unused = []
    for resolved, (name, _) in metadata.items():
        if resolved in used:
            continue
        if resolved in skipped:
            why = f"skipped: {skipped[resolved]}"
        elif resolved.as_posix().lower() in by_lower and by_lower[resolved.as_posix().lower()].resolve() != resolved:
            why = (f"no such file, but {by_lower[resolved.as_posix().lower()].relative_to(scan.root).as_posix()} "
                   "matches when case is ignored; names are case-sensitive, correct the row or the file name")
        elif resolved.is_file():
            why = "not one of the training images"
        else:
            why = "no such file"
        unused.append((name, why))
    return unused


def _orphan_captions(files: list[Path]) -> list[tuple[Path, str]]:
    """(caption file, why) for each caption file no image reads: ``img.png.txt`` (some taggers' name) and
    ``img.TXT`` are not ``img.txt``, and an image without its caption file would train on its folder caption
    unnoticed. Caption files of skipped images are left out: the image's own line says why it was not used."""
    images = {p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    stems = {p.with_suffix("") for p in images}
    orphans = []
    for path in files:
        if path.suffix.lower() not in CAPTION_SUFFIXES or path.name in METADATA_FILES:
            continue
        stem = path.with_suffix("")
        if stem in stems and (path.suffix in CAPTION_SUFFIXES or stem.with_suffix(path.suffix.lower()).is_file()):
            continue  # its image's caption (a case-insensitive file system, Windows' or macOS', reads img.TXT so)
        if stem in stems:
            why = f"the extension is case-sensitive: rename it to {stem.name}{path.suffix.lower()}"
        elif stem in images:
            why = f"the caption file of {stem.name} is {stem.with_suffix(path.suffix.lower()).name}"
        else:
            why = "no image of that name"
        orphans.append((path, why))
    return orphans


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


def files_under(root: Path) -> tuple[list[Path], list[Path]]:
    """(every file under ``root``, every link there whose target is gone), hidden files and folders left out.
    Linked folders are followed, as torchvision's ImageFolder follows them, each real folder once (a link to a
    folder above it would otherwise loop); pathlib's rglob does not follow them before Python 3.13."""
    files, broken, seen = [], [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                broken.append(path)
    return sorted(files), sorted(broken)


def check_caption_template(template: str, trigger: str | None) -> None:
    """Refuse a template that would leave text unfilled: it is filled by replacing ``{class}``, so any other
    ``{field}`` ("{0}", a typo like "{clas}") or brace would reach every caption as written."""
    rest = template.replace(TEMPLATE_FIELD, "")
    other = re.search(r"\{[^{}]*\}", rest)
    if other or "{" in rest or "}" in rest:
        what = f"the field {other[0]}" if other else "a stray brace"
        raise EgakuError(f"--caption-template {template!r} has {what}; the template may use only {TEMPLATE_FIELD}, "
                         "remove it (it is not str.format, so '{{' is no escape: put captions with braces in "
                         "caption files)")
    if TEMPLATE_FIELD not in template and trigger is None:
        raise EgakuError(f"--caption-template {template!r} must contain {TEMPLATE_FIELD}")


def scan_image_folder(root: str | Path, caption_template: str = "{class}", trigger: str | None = None,
                      min_images: int = 1, max_pixels: int | None = None, kohya_names: bool = False,
                      repeats: int = 1) -> FolderScan:
    """Find, decode-check and caption every image under ``root`` (one level of class folders or flat). Each
    image's caption comes from the first source it has, in the precedence the module docstring gives. ``repeats``
    (train-lora's --repeats) is what the report printed above a data error counts with, as ``FolderScan.report``."""
    root = Path(root)
    if not root.is_dir():
        raise EgakuError(f"data folder {str(root)!r} does not exist or is not a folder")
    check_caption_template(caption_template, trigger)
    metadata_file, metadata = _read_metadata(root)
    scan = FolderScan(root=root, metadata_file=metadata_file)
    files, broken_links = files_under(root)
    scan.skipped += [(link, "a link whose target does not exist") for link in broken_links]
    scan.folder_repeats = _kohya_repeats(root, files) if kohya_names else {}
    scan.kohya_root = bool(kohya_names and not scan.folder_repeats and KOHYA_FOLDER.match(root.resolve().name))
    for path in files:
        if path.name in METADATA_FILES or path.suffix.lower() in CAPTION_SUFFIXES:
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
        folder_count = scan.folder_repeats.get(label, 1)
        if label in scan.folder_repeats:
            label = KOHYA_FOLDER.match(label)[2]
        caption_files = [path.with_suffix(s) for s in CAPTION_SUFFIXES if path.with_suffix(s).is_file()]
        caption, source, used_file, empty = None, None, None, []
        if path.resolve() in metadata:
            caption, source = metadata[path.resolve()][1], f"its {metadata_file.name} row"
        for side in caption_files if caption is None else []:
            text, encoding, n_lines = read_caption_file(side)
            if not text:
                empty.append(side)
                continue
            caption, source, used_file = text, side.name, side
            if encoding != "utf-8":
                scan.caption_encodings.append((side, encoding))
            if n_lines > 1:
                scan.multiline_captions.append(side)
            break
        if source is not None:
            scan.overridden_captions += [(side, source) for side in caption_files
                                         if side != used_file and side not in empty]
        if caption is None and label is not None:
            caption = caption_template.replace(TEMPLATE_FIELD, label.replace("_", " "))
            source = "the folder caption"
        if caption and empty:
            scan.empty_captions += [(side, source) for side in empty]
        if not caption:  # no source, or an empty caption file or metadata text
            scan.uncaptioned.append(path)
            caption = trigger or ""
        elif trigger and not has_trigger(caption, trigger):
            caption = f"{trigger}, {caption}"
        scan.items.append(FolderItem(path=path, caption=caption, label=label, size=size, repeats=folder_count))
    scan.orphan_captions = _orphan_captions(files)
    scan.unread_metadata = [p for p in files if p.name in METADATA_FILES and p.parent != root]
    if metadata_file is not None:
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        scan.unused_rows = _unused_rows(scan, metadata, images)
        matched = any(item.path.resolve() in metadata for item in scan.items)
        # also where class folders captioned every image: the file was written to caption them, and training on the
        # folder names instead would go unnoticed
        if scan.items and not matched:
            print(scan.report(repeats), file=sys.stderr)  # before the error, so that the error is the last line read
            raise EgakuError(f"{metadata_file} gives a caption to none of the {counted(len(scan.items), 'image')} in "
                             f"{root} (its {len(metadata)} row(s) name "
                             f"{_some([n for n, _ in metadata.values()]) or 'nothing'}; the images are "
                             f"{_some([i.path.relative_to(root).as_posix() for i in scan.items])}); "
                             "the names probably do not match: make each row's file_name the image's path relative "
                             f"to {root}, exactly (case counts)")
    if len(scan.items) < min_images:
        fix = f"add images to {root}" + (f", or lower --min-images (now {min_images})" if min_images > 1 else "")
        print(scan.report(repeats), file=sys.stderr)  # before the error, so that the error is the last line read
        raise EgakuError(f"{root}: found {counted(len(scan.items), 'usable image')}, need at least {min_images}; "
                         f"{fix}")
    return scan
