"""Generation parameters stored inside PNGs, in the two forms tools read.

- ``parameters``: the A1111 text chunk (prompt, ``Negative prompt:`` line, then ``Key: value`` pairs),
  which A1111's PNG Info, ComfyUI's loaders and civitai read. Values are written as A1111 writes them
  (``quote``): one holding a comma, colon or newline goes in double quotes as a JSON string, so A1111's
  parser, which splits the line on commas outside quotes, reads it back whole. LoRAs appear as A1111's
  ``Lora hashes: "name: hash, name: hash"`` with each file's short hash (``lora_short_hash``);
- ``egaku``: the same as JSON, exact and machine-readable, which ``egaku generate --from`` re-runs. It
  also records what made the image: the model source (``model_source``, with ``model_config``), each
  LoRA's file, weight and hash (``lora_files``) and the LoRA folder the prompt's tags were read from
  (``lora_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import EgakuError

# A1111's settings line: "Key: value" pairs, a value either a double-quoted JSON string or anything up to
# the next comma (modules/infotext_utils.py, re_param)
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

# (absolute path, mtime in ns, size) -> short hash: each LoRA file is read once per process, not per image
_HASHES: dict[tuple[str, int, int], str] = {}


def quote(value: Any) -> Any:
    """A value as A1111 writes it in its settings line: as is, or a JSON string when it holds a comma,
    a newline or a colon."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def lora_short_hash(path: str | Path) -> str | None:
    """A1111's short hash of a LoRA file: the first 12 hex digits of its "addnet" hash, the sha256 of a
    .safetensors file's bytes after the header (so rewriting the metadata keeps the hash), as kohya's
    ``sshs_model_hash`` and A1111's Lora hashes use; of the whole file for other formats. Cached per
    file version, so a run hashes each file once. None for a file that cannot be read (A1111 then
    leaves the LoRA out of Lora hashes; loading it reports the problem)."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        if key not in _HASHES:
            _HASHES[key] = _addnet_hash(path)[:12]
    except OSError:
        return None
    return _HASHES[key]


def _addnet_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if path.suffix.lower() == ".safetensors":
            header_length = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + header_length)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lora_hashes_text(lora_files: list[dict[str, Any]]) -> str | None:
    """A1111's ``Lora hashes`` value: ``name: hash`` pairs, names without the ':' and ',' that would break
    the list (A1111 removes them too), each name once."""
    pairs: dict[str, str] = {}
    for entry in lora_files:
        name = str(entry.get("name") or "").replace(":", "").replace(",", "").strip()
        if name and entry.get("hash"):
            pairs.setdefault(name, entry["hash"])
    return ", ".join(f"{n}: {h}" for n, h in pairs.items()) or None


def _a1111_number(value: Any) -> Any:
    """7.0 as A1111 writes it: 7."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _option_lora_tags(lora_files: list[dict[str, Any]]) -> list[str]:
    """``<lora:name:weight>`` for each LoRA given as an option (``--lora PATH:W``), the way A1111 records every
    LoRA: its "send to txt2img" and civitai read LoRAs and weights from the prompt's tags only. Those from the
    prompt's own tags are in the prompt already."""
    tags = []
    for entry in lora_files:
        name, weight = str(entry.get("name") or ""), entry.get("weight")
        if entry.get("from") != "option" or not name or any(c in name for c in ":<>"):
            continue  # a name with ':' or '>' cannot be written as a tag that reads back
        weight = 1.0 if weight is None else float(weight)
        tags.append(f"<lora:{name}:{_a1111_number(weight)}>")
    return tags


# a BREAK in a prompt, which the emphasis mode none reads as a word
_BREAK_WORD = re.compile(r"\bBREAK\b")


def emphasis_text(p: dict[str, Any]) -> str | None:
    """A1111's "Emphasis" value for the parameters ``p``: the mode's name as A1111 writes it ("Original", "No norm",
    "Ignore", "None"; "Comfy" for egaku's default, which A1111 does not have and reads as its Original), written, as
    A1111 writes it, where the prompt or negative prompt holds a bracket (and for none a BREAK too, which it reads
    as a word): elsewhere the modes make the same image. Unlike A1111, which leaves its default out, egaku writes
    Original too, so that a text says which rule made it (egaku reads one without "Emphasis" as A1111's Original,
    or as comfy where egaku wrote it before it had modes). None where ``p`` records no mode (an egaku image from
    before it read A1111's syntax)."""
    from ..models.text import EMPHASIS_MODES, emphasis_mode

    mode = p.get("emphasis_mode")
    if mode is None and isinstance(p.get("emphasis"), bool):  # egaku before it had modes: on was comfy's rule
        mode = emphasis_mode(p["emphasis"])
    if mode is None:
        return None
    texts = [str(p.get("prompt") or ""), str(p.get("negative_prompt") or "")]
    syntax = any("(" in t or "[" in t or (mode == "none" and _BREAK_WORD.search(t)) for t in texts)
    return EMPHASIS_MODES.get(mode, str(mode)) if syntax else None


