"""Text-to-image and image-to-image generation with any Stable Diffusion pipeline. Never trains.

Reproducibility contract: image ``i`` of a run uses seed ``seed + i`` through its own CPU generator, so
any image of a batch can be regenerated alone (``-n 1 --seed seed+i``) and comes out identical, on any
batch size and any device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import build, option
from ..errors import EgakuError
from ..models.text import (DEFAULT_EMPHASIS, EMPHASIS_MODES, check_clip_skip, emphasis_mode, encode_prompt_pair,
                           needs_chunked_encoding, prompt_editing_note)
from .metadata import lora_short_hash
from .samplers import DEFAULT_SAMPLER, SAMPLERS, canonical_sampler, sampler_names, sampler_note, sampling_runner


class EmphasisMode(str):
    """The emphasis option's type: a mode's name as ``emphasis_mode`` reads it (A1111's spellings too), the CLI's
    error naming the modes. Presets and saved options may also hold True or False, the option's older on/off
    (the default mode and none), which ``emphasis_mode`` reads."""

    def __new__(cls, value: str) -> str:  # a plain str: what the options hold, whatever their source
        import argparse

        try:
            return emphasis_mode(value)
        except EgakuError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


MAX_SIDE = 4096  # beyond this even an 80 GB GPU runs out of memory on SD-class UNets
MAX_SEED = 2**32 - 1


@dataclass
class GenerateOptions:
    """Everything `egaku generate` takes; the Python API ``generate()`` reads the same fields."""

    prompt: str = option("", help="what to draw, in A1111's syntax: (word:1.3) and [word] weigh words, BREAK starts "
                         "a new 75-token chunk, <lora:name:0.8> applies a LoRA", positional=True)
    negative_prompt: str = option("", help="what to steer away from")
    model: str = option("builtin", help="builtin, tiny, a diffusers folder, a .safetensors checkpoint or a hub id")
    model_config: str | None = option(None, help="local diffusers folder whose configs describe a single-file "
                                      "checkpoint")
    allow_pickle: bool = option(False, help="allow .ckpt/.pt/.bin checkpoints (read with weights_only=True)")
    steps: int = option(20, help="denoising steps")
    guidance_scale: float | None = option(None, help="classifier-free guidance scale (1 = off); default: the "
                                          "model's own (3 for the built-in model), else 7.5", aliases=["--cfg"])
    seed: int | None = option(None, help="seed of the first image; image i uses seed+i (random if unset)")
    num_images: int = option(1, help="how many images", short="-n")
    batch_size: int = option(4, help="images denoised together (memory vs speed); results do not depend on it")
    width: int | None = option(None, help="image width in pixels (default: the model's native size)")
    height: int | None = option(None, help="image height in pixels (default: the model's native size)")
    aspect_ratio: str | None = option(None, help="W:H such as 16:9, at the model's native pixel count",
                                      aliases=["--ar"])
    sampler: str = option(DEFAULT_SAMPLER, help=f"one of {', '.join(SAMPLERS)}")
    emphasis: EmphasisMode | bool = option(
        DEFAULT_EMPHASIS, help="how (word:1.3) and [word] weigh words: comfy (ComfyUI's rule: a weighted word's "
        "embedding moves away from the empty prompt's), original (A1111's default: embeddings multiplied by their "
        "weights, then each 75-token chunk rescaled to its old mean), no-norm (A1111's No norm: multiplied only), "
        "ignore (A1111's Ignore: brackets read, weights dropped) or none (A1111's None: brackets and BREAK are words; "
        "prompts over 75 tokens are chunked either way)", const_flags={"--no-emphasis": "none"})
    clip_skip: int = option(1, help="text-encoder layer the prompt is read from, counted from the end as A1111 and "
                                    "kohya count: 1 = the last, 2 = the one before it (NovelAI-derived anime models)")
    hires_scale: float = option(1.0, help="A1111's hires fix: sample at the size asked, upscale by this factor "
                                "(Lanczos) and redraw detail with an img2img pass at --hires-strength; 1 = off")
    hires_steps: int = option(0, help="hires fix: steps of the img2img pass, of which it runs steps x strength "
                              "as A1111 does (0 = --steps)")
    # A1111's default of 0.7 goes with its latent upscaler, whose blur needs it; from a Lanczos upscale 0.7 redraws
    # the composition (the built-in model draws a second shape) where 0.5 sharpens the same one
    hires_strength: float = option(0.5, help="hires fix: how much of the upscaled image is redrawn (A1111's "
                                   "denoising strength)")
    init_image: str | None = option(None, help="start from this image (img2img)")
    mask: str | None = option(None, help="with --init-image: repaint only the mask's white part (or, in a mask with "
                              "transparency, its transparent part, as OpenAI's edits); the rest keeps the init "
                              "image's pixels. The masked part is repainted from noise (strength 1, as the server's "
                              "edits) unless --strength is given")
    strength: float = option(0.6, help="img2img: how much of the init image is re-noised (0..1]")
    lora: list[str] = option([], help="PATH[:SCALE] of a LoRA to apply (a .safetensors file, a train-lora "
                                "folder or a hub id org/name[/FILE.safetensors]); repeatable")
    lora_dir: str | None = option(None, help="folder where <lora:name:w> prompt tags are looked up")
    embedding_dir: str | None = option(None, help="folder of textual-inversion embeddings (A1111's embeddings/): a "
                                       "prompt word that names a file there (EasyNegative) uses its vectors")
    out: str = option("outputs", help="output folder")
    overwrite: bool = option(False, help="number files from 0 again, first removing the numbered files egaku wrote "
                             "in --out (NNNNN-*.png, NNNNN-options.json); other files stay")
    grid: bool = option(True, help="also write a contact sheet when more than one image is made")
    prompt_file: str | None = option(None, help="text file with one prompt per line (each gets -n images)")
    from_image: str | None = option(None, help="re-run the parameters stored in this PNG, with the model and LoRA "
                                    "files it records; flags given here override them", aliases=["--from"])
    device: str = option("auto", help="auto, cpu, cuda or mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = option("auto", help="auto (fp32 on CPU, fp16 on GPU), float32, float16 or bfloat16",
                        choices=["auto", "float32", "float16", "bfloat16"])
    progress: bool = option(True, help="show a progress bar")
    given_options: list[str] = option([], cli=False, help="the options a flag or preset set (filled by the CLI): "
                                      "--from keeps these even where they equal the default")


@dataclass
class GeneratedImage:
    image: Image.Image
    params: dict[str, Any]  # everything needed to regenerate it; stored in the PNG

    @property
    def seed(self) -> int:
        return self.params["seed"]


def size_multiple(pipe) -> int:
    """Pixel multiple a size must have: the VAE's downscale factor, and 8, which diffusers' pipelines
    check whatever the model. (The UNet itself takes latents of any size: diffusers forwards the
    skip-connection sizes to its upsamplers.)"""
    return math.lcm(8, int(pipe.vae_scale_factor))


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def resolve_size(pipe, width: int | None, height: int | None, aspect_ratio: str | None,
                 ratio_from: str = "aspect ratio") -> tuple[int, int, str | None]:
    """(width, height, note): fill defaults, apply W:H, round to the model's multiple. ``ratio_from`` names where
    the W:H came from, for the error when it is too far from square for the model."""
    base = native_size(pipe)
    multiple = size_multiple(pipe)
    if aspect_ratio:
        if width or height:
            raise EgakuError("give either --aspect-ratio or --width/--height, not both", param="size")
        try:
            aw, ah = (float(x) for x in aspect_ratio.replace("x", ":").split(":"))
            if aw <= 0 or ah <= 0:
                raise ValueError
        except ValueError:
            raise EgakuError(f"aspect ratio {aspect_ratio!r} is not W:H with positive numbers (e.g. 16:9)",
                             param="size") from None
        width = int(round(base * math.sqrt(aw / ah)))
        height = int(round(base * math.sqrt(ah / aw)))
        if min(width, height) < multiple or max(width, height) > MAX_SIDE:
            raise EgakuError(f"{ratio_from} {aspect_ratio} is too far from square for this model: at its native "
                             f"pixel count ({base}x{base}) it gives {width}x{height}, and a side must be "
                             f"{multiple}..{MAX_SIDE} pixels; give the size in pixels (--width and --height; the "
                             "API's size)", param="size")
    width = base if width is None else width
    height = base if height is None else height
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < multiple or value > MAX_SIDE:
            raise EgakuError(f"{name} {value} is outside what this model can take: use {multiple}..{MAX_SIDE} "
                             f"pixels (a multiple of {multiple}; native size {base})", param="size")
    rw = max(multiple, int(round(width / multiple)) * multiple)
    rh = max(multiple, int(round(height / multiple)) * multiple)
    note = None
    if (rw, rh) != (width, height):
        note = f"size {width}x{height} rounded to {rw}x{rh} (this model needs multiples of {multiple})"
    return rw, rh, note


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode to [-1, 1] images; in half precision a NaN result is retried with the VAE in fp32
    (SD 1.x/SDXL VAEs overflow in fp16 on some inputs, which otherwise gives black images)."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    with torch.no_grad():
        images = vae.decode(scaled.to(vae.dtype)).sample
        if vae.dtype != torch.float32 and torch.isnan(images).any() and torch.isfinite(latents).all():
            print("egaku: the VAE produced NaNs in reduced precision; decoding again in float32")
            vae.to(torch.float32)
            images = vae.decode(scaled.to(torch.float32)).sample
    if not torch.isfinite(images).all():  # saved, it would be an all-black image that looks like a result
        where = "the denoiser's output" if not torch.isfinite(latents).all() else "the VAE's output"
        raise EgakuError(f"the image came out as NaN/inf ({where} overflowed), which would be saved as a black image; "
                         "with LoRAs, lower their weights (past about 10 a LoRA's update swamps the model) or check "
                         "the files with `egaku info`; in half precision, try --dtype float32", param="lora")
    return images


def lora_display_name(path: Path) -> str:
    """``style.safetensors`` -> style; ``style/pytorch_lora_weights.safetensors`` -> style."""
    return path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem


def _validate(o: GenerateOptions) -> None:
    if o.steps < 1:
        raise EgakuError(f"--steps must be at least 1, got {o.steps}", param="steps")
    if o.num_images < 1:
        raise EgakuError(f"--num-images must be at least 1, got {o.num_images}", param="n")
    if o.batch_size < 1:
        raise EgakuError(f"--batch-size must be at least 1, got {o.batch_size}", param="batch_size")
    if o.guidance_scale is not None and (o.guidance_scale < 0 or not math.isfinite(o.guidance_scale)):
        raise EgakuError(f"--guidance-scale must be a finite number >= 0, got {o.guidance_scale}",
                         param="guidance_scale")
    if o.init_image is not None and not 0.0 < o.strength <= 1.0:
        raise EgakuError(f"--strength must be in (0, 1], got {o.strength}", param="strength")
    if o.init_image is not None and int(o.steps * o.strength) < 1:
        raise EgakuError(f"{o.steps} steps at strength {o.strength} leave no denoising step (img2img runs "
                         f"steps x strength steps); use at least {min_steps_at(o.strength)} steps", param="steps")
    if not 1.0 <= o.hires_scale <= 4.0 or not math.isfinite(o.hires_scale):
        raise EgakuError(f"--hires-scale must be in 1..4 (1 = no hires fix), got {o.hires_scale}", param="hires_scale")
    if o.hires_scale > 1:
        if o.init_image is not None:
            raise EgakuError("--hires-scale is for text-to-image, as A1111's hires fix is; with --init-image, give "
                             "the size wanted (--width/--height) instead", param="hires_scale")
        if not 0.0 < o.hires_strength <= 1.0:
            raise EgakuError(f"--hires-strength must be in (0, 1], got {o.hires_strength}", param="hires_strength")
        hires_steps = o.hires_steps or o.steps
        if o.hires_steps < 0 or int(hires_steps * o.hires_strength) < 1:
            raise EgakuError(f"the hires pass runs steps x strength steps: {hires_steps} x {o.hires_strength} leaves "
                             f"none; give --hires-steps {min_steps_at(o.hires_strength)} or more", param="hires_steps")
    if o.clip_skip < 1:
        raise EgakuError(f"--clip-skip counts layers from the end and starts at 1 (the last), got {o.clip_skip}",
                         param="clip_skip")
    if o.seed is not None and not 0 <= o.seed <= MAX_SEED:
        raise EgakuError(f"--seed must be in 0..{MAX_SEED}, got {o.seed}", param="seed")
    if o.seed is not None and o.seed + o.num_images - 1 > MAX_SEED:
        # image i uses seed+i, and a seed past the maximum could not be given back to --seed or --from
        raise EgakuError(f"{o.num_images} images from --seed {o.seed} would use seeds {o.seed}.."
                         f"{o.seed + o.num_images - 1}, past the largest seed {MAX_SEED}; use --seed "
                         f"{MAX_SEED - o.num_images + 1} or lower, or fewer images", param="seed")


# an edit repaints its mask from noise, as OpenAI's edits do: the strength of a masked edit that gives none
MASK_STRENGTH = 1.0


def edit_strength(o: GenerateOptions, has_mask: bool) -> float:
    """The img2img strength ``o`` runs at: with a mask and no strength given, ``MASK_STRENGTH``. Given is set by a
    flag, a preset or a keyword (``given_options``), or away from the default (an options object built in Python
    records none), as ``apply_prompt_parameters`` counts it. ``egaku generate``, ``generate()`` and the server's
    edits all take the rule from here."""
    given = "strength" in o.given_options or o.strength != GenerateOptions.strength
    return MASK_STRENGTH if has_mask and not given else o.strength


def min_steps_at(strength: float) -> int:
    """The fewest steps that leave img2img at ``strength`` one denoising step (it runs int(steps x strength))."""
    steps = max(1, math.ceil(1 / strength))
    while int(steps * strength) < 1:  # 1 / strength rounded down in floating point
        steps += 1
    return steps


def _load_init_image(source: str | Image.Image | None) -> Image.Image | None:
    if source is None:
        return None
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    from ..data.images import ImageError, open_image

    try:
        return open_image(source)
    except ImageError as exc:
        raise EgakuError(f"--init-image {exc}", param="image") from None


def _denoising_steps(runner, steps: int, strength: float | None) -> int:
    """Denoising steps (step callbacks) one batch runs: the scheduler's own timesteps, which a 2nd-order
    sampler (Heun: 2 x steps - 1) or PLMS (steps + 1) make more than ``steps``; for img2img (``strength``)
    the share diffusers' img2img and inpaint pipelines run (their ``get_timesteps``)."""
    scheduler = type(runner.scheduler).from_config(runner.scheduler.config)  # the runner's own stays untouched
    scheduler.set_timesteps(steps)
    if strength is None:
        return len(scheduler.timesteps)
    t_start = steps - min(int(steps * strength), steps)
    return len(scheduler.timesteps[t_start * scheduler.order:])


def _hires_size(pipe, scale: float, width: int, height: int) -> tuple[int, int] | None:
    """The hires pass's size: the first pass's times ``scale``, at the model's multiple (None: no hires pass)."""
    if scale <= 1:
        return None
    multiple = size_multiple(pipe)
    hires = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))
    if hires == (width, height):
        print(f"egaku: --hires-scale {scale:g} rounds back to {width}x{height} (this model needs multiples "
              f"of {multiple}): the hires pass redraws at the same size")
    if max(hires) > MAX_SIDE:
        raise EgakuError(f"--hires-scale {scale:g} makes {hires[0]}x{hires[1]}, over {MAX_SIDE} pixels a "
                         "side; give a smaller scale or size", param="hires_scale")
    return hires


