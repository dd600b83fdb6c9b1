"""Request bodies of the images API -> validated generation options, before anything is queued.

Every check that can fail on a request happens here, on the event loop, so a bad request gets its 4xx
at once and never takes a place in a model's queue. JSON bodies are typed strictly (``"n": "2"`` is an
error, as with OpenAI); multipart form fields are text and are converted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import EgakuError, NotFoundError
from ..inference.generate import (MAX_SEED, GenerateOptions, edit_strength, min_steps_at, resolve_size,
                                  size_multiple)
from ..inference.prompts import UPSCALE_STRENGTH, VARIATION_STRENGTH, apply_prompt_parameters, chaos_sets_strength
from ..inference.samplers import usable_sampler
from ..models.loading import recommended_guidance

# Fields of the OpenAI images API that describe DALL-E / gpt-image rendering choices with no Stable
# Diffusion counterpart: accepted so existing client code runs unchanged, and otherwise ignored.
OPENAI_IGNORED = {"quality", "style", "background", "moderation", "output_compression", "input_fidelity",
                  "safety_identifier", "user"}
COMMON = {"model", "n", "size", "response_format", "output_format", "negative_prompt", "seed", "steps",
          "guidance_scale", "sampler", "loras", "clip_skip", "emphasis"} | OPENAI_IGNORED
ALLOWED = {
    "generation": COMMON | {"prompt"},
    "edit": COMMON | {"prompt", "strength"},
    "variation": COMMON | {"prompt", "strength"},
    "upscale": COMMON | {"prompt", "strength"},
}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


@dataclass
class Limits:
    """What one request may ask of the server (bounds the work a single request can queue)."""

    max_n: int = 10
    max_side: int = 1024
    max_steps: int = 150
    lora_dir: str | None = None
    embedding_dir: str | None = None
    allow_pickle: bool = False  # serve --allow-pickle: embeddings in pickle files load too


@dataclass
class ImageRequest:
    """A validated request: ``options`` are ``generate()`` keyword arguments."""

    kind: str
    model: str | None
    options: dict[str, Any]
    response_format: str = "url"
    revised_prompt: str = ""
    init_image: Image.Image | None = None
    mask: Image.Image | None = None


def _bad(message: str, param: str) -> EgakuError:
    return EgakuError(message, param=param)


def pickle_embeddings(embedding_dir: str | Path, files: dict[str, list[Path]] | None = None) -> dict[str, list[Path]]:
    """The embeddings of the folder (lower-cased name -> files) whose files are all pickles (.pt/.bin): what a server
    without --allow-pickle neither offers nor loads. ``files``: the folder's ``embedding_files``, where the caller
    has read them already."""
    from ..inference.embeddings import PICKLE_SUFFIXES, embedding_files

    files = embedding_files(embedding_dir) if files is None else files
    return {name: paths for name, paths in files.items()
            if all(path.suffix.lower() in PICKLE_SUFFIXES for path in paths)}


def refuse_pickle_embeddings(prompt: str, negative_prompt: str, limits: Limits) -> None:
    """A 400 for a prompt word that names a pickle embedding on a server started without --allow-pickle: the
    operator's choice, which a request cannot change (so the message does not ask the client for the flag)."""
    if not limits.embedding_dir or limits.allow_pickle:
        return
    from ..inference.embeddings import names_in

    refused = pickle_embeddings(limits.embedding_dir)
    for param, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        used = names_in([text], refused)
        if used:
            name = used[0]
            shown = refused[name][0].relative_to(limits.embedding_dir).as_posix()
            raise _bad(f"the embedding {refused[name][0].stem!r} ({shown}) is a pickle file, and this server was "
                       "started without --allow-pickle, so it loads only .safetensors embeddings (its operator's "
                       f"choice); take the word out of the {param.replace('_', ' ')}, or use an embedding that GET "
                       "/v1/egaku/options lists", param)