def a1111_parameters(p: dict[str, Any]) -> str:
    """A1111's text for ``p`` (the parameters ``generate`` records); a key it lacks is left out. LoRAs given as
    options are added to the prompt as ``<lora:name:weight>`` tags, as A1111 always has them there."""
    prompt, tags = str(p.get("prompt", "")), _option_lora_tags(p.get("lora_files") or [])
    lines = [" ".join([prompt.rstrip(), *tags]).lstrip() if tags else prompt]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    hires = (p.get("hires_scale") or 1) > 1
    pairs = [
        ("Steps", p.get("steps")),
        ("Sampler", p.get("sampler_label") or p.get("sampler")),
        ("CFG scale", _a1111_number(p.get("guidance_scale"))),
        ("Seed", p.get("seed")),
        ("Size", f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None),
        ("Model hash", p.get("model_hash")),
        ("Model", p.get("model_name")),
        ("Denoising strength", p.get("strength") if p.get("init_image") else p.get("hires_strength")
         if hires else None),  # the hires pass's, in A1111's text-to-image
        ("Clip skip", p["clip_skip"] if (p.get("clip_skip") or 1) > 1 else None),  # A1111 writes it from 2 on
        ("Emphasis", emphasis_text(p)),
        ("Hires upscale", _a1111_number(p["hires_scale"]) if hires else None),
        ("Hires steps", (p.get("hires_steps") or None) if hires else None),
        ("Hires upscaler", p.get("hires_upscaler") if hires else None),
        ("Lora hashes", lora_hashes_text(p.get("lora_files") or [])),  # the weights are in the prompt's tags
        ("TI hashes", ", ".join(f"{e['name']}: {e['hash']}" for e in p.get("embeddings") or []) or None),
        ("Version", f"egaku {p.get('egaku_version', '')}".strip()),
    ]
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in pairs if v not in (None, "")))
    return "\n".join(lines)


def without_local_paths(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the machine's file paths (the model's, the LoRA files' and their folder's), for images
    and responses that leave the machine: a server's clients see names and hashes, not its file system."""
    public = {k: v for k, v in params.items() if k not in ("model_source", "model_config", "lora_dir", "embedding_dir")}
    for files in ("lora_files", "embeddings"):
        if params.get(files):
            public[files] = [{k: v for k, v in f.items() if k != "path"} for f in params[files]]
    return public


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("egaku", json.dumps(params, sort_keys=True))
    image.save(path, pnginfo=info)


def read_text_chunks(path: str | Path) -> dict[str, Any]:
    """An image's text chunks as they are stored (``parameters``, ``egaku``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise EgakuError(f"{path} does not exist")
    try:
        with Image.open(path) as img:
            return image_text(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise EgakuError(f"{path} is not a readable image ({exc})") from None


def image_text(img: Image.Image) -> dict[str, Any]:
    """An opened image's text chunks (a PNG's), or its info; with A1111's parameters of a JPEG or WebP, which it
    keeps in EXIF's UserComment, as ``parameters``."""
    text = dict(img.text) if hasattr(img, "text") else dict(img.info)
    if "parameters" not in text:
        comment = exif_user_comment(img)
        if comment:
            text["parameters"] = comment
    return text


_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def exif_user_comment(img: Image.Image) -> str | None:
    """EXIF's UserComment as text, where A1111 writes a JPEG's or WebP's parameters (piexif's "UNICODE" form:
    an 8-byte charset prefix, then UTF-16, big-endian as piexif writes it; little-endian read too)."""
    raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, str):
        return raw.strip("\x00").strip() or None
    if not isinstance(raw, bytes) or not raw:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        # the zero byte of an ASCII character comes first in big-endian UTF-16
        encoding = "utf-16-be" if body[:1] == b"\x00" or len(body) < 2 or body[1:2] != b"\x00" else "utf-16-le"
        text = body.decode(encoding, errors="replace")
    elif prefix.startswith((b"ASCII", b"\x00" * 8)):
        text = body.decode("utf-8", errors="replace")
    else:  # no charset prefix: the whole field, as A1111's own fallback reads it
        text = raw.decode("utf-8", errors="ignore")
    return text.strip("\x00").strip() or None