def _apply_requested_loras(pipe, o: GenerateOptions, cleanup: ExitStack) -> tuple[str, list, list, list[dict]]:
    """Apply ``--lora`` files and the prompt's ``<lora:name:w>`` tags to ``pipe`` (``cleanup`` takes them off
    again); returns the prompt without its tags, the tags, (name, weight) of each LoRA, and each file's record
    for the image's metadata."""
    from ..lora.apply import has_prompt_loras

    if not has_prompt_loras(o.prompt) and not o.lora:
        return o.prompt, [], [], []
    from ..lora.apply import (apply_loras, parse_lora_arg, parse_prompt_loras, remove_loras, resolve_lora,
                              resolve_lora_option, trained_clip_skip)

    text, tag_loras = parse_prompt_loras(o.prompt)
    specs = [(resolve_lora(n, o.lora_dir), w) for n, w in tag_loras]
    origins = ["prompt"] * len(specs)
    for item in o.lora:
        name, scale = parse_lora_arg(item)
        # the server passes paths it found in its own LoRA folder
        specs.append((resolve_lora_option(name, o.lora_dir), scale))
        origins.append("option")
    for path, _ in specs:  # A1111 does not warn either; a LoRA read at another layer quietly does less
        trained_at = trained_clip_skip(path)
        if trained_at is not None and trained_at != o.clip_skip:
            print(f"egaku: {lora_display_name(Path(path))} was trained at clip skip {trained_at}; this image "
                  f"uses {o.clip_skip} (give --clip-skip {trained_at})")
    # a tag's two weights (<lora:name:0.8:0.5>) are recorded as apply_loras takes them: {"text_encoder", "unet"}
    # a tag's LoRA is recorded by the name it was looked up by (styles/ink, not ink, which another file may share),
    # so that the recorded tags find the same files again
    names = [name.strip() for name, _ in tag_loras] + [lora_display_name(Path(p)) for p, _ in specs[len(tag_loras):]]
    lora_files = [{"name": name, "path": os.path.abspath(p),
                   "weight": w if isinstance(w, dict) else float(w), "hash": lora_short_hash(p), "from": origin}
                  for name, (p, w), origin in zip(names, specs, origins)]
    cleanup.callback(remove_loras, pipe)  # (before: a file that fails to load leaves none of the others)
    apply_loras(pipe, specs)
    return text, tag_loras, [(f["name"], w) for f, (_, w) in zip(lora_files, specs)], lora_files


