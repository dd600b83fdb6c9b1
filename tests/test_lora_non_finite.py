"""A LoRA that would turn images to NaN (a damaged file, a weight so large that the sum overflows) is an error that
says so, never a black image saved as a result."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import egaku
from egaku.errors import EgakuError
from egaku.lora.commands import MergeLoraOptions, merge_lora_command
from egaku.lora.formats import check_coverage

MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 64 -> 64 in the tiny model


def lora_file(path, down: torch.Tensor, up: torch.Tensor, module: str = MODULE):
    save_file({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, path)
    return path


def test_a_lora_holding_nan_is_refused_naming_the_tensor(tmp_path, tiny_model_dir):
    up = torch.randn(64, 4)
    up[0, 0] = float("nan")
    damaged = lora_file(tmp_path / "nan.safetensors", torch.randn(4, 64), up)
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(EgakuError, match=r"nan\.safetensors: .*lora_B\.weight holds NaN or inf values"):
        egaku.generate(pipe, "a red star", steps=1, lora=[str(damaged)])
    with pytest.raises(EgakuError, match="holds NaN or inf values"):
        merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(damaged)], out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_an_update_that_overflows_is_an_error_in_generate_and_merge(tmp_path, tiny_model_dir):
    # on the attention's output projection, whose overflow reaches the whole image (the query's is normalised away)
    huge = lora_file(tmp_path / "huge.safetensors", torch.full((4, 64), 1e19), torch.full((64, 4), 1e19),
                     MODULE.replace("to_q", "to_out.0"))
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(EgakuError, match=r"came out as NaN/inf .* saved as a black image; .*lower their weights"):
        egaku.generate(pipe, "a red star", steps=1, lora=[str(huge)])
    with pytest.raises(EgakuError, match=r"the merge overflowed: unet\..*to_out.* NaN/inf"):
        merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(huge)], out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()
    assert egaku.generate(pipe, "a red star", steps=1)[0].image  # the pipeline is as it was


def test_halves_of_different_ranks_are_named_as_a_damaged_file_not_another_base():
    modules = {"unet.a": torch.nn.Linear(8, 16)}
    with pytest.raises(EgakuError, match="down matrix has rank 2 and its up matrix 3; .*the file is damaged"):
        check_coverage({"unet.a": {"down": torch.zeros(2, 8), "up": torch.zeros(16, 3)}}, modules, "f")
