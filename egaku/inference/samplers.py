"""Sampler names (as A1111/ComfyUI users know them) -> diffusers schedulers.

Each scheduler is built from the model's own scheduler config (betas, prediction type, timestep spacing),
with only the algorithm-specific options changed, and a fresh instance is made for every generation so
concurrent requests never share scheduler state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import EgakuError


@dataclass(frozen=True)
class Sampler:
    name: str
    label: str  # the name A1111 writes into its `parameters` chunk
    cls: type
    options: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    # DPM-Solver++(2M), Lu et al. 2022: good images in 20-25 steps; the default.
    Sampler("dpmpp-2m", "DPM++ 2M", DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    Sampler("dpmpp-2m-karras", "DPM++ 2M Karras", DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("euler", "Euler", EulerDiscreteScheduler),
    Sampler("euler-a", "Euler a", EulerAncestralDiscreteScheduler),
    Sampler("ddim", "DDIM", DDIMScheduler),
    Sampler("ddpm", "DDPM", DDPMScheduler),
    Sampler("pndm", "PLMS", PNDMScheduler, {"skip_prk_steps": True}),
    Sampler("heun", "Heun", HeunDiscreteScheduler),
    Sampler("lms", "LMS", LMSDiscreteScheduler),
    Sampler("unipc", "UniPC", UniPCMultistepScheduler),
]}
DEFAULT_SAMPLER = "dpmpp-2m"
_BY_LABEL = {s.label.lower(): s.name for s in SAMPLERS.values()}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def canonical_sampler(name: str) -> str:
    """Accept our names and A1111 labels ("DPM++ 2M Karras"), return our name or raise with the list."""
    key = name.strip().lower()
    if key in SAMPLERS:
        return key
    if key in _BY_LABEL:
        return _BY_LABEL[key]
    raise EgakuError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}", param="sampler")


def supports_zero_terminal_snr(sampler: Sampler) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(sampler.cls.__init__).parameters


def works_with(sampler: Sampler, base_config: dict[str, Any]) -> bool:
    """Whether ``sampler`` can sample the model whose scheduler config is ``base_config``: a zero-terminal-SNR
    model's only with a scheduler that keeps the rescaling (the others would silently drop it and sample on a
    schedule the model never saw)."""
    return not base_config.get("rescale_betas_zero_snr") or supports_zero_terminal_snr(sampler)


def usable_samplers(base_config: dict[str, Any]) -> list[str]:
    """The sampler names ``make_scheduler`` accepts for this model, in ``SAMPLERS``' order (what a server offers)."""
    return [s.name for s in SAMPLERS.values() if works_with(s, base_config)]


def usable_sampler(name: str, base_config: dict[str, Any]) -> str:
    """``name`` as ``canonical_sampler`` reads it, where the model whose scheduler config is ``base_config`` takes
    it (``works_with``); else an error listing those it takes. The server checks a request's sampler with it before
    queueing, and ``make_scheduler`` every sampler it builds."""
    sampler = SAMPLERS[canonical_sampler(name)]
    if not works_with(sampler, base_config):
        raise EgakuError(f"sampler {sampler.name!r} does not support this model's zero-terminal-SNR noise schedule; "
                         f"choose one of: {', '.join(usable_samplers(base_config))}", param="sampler")
    return sampler.name


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    sampler = SAMPLERS[usable_sampler(name, base_config)]
    return sampler.cls.from_config(dict(base_config), **sampler.options)


# Under this many steps, Karras sigmas on a zero-terminal-SNR model go wrong (measured on the built-in model:
# wrong colours at 4-10 steps, right from 12 on the prompts tried; 15 leaves a margin)
KARRAS_ZERO_SNR_MIN_STEPS = 15


def sampler_note(name: str, base_config: dict[str, Any], steps: int) -> str | None:
    """A warning for a sampler that works on this model but not at this step count; None when there is none."""
    sampler = SAMPLERS[canonical_sampler(name)]
    if (sampler.options.get("use_karras_sigmas") and base_config.get("rescale_betas_zero_snr")
            and steps < KARRAS_ZERO_SNR_MIN_STEPS):
        # sigma_max of a zero-terminal-SNR schedule is 4096 (diffusers' stand-in for infinity), and Karras'
        # spacing (rho 7) puts most of a short schedule's steps between 4096 and 200: near-pure noise
        return (f"{sampler.label} on this zero-terminal-SNR model spends most of {steps} steps at near-pure noise "
                f"(its Karras sigmas start at 4096); use {KARRAS_ZERO_SNR_MIN_STEPS}+ steps, or "
                f"{sampler.name.replace('-karras', '')}, whose steps are evenly spaced")
    return None


def sampling_runner(pipe, runner_cls: type, sampler: str):
    """A ``runner_cls`` (a diffusers Stable Diffusion pipeline class: text-to-image, img2img, inpaint) that shares
    ``pipe``'s models with a fresh ``sampler`` scheduler built from the model's own schedule, so concurrent
    calls never share scheduler state."""
    components = {**pipe.components, "scheduler": make_scheduler(sampler, dict(pipe.scheduler.config))}
    components.pop("requires_safety_checker", None)
    runner = runner_cls(**components, requires_safety_checker=False)
    runner.set_progress_bar_config(disable=True)
    return runner
