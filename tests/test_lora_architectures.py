"""LoRAs made for other architectures (SDXL, Flux) are named as such by info, generate and merge-lora."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from egaku.cli import main


def _kohya_file(path, names):
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 32)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(32, 4)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.mark.parametrize("names, label", [
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
     "SDXL"),
    (["lora_unet_double_blocks_0_img_attn_qkv"], "Flux or SD3"),
])
def test_a_lora_for_another_architecture_is_named_as_one(tiny_model_dir, tmp_path, capsys, names, label):
    lora = _kohya_file(tmp_path / "other.safetensors", names)
    assert main(["info", str(lora)]) == 0
    assert f"for {label}" in capsys.readouterr().out
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--lora", str(lora), "--steps", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"is a LoRA for {label}" in err and "Stable Diffusion 1.x/2.x" in err
    assert main(["merge-lora", "--model", str(tiny_model_dir), "--lora", str(lora), "--out", str(tmp_path / "m")]) == 2
    assert f"is a LoRA for {label}" in capsys.readouterr().err


def test_an_sd1_lora_is_not_taken_for_another_architecture():
    from egaku.lora.formats import other_architecture

    assert other_architecture(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                               "lora_te_text_model_encoder_layers_0_self_attn_q_proj"], {"ss_base_model_version": "sd_v1"}) is None
    assert other_architecture(["lora_unet_down_blocks_0_attentions_0_proj_in"],
                              {"ss_base_model_version": "sdxl_base_v1-0"}) == "SDXL"
