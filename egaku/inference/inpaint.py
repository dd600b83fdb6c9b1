"""Inpainting: repaint the white part of a mask, keep the rest (the OpenAI images "edit with mask").

Works with any Stable Diffusion pipeline: dedicated 9-channel inpainting UNets get the masked image as
extra input; ordinary 4-channel UNets use diffusers' latent blending (the known region is re-noised
to each step's level and pasted back), which is what "where the model supports it" amounts to for them.
Same contract as ``generate()``: a fresh scheduler per call, image i uses seed+i, the parameters that
regenerate each image come back with it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..config import build
from ..errors import EgakuError
from .generate import (MAX_SEED, GeneratedImage, GenerateOptions, _validate, _version, decode_latents, resolve_size,
                       split_lora_arg)
from .samplers import SAMPLERS, canonical_sampler, make_scheduler


def inpaint(pipe, prompt: str, image: Image.Image, mask: Image.Image,
            on_step: Callable[[int, int], None] | None = None, **overrides: Any) -> list[GeneratedImage]:
    """Repaint where ``mask`` is white (L mode, same size as ``image``); ``overrides`` are
    ``GenerateOptions`` fields (strength defaults to 1.0 here: the masked area starts from noise)."""
    from diffusers import StableDiffusionInpaintPipeline

    overrides.setdefault("strength", 1.0)
    o = build(GenerateOptions, overrides, {"prompt": prompt, "init_image": "image"})
    # 1. Check inputs
    _validate(o)
    if mask.size != image.size:
        raise EgakuError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
                         "they must be the same size", param="mask")
    if int(o.steps * o.strength) < 1:
        raise EgakuError(f"{o.steps} steps at strength {o.strength} leave no denoising step; use more steps",
                         param="steps")
    sampler = canonical_sampler(o.sampler)
    width, height, _ = resolve_size(pipe, o.width, o.height, o.aspect_ratio)
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    mask = mask.convert("L").resize((width, height), Image.NEAREST)
    seed = random.randint(0, MAX_SEED - o.num_images) if o.seed is None else o.seed

    # 2. LoRAs: the same tags and --lora entries generate() takes
    text, specs = o.prompt, []
    if "<lora:" in text or o.lora:
        from ..lora.apply import apply_loras, parse_prompt_loras, resolve_lora

        text, tags = parse_prompt_loras(text)
        specs = [(resolve_lora(n, o.lora_dir), w) for n, w in tags]
        specs += [(resolve_lora(n, o.lora_dir), w) for n, w in map(split_lora_arg, o.lora)]
        apply_loras(pipe, specs)

    # 3. A fresh scheduler per call
    base_config = getattr(pipe, "egaku_base_scheduler_config", None) or dict(pipe.scheduler.config)
    components = {**pipe.components, "scheduler": make_scheduler(sampler, base_config)}
    components.pop("requires_safety_checker", None)
    runner = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    runner.set_progress_bar_config(disable=True)
    info = getattr(pipe, "egaku_info", None)
    base_params = {
        "prompt": o.prompt, "negative_prompt": o.negative_prompt, "steps": o.steps, "sampler": sampler,
        "sampler_label": SAMPLERS[sampler].label, "guidance_scale": o.guidance_scale, "width": width,
        "height": height, "model_name": info.name if info else None, "model_hash": info.hash if info else None,
        "loras": [(str(p), w) for p, w in specs], "egaku_version": _version(), "strength": o.strength,
        "init_image": "image", "mask": "mask",
    }
    steps_per_batch = max(1, int(o.steps * o.strength))
    total = steps_per_batch * -(-o.num_images // o.batch_size)
    done = 0

    def step_callback(_pipe, _i, _t, kwargs):
        nonlocal done
        done += 1
        if on_step:
            on_step(done, total)
        return kwargs

    results: list[GeneratedImage] = []
    try:
        # 4. Denoise batch by batch, one generator per image
        for start in range(0, o.num_images, o.batch_size):
            count = min(o.batch_size, o.num_images - start)
            seeds = [seed + start + k for k in range(count)]
            with torch.no_grad():
                latents = runner(
                    prompt=[text] * count, negative_prompt=[o.negative_prompt] * count, image=image,
                    mask_image=mask, width=width, height=height, strength=o.strength,
                    num_inference_steps=o.steps, guidance_scale=o.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="latent",
                    callback_on_step_end=step_callback,
                ).images
            # 5. Decode
            images = runner.image_processor.postprocess(decode_latents(runner, latents), output_type="pil")
            for k, img in enumerate(images):
                results.append(GeneratedImage(img, {**base_params, "seed": seeds[k], "index": start + k}))
    finally:
        if specs:
            from ..lora.apply import remove_loras

            remove_loras(pipe)
    return results


__all__ = ["inpaint"]