def generate(pipe, prompt: str | None = None, opts: GenerateOptions | None = None,
             init_image: Image.Image | None = None, mask_image: Image.Image | None = None,
             on_step: Callable[[int, int], None] | None = None, **overrides: Any) -> list[GeneratedImage]:
    """Generate ``num_images`` images; returns each with the parameters that regenerate it.

    ``opts`` (or keyword overrides of its fields) as for the CLI; ``init_image`` may be a PIL image.
    ``mask_image`` (with an init image) repaints only where the mask is white: a 9-channel inpainting
    UNet gets the masked image as input, an ordinary UNet uses latent blending (the kept region is
    re-noised to each step's level and pasted back, ``keep_unmasked``); outside the mask the result
    holds the init image's pixels (grey mask values mix the two).
    ``on_step(done, total)`` is called after every denoising step (progress bars, servers).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    if prompt is not None:
        overrides["prompt"] = prompt
    if init_image is not None:
        overrides.setdefault("init_image", (opts.init_image if opts else None) or "image")
    o = build(GenerateOptions, dataclasses.asdict(opts) if opts else {}, overrides)
    # what the caller set: the CLI's record, and the keywords given here with a value (None is "not set", as
    # variations() passes seed=None); apply_prompt_parameters also counts any value away from its default
    o.given_options = sorted(set(opts.given_options if opts else [])
                             | {k for k, v in overrides.items() if v is not None})
    if o.guidance_scale is None:
        from ..models.loading import recommended_guidance

        o.guidance_scale = recommended_guidance(pipe)
    o.strength = edit_strength(o, mask_image is not None or bool(o.mask))  # (a mask needs an init image: checked below)
    if "--" in o.prompt:  # Midjourney-style "--ar 16:9 --seed 7" read as the CLI and the server read them
        from .prompts import apply_prompt_parameters, chaos_sets_strength

        # (a mask handed in as an image is not in o.mask)
        o = apply_prompt_parameters(o, has_init_image=chaos_sets_strength(
            o.init_image is not None, mask_image is not None or bool(o.mask)))
    # files are recorded whole, so that --from finds them again; images handed in (Python, the server) are not files
    recorded_files = {"init_image": os.path.abspath(o.init_image) if init_image is None and o.init_image else None,
                      "mask": os.path.abspath(o.mask) if mask_image is None and o.mask else None}
    if mask_image is None and o.mask:
        from ..data.images import ImageError, decode_image

        try:
            mask_image = repaint_mask(decode_image(o.mask))
        except ImageError as exc:
            raise EgakuError(f"--mask {exc}", param="mask") from None
    if mask_image is not None and o.init_image is None:
        raise EgakuError("a mask needs an image to repaint (init_image)", param="mask")
    # 1. Check inputs
    o.emphasis = emphasis_mode(o.emphasis)  # a mode's name (True and False, the older on/off, read as modes)
    _validate(o)
    check_clip_skip(o.clip_skip, pipe.text_encoder)
    sampler = canonical_sampler(o.sampler)
    source = _load_init_image(init_image if init_image is not None else o.init_image)
    if source is not None and o.width is None and o.height is None and not o.aspect_ratio:
        # img2img keeps the init image's shape, at the model's native pixel count (as --ar W:H does)
        width, height, note = resolve_size(pipe, None, None, f"{source.width}:{source.height}",
                                           ratio_from="the init image's shape")
    else:
        width, height, note = resolve_size(pipe, o.width, o.height, o.aspect_ratio)
    for note in (note, sampler_note(sampler, pipe.scheduler.config, o.steps)):
        if note:
            print(f"egaku: {note}")
    init = None
    if source is not None:
        init = source.resize((width, height), Image.LANCZOS) if source.size != (width, height) else source
    mask = None
    if mask_image is not None:
        source_size = source.size
        if mask_image.size != source_size:
            raise EgakuError(f"the mask is {mask_image.size[0]}x{mask_image.size[1]} but the image is "
                             f"{source_size[0]}x{source_size[1]}; they must be the same size", param="mask")
        mask = mask_image.convert("L").resize((width, height), Image.NEAREST)
    hires = _hires_size(pipe, o.hires_scale, width, height)
    seed = random.randint(0, MAX_SEED - o.num_images) if o.seed is None else o.seed

    cleanup = ExitStack()  # what this call adds to the pipeline comes out again, whatever happens
    with cleanup:
        # 2. LoRAs: explicit --lora and <lora:name:w> tags in the prompt
        text, tag_loras, lora_record, lora_files = _apply_requested_loras(pipe, o, cleanup)
        from ..lora.apply import has_prompt_loras, take_out_other_network_tags

        text, other_tags = take_out_other_network_tags(text)
        if other_tags:  # a prompt written for A1111 that names its hypernetworks, say: not words for the encoder
            print(f"egaku: {', '.join(other_tags)}: egaku applies <lora:...> and <lyco:...> tags only; taken out of "
                  "the prompt, as A1111 takes out the extra-network tags it does not apply")

        if has_prompt_loras(o.negative_prompt):  # as the prompt's are matched: <LORA:x> is words there too
            print("egaku: <lora:...> and <lyco:...> tags are applied from the prompt only; those in the negative "
                  "prompt are read as words (take them out)")
        # textual-inversion embeddings the prompts name: their words become the embeddings' tokens
        encoder_texts, embeddings = [text, o.negative_prompt], []
        if o.embedding_dir:
            from .embeddings import load_embeddings, unload_embeddings

            encoder_texts, embeddings = load_embeddings(pipe, encoder_texts, o.embedding_dir, o.allow_pickle)
            cleanup.callback(unload_embeddings, pipe, embeddings)

        # 3. A fresh scheduler per call: concurrent calls never share scheduler state. An inpainting UNet (9 input
        # channels) takes the mask as input; any other repaints by blending (diffusers' inpaint pipeline does this
        # for 4 latent channels only, so models with other latent sizes, like the built-in one, do it here)
        inpainting_unet = mask is not None and pipe.unet.config.in_channels == 9
        if inpainting_unet:
            runner_cls = StableDiffusionInpaintPipeline
        else:
            runner_cls = StableDiffusionImg2ImgPipeline if init is not None else StableDiffusionPipeline
        runner = sampling_runner(pipe, runner_cls, sampler)
        # prompts egaku encodes itself: weights, chunks past 75 tokens, an earlier text layer (egaku.models.text),
        # or embeddings (their words are already the tokens: the pipelines would expand them a second time)
        # a multi-vector embedding is not split between two 75-token chunks (A1111 moves it whole)
        embedding_tokens = {pipe.tokenizer.convert_tokens_to_ids(e.tokens[0]): len(e.tokens) for e in embeddings}
        own_encoding = o.clip_skip > 1 or bool(embeddings) or any(
            needs_chunked_encoding(pipe.tokenizer, words, o.emphasis) for words in encoder_texts)
        if o.emphasis != "none":
            for words in (text, o.negative_prompt):
                note = prompt_editing_note(words)
                if note:
                    print(f"egaku: {note}")

        info = getattr(pipe, "egaku_info", None)
        base_params = {
            "prompt": o.prompt, "negative_prompt": o.negative_prompt, "steps": o.steps, "sampler": sampler,
            "sampler_label": SAMPLERS[sampler].label, "guidance_scale": o.guidance_scale, "width": width,
            "height": height, "model_name": info.name if info else None, "model_hash": info.hash if info else None,
            "loras": lora_record, "egaku_version": _version(), "clip_skip": o.clip_skip,
            # what --from needs to make it again: the model and each LoRA file (see metadata.py)
            "model_source": model_source(info), "lora_files": lora_files,
        }
        # the mode, and whether brackets were read (the record of egaku before it had modes; images of egaku before
        # it read A1111's syntax have neither: see --from)
        base_params.update(emphasis=o.emphasis != "none", emphasis_mode=o.emphasis)
        if embeddings:
            base_params.update(embeddings=[e.record() for e in embeddings],
                               embedding_dir=os.path.abspath(o.embedding_dir))
        if info is not None and info.kind in ("single-file", "pickle") and o.model_config:
            base_params["model_config"] = os.path.abspath(o.model_config)
        if tag_loras and o.lora_dir:  # the prompt's <lora:name:w> tags are names in this folder
            base_params["lora_dir"] = os.path.abspath(o.lora_dir)
        if init is not None:
            base_params.update(strength=o.strength, init_image=recorded_files["init_image"] or "image")
        if mask is not None:
            base_params["mask"] = recorded_files["mask"] or "mask"
        if hires is not None:  # width and height stay the first pass's, as A1111 records them
            base_params.update(hires_scale=o.hires_scale, hires_steps=o.hires_steps, hires_strength=o.hires_strength,
                               hires_upscaler="Lanczos")
            hires_runner = sampling_runner(pipe, StableDiffusionImg2ImgPipeline, sampler)
        # img2img runs only the last `strength` fraction of the schedule
        steps_per_batch = _denoising_steps(runner, o.steps, None if init is None else o.strength)
        if hires is not None:
            steps_per_batch += _denoising_steps(hires_runner, o.hires_steps or o.steps, o.hires_strength)
        total_steps = steps_per_batch * math.ceil(o.num_images / o.batch_size)
        done = 0

        def step_callback(_pipe, _i, _t, kwargs):
            nonlocal done
            done += 1
            if on_step:
                on_step(done, total_steps)
            return kwargs

        embeds = None
        if own_encoding:  # the same for every batch: encoded once
            with torch.no_grad():
                embeds = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, *encoder_texts, o.clip_skip,
                                            o.emphasis, keep_together=embedding_tokens)
        results: list[GeneratedImage] = []
        # 4. Denoise batch by batch; each image has its own generator seeded seed+i
        for start in range(0, o.num_images, o.batch_size):
            count = min(o.batch_size, o.num_images - start)
            seeds = [seed + start + k for k in range(count)]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            call: dict[str, Any] = dict(
                prompt=[text] * count, negative_prompt=[o.negative_prompt] * count,
                num_inference_steps=o.steps, guidance_scale=o.guidance_scale, generator=generators,
                output_type="latent", callback_on_step_end=step_callback,
            )
            if embeds is not None:
                del call["prompt"], call["negative_prompt"]
                call["prompt_embeds"], call["negative_prompt_embeds"] = (e.repeat(count, 1, 1) for e in embeds)
            text_args = {k: call[k] for k in ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")
                         if k in call}
            if inpainting_unet:
                call.update(image=init, mask_image=mask, width=width, height=height, strength=o.strength)
            elif init is not None:
                call.update(image=[init] * count, strength=o.strength)
                if mask is not None:
                    blend = keep_unmasked(runner, init, mask, seeds)
                    call["callback_on_step_end"] = (lambda p, i, t, kwargs:
                                                    step_callback(p, i, t, blend(p, i, t, kwargs)))
            else:
                call.update(width=width, height=height)
            with torch.no_grad():
                latents = runner(**call).images
            # 5. Decode (with the fp32 fallback) and post-process
            images = runner.image_processor.postprocess(decode_latents(runner, latents), output_type="pil")
            if mask is not None:  # outside the mask the image is the input's pixels, as A1111 pastes them back: a
                # VAE decoder reads its whole latent (the built-in one mixes colours across the image), so the
                # kept latents alone would not decode to the kept pixels
                images = [Image.composite(img, init, mask) for img in images]
            if hires is not None:  # the hires fix: upscale, then redraw detail from the same seeds
                hires_call = dict(text_args, image=[img.resize(hires, Image.LANCZOS) for img in images],
                                  strength=o.hires_strength, num_inference_steps=o.hires_steps or o.steps,
                                  guidance_scale=o.guidance_scale, output_type="latent",
                                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                                  callback_on_step_end=step_callback)
                with torch.no_grad():
                    latents = hires_runner(**hires_call).images
                images = hires_runner.image_processor.postprocess(decode_latents(hires_runner, latents),
                                                                  output_type="pil")
            for k, img in enumerate(images):
                results.append(GeneratedImage(img, {**base_params, "seed": seeds[k], "index": start + k}))
    return results


def repaint_mask(img: Image.Image) -> Image.Image:
    """The area a mask image asks to repaint, white on black: in an image with transparency its transparent
    pixels (OpenAI's edits), else its white ones."""
    if "A" in img.getbands() or "transparency" in img.info:
        return img.convert("RGBA").getchannel("A").point(lambda a: 255 if a < 128 else 0)
    return img.convert("L").point(lambda v: 255 if v >= 128 else 0)


def keep_unmasked(runner, init: Image.Image, mask: Image.Image, seeds: list[int]) -> Callable:
    """An img2img step callback that repaints only the mask's white area: after every step the rest of the
    latents is set back to the init image's, noised to the next step's level (the latent blending diffusers'
    inpaint pipeline applies to ordinary UNets, with noise drawn from each image's seed)."""
    import numpy as np

    vae = runner.vae
    with torch.no_grad():
        pixels = runner.image_processor.preprocess(init).to(vae.device, vae.dtype)
        known = vae.encode(pixels).latent_dist.mode()
    if getattr(vae.config, "shift_factor", None):
        known = known - vae.config.shift_factor
    known = (known * vae.config.scaling_factor).float()
    size = (known.shape[-1], known.shape[-2])
    repaint = torch.from_numpy((np.asarray(mask.resize(size, Image.NEAREST), dtype=np.float32) >= 128).astype(
        np.float32))[None, None]
    noise = torch.cat([torch.randn(known.shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    known = known.expand(len(seeds), -1, -1, -1)

    def blend(runner, i: int, t, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        timesteps = runner.scheduler.timesteps[len(runner.scheduler.timesteps) - runner._num_timesteps:]
        kept = known if i + 1 >= len(timesteps) else runner.scheduler.add_noise(known, noise, timesteps[i + 1:i + 2])
        kwargs["latents"] = repaint.to(latents) * latents + (1 - repaint.to(latents)) * kept.to(latents)
        return kwargs

    return blend


def model_source(info) -> str | None:
    """What ``--model`` loads this pipeline again: tiny, builtin, a hub id, or the absolute path of the
    folder or file it was read from (a path as given would depend on the folder the command ran in)."""
    if info is None:
        return None
    if info.kind in ("tiny", "builtin"):
        return info.kind
    if info.kind == "hub" or info.path is None:
        return info.name
    return str(info.path)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("egaku")
    except PackageNotFoundError:
        return "dev"


def reproduce_options(params: dict[str, Any]) -> dict[str, Any]:
    """Options that regenerate an image from its stored parameters."""
    keys = ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height", "strength", "clip_skip",
            "hires_scale", "hires_steps", "hires_strength", "embedding_dir")
    out = {k: params[k] for k in keys if params.get(k) is not None}
    mode = recorded_emphasis(params)
    if mode is not None:
        out["emphasis"] = mode if mode in EMPHASIS_MODES else "original"  # a name A1111 does not know: its default
    if params.get("sampler"):  # one egaku does not have stays as written: --sampler may replace it, else
        # generate names it with the list of those there are
        try:
            out["sampler"] = canonical_sampler(str(params["sampler"]))
        except EgakuError:
            out["sampler"] = str(params["sampler"])
    # the model and the LoRA files, which images written before egaku recorded them (and A1111's) lack
    if params.get("model_source"):
        out["model"] = params["model_source"]
        if params.get("model_config"):
            out["model_config"] = params["model_config"]
    if params.get("lora_files") is not None:
        out["lora"] = [f"{f['path']}:{f['weight']!r}" for f in params["lora_files"] if f.get("from") == "option"]
    if params.get("lora_dir"):
        out["lora_dir"] = params["lora_dir"]
    for key in ("init_image", "mask"):  # files; "image" and "mask" stand for images handed in, which are not
        if params.get(key) and params[key] != IMAGE_PLACEHOLDERS[key]:
            out[key] = str(params[key])
    return out


def recorded_emphasis(params: dict[str, Any]) -> str | None:
    """The emphasis mode an image was made with, from its stored parameters: egaku's ``emphasis_mode``, or
    A1111's "Emphasis" as ``parse_a1111`` reads it (a name no mode has is returned as written); from egaku before
    it had modes, its on/off ``emphasis`` (on: comfy, its rule then); A1111's Original where A1111's text has no
    "Emphasis", as A1111 leaves its default out. None for egaku's images from before it read A1111's syntax."""
    mode = params.get("emphasis_mode")
    if isinstance(mode, str):
        try:
            return emphasis_mode(mode)
        except EgakuError:
            return mode
    if isinstance(params.get("emphasis"), bool):
        return emphasis_mode(params["emphasis"])
    return None if "egaku_version" in params else "original"


# what an image records in place of the init image's or mask's path when it was handed in, not read from a file
IMAGE_PLACEHOLDERS = {"init_image": "image", "mask": "mask"}


__all__ = ["GenerateOptions", "GeneratedImage", "generate", "resolve_size", "decode_latents", "sampler_names",
           "reproduce_options"]