def _as_int(body: Mapping[str, Any], key: str, low: int, high: int, form: bool) -> int | None:
    value = body.get(key)
    if value is None or (form and value == ""):
        return None
    if form and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _bad(f"'{key}' must be a whole number, got {value!r}", key) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be a whole number, got {value!r}", key)
    if not low <= value <= high:
        raise _bad(f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def _as_float(body: Mapping[str, Any], key: str, low: float, high: float, form: bool,
              name: str | None = None) -> float | None:
    """``body[key]`` as a number in low..high (None where it is absent); ``name``: how errors name the field where
    ``body`` is nested in the request ("loras[1].weight"), so that the client learns which entry is wrong."""
    name = name or key
    value = body.get(key)
    if value is None or (form and value == ""):
        return None
    if form and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(f"'{name}' must be a number, got {value!r}", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a finite number, got {value!r}", name)
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def _as_str(body: Mapping[str, Any], key: str, max_len: int = 4000) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"'{key}' must be a string, got {type(value).__name__}", key)
    if len(value) > max_len:
        raise _bad(f"'{key}' is {len(value)} characters long; the limit is {max_len}", key)
    try:  # JSON may carry lone UTF-16 surrogates ("\ud800"), which no tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"'{key}' is not valid Unicode text (it holds a lone surrogate such as \\ud800)", key) from None
    return value


def parse_size(text: str | None, pipe, limits: Limits) -> tuple[int | None, int | None]:
    """"WxH" -> (W, H) within the server's limits and the model's pixel multiple; "auto"/None -> model default."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(text)
    if not match:
        raise _bad(f"size {text!r} is not WIDTHxHEIGHT (e.g. \"512x512\")", "size")
    width, height = int(match[1]), int(match[2])
    multiple = size_multiple(pipe)
    if not (multiple <= width <= limits.max_side and multiple <= height <= limits.max_side):
        raise _bad(f"size {width}x{height} is outside {multiple}..{limits.max_side} pixels per side, "
                   "the limit of this server", "size")
    if width % multiple or height % multiple:
        near = f"{round(width / multiple) * multiple or multiple}x{round(height / multiple) * multiple or multiple}"
        raise _bad(f"size {width}x{height} is not a multiple of {multiple} pixels, which this model needs; "
                   f"use e.g. {near}", "size")
    return width, height


def lora_names(names: list[str], limits: Limits) -> None:
    """Each name must name a LoRA in the server's folder, as resolve_lora finds it there (never a path elsewhere):
    its name, found in sub-folders too, or its path inside the folder ('styles/deep')."""
    if not names:
        return
    if len(names) > MAX_LORAS:
        raise _bad(f"{len(names)} LoRAs asked for ('loras' and <lora:...> tags together); the limit is {MAX_LORAS}",
                   "lora")
    for name in names:
        _check_lora_name(name)
        parts = name.replace("\\", "/").split("/")
        if ".." in parts or name.startswith(("/", "\\", "~")) or Path(name).is_absolute():
            raise _bad(f"LoRA name {name!r} points outside the server's LoRA folder; give the name of a LoRA in it",
                       "lora")
    if limits.lora_dir is None:
        raise NotFoundError(f"LoRA {names[0]!r} not found: this server has no LoRA folder (start it with "
                            "`egaku serve --lora-dir DIR`)", param="lora")
    from ..lora.apply import resolve_lora

    for name in names:
        try:
            resolve_lora(name, limits.lora_dir)
        except OSError:  # a name the file system cannot even look up
            raise NotFoundError(f"LoRA {name[:40]!r} not found in the server's LoRA folder", param="lora") from None


def _loras(value: Any, form: bool) -> list[tuple[str, float]]:
    if value is None or (form and value == ""):
        return []
    if form and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _bad("'loras' must be a JSON list such as [{\"name\": \"style\", \"weight\": 0.8}]",
                       "loras") from None
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise _bad(f"'loras' must be a list of at most {MAX_LORAS} {{\"name\", \"weight\"}} objects", "loras")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "weight"}:
            raise _bad(f"each entry of 'loras' must be {{\"name\": str, \"weight\": number}}; loras[{i}] is "
                       f"{item!r}", f"loras[{i}]")
        weight = _as_float(item, "weight", -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT, form=False, name=f"loras[{i}].weight")
        out.append((item["name"], 1.0 if weight is None else weight))
    return out


MAX_LORAS = 8  # per request: the 'loras' field and the prompt's <lora:name:w> tags together
# a LoRA's weight, in 'loras' and in the prompt's tags: far past it the image is noise or black
MAX_LORA_WEIGHT = 10.0


def _tag_weight_out_of_range(tag: str) -> float | None:
    """The first weight of one <lora:name:w> (or <lora:name:te:unet>) tag outside -MAX_LORA_WEIGHT..MAX_LORA_WEIGHT,
    else None."""
    from ..lora.apply import component_weights, parse_prompt_loras

    for _, weight in parse_prompt_loras(tag)[1]:
        for value in component_weights(weight):
            if not -MAX_LORA_WEIGHT <= value <= MAX_LORA_WEIGHT:
                return value
    return None


def _check_tag_weights(prompt: str) -> None:
    """The prompt's LoRA tags must keep the limit the 'loras' field has."""
    from ..lora.apply import LORA_TAG

    for match in LORA_TAG.finditer(prompt):
        weight = _tag_weight_out_of_range(match[0])
        if weight is not None:
            tag = match[0] if len(match[0]) <= 80 else match[0][:77] + "..."
            raise _bad(f"the weight of the prompt's tag {tag} must be between {-MAX_LORA_WEIGHT} and "
                       f"{MAX_LORA_WEIGHT}, got {weight:g}", "prompt")


def _check_lora_name(name: str) -> None:
    """A LoRA name a request may give: not empty, of a length a file name can have, valid text."""
    if not name.strip() or len(name) > 255:
        raise _bad(f"LoRA name {name[:40]!r}{'...' if len(name) > 40 else ''} is not a name a LoRA file can have "
                   "(empty, or over 255 characters)", "lora")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("a LoRA name is not valid Unicode text", "lora") from None


def default_size(image: Image.Image, pipe, limits: Limits) -> tuple[int, int]:
    """The size of an edit or variation that gives none: the upload's shape at the model's native pixel count,
    as `egaku generate --init-image` makes it (``resolve_size`` with the image's W:H), then scaled down to fit
    the server's limit. (The upload's own size would let a 4000x4000 image start a job of the largest size.)"""
    try:
        width, height, _ = resolve_size(pipe, None, None, f"{image.width}:{image.height}")
    except EgakuError:  # so long and thin that one side falls outside what the model takes
        raise _bad(f"the image's shape {image.width}x{image.height} is too far from square for this model at its "
                   "native size; give 'size'", "size") from None
    multiple = size_multiple(pipe)
    scale = min(1.0, limits.max_side / max(width, height))
    return tuple(max(multiple, int(side * scale) // multiple * multiple)  # type: ignore[return-value]
                 for side in (width, height))


def default_steps(limits: Limits) -> int:
    """The steps of a request that gives none: the CLI's default, capped at the server's limit (OpenAI's API has
    no steps field, so its clients never send one and must not be refused for a value they did not ask for)."""
    return min(GenerateOptions.steps, limits.max_steps)


def min_strength_at(steps: int) -> float:
    """The lowest strength, in hundredths, at which img2img with ``steps`` steps runs one denoising step (it runs
    int(steps x strength)): what to ask for where the server's step limit is below ``min_steps_at(strength)``."""
    hundredths = math.ceil(100 / steps)
    while int(steps * (hundredths / 100)) < 1:  # 1 / steps rounded down in floating point
        hundredths += 1
    return hundredths / 100


def _usable_prompt(prompt: str, limits: Limits) -> tuple[str, EgakuError | None]:
    """A prompt from an uploaded image without what this server would refuse in it: --parameters it does not
    know (Midjourney's --v 6) and <lora:name> tags of LoRAs its folder does not have; with, for the first tag
    taken out that names a LoRA this server cannot find (or has no folder for), the error that says so
    (``_stored_lora``): a tag without a name, or of weights a request's own tag may not have, names
    no LoRA to look for, and goes quietly."""
    from ..inference.prompts import PROMPT_PARAMETER, parse_prompt_parameters
    from ..lora.apply import LORA_TAG, parse_prompt_loras

    try:
        parse_prompt_parameters(prompt)
    except EgakuError:
        prompt = prompt[: PROMPT_PARAMETER.search(prompt).start()].strip()
    unusable: list[EgakuError] = []

    def keep(tag: re.Match) -> str:
        try:
            [(name, _)] = parse_prompt_loras(tag[0])[1]  # it has a name, and weights that are finite numbers
        except EgakuError:
            return " "
        if _tag_weight_out_of_range(tag[0]) is not None:  # a request's own tag of that weight is refused
            return " "
        found = _stored_lora(f"the image's prompt uses the LoRA {name[:40]!r} ({tag[0][:80]})", name, limits,
                             "send a 'prompt' (the image's without the tag, say)")
        if isinstance(found, EgakuError):
            unusable.append(found)
            return " "
        return tag[0]

    kept = re.sub(r"\s{2,}", " ", LORA_TAG.sub(keep, prompt)).strip()
    return kept, unusable[0] if unusable else None


def _stored_lora(what: str, name: str, limits: Limits, instead: str) -> Path | EgakuError:
    """The file of the LoRA ``name`` that an uploaded image records, where this server finds it; else the 4xx that
    says so (a variation or upscale that went on without it would give an image made without the LoRA, and say
    nothing). ``what`` names the LoRA ("the image was made with the LoRA 'x'"); the message says why the server
    cannot use it and the two ways on: the LoRA added to the server's folder, or ``instead`` (the request's own
    field, which replaces what the image records)."""
    from ..lora.apply import resolve_lora

    if not limits.lora_dir:
        return NotFoundError(f"{what}, and this server has no LoRA folder to find it in (its operator can give "
                             f"one: egaku serve --lora-dir DIR); {instead} to go on without it", param="image")
    try:
        return resolve_lora(name, limits.lora_dir)
    except OSError:  # a name the file system cannot even look up
        return NotFoundError(f"{what}, which is not in this server's LoRA folder: add it to that folder, or "
                             f"{instead} to go on without it", param="image")
    except NotFoundError as exc:  # (its message: the names the folder has, one that differs only in case)
        return NotFoundError(f"{what}, which is not in this server's LoRA folder ({exc}): add it to that folder, "
                             f"or {instead} to go on without it", param="image")
    except EgakuError as exc:  # a name several files share, a path out of the folder
        return EgakuError(f"{what}, which this server cannot use: {exc}; or {instead}", param="image")


def reused_settings(stored: Mapping[str, Any] | None, pipe, limits: Limits) -> dict[str, Any]:
    """What a variation or upscale takes over from the parameters stored in its image (egaku's PNG chunk or
    A1111's), as A1111's "send to img2img" does: prompt, negative prompt, steps, guidance, sampler, clip skip
    and the LoRAs given as options. The file came from the client, so each value is checked as a request
    field would be, and one that would be refused (out of this server's limits, an unknown sampler, or one
    this model does not take: an image made with LMS elsewhere, varied on a zero-terminal-SNR model) is left
    to the server's default instead. A LoRA is taken over only when this server's folder has one of that
    name, and, where the image records its hash, the same file; ``unusable_stored_loras`` says which are not,
    and ``parse_image_request`` refuses a request that would go on without them."""
    return _reuse(stored, pipe, limits)[0]


def unusable_stored_loras(stored: Mapping[str, Any] | None, pipe, limits: Limits) -> dict[str, EgakuError]:
    """The LoRAs an uploaded image records that this server cannot apply as the image was made with them (not in
    its folder, no folder, a name that fits several files, another file of that name), by the request field that
    replaces what the image records: "prompt" (a <lora:> tag of the image's prompt) and "loras" (a LoRA given as
    an option), each with the 4xx that names the first such LoRA and what to do."""
    return _reuse(stored, pipe, limits)[1]


def _reuse(stored: Mapping[str, Any] | None, pipe, limits: Limits) -> tuple[dict[str, Any], dict[str, EgakuError]]:
    """(``reused_settings``, ``unusable_stored_loras``), read in one pass."""
    unusable: dict[str, EgakuError | None] = {}
    if not stored:
        return {}, {}
    fields = {
        "prompt": lambda: _as_str(stored, "prompt"),
        "negative_prompt": lambda: _as_str(stored, "negative_prompt"),
        "steps": lambda: _as_int(stored, "steps", 1, limits.max_steps, False),
        "guidance_scale": lambda: _as_float(stored, "guidance_scale", 0.0, 50.0, False),
        "sampler": lambda: None if _as_str(stored, "sampler", 100) is None else usable_sampler(
            stored["sampler"], dict(pipe.scheduler.config)),
        "clip_skip": lambda: _as_int(stored, "clip_skip", 1, pipe.text_encoder.config.num_hidden_layers, False),
        "emphasis": lambda: _recorded_emphasis(stored),
    }
    reused: dict[str, Any] = {}
    for key, read in fields.items():
        try:
            value = read()
        except EgakuError:
            continue
        if value is not None:
            reused[key] = value
    if "prompt" in reused:
        reused["prompt"], unusable["prompt"] = _usable_prompt(reused["prompt"], limits)
    loras = []
    files = stored.get("lora_files")
    if isinstance(files, list):
        from ..inference.metadata import lora_short_hash

        for entry in files:
            if not isinstance(entry, dict) or entry.get("from") != "option" or not isinstance(entry.get("name"), str):
                continue
            try:
                weight = _as_float(entry, "weight", -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT, False)
            except EgakuError:
                continue
            weight = 1.0 if weight is None else weight
            name = entry["name"]
            what = f"the image was made with the LoRA {name[:40]!r} (weight {weight:g})"
            found = _stored_lora(what, name, limits, "send 'loras' (the LoRAs to use instead, or [] for none)")
            if isinstance(found, EgakuError):
                unusable["loras"] = unusable.get("loras") or found
                continue
            now = lora_short_hash(found)
            if entry.get("hash") in (None, now):
                loras.append((name, weight))
            elif not unusable.get("loras"):
                unusable["loras"] = EgakuError(
                    f"{what}, whose file had the hash {entry['hash']}; the file of that name in this server's LoRA "
                    f"folder is another one (hash {now}), so the image would not be made again as it was: send "
                    f"'loras' to choose ([{{\"name\": {json.dumps(name)}, \"weight\": {weight:g}}}] uses the "
                    "folder's file, [] none)", param="image")
    if loras:
        reused["loras"] = loras
    return reused, {key: error for key, error in unusable.items() if error is not None}


def _recorded_emphasis(stored: Mapping[str, Any]) -> str | None:
    """The emphasis mode an uploaded image was made with (``recorded_emphasis``: an A1111 image without the entry,
    A1111's Original), where it is one of egaku's; None for a name egaku does not have, left to the default."""
    from ..inference.generate import recorded_emphasis
    from ..models.text import EMPHASIS_MODES

    mode = recorded_emphasis(dict(stored))
    return mode if mode in EMPHASIS_MODES else None


def _emphasis(value: Any, form: bool) -> str | None:
    """The 'emphasis' field: one of egaku's emphasis modes (A1111's spellings, "No norm", read too); None where the
    request leaves it out."""
    from ..models.text import EMPHASIS_MODES, emphasis_mode

    if value is None or (form and value == ""):
        return None
    if isinstance(value, str) and len(value) <= 40:
        try:
            return emphasis_mode(value)
        except EgakuError:
            pass
    raise _bad(f"'emphasis' must be one of {', '.join(map(repr, EMPHASIS_MODES))}, got {value!r:.60}", "emphasis")


def parse_image_request(kind: str, body: Mapping[str, Any], pipe, limits: Limits, *, form: bool = False,
                        image: Image.Image | None = None, mask: Image.Image | None = None,
                        stored: Mapping[str, Any] | None = None) -> ImageRequest:
    """Validate ``body`` for endpoint ``kind`` (generation, edit, variation, upscale).

    ``stored``: the parameters the uploaded image was made with; a variation or upscale reuses them
    where the request leaves a field out (``reused_settings``), and is refused where they name a LoRA this
    server cannot apply that the request does not replace ('prompt' for the prompt's tags, 'loras' for the
    others): the image it would make would lack the LoRA (``unusable_stored_loras``).
    """
    stream = body.get("stream")
    if form and isinstance(stream, str):
        stream = {"": None, "false": False, "true": True}.get(stream.strip().lower(), stream)
    if stream not in (None, False):  # OpenAI's clients may send "stream": false, which asks for what is done here
        raise _bad("streamed partial images ('stream': true) are not done by this server; leave 'stream' out or set "
                   "it to false to get the finished images", "stream")
    unknown = sorted(set(body) - ALLOWED[kind] - {"image", "image[]", "mask", "stream"})
    if unknown:
        raise _bad(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} for "
                   f"{kind} requests; allowed: {', '.join(sorted(ALLOWED[kind] - OPENAI_IGNORED))}", unknown[0])
    model = _as_str(body, "model", 200)
    # OpenAI's gpt-image models always answer with b64_json, so client code written for them reads only that
    response_format = _as_str(body, "response_format") or (
        "b64_json" if model is not None and model.startswith("gpt-image") else "url")
    if response_format not in ("url", "b64_json"):
        raise _bad(f"response_format must be 'url' or 'b64_json', got {response_format!r}", "response_format")
    output_format = _as_str(body, "output_format")
    if output_format not in (None, "png"):
        raise _bad(f"output_format {output_format!r} is not supported; egaku returns PNG (with its parameters)",
                   "output_format")
    prompt = _as_str(body, "prompt")
    if kind in ("generation", "edit") and (prompt is None or not prompt.strip()):
        raise _bad("'prompt' is required and must not be empty", "prompt")
    reused, unusable = _reuse(stored, pipe, limits) if kind in ("variation", "upscale") else ({}, {})
    prompt = reused.get("prompt", "") if prompt is None else prompt
    n = _as_int(body, "n", 1, limits.max_n, form)
    if kind == "upscale" and n not in (None, 1):
        raise _bad("upscale makes one image per request; leave 'n' out or set it to 1", "n")
    steps = _as_int(body, "steps", 1, limits.max_steps, form)
    steps_asked = steps is not None  # (not the uploaded image's: a prompt's --steps may replace those)
    steps = reused.get("steps") if steps is None else steps
    seed = _as_int(body, "seed", 0, MAX_SEED, form)
    guidance = _as_float(body, "guidance_scale", 0.0, 50.0, form)
    guidance = reused.get("guidance_scale") if guidance is None else guidance
    strength = _as_float(body, "strength", 0.01, 1.0, form)
    sampler = _as_str(body, "sampler", 100)
    sampler = reused.get("sampler") if sampler is None else sampler
    clip_skip = _as_int(body, "clip_skip", 1, pipe.text_encoder.config.num_hidden_layers, form)
    clip_skip = reused.get("clip_skip") if clip_skip is None else clip_skip
    emphasis = _emphasis(body.get("emphasis"), form)
    emphasis = reused.get("emphasis") if emphasis is None else emphasis
    negative = _as_str(body, "negative_prompt")
    negative = reused.get("negative_prompt", "") if negative is None else negative
    loras = reused.get("loras", []) if body.get("loras") is None else _loras(body.get("loras"), form)
    # a LoRA the image records that the request leaves to it, and that this server cannot apply: a 4xx, not an image
    # made without it that nothing marks as such (the field the request gives replaces what the image records)
    for field in ("prompt", "loras"):
        if field in unusable and body.get(field) is None:
            raise unusable[field]
    width, height = parse_size(_as_str(body, "size", 40), pipe, limits)
    if kind == "upscale" and width is not None:
        raise _bad("upscale always doubles the image's size; leave 'size' out", "size")

    has_image = kind != "generation"
    if has_image and image is None:
        raise _bad("an 'image' file is required", "image")
    opts = GenerateOptions(prompt=prompt or "", negative_prompt=negative, num_images=n or 1, seed=seed,
                           width=width, height=height, progress=False)
    opts.steps = steps  # None until the prompt's --steps has had its say: unset is never a conflict with it
    opts.given_options = ["steps"] if steps_asked else []  # an explicit 20 and "--steps 5" conflict too
    # the model's own default guidance, before --chaos in the prompt scales it
    opts.guidance_scale = recommended_guidance(pipe) if guidance is None else guidance
    # a sampler the request names that this model refuses is a 400 here, not a failed job (one stored in an
    # uploaded image is left to the default instead: reused_settings)
    if sampler is not None:
        opts.sampler = usable_sampler(sampler, dict(pipe.scheduler.config))
    if clip_skip is not None:
        opts.clip_skip = clip_skip
    if emphasis is not None:
        opts.emphasis = emphasis
    # an edit with a mask repaints the masked area from noise, as OpenAI's edits do (and the CLI's, generate()'s)
    default_strength = {"variation": VARIATION_STRENGTH, "upscale": UPSCALE_STRENGTH}.get(
        kind, edit_strength(opts, mask is not None))
    opts.strength = default_strength if strength is None else strength
    # Midjourney-style parameters in the prompt ("--ar 16:9 --seed 7 --no text")
    try:
        opts = apply_prompt_parameters(opts, has_init_image=chaos_sets_strength(has_image, mask is not None))
    except EgakuError as exc:
        raise EgakuError(str(exc), param=exc.param if exc.param in ("prompt", "size") else "prompt") from None
    if opts.steps is None:
        opts.steps = default_steps(limits)
    if kind in ("generation", "edit") and not opts.prompt.strip():
        raise _bad("the prompt is empty once its --parameters are taken out; say what to draw", "prompt")
    if opts.seed is not None and opts.seed + opts.num_images - 1 > MAX_SEED:  # image i uses seed + i
        raise _bad(f"'seed' {opts.seed} with n={opts.num_images} would use seeds up to "
                   f"{opts.seed + opts.num_images - 1}, past the largest seed {MAX_SEED}; use a seed of at most "
                   f"{MAX_SEED - opts.num_images + 1}", "seed")
    if opts.steps > limits.max_steps:
        raise _bad(f"steps {opts.steps} is over this server's limit of {limits.max_steps}", "steps")
    if opts.aspect_ratio:
        # W:H at the model's native pixel count, on this server's pixel grid (the response's "size" says it)
        w, h, _ = resolve_size(pipe, None, None, opts.aspect_ratio)
        m = size_multiple(pipe)
        w, h = (max(m, round(side / m) * m) for side in (w, h))
        if max(w, h) > limits.max_side:
            raise _bad(f"--ar {opts.aspect_ratio} gives {w}x{h}, over this server's {limits.max_side}-pixel limit",
                       "size")
        opts.width, opts.height, opts.aspect_ratio = w, h, None
    if kind in ("edit", "variation") and opts.width is None:
        opts.width, opts.height = default_size(image, pipe, limits)
    if kind == "upscale":
        opts.width, opts.height = image.width, image.height
        if 2 * max(image.size) > limits.max_side:
            raise _bad(f"upscaling {image.width}x{image.height} would give more than this server's "
                       f"{limits.max_side}-pixel limit per side", "image")
    if has_image and int(opts.steps * opts.strength) < 1:
        needed = min_steps_at(opts.strength)
        if needed > limits.max_steps:  # no step count this server allows works: only more strength does
            raise _bad(f"img2img at strength {opts.strength} needs at least {needed} steps (it runs steps x strength "
                       f"steps), over this server's limit of {limits.max_steps}; give a 'strength' of at least "
                       f"{min_strength_at(limits.max_steps)}, or start the server with --max-steps {needed}",
                       "strength")
        raise _bad(f"{opts.steps} steps at strength {opts.strength} leave no denoising step (img2img runs "
                   f"steps x strength steps); use at least {needed} steps", "steps")

    # LoRAs: explicit list and <lora:name:w> (or <lyco:name:w>) prompt tags, all bare names inside the server's folder
    from ..lora.apply import has_prompt_loras, parse_prompt_loras

    tag_names: list[str] = []
    if has_prompt_loras(opts.prompt):  # (a tag without a name is refused here, as generate refuses it)
        tag_names = [name for name, _ in parse_prompt_loras(opts.prompt)[1]]
        _check_tag_weights(opts.prompt)
    lora_names(tag_names + [name for name, _ in loras], limits)

    options = {k: getattr(opts, k) for k in ("prompt", "negative_prompt", "num_images", "seed", "steps",
                                              "guidance_scale", "sampler", "width", "height", "aspect_ratio",
                                              "clip_skip", "emphasis")}
    if has_image:
        options["strength"] = opts.strength
    if loras or tag_names:
        from ..lora.apply import resolve_lora

        # found in the server's folder here (sub-paths too): generate reads a name with a separator as a path
        options["lora"] = [f"{resolve_lora(name, limits.lora_dir)}:{weight}" for name, weight in loras]
        options["lora_dir"] = str(Path(limits.lora_dir))
    if limits.embedding_dir:
        options["embedding_dir"] = str(Path(limits.embedding_dir))
        options["allow_pickle"] = limits.allow_pickle
    revised = opts.prompt
    if has_prompt_loras(revised):
        revised = parse_prompt_loras(revised)[0]
    refuse_pickle_embeddings(revised, opts.negative_prompt, limits)  # the texts generate() looks for embeddings in
    return ImageRequest(kind, model, options, response_format, revised, image, mask)
