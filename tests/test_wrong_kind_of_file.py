"""A model given where a LoRA goes, or a LoRA given as the model, is named as what it is, with where it goes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import egaku
from egaku.errors import EgakuError
from egaku.lora.apply import resolve_lora
from egaku.models.loading import load_pipeline


def test_a_pipeline_folder_given_as_a_lora_is_named_a_model(tiny_model_dir):
    with pytest.raises(EgakuError, match="is a diffusers pipeline folder, a model, not a LoRA: give it as --model"):
        resolve_lora(str(tiny_model_dir), None)


def test_a_checkpoint_given_as_a_lora_is_named_a_model(tmp_path, tiny_model_dir):
    checkpoint = tmp_path / "v1-5.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, checkpoint)
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(EgakuError, match="is a single-file Stable Diffusion checkpoint, a model, not a LoRA"):
        egaku.generate(pipe, "a red star", steps=1, lora=[str(checkpoint)])


def test_a_lora_given_as_the_model_is_named_a_lora(style_lora_dir):
    with pytest.raises(EgakuError, match=r"style\.safetensors is a LoRA, not a model: give it as --lora"):
        load_pipeline(style_lora_dir / "style.safetensors", device="cpu")
