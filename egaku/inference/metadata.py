"""Generation parameters stored inside PNGs, in the two forms tools read.

- ``parameters``: the A1111 text chunk (prompt, ``Negative prompt:`` line, then ``Key: value`` pairs),
  which A1111's PNG Info, ComfyUI's loaders and civitai read;
- ``egaku``: the same as JSON, exact and machine-readable, which ``egaku generate --from`` re-runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import EgakuError


def a1111_parameters(p: dict[str, Any]) -> str:
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    pairs = [
        ("Steps", p["steps"]),
        ("Sampler", p["sampler_label"]),
        ("CFG scale", p["guidance_scale"]),
        ("Seed", p["seed"]),
        ("Size", f"{p['width']}x{p['height']}"),
        ("Model hash", p.get("model_hash")),
        ("Model", p.get("model_name")),
        ("Denoising strength", p.get("strength") if p.get("init_image") else None),
        ("Clip skip", p["clip_skip"] if (p.get("clip_skip") or 1) > 1 else None),  # A1111 writes it from 2 on
        ("Lora hashes", ", ".join(f"{n}: {w}" for n, w in p.get("loras", [])) or None),
        ("Version", f"egaku {p.get('egaku_version', '')}".strip()),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v not in (None, "")))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, params: dict[str, Any]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("egaku", json.dumps(params, sort_keys=True))
    image.save(path, pnginfo=info)


def read_params(path: str | Path) -> dict[str, Any]:
    """The parameters stored in an image: egaku's JSON if present, else parsed from A1111's text."""
    path = Path(path)
    if not path.is_file():
        raise EgakuError(f"{path} does not exist")
    try:
        with Image.open(path) as img:
            text = dict(img.text) if hasattr(img, "text") else dict(img.info)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise EgakuError(f"{path} is not a readable image ({exc})") from None
    if "egaku" in text:
        return json.loads(text["egaku"])
    if "parameters" in text:
        return parse_a1111(text["parameters"])
    raise EgakuError(f"{path} carries no generation parameters (no 'parameters' or 'egaku' PNG text chunk)")


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse A1111's ``parameters`` text (prompt lines, optional negative prompt, then key: value pairs)."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for part in settings_line.split(", "):
        if ": " not in part:
            continue
        key, value = part.split(": ", 1)
        key = key.strip()
        if key == "Steps":
            params["steps"] = int(value)
        elif key == "Sampler":
            params["sampler"] = value
        elif key == "CFG scale":
            params["guidance_scale"] = float(value)
        elif key == "Seed":
            params["seed"] = int(value)
        elif key == "Size":
            w, h = value.split("x")
            params["width"], params["height"] = int(w), int(h)
        elif key == "Model":
            params["model_name"] = value
        elif key == "Model hash":
            params["model_hash"] = value
        elif key == "Denoising strength":
            params["strength"] = float(value)
        elif key == "Clip skip":
            params["clip_skip"] = int(value)
    return params