def read_params(path: str | Path, text: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters stored in an image: egaku's JSON if present, else parsed from A1111's text. ``text``: the
    image's chunks when the caller has read them already (``read_text_chunks``)."""
    path = Path(path)
    if text is None:
        text = read_text_chunks(path)
    try:
        params = params_from_text(text)
    except EgakuError as exc:
        raise EgakuError(f"{path}: {exc}") from None
    if params is None:
        raise EgakuError(f"{path} carries no generation parameters (no 'parameters' or 'egaku' PNG text chunk, no "
                         "A1111 EXIF comment)")
    return params


def params_from_text(text: dict[str, Any]) -> dict[str, Any] | None:
    """The parameters in an image's text chunks: egaku's JSON if present, else A1111's text; None when it
    holds neither."""
    if "egaku" in text:
        try:
            params = json.loads(text["egaku"])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise EgakuError(f"its egaku text chunk is not valid JSON ({exc})") from None
        if not isinstance(params, dict):
            raise EgakuError("its egaku text chunk is not a JSON object of parameters")
        return params
    if "parameters" in text:
        return parse_a1111(str(text["parameters"]))
    return None


# A1111's settings keys read as one value each: key -> (egaku's name, how to read it)
_A1111_KEYS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", int), "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),  # A1111 1.9+ writes "DPM++ 2M" with "Schedule type: Karras"
    "CFG scale": ("guidance_scale", float), "Seed": ("seed", int), "Model": ("model_name", str),
    "Model hash": ("model_hash", str), "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int),
    "Emphasis": ("emphasis_mode", str), "Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str),
}


def _read_emphasis(params: dict[str, Any], settings: list[tuple[str, str]]) -> None:
    """A1111's "Emphasis" (in ``params["emphasis_mode"]`` as written) as egaku's mode name, a name no mode has left as
    written; A1111's None also as ``emphasis`` False, the on/off egaku recorded before it had modes. A text without
    "Emphasis" is left without, as A1111's default (Original) is (``recorded_emphasis`` reads it so), except egaku's
    from before it wrote its mode there: one whose prompts hold a bracket was made with comfy."""
    from ..models.text import emphasis_mode

    name = params.get("emphasis_mode")
    if name is None:
        version = [unquote(v.strip()) for k, v in settings if k.strip() == "Version"]
        texts = (params.get("prompt", ""), params.get("negative_prompt", ""))
        if version and version[-1].startswith("egaku") and any("(" in t or "[" in t for t in texts):
            params["emphasis_mode"] = "comfy"
        return
    try:
        params["emphasis_mode"] = emphasis_mode(name)
    except EgakuError:
        return
    if params["emphasis_mode"] == "none":
        params["emphasis"] = False


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse A1111's ``parameters`` text (prompt lines, optional negative prompt, then key: value pairs).

    As A1111 reads it: the last line is the settings line when it holds at least three pairs; a quoted
    value is a JSON string; a value that does not parse is skipped.
    """
    *lines, last = text.strip().split("\n")
    settings = _PAIR.findall(last)
    if len(settings) < 3:
        lines.append(last)
        settings = []
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in settings:
        key, value = key.strip(), unquote(value.strip())
        try:
            if key in _A1111_KEYS:
                name, read = _A1111_KEYS[key]
                params[name] = read(value)
            elif key in ("Size", "Hires resize"):
                w, h = value.split("x")
                prefix = "" if key == "Size" else "hires_"
                params[prefix + "width"], params[prefix + "height"] = int(w), int(h)
            elif key in ("Lora hashes", "TI hashes"):
                pairs = (item.rpartition(":") for item in value.split(","))
                params["lora_hashes" if key == "Lora hashes" else "embedding_hashes"] = [
                    [name.strip(), h.strip()] for name, _, h in pairs if name.strip()]
        except ValueError:
            continue  # A1111 skips a value it cannot read; so does egaku
    if "hires_width" in params and params.get("width") and "hires_scale" not in params:
        # a hires fix to a size: as a scale of the first pass (A1111 crops to the size where the shapes differ)
        params["hires_scale"] = max(params["hires_width"] / params["width"], params["hires_height"] / params["height"])
    if (params.get("hires_scale") or 1) > 1 and "strength" in params:  # text-to-image: the hires pass's strength
        params["hires_strength"] = params.pop("strength")
    _read_emphasis(params, settings)
    schedule = params.get("schedule_type", "")
    if params.get("sampler") and schedule and schedule.lower() not in ("automatic", "uniform"):
        params["sampler"] = f"{params['sampler']} {schedule}"  # A1111's older label: "DPM++ 2M Karras"
    return params
