"""A LoRA trained on, and merged into, a pickled single-file base (.ckpt, as many A1111 models still are): refused
unless --allow-pickle is given, which train-lora and merge-lora take as generate does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from egaku.config import build
from egaku.errors import EgakuError
from egaku.lora.commands import MergeLoraOptions, merge_lora_command
from egaku.training.lora import TrainLoraOptions, train_lora


@pytest.fixture(scope="module")
def pickled_base(tmp_path_factory, tiny_model_dir) -> Path:
    from egaku.models.loading import load_pipeline
    from egaku.models.single_file import pipeline_to_original

    ckpt = tmp_path_factory.mktemp("pickled") / "model.ckpt"
    torch.save({"state_dict": pipeline_to_original(load_pipeline(tiny_model_dir, device="cpu"))}, ckpt)
    return ckpt


def train_options(tmp_path: Path, model: Path, config: Path, **overrides) -> TrainLoraOptions:
    data = tmp_path / "data" / "red_star"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (200 - 50 * i, 30, 30)).save(data / f"{i}.png")
    return build(TrainLoraOptions, dict(data=str(tmp_path / "data"), model=str(model), model_config=str(config),
                                        out=str(tmp_path / "out"), resolution=32, rank=2, max_steps=1, batch_size=2,
                                        min_images=2, progress=False, format="diffusers", **overrides))


def test_train_lora_and_merge_lora_read_a_pickled_base_only_with_allow_pickle(tmp_path, pickled_base, tiny_model_dir):
    with pytest.raises(EgakuError, match=r"model\.ckpt is a pickle .*pass --allow-pickle"):
        train_lora(train_options(tmp_path, pickled_base, tiny_model_dir))
    out = train_lora(train_options(tmp_path, pickled_base, tiny_model_dir, allow_pickle=True))
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    merge = dict(model=str(pickled_base), model_config=str(tiny_model_dir), lora=[str(out)])
    with pytest.raises(EgakuError, match=r"model\.ckpt is a pickle .*pass --allow-pickle"):
        merge_lora_command(MergeLoraOptions(**merge, out=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()
    merge_lora_command(MergeLoraOptions(**merge, out=str(tmp_path / "merged"), allow_pickle=True))
    assert (tmp_path / "merged" / "model_index.json").is_file()
    assert list((tmp_path / "merged" / "unet").glob("*.safetensors"))  # written as safetensors, whatever it came from
