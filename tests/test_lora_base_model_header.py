"""The kohya-layout header names the base model's version as kohya writes it, which A1111 sorts LoRAs by."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from egaku.config import build
from egaku.lora.formats import base_model_metadata
from egaku.training.lora import TrainLoraOptions, train_lora


def a1111_version(metadata: dict[str, str]) -> str:
    """A1111's extensions-builtin/Lora/network.py NetworkOnDisk.detect_version, which (with its default
    lora_show_all off) lists a LoRA only beside checkpoints of that version."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def make_data(root: Path) -> Path:
    for cls, colour in (("red_star", (220, 30, 30)), ("blue_circle", (30, 30, 220))):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), tuple(c // (i + 1) for c in colour)).save(root / cls / f"{i}.png")
    return root


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize("config, version, architecture", [
    ({"cross_attention_dim": 768, "sample_size": 64}, "sd_v1", "stable-diffusion-v1/lora"),  # SD 1.x
    ({"cross_attention_dim": 1024, "sample_size": 64}, "sd_v2", "stable-diffusion-v2-512/lora"),  # 2.x base
    ({"cross_attention_dim": 1024, "sample_size": 96}, "sd_v2", "stable-diffusion-v2-768-v/lora"),  # 2.x 768-v
])
def test_base_model_entries_are_kohyas_for_each_version(config, version, architecture):
    entries = base_model_metadata(config)
    assert (entries["ss_base_model_version"], entries["modelspec.architecture"]) == (version, architecture)
    assert a1111_version(entries) == ("SD2" if version == "sd_v2" else "SD1")
    assert all(isinstance(v, str) for v in entries.values())


@pytest.fixture(scope="module")
def sd2_shaped_model(tmp_path_factory) -> Path:
    """The tiny pipeline with SD 2.x's text width: its text encoder's states, and the UNet's cross-attention, are
    1024 wide (OpenCLIP ViT-H's), as in every 2.x model."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from egaku.models.tiny import tiny_components

    parts = tiny_components()
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(**{**parts["unet"].config, "cross_attention_dim": 1024}).eval()
    config = parts["text_encoder"].config.to_dict()
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**{**config, "hidden_size": 1024,
                                                            "hidden_act": "gelu"})).eval()
    path = tmp_path_factory.mktemp("tiny-sd2") / "tiny-sd2"
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(path, safe_serialization=True)
    return path


def test_a_lora_trained_on_a_2x_model_says_so_and_one_on_1x_says_1x(tmp_path, sd2_shaped_model, tiny_model_dir):
    data = make_data(tmp_path / "data")
    for model, version in ((sd2_shaped_model, "SD2"), (tiny_model_dir, "SD1")):
        out = train_lora(build(TrainLoraOptions, dict(
            data=str(data), model=str(model), out=str(tmp_path / f"lora-{version}"), resolution=32, rank=4,
            max_steps=1, batch_size=2, checkpoint_every=0, min_images=2, progress=False, format="kohya",
            train_text_encoder=True, caption_template="a photo of {class}")))
        meta = header(out / f"lora-{version}.safetensors")
        assert a1111_version(meta) == version
        assert meta["ss_v2"] == str(version == "SD2")
        assert meta["modelspec.architecture"] == ("stable-diffusion-v2-512/lora" if version == "SD2"
                                                  else "stable-diffusion-v1/lora")
