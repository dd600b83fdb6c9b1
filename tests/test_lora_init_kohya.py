"""--init-lora from a LoRA kohya's sd-scripts trained: its default network adapts more layers than egaku's default,
and the error must name the options that fit it, or say that none does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from egaku.config import build
from egaku.errors import EgakuError
from egaku.training.lora import TrainLoraOptions, train_lora


def kohya_file(model_dir: Path, path: Path, text_mlp: bool) -> Path:
    """A LoRA laid out as sd-scripts' networks.lora writes one for SD 1.x: every Linear/Conv2d of the UNet's
    transformer models (attention, proj_in/proj_out, feed-forward) and of CLIP's attention (and MLP)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    g = torch.Generator().manual_seed(0)
    state = {}

    def add(key: str, module) -> None:
        shape = (4, module.in_channels, 1, 1) if isinstance(module, torch.nn.Conv2d) else (4, module.in_features)
        out = (module.out_channels, 4, 1, 1) if isinstance(module, torch.nn.Conv2d) else (module.out_features, 4)
        state[f"{key}.lora_down.weight"] = torch.randn(*shape, generator=g).half() * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(*out, generator=g).half() * 0.1
        state[f"{key}.alpha"] = torch.tensor(2.0).half()

    for name, module in unet.named_modules():
        if ".attentions." in name and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            add("lora_unet_" + name.replace(".", "_"), module)
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ("self_attn" in name or text_mlp and ".mlp." in name):
            add("lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_"), module)
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def test_init_lora_from_a_kohya_file_names_the_options_that_fit_it_or_says_none_does(tmp_path, tiny_model_dir):
    data = tmp_path / "data" / "10_sks dog"
    data.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(data / f"{i}.png")

    def run(out: str, init: Path, **overrides):
        return train_lora(build(TrainLoraOptions, dict(
            data=str(tmp_path / "data"), model=str(tiny_model_dir), out=str(tmp_path / out), resolution=32, rank=4,
            max_steps=1, min_images=2, checkpoint_every=0, progress=False, init_lora=str(init), **overrides)))

    attention_only = kohya_file(tiny_model_dir, tmp_path / "attn.safetensors", text_mlp=False)
    fit = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2"
    with pytest.raises(EgakuError, match=rf"this run does not train .*; give --target-modules {fit} "
                                         r"--train-text-encoder \(the layers it was trained on\)$"):
        run("a", attention_only)
    # the options it names are the ones that take the file (--target-modules in the one flag's comma form)
    assert (run("b", attention_only, target_modules=[fit], train_text_encoder=True)
            / "pytorch_lora_weights.safetensors").is_file()
    # kohya's text-encoder LoRA adapts CLIP's MLP too, which no option here trains: say so, not "give --train-..."
    with_mlp = kohya_file(tiny_model_dir, tmp_path / "mlp.safetensors", text_mlp=True)
    with pytest.raises(EgakuError, match=r"its text-encoder layers fc1, fc2 are ones train-lora cannot train .* it "
                                         r"cannot continue this file; start from zero, or use it with generate --lora"):
        run("c", with_mlp, target_modules=[fit], train_text_encoder=True)
