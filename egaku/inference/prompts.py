"""Midjourney-style prompt parameters, and the variation / upscale loop built on ``generate()``.

``"a red cat --ar 16:9 --seed 7 --no text, watermark --steps 30 --chaos 40"`` reads as the prompt
``"a red cat"`` plus option overrides. Parameters follow the prompt (as in Midjourney): everything from
the first ``--name`` token on is parameters. ``<lora:name:w>`` tags stay in the prompt; ``generate()``
handles them.

- ``--ar W:H`` / ``--aspect``: aspect ratio at the model's native pixel count;
- ``--seed N``: seed of the first image (image i uses N+i);
- ``--no a, b``: negative prompt (joined to any negative prompt already given);
- ``--steps N``: denoising steps;
- ``--chaos N`` / ``--c`` (0..100): how far results stray. With an init image (variations, img2img) it
  is the img2img strength, from ``CHAOS_MIN_STRENGTH`` at 0 to ``CHAOS_MAX_STRENGTH`` at 100; for
  text-to-image it lowers classifier-free guidance down to half at 100, which makes compositions less
  tied to the prompt and so more varied across the grid.

A value given both in the prompt and as an explicit option is refused rather than silently picked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from PIL import Image

from ..config import decimal_comma
from ..errors import EgakuError
from .generate import MAX_SEED, GeneratedImage, GenerateOptions, generate

# Midjourney's "subtle"/"strong" variations sit around these img2img strengths on SD models.
VARIATION_STRENGTH = 0.6
UPSCALE_STRENGTH = 0.3  # a "hires fix" pass: enough to add detail, too little to change the composition
CHAOS_MIN_STRENGTH = 0.25
CHAOS_MAX_STRENGTH = 0.9

# a Midjourney-style "--name" parameter (the first one ends the prompt's text)
PROMPT_PARAMETER = re.compile(r"(?:^|\s)--([A-Za-z][\w-]*)")
_ALIASES = {"ar": "ar", "aspect": "ar", "seed": "seed", "no": "no", "steps": "steps", "chaos": "chaos", "c": "chaos"}


def _number(name: str, text: str, kind: type, low: float, high: float):
    try:
        value = kind(text)
    except ValueError:
        decimal = decimal_comma(text) if kind is float else None  # "--chaos 12,5": a decimal comma
        hint = f": write --{name} {decimal} (with a decimal point, not a comma)" if decimal else ""
        raise EgakuError(f"prompt parameter --{name} needs a {'whole ' if kind is int else ''}number, got "
                         f"{text!r}{hint}", param="prompt") from None
    if not low <= value <= high:
        raise EgakuError(f"prompt parameter --{name} must be in {low}..{high}, got {value}", param="prompt")
    return value


def parse_prompt_parameters(prompt: str) -> tuple[str, dict[str, Any]]:
    """Split ``prompt`` into (text, parameters); parameters use the names ``ar``, ``seed``, ``no``,
    ``steps`` and ``chaos`` with typed values. Unknown ``--name`` parameters are an error."""
    matches = list(PROMPT_PARAMETER.finditer(prompt))
    if not matches:
        return prompt.strip(), {}
    text = prompt[: matches[0].start()].strip()
    params: dict[str, Any] = {}
    for k, match in enumerate(matches):
        raw = match.group(1).lower()
        end = matches[k + 1].start() if k + 1 < len(matches) else len(prompt)
        value = prompt[match.end(): end].strip()
        name = _ALIASES.get(raw)
        if name is None:
            raise EgakuError(f"unknown prompt parameter --{raw}; egaku understands --ar W:H, --seed N, "
                             "--no a, b, --steps N and --chaos 0..100", param="prompt")
        if name in params:
            raise EgakuError(f"prompt parameter --{raw} is given twice; keep one", param="prompt")
        if not value:
            raise EgakuError(f"prompt parameter --{raw} needs a value (e.g. --ar 16:9, --seed 7, --no text)",
                             param="prompt")
        if name == "ar":
            if not re.fullmatch(r"\d+(\.\d+)?:\d+(\.\d+)?", value):
                raise EgakuError(f"prompt parameter --ar needs W:H such as 16:9, got {value!r}", param="prompt")
            params[name] = value
        elif name == "seed":
            params[name] = _number(raw, value, int, 0, MAX_SEED)
        elif name == "steps":
            params[name] = _number(raw, value, int, 1, 1000)
        elif name == "chaos":
            params[name] = _number(raw, value, float, 0, 100)
        else:
            params[name] = value
    return text, params


def chaos_strength(chaos: float) -> float:
    return CHAOS_MIN_STRENGTH + (CHAOS_MAX_STRENGTH - CHAOS_MIN_STRENGTH) * chaos / 100.0


def chaos_sets_strength(has_init_image: bool, has_mask: bool) -> bool:
    """Whether ``--chaos`` is the img2img strength (an init image without a mask) rather than a lower guidance: a
    masked area is repainted from noise (strength 1, as the server's edits do), so there the grid varies, as in
    text-to-image, by guidance. ``egaku generate``, ``generate()`` and the server all read it so."""
    return has_init_image and not has_mask


def apply_prompt_parameters(opts: GenerateOptions, has_init_image: bool | None = None) -> GenerateOptions:
    """A copy of ``opts`` with the prompt's parameters moved into the options they stand for.

    ``has_init_image`` tells how ``--chaos`` applies (``chaos_sets_strength``) where ``opts`` does not hold the init
    image and mask (servers, images handed to ``generate()``).
    """
    text, params = parse_prompt_parameters(opts.prompt)
    if not params:
        return opts
    defaults = GenerateOptions()
    changes: dict[str, Any] = {"prompt": text}

    def take(field: str, value: Any, flag: str) -> None:
        current = getattr(opts, field)
        # set by a flag or keyword (the CLI and generate() record which, even at the default value), or away from
        # its default; an unset value (None) is never a conflict
        given = field in opts.given_options or current != getattr(defaults, field)
        if given and current is not None and current != value:
            raise EgakuError(f"{flag} is given twice: {current!r} as an option and {value!r} in the prompt; keep one",
                             param=field)
        changes[field] = value

    if "ar" in params:
        if opts.width or opts.height:
            raise EgakuError("the prompt has --ar but a width/height (size) is also given; keep one", param="size")
        take("aspect_ratio", params["ar"], "the aspect ratio")
    if "seed" in params:
        take("seed", params["seed"], "the seed")
    if "steps" in params:
        take("steps", params["steps"], "the number of steps")
    if "no" in params:
        changes["negative_prompt"] = ", ".join(p for p in (opts.negative_prompt.strip(), params["no"]) if p)
    if "chaos" in params:
        image_based = (chaos_sets_strength(opts.init_image is not None, bool(opts.mask)) if has_init_image is None
                       else has_init_image)
        if image_based:
            take("strength", round(chaos_strength(params["chaos"]), 4), "the img2img strength")
        else:
            from ..models.loading import DEFAULT_GUIDANCE

            # callers that know the model resolve its default guidance first (egaku generate, the server)
            guidance = DEFAULT_GUIDANCE if opts.guidance_scale is None else opts.guidance_scale
            changes["guidance_scale"] = guidance * (1.0 - 0.5 * params["chaos"] / 100.0)
    return dataclasses.replace(opts, **changes)


def variations(pipe, image: Image.Image, prompt: str = "", num_images: int = 4, seed: int | None = None,
               strength: float = VARIATION_STRENGTH, on_step: Callable[[int, int], None] | None = None,
               **overrides: Any) -> list[GeneratedImage]:
    """Variations of a chosen image: img2img at moderate strength with new seeds, same size."""
    overrides.setdefault("width", image.width)
    overrides.setdefault("height", image.height)
    return generate(pipe, prompt, init_image=image, num_images=num_images, seed=seed, strength=strength,
                    on_step=on_step, **overrides)


def upscale(pipe, image: Image.Image, prompt: str = "", factor: int = 2, strength: float = UPSCALE_STRENGTH,
            seed: int | None = None, on_step: Callable[[int, int], None] | None = None,
            **overrides: Any) -> GeneratedImage:
    """A "hires fix": resize ``factor``x (Lanczos), then a low-strength img2img pass that redraws detail."""
    if factor < 1:
        raise EgakuError(f"upscale factor must be at least 1, got {factor}", param="factor")
    width, height = image.width * factor, image.height * factor
    big = image.convert("RGB").resize((width, height), Image.LANCZOS)
    result = generate(pipe, prompt, init_image=big, num_images=1, seed=seed, strength=strength, width=width,
                      height=height, on_step=on_step, **overrides)[0]
    result.params["upscaled_from"] = f"{image.width}x{image.height}"
    return result


__all__ = ["parse_prompt_parameters", "apply_prompt_parameters", "chaos_strength", "chaos_sets_strength",
           "variations", "upscale", "VARIATION_STRENGTH", "UPSCALE_STRENGTH"]
