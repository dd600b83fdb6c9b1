"""egaku (描く, "to draw"): image generation with Stable Diffusion-class models, LoRA fine-tuning,
latent diffusion and GAN training, and an OpenAI-compatible images server.

The public Python API (imported lazily, so ``import egaku`` is instant)::

    pipe = egaku.load_pipeline("builtin")            # or a folder, a .safetensors file, a hub id, "tiny"
    images = egaku.generate(pipe, "a red circle", seed=1, num_images=4)
    images[0].image.save("x.png")                    # images[i].params regenerate it
"""

from __future__ import annotations

import importlib
import logging


class _NoImageProcessorFallbackNotice(logging.Filter):
    """transformers announces, when diffusers' pipelines import CLIPImageProcessor, that it falls back to the PIL
    version because torchvision is not installed. egaku never runs an image processor (no safety checker), and
    torchvision cannot be installed beside the CPU build of torch this project pins, so the notice says nothing
    to act on; every other transformers message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNotice())

_EXPORTS = {
    "load_pipeline": "egaku.models.loading",
    "ModelInfo": "egaku.models.loading",
    "generate": "egaku.inference.generate",
    "GenerateOptions": "egaku.inference.generate",
    "GeneratedImage": "egaku.inference.generate",
    "sampler_names": "egaku.inference.samplers",
    "read_params": "egaku.inference.metadata",
    "save_png": "egaku.inference.metadata",
    "EgakuError": "egaku.errors",
    "train_lora": "egaku.training.lora",
    "TrainLoraOptions": "egaku.training.lora",
    "apply_loras": "egaku.lora.apply",
    "remove_loras": "egaku.lora.apply",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'egaku' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily loaded names too, so dir(egaku) and editors' completion show the public API
    return sorted(set(globals()) | set(_EXPORTS))
