"""LoRA training on the tiny pipeline: what trains, what is written, who can load it, exact resume, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from egaku.config import build
from egaku.errors import EgakuError
from egaku.training import lora as lora_training
from egaku.training.lora import TrainLoraOptions, train_lora

RESOLUTION = 32  # 16x16 latents on the tiny VAE: a step takes well under a second


def make_folder(root: Path, per_class: int = 3) -> Path:
    """Two class folders of small images in three aspect ratios."""
    rng = np.random.default_rng(0)
    for cls, colour in (("red_star", (220, 30, 30)), ("blue_circle", (30, 30, 220))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = [(48, 48), (64, 40), (40, 64)][i % 3]
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
            ImageDraw.Draw(img).ellipse((6, 6, w - 6, h - 6), fill=colour)
            img.save(root / cls / f"{i}.png")
    return root


def options(data: Path, model: Path, out: Path, **overrides) -> TrainLoraOptions:
    base = dict(data=str(data), model=str(model), out=str(out), resolution=RESOLUTION, rank=4, alpha=2.0,
                max_steps=3, batch_size=2, checkpoint_every=0, min_images=2, progress=False,
                caption_template="a photo of {class}")
    base.update(overrides)
    return build(TrainLoraOptions, base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("lora-data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_model_dir) -> Path:
    """One fp32 run shared by the loading tests: alpha != rank, UNet attention + conv LoRA (the convolutions at
    another rank and alpha), both layouts, validation, checkpoints."""
    out = tmp_path_factory.mktemp("lora-run") / "starlora"
    return train_lora(options(data_dir, tiny_model_dir, out, **TRAINED))


TRAINED = dict(learning_rate=5e-2, checkpoint_every=2, validation_prompts=["a photo of red star"],
               validation_seeds=[0, 1], validation_steps=2, random_flip=True, lora_conv=True, conv_rank=2,
               conv_alpha=1.0, log_with="tensorboard")


def tiny_pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe) -> np.ndarray:
    return pipe("a photo of red star", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


# ---- what training writes ----------------------------------------------------------------------------

def test_run_writes_adapter_kohya_config_log_grid_and_checkpoints(trained, tensorboard_events):
    files = sorted(p.name for p in trained.iterdir())
    for name in ("pytorch_lora_weights.safetensors", "starlora.safetensors", "training_config.json", "loss.csv",
                 "data_report.txt", "samples", "checkpoints"):
        assert name in files
    lines = (trained / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,time,loss,lr") and len(lines) == 4
    assert all(np.isfinite(float(line.split(",")[2])) for line in lines[1:])
    # --log-with tensorboard: the same loss and learning rate in OUT/logs, and the validation grid
    scalars, images = tensorboard_events(trained / "logs")
    assert scalars["loss"] == [(int(r.split(",")[0]), pytest.approx(float(r.split(",")[2]))) for r in lines[1:]]
    assert [step for step, _ in scalars["lr"]] == [1, 2, 3]
    assert images == {"validation": [3]}
    grid = Image.open(trained / "samples" / "step-000003.png")
    assert grid.width > 2 * RESOLUTION  # two seeds side by side
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert json.loads((trained / "training_config.json").read_text())["rank"] == 4
    # the adapter, not the pipeline: only LoRA tensors, about 10k numbers
    weights = load_file(trained / "pytorch_lora_weights.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert {k.split(".")[0] for k in weights} == {"unet"}
    assert {v.shape[0] for k, v in weights.items() if ".resnets.0.conv1.lora_A" in k} == {2}  # --conv-rank
    assert {v.shape[0] for k, v in weights.items() if ".to_q.lora_A" in k} == {4}  # --rank


def test_kohya_file_has_kohya_keys_alpha_and_ss_metadata(trained):
    path = trained / "starlora.safetensors"
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_"))
               and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_down_blocks_0_resnets_1_conv2.lora_up.weight" in tensors
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and {a for k, a in alphas.items() if "_conv" in k} == {1.0}  # --conv-alpha
    assert {a for k, a in alphas.items() if "_conv" not in k} == {2.0}
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 1.0}
    assert meta["ss_output_name"] == "starlora"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    # what kohya's training-info readers (A1111, civitai) show of the run
    from egaku.inference.metadata import lora_short_hash

    assert json.loads(meta["ss_dataset_dirs"]) == {"red_star": {"n_repeats": 1, "img_count": 3},
                                                   "blue_circle": {"n_repeats": 1, "img_count": 3}}
    # 6 images in 3 aspect buckets at batch 2: 3 batches an epoch, so 3 steps are 1 epoch
    assert (meta["ss_num_epochs"], meta["ss_batch_size_per_device"], meta["ss_gradient_accumulation_steps"],
            meta["ss_total_batch_size"]) == ("1", "2", "1", "2")
    assert (meta["ss_num_batches_per_epoch"], meta["ss_num_reg_images"]) == ("3", "0")
    assert meta["ss_unet_lr"] == meta["ss_learning_rate"]  # kohya's tools read the UNet's rate from ss_unet_lr
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["sshs_model_hash"][:12] == lora_short_hash(path) and len(meta["sshs_model_hash"]) == 64
    assert meta["modelspec.resolution"] == f"{RESOLUTION}x{RESOLUTION}" and meta["modelspec.date"][:2] == "20"


def test_info_describes_a_lora_of_either_layout_without_a_model(trained, tmp_path, capsys):
    from egaku.cli import main

    diffusers_file, kohya_file = trained / "pytorch_lora_weights.safetensors", trained / "starlora.safetensors"
    described = {}
    for path in (trained, kohya_file):  # a train-lora folder means its diffusers file
        assert main(["info", str(path), "--json"]) == 0
        described[path.name] = json.loads(capsys.readouterr().out)
    folder, kohya = described[trained.name], described[kohya_file.name]
    assert folder["layout"] == "diffusers/PEFT" and kohya["layout"].startswith("kohya")
    n_layers = len([k for k in load_file(diffusers_file) if ".lora_A." in k])
    for d in (folder, kohya):
        assert d["unet_layers"] == n_layers and d["text_encoder_layers"] == 0
        assert 0 < d["convolution_layers"] < n_layers  # TRAINED adapts the ResNet convolutions too
        assert d["ranks"] == [2, 4] and d["alphas"] == [1.0, 2.0] and d["unrecognised_keys"] == 0
        # numbers as numbers, from a kohya header as from a training_config.json
        assert d["training"]["learning rate"] == 0.05 and d["training"]["steps"] == 3
    assert kohya["top_tags"] == {"a photo of blue circle": 3, "a photo of red star": 3}
    assert main(["info", str(kohya_file)]) == 0
    text = capsys.readouterr().out
    assert "rank: 2/4, alpha: 1/2" in text
    # the convolutions are counted among the UNet's layers, where they are (the text encoder has none)
    assert f"layers: {n_layers} UNet ({kohya['convolution_layers']} of them convolutions), 0 text encoder\n" in text
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "not-a-lora.safetensors")
    assert main(["info", str(tmp_path / "not-a-lora.safetensors")]) == 2
    assert "holds no LoRA layers" in capsys.readouterr().err


def test_plain_diffusers_loads_the_adapter_and_it_changes_the_output(trained, tiny_model_dir):
    pipe = tiny_pipe(tiny_model_dir)
    base = render(pipe)
    pipe.load_lora_weights(str(trained))  # the folder, as any diffusers user would
    with_lora = render(pipe)
    assert np.abs(with_lora - base).max() > 1e-3


def test_kohya_export_through_diffusers_converter_matches_diffusers_export(trained, tiny_model_dir):
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(trained))
    diffusers_image = render(pipe)
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(trained), weight_name="starlora.safetensors")  # diffusers' own kohya converter
    kohya_image = render(pipe)
    base = render(tiny_pipe(tiny_model_dir))
    assert np.abs(diffusers_image - base).max() > 1e-3
    np.testing.assert_allclose(kohya_image, diffusers_image, atol=1e-5)


def test_apply_loras_both_layouts_match_diffusers_and_remove_restores_base(trained, tiny_model_dir):
    from egaku.lora.apply import apply_loras, remove_loras

    reference = tiny_pipe(tiny_model_dir)
    base = render(reference)
    reference.load_lora_weights(str(trained))
    expected = render(reference)

    pipe = tiny_pipe(tiny_model_dir)
    for file in ("pytorch_lora_weights.safetensors", "starlora.safetensors"):
        names = apply_loras(pipe, [(trained / file, 1.0)])
        assert len(names) == 1
        np.testing.assert_allclose(render(pipe), expected, atol=1e-5)
        remove_loras(pipe)
        np.testing.assert_allclose(render(pipe), base, atol=1e-6)
    # two adapters at half weight each equal one at full weight
    apply_loras(pipe, [(trained / "pytorch_lora_weights.safetensors", 0.5), (trained / "starlora.safetensors", 0.5)])
    np.testing.assert_allclose(render(pipe), expected, atol=1e-4)
    remove_loras(pipe)


def test_save_every_writes_loadable_loras_of_the_steps_beside_the_final_one(tmp_path, data_dir, tiny_model_dir):
    from egaku.lora.apply import apply_loras, resolve_lora

    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "starlora", max_steps=5, save_every=2,
                             checkpoint_every=2, keep_checkpoints=5, learning_rate=5e-2))
    steps = out / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["starlora-step000002", "starlora-step000004"]  # not 5: final
    for step in (2, 4):
        folder = steps / f"starlora-step{step:06d}"
        assert {p.name for p in folder.iterdir()} >= {"pytorch_lora_weights.safetensors",
                                                       f"starlora-step{step:06d}.safetensors", "training_config.json"}
        # the LoRA as it was at that step: the checkpoint's weights
        lora = load_file(folder / "pytorch_lora_weights.safetensors")
        checkpoint = load_file(out / "checkpoints" / f"step-{step:06d}" / "unet_lora.safetensors")
        assert len(checkpoint) == len(lora)
        for key, value in checkpoint.items():
            assert torch.equal(lora[f"unet.{key}"], value), key
        with safe_open(str(folder / f"starlora-step{step:06d}.safetensors"), framework="pt") as fh:
            meta = fh.metadata()
        assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_output_name"]) == (
            str(step), "5", f"starlora-step{step:06d}")
        # the diffusers file records its step in its own header too, beside what diffusers reads there
        with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
            meta = fh.metadata()
        assert (meta["ss_steps"], meta["ss_max_train_steps"]) == (str(step), "5") and "lora_adapter_metadata" in meta
    for name in ("starlora.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(out / name), framework="pt") as fh:
            assert (fh.metadata()["ss_steps"], fh.metadata()["ss_max_train_steps"]) == ("5", "5"), name
    # info reads it from there, wherever the file is taken
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(steps / "starlora-step000002" / "pytorch_lora_weights.safetensors", moved)
    assert describe(moved / "pytorch_lora_weights.safetensors")["training"]["steps"] == 2
    # diffusers loads a step's folder; egaku finds it by name in the steps folder (<lora:starlora-step000002>),
    # and reads its kohya file to the same effect
    pipe = tiny_pipe(tiny_model_dir)
    base = render(pipe)
    pipe.load_lora_weights(str(steps / "starlora-step000002"))
    at_two = render(pipe)
    assert np.abs(at_two - base).max() > 1e-3
    for found in (resolve_lora("starlora-step000002", str(steps)),
                  steps / "starlora-step000002" / "starlora-step000002.safetensors"):
        pipe = tiny_pipe(tiny_model_dir)
        apply_loras(pipe, [(found, 1.0)])
        np.testing.assert_allclose(render(pipe), at_two, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_save_precision_halves_the_files_which_load_everywhere_like_the_fp32_ones(trained, tmp_path, data_dir,
                                                                                  tiny_model_dir, precision):
    from egaku.lora.apply import apply_loras
    from egaku.lora.commands import describe_lora

    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "starlora", **TRAINED, save_precision=precision))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for file in ("pytorch_lora_weights.safetensors", "starlora.safetensors"):
        half, full = load_file(out / file), load_file(trained / file)
        assert half.keys() == full.keys() and {v.dtype for v in half.values()} == {dtype}
        # the same training (same seed) rounded at the end only
        for k in full:
            torch.testing.assert_close(half[k].float(), full[k].to(dtype).float(), rtol=0, atol=0)
        assert (out / file).stat().st_size < 0.6 * (trained / file).stat().st_size
    # the checkpoint keeps full precision: a resume continues from the exact weights
    checkpoint = out / "checkpoints" / "step-000003"
    assert {v.dtype for f in checkpoint.glob("*.safetensors") for v in load_file(f).values()} <= {torch.float32}

    fp32_pipe = tiny_pipe(tiny_model_dir)
    fp32_pipe.load_lora_weights(str(trained))
    expected = render(fp32_pipe)
    tolerance = 2e-3 if precision == "fp16" else 2e-2  # bf16 keeps 8 bits of mantissa
    for load in ("diffusers", "diffusers-kohya", "egaku"):
        pipe = tiny_pipe(tiny_model_dir)
        if load == "diffusers":
            pipe.load_lora_weights(str(out))
        elif load == "diffusers-kohya":
            pipe.load_lora_weights(str(out), weight_name="starlora.safetensors")
        else:
            apply_loras(pipe, [(out / "starlora.safetensors", 1.0)])
        np.testing.assert_allclose(render(pipe), expected, atol=tolerance)
    assert describe_lora(out / "starlora.safetensors")["ranks"] == [2, 4]


def test_text_encoder_lora_uses_the_names_other_tools_use_and_applies(tmp_path, data_dir, tiny_model_dir):
    from egaku.lora.apply import apply_loras, remove_loras

    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "telora", max_steps=2, learning_rate=5e-2,
                             train_text_encoder=True, validation_prompts=["a photo of red star"],
                             validation_seeds=[3], validation_steps=2))
    assert (out / "samples" / "step-000002.png").is_file()  # validation through the trained text encoder
    diffusers_keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diffusers_keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha" in load_file(out / "telora.safetensors")
    with safe_open(str(out / "telora.safetensors"), framework="pt") as fh:  # 0 would read as "not trained"
        assert (fh.metadata()["ss_text_encoder_lr"], fh.metadata()["ss_network_train_unet_only"]) == ("0.05", "False")

    pipe = tiny_pipe(tiny_model_dir)
    ids = pipe.tokenizer(["a photo of red star"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base_text = pipe.text_encoder(ids)[0]
    base = render(pipe)
    images = []
    for file in ("pytorch_lora_weights.safetensors", "telora.safetensors"):
        apply_loras(pipe, [(out / file, 1.0)])
        with torch.no_grad():
            assert (pipe.text_encoder(ids)[0] - base_text).abs().max() > 1e-4  # the text-encoder half is active
        images.append(render(pipe))
        remove_loras(pipe)
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder(ids)[0], base_text)
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)
    assert np.abs(images[0] - base).max() > 1e-3
    # fusing the text-encoder half too: the merged copy renders like base + LoRA
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command

    merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(out)], out=str(tmp_path / "merged")))
    np.testing.assert_allclose(render(tiny_pipe(tmp_path / "merged")), images[0], atol=1e-4)


# ---- what trains -----------------------------------------------------------------------------------------

def test_only_lora_trains_in_fp32_under_bf16_and_caches_skip_the_encoders(tmp_path, data_dir, tiny_model_dir,
                                                                          monkeypatch):
    held, calls = {}, {"vae": 0, "text": 0}
    original_load = lora_training._load_base

    def load_and_count(*args):
        pipe = original_load(*args)
        held["pipe"] = pipe
        held["before"] = {f"{c}.{k}": v.detach().clone() for c in ("unet", "vae", "text_encoder")
                          for k, v in getattr(pipe, c).state_dict().items()}
        encode, text_forward = pipe.vae.encode, pipe.text_encoder.forward

        def counted_encode(*a, **kw):
            calls["vae"] += 1
            return encode(*a, **kw)

        def counted_text(*a, **kw):
            calls["text"] += 1
            return text_forward(*a, **kw)

        monkeypatch.setattr(pipe.vae, "encode", counted_encode)
        monkeypatch.setattr(pipe.text_encoder, "forward", counted_text)
        return pipe

    monkeypatch.setattr(lora_training, "_load_base", load_and_count)
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "out", mixed_precision="bf16", max_steps=4,
                       learning_rate=1e-2))
    pipe = held["pipe"]
    # 6 images encoded once each; 2 captions encoded once each; 4 steps added no encoder call
    assert calls == {"vae": 6, "text": 2}
    lora = {k: v for k, v in pipe.unet.named_parameters() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 and v.requires_grad for v in lora.values())
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    frozen = {k: v for k, v in pipe.unet.named_parameters() if "lora_" not in k}
    assert all(not v.requires_grad for v in frozen.values())
    assert {v.dtype for v in frozen.values()} == {torch.bfloat16}
    for name, value in pipe.unet.state_dict().items():
        if "lora_" in name:
            continue
        key = "unet." + name.replace(".base_layer", "")
        assert torch.equal(value, held["before"][key].to(value.dtype)), name
    for name, value in pipe.vae.state_dict().items():
        assert torch.equal(value, held["before"]["vae." + name]), name


def count_vae_encodes(monkeypatch) -> list:
    """Make the trainer's base pipeline record each VAE encode call in the returned list."""
    calls = []
    original_load = lora_training._load_base

    def load_and_count(*args):
        pipe = original_load(*args)
        encode = pipe.vae.encode
        monkeypatch.setattr(pipe.vae, "encode", lambda *a, **kw: calls.append(1) or encode(*a, **kw))
        return pipe

    monkeypatch.setattr(lora_training, "_load_base", load_and_count)
    return calls


def test_without_latent_cache_the_vae_runs_every_step(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    calls = count_vae_encodes(monkeypatch)
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "out", cache_latents=False, max_steps=3,
                       format="diffusers"))
    assert len(calls) == 3


def test_v_prediction_min_snr_noise_offset_and_checkpointing_run(tmp_path, data_dir, tiny_model_dir, monkeypatch,
                                                                capfd):

    from diffusers import DDPMScheduler

    model = tmp_path / "v-model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    velocity_calls = []
    original = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity",
                        lambda self, *a: velocity_calls.append(1) or original(self, *a))
    out = train_lora(options(data_dir, model, tmp_path / "out", max_steps=2, min_snr_gamma=5.0, noise_offset=0.1,
                             gradient_checkpointing=True, format="diffusers", progress=True))
    assert len(velocity_calls) == 2  # the target is v, as the model's scheduler says
    progress = capfd.readouterr().err
    # stderr is a file here, so the bar writes plain lines; the loss is shown in them
    assert "train-lora: 2/2 steps (100%), loss=" in progress
    losses = [float(r.split(",")[2]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_debiased_estimation_weights_each_sample_by_its_snr_and_is_recorded(tmp_path, data_dir, tiny_model_dir):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from egaku.training.runtime import debiased_weights, min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    snr = compute_snr(scheduler, t)
    assert snr[0] > 1000  # kohya's cap applies at the first step
    eps, v = debiased_weights(scheduler, t, "epsilon"), debiased_weights(scheduler, t, "v_prediction")
    torch.testing.assert_close(eps, torch.stack([torch.tensor(1000 ** -0.5), snr[1] ** -0.5, snr[2] ** -0.5]))
    torch.testing.assert_close(v, torch.stack([torch.tensor(1 / 1001), 1 / (snr[1] + 1), 1 / (snr[2] + 1)]))
    zero_terminal = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True)
    assert torch.isfinite(debiased_weights(zero_terminal, t, "epsilon")).all()
    # the batch loss: each sample's error times its weight, on top of min-SNR-gamma's
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    opts = options(data_dir, tiny_model_dir, tmp_path / "x", min_snr_gamma=5.0, debiased_estimation=True)
    got = lora_training.weighted_loss(pred, target, t, torch.ones(3), None, opts, scheduler)
    expected = (per_sample * min_snr_weights(scheduler, t, 5.0, "epsilon") * eps).mean()
    torch.testing.assert_close(got, expected)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", max_steps=1, debiased_estimation=True))
    with safe_open(str(out / "run.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_debiased_estimation"] == "True"  # as kohya records it


def test_huber_loss_trains_is_recorded_and_with_a_far_threshold_trains_as_l2(tmp_path, data_dir, tiny_model_dir):
    common = dict(learning_rate=5e-2, min_snr_gamma=5.0)
    l2 = train_lora(options(data_dir, tiny_model_dir, tmp_path / "l2", **common))
    # 2c d^2 / (sqrt(d^2 + c^2) + c) is d^2 to float precision when c is far above every error
    far = train_lora(options(data_dir, tiny_model_dir, tmp_path / "far", **common, loss_type="huber",
                             huber_schedule="constant", huber_c=1e6))
    huber = train_lora(options(data_dir, tiny_model_dir, tmp_path / "huber", **common, loss_type="huber"))
    a, b, h = (load_file(run / "pytorch_lora_weights.safetensors") for run in (l2, far, huber))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert max(float((h[k] - a[k]).abs().max()) for k in a) > 1e-4  # the default threshold (0.1, snr) is not l2
    losses = [float(r.split(",")[2]) for r in (huber / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    with safe_open(str(huber / "huber.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], float(meta["ss_huber_c"])) == ("huber", "snr", 0.1)
    with safe_open(str(l2 / "l2.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_loss_type"] == "l2" and "ss_huber_c" not in fh.metadata()
    assert json.loads((huber / "training_config.json").read_text())["loss_type"] == "huber"


def test_input_perturbation_noises_the_input_but_not_the_target(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    from diffusers import DDPMScheduler

    import egaku.training.lora as lora_training
    from egaku.training import runtime

    def record(gamma: float) -> tuple[list, list]:
        inputs, targets = [], []
        original = DDPMScheduler.add_noise
        monkeypatch.setattr(DDPMScheduler, "add_noise",
                            lambda self, x, noise, t: inputs.append(noise.clone()) or original(self, x, noise, t))
        monkeypatch.setattr(lora_training, "elementwise_loss",
                            lambda pred, target, *a: targets.append(target.clone()) or runtime.elementwise_loss(
                                pred, target, *a))
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / f"g{gamma}", max_steps=2,
                                 input_perturbation=gamma, format="kohya"))
        with safe_open(str(out / f"g{gamma}.safetensors"), framework="pt") as fh:
            assert fh.metadata()["ss_ip_noise_gamma"] == (str(gamma) if gamma else "None")
        return inputs, targets

    plain_inputs, plain_targets = record(0.0)
    inputs, targets = record(0.5)
    assert len(inputs) == len(targets) == 2
    for noise, target in zip(plain_inputs, plain_targets):
        torch.testing.assert_close(noise, target)  # without it the input's noise is the target
    # with it: the target is the same noise as without (the same draws), the input carries gamma more
    torch.testing.assert_close(targets[0], plain_targets[0])
    extra = torch.cat([(noise - target).flatten() for noise, target in zip(inputs, targets)])
    assert 0.4 < float(extra.std()) < 0.6


def test_logit_normal_timesteps_are_drawn_by_the_shared_sampler(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    from egaku.training import runtime

    draws = []
    monkeypatch.setattr(lora_training, "draw_timesteps",
                        lambda *a, **k: draws.append((a, k)) or runtime.draw_timesteps(*a, **k))
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "uniform", max_steps=1, format="diffusers"))
    assert draws == []  # uniform: drawn as before the option, so earlier runs stay reproducible
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "ln", max_steps=2, format="diffusers",
                             timestep_sampling="logit_normal", uniform_share=0.25, logit_mean=-0.5, logit_std=0.8))
    # (sampling, logit mean, logit std, uniform share) as train-ldm passes them
    assert [a[2:6] for a, k in draws] == [("logit_normal", -0.5, 0.8, 0.25)] * 2
    losses = [float(r.split(",")[2]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(EgakuError, match="--uniform-share"):
        options(data_dir, tiny_model_dir, tmp_path / "bad", uniform_share=0.25)
    with pytest.raises(EgakuError, match="--logit-std 0.0"):
        options(data_dir, tiny_model_dir, tmp_path / "bad", timestep_sampling="logit_normal", logit_std=0.0)


def test_disk_cache_is_reused_by_the_next_run_and_names_the_bytes(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    calls = count_vae_encodes(monkeypatch)
    data = tmp_path / "data"  # as BMP (uncompressed): an edited pixel keeps the file's size
    for image in data_dir.glob("*/*.png"):
        (data / image.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(image).save(data / image.parent.name / f"{image.stem}.bmp")

    def run(name: str) -> None:
        train_lora(options(data, tiny_model_dir, tmp_path / name, max_steps=1, format="diffusers",
                           cache_dir=str(tmp_path / "cache")))

    for name in ("a", "b"):
        run(name)
    assert len(calls) == 6  # six images encoded by the first run only
    # an image changed in place with its size and time kept (an edit copied back with cp -p or rsync -t) is encoded
    # again: the disk cache names the bytes, not the file's size and time
    image = sorted(data.glob("red_star/*.bmp"))[0]
    stat = image.stat()
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    calls.clear()
    run("c")
    assert len(calls) == 1  # that image alone


def test_the_disk_cache_is_keyed_the_same_in_every_process():
    """diffusers lists the config entries it filled with defaults (``_use_default_values``) from a set, in an order
    that each process's string hashing decides: a key built from it made every new run miss the whole cache."""
    from types import SimpleNamespace

    pipe = lora_training._load_base("tiny")
    vae, text_encoder = pipe.vae, pipe.text_encoder
    defaults = list(vae.config["_use_default_values"])
    assert len(defaults) > 1  # what the order of another process's hashing changes
    other_process = SimpleNamespace(config={**vae.config, "_use_default_values": defaults[::-1]},
                                    parameters=vae.parameters)
    key = lora_training.encoders_key(vae, text_encoder)
    assert lora_training.encoders_key(other_process, text_encoder) == key
    assert "_use_default_values" not in key and "_name_or_path" not in key


def test_a_damaged_disk_cache_file_is_encoded_again_and_rewritten(tmp_path, data_dir, tiny_model_dir, monkeypatch,
                                                                  capsys):
    calls = count_vae_encodes(monkeypatch)
    cache = tmp_path / "cache"
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "a", max_steps=1, format="diffusers",
                       cache_dir=str(cache)))
    files = sorted(cache.glob("*.safetensors"))
    for path in files[:3]:
        path.write_bytes(path.read_bytes()[:50])  # cut short (a full disk, a copy interrupted)
    files[3].write_bytes(b"not a safetensors file")
    capsys.readouterr()
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "b", max_steps=1, format="diffusers",
                       cache_dir=str(cache)))
    assert capsys.readouterr().err.count("cannot be read") == 4
    assert 6 < len(calls) <= 10  # the damaged latents only (the others may be captions' text states)
    for path in files:  # rewritten whole
        assert load_file(path)["t"].numel() > 0


def test_a_cache_dir_that_cannot_be_written_is_said_once_and_the_run_trains(tmp_path, data_dir, tiny_model_dir,
                                                                            monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_training, "atomic_save_file", full_disk)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", max_steps=1, format="diffusers",
                             cache_dir=str(tmp_path / "cache")))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    err = capsys.readouterr().err
    assert err.count("cannot be written") == 1 and "No space left on device" in err and "in memory only" in err


def test_clip_skip_trains_on_the_earlier_text_layer_and_keeps_its_own_cache_entries(tmp_path, data_dir,
                                                                                  tiny_model_dir, monkeypatch,
                                                                                  capsys):
    """--clip-skip 2: captions are read from the layer before the last (cached, and in the validation grid),
    the disk cache keeps those apart from last-layer entries, and the kohya file records it."""
    from egaku.models import text as text_module

    seen = []
    real = text_module.encode_tokens
    monkeypatch.setattr(text_module, "encode_tokens",
                        lambda te, ids, skip=1: (seen.append(skip), real(te, ids, skip))[1])
    common = dict(max_steps=2, learning_rate=5e-2, format="both", cache_dir=str(tmp_path / "cache"),
                  validation_prompts=["a photo of red star"], validation_seeds=[0], validation_steps=2)
    last = train_lora(options(data_dir, tiny_model_dir, tmp_path / "last", **common))
    cached = len(list((tmp_path / "cache").glob("*.safetensors")))
    assert seen and set(seen) == {1}
    seen.clear()
    skipped = train_lora(options(data_dir, tiny_model_dir, tmp_path / "skipped", clip_skip=2, **common))
    assert seen and set(seen) == {2}  # every caption (and the validation prompt) encoded at layer -2, none reused
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) > cached
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (last, skipped))
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    with safe_open(str(skipped / "skipped.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_clip_skip"] == "2"
    # generating with it at another clip skip says so, from either file
    import egaku

    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    for lora in (skipped, skipped / "skipped.safetensors"):
        egaku.generate(pipe, "a photo of red star", steps=1, lora=[str(lora)])
        assert "was trained at clip skip 2; this image uses 1 (give --clip-skip 2)" in capsys.readouterr().out
        egaku.generate(pipe, "a photo of red star", steps=1, lora=[str(lora)], clip_skip=2)
        assert "clip skip" not in capsys.readouterr().out
    egaku.generate(pipe, "a photo of red star", steps=1, lora=[str(last)])
    assert "clip skip" not in capsys.readouterr().out
    with pytest.raises(EgakuError, match="has 2 layers"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "x", clip_skip=3))


def assert_same_lora(run_a: Path, run_b: Path) -> None:
    a = load_file(run_a / "pytorch_lora_weights.safetensors")
    b = load_file(run_b / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("optimizer,rate", [("prodigy", 1.0), ("adafactor", 1e-2)])
def test_prodigy_and_adafactor_train_resume_exactly_and_are_recorded(tmp_path, data_dir, tiny_model_dir, optimizer,
                                                                     rate):
    common = dict(optimizer=optimizer, learning_rate=rate, max_steps=3, checkpoint_every=1, format="both",
                  train_tokens=["star"])
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", **common))
    weights = load_file(whole / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)  # B starts at zero: it moved
    split = tmp_path / "split"  # the optimizer's own state (Prodigy's step-size estimate) comes back on resume
    train_lora(options(data_dir, tiny_model_dir, split, stop_at=2, **common))
    train_lora(options(data_dir, tiny_model_dir, split, resume="latest", **common))
    assert_same_lora(whole, split)
    with safe_open(str(whole / "whole.safetensors"), framework="pt") as fh:
        # as kohya records it: the optimizer's class path and its arguments
        assert fh.metadata()["ss_optimizer"] == {"prodigy": "prodigyopt.prodigy.Prodigy(weight_decay=0.01)",
                                                 "adafactor": "transformers.optimization.Adafactor(weight_decay=0.01)"
                                                 }[optimizer]
    if optimizer == "prodigy":
        with pytest.raises(EgakuError, match="give about 1.0, not 0.0001"):
            options(data_dir, tiny_model_dir, tmp_path / "x", optimizer="prodigy", learning_rate=1e-4)


def test_resume_twice_equals_uninterrupted(tmp_path, data_dir, tiny_model_dir):
    # flips, dropout, accumulation across epochs and a warmup+cosine schedule all have state to restore
    common = dict(max_steps=4, gradient_accumulation=2, batch_size=2, random_flip=True, dropout=0.1,
                  lr_scheduler="cosine", lr_warmup_steps=2, learning_rate=1e-2, format="diffusers")
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", **common))
    split = tmp_path / "split"
    train_lora(options(data_dir, tiny_model_dir, split, stop_at=1, **common))
    assert not (split / "pytorch_lora_weights.safetensors").exists()
    train_lora(options(data_dir, tiny_model_dir, split, stop_at=3, resume="latest", **common))
    train_lora(options(data_dir, tiny_model_dir, split, resume="latest", **common))
    assert_same_lora(whole, split)
    # and the logged losses of steps 1-4 agree
    assert [r.split(",")[2] for r in (whole / "loss.csv").read_text().splitlines()[1:]] == \
           [r.split(",")[2] for r in (split / "loss.csv").read_text().splitlines()[1:]]
    # resumed from that run's step-3 checkpoint into a new folder: its loss log starts with the first run's steps
    elsewhere = tmp_path / "elsewhere"
    train_lora(options(data_dir, tiny_model_dir, elsewhere, resume=str(split / "checkpoints" / "step-000003"), **common))
    assert_same_lora(whole, elsewhere)
    assert [r.split(",")[::2] for r in (whole / "loss.csv").read_text().splitlines()] == \
           [r.split(",")[::2] for r in (elsewhere / "loss.csv").read_text().splitlines()]


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resume_equals_uninterrupted(tmp_path, data_dir,
                                                                                      tiny_model_dir, ctrl_c_at_step):
    import signal

    common = dict(max_steps=4, gradient_accumulation=2, batch_size=2, random_flip=True, learning_rate=1e-2,
                  lr_scheduler="cosine", checkpoint_every=0, format="diffusers")
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", **common))
    split = tmp_path / "split"
    handler = signal.getsignal(signal.SIGINT)
    ctrl_c_at_step(lora_training, 1)  # the signal lands after step 1's loss is gathered: step 2 is the last
    with pytest.raises(KeyboardInterrupt):
        train_lora(options(data_dir, tiny_model_dir, split, **common))
    assert signal.getsignal(signal.SIGINT) is handler
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (split / "pytorch_lora_weights.safetensors").exists()
    train_lora(options(data_dir, tiny_model_dir, split, resume="latest", **common))
    assert_same_lora(whole, split)
    # Ctrl-C during the last step: training is done, so the LoRA is written (not only the checkpoint)
    last = tmp_path / "last"
    ctrl_c_at_step(lora_training, 3)
    train_lora(options(data_dir, tiny_model_dir, last, **common))
    assert (last / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert_same_lora(whole, last)


def test_two_process_run_under_torchrun_on_cpu(tmp_path, data_dir, tiny_model_dir, torchrun):
    """The trainer under a real 2-process launch (gloo on CPU); it checks itself that replicas agree."""
    out = tmp_path / "ddp"
    stdout, _ = torchrun("train-lora", "--data", str(data_dir), "--model", str(tiny_model_dir), "--out", str(out),
                         "--resolution", str(RESOLUTION), "--max-steps", "2", "--batch-size", "1", "--min-images",
                         "2", "--no-progress", "--format", "diffusers")
    assert "on 2 process(es)" in stdout
    assert stdout.count("LoRA files in") == 1  # only the main process writes and reports
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert len((out / "loss.csv").read_text().splitlines()) == 3


@pytest.mark.slow
def test_two_processes_train_the_text_encoder_on_weighted_captions(tmp_path, data_dir, tiny_model_dir, torchrun):
    """Weighted captions encode the empty prompt beside each caption: a second forward of a distributed text
    encoder in one step, which the replicas must still agree on."""
    out = tmp_path / "ddp-weighted"
    stdout, _ = torchrun("train-lora", "--data", str(data_dir), "--model", str(tiny_model_dir), "--out", str(out),
                         "--resolution", str(RESOLUTION), "--max-steps", "2", "--batch-size", "1", "--min-images",
                         "2", "--no-progress", "--format", "diffusers", "--train-text-encoder", "--train-tokens",
                         "star", "--weighted-captions", "--caption-template", "a photo of ({class}:1.5)")
    assert "on 2 process(es)" in stdout and "'a photo of (red star:1.5)'" in stdout
    assert any(k.startswith("text_encoder.") for k in load_file(out / "pytorch_lora_weights.safetensors"))


# ---- bad input ---------------------------------------------------------------------------------------------

def test_half_precision_with_gradient_checkpointing_trains_on_the_cpu(tmp_path, data_dir, tiny_model_dir):
    # the recomputed forward used another attention kernel than the forward and torch refused its outputs
    for precision in ("fp16", "bf16"):
        common = dict(max_steps=2, mixed_precision=precision, learning_rate=1e-2, format="diffusers")
        plain = load_file(train_lora(options(data_dir, tiny_model_dir, tmp_path / f"{precision}-plain", **common))
                          / "pytorch_lora_weights.safetensors")
        checkpointed = load_file(train_lora(options(data_dir, tiny_model_dir, tmp_path / f"{precision}-ckpt",
                                                    gradient_checkpointing=True, **common))
                                 / "pytorch_lora_weights.safetensors")
        assert plain.keys() == checkpointed.keys()
        assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-3) for k in plain)


def test_a_constant_schedule_run_resumes_longer_and_changes_its_checkpoint_interval(tmp_path, data_dir,
                                                                                   tiny_model_dir):
    common = dict(random_flip=True, dropout=0.1, learning_rate=1e-2, format="diffusers", lr_scheduler="constant")
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", max_steps=5, **common))
    longer = tmp_path / "longer"
    train_lora(options(data_dir, tiny_model_dir, longer, max_steps=3, checkpoint_every=1, **common))
    # kohya's "resume to train longer": the constant rate does not depend on the run's length
    train_lora(options(data_dir, tiny_model_dir, longer, max_steps=5, checkpoint_every=2, resume="latest", **common))
    assert_same_lora(whole, longer)
    assert (longer / "checkpoints" / "step-000004").is_dir()
    # a schedule that does depend on it (cosine's decay ends at the last step) is refused, saying why
    cosine = {**common, "lr_scheduler": "cosine"}
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "cos", max_steps=3, checkpoint_every=1, stop_at=2,
                       **cosine))
    with pytest.raises(EgakuError, match="another run length .* --lr-scheduler cosine schedule depends on it"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "cos", max_steps=5, resume="latest", **cosine))


def test_resuming_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, data_dir, tiny_model_dir):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "state.pt").write_text("hi")
    with pytest.raises(EgakuError, match="is not a train-lora checkpoint .*config.json cannot be read"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", resume=str(garbage)))
    (garbage / "config.json").write_text("{}")
    with pytest.raises(EgakuError, match="is not a train-lora checkpoint; pass --resume latest"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", resume=str(garbage)))


def test_regularization_images_in_class_folders_are_counted_and_guidance_follows_the_model(tmp_path, data_dir,
                                                                                         tiny_model_dir,
                                                                                         monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    import egaku.models.loading as loading

    reg = make_folder(tmp_path / "reg", per_class=2)  # kohya's reg/1_dog/ layout: 4 images in class folders
    scales = []
    call = StableDiffusionPipeline.__call__

    def recording_call(self, *args, **kwargs):
        scales.append(kwargs.get("guidance_scale"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording_call)
    monkeypatch.setattr(loading, "recommended_guidance", lambda pipe: 1.25)
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", prior_data=str(reg), prior_images=4,
                       validation_prompts=["a photo of red star"], validation_steps=2, max_steps=2))
    assert not list(reg.glob("prior-*"))  # the 4 there were enough: none generated
    assert scales and set(scales) == {1.25}  # validation at the model's own guidance, as generate draws
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "more", prior_data=str(reg), prior_images=5,
                       prior_prompts=["a photo of blue circle"], max_steps=1))
    assert len(list(reg.glob("prior-*.png"))) == 1 and scales[-1] == 1.25
    # --resolution is rounded to what the model takes, and said so; the buckets in use are listed
    capsys.readouterr()
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "odd", resolution=RESOLUTION + 3, max_steps=1))
    said = capsys.readouterr().out
    assert f"--resolution {RESOLUTION + 3} trains at {RESOLUTION}" in said
    assert "3 bucket(s): " in said and "(2 images)" in said


def test_the_default_resolution_is_the_models_native_size_and_a_resume_keeps_the_runs(tmp_path, data_dir,
                                                                                     tiny_model_dir, capsys):
    import egaku
    from egaku.inference.generate import native_size

    native = native_size(egaku.load_pipeline(str(tiny_model_dir), "cpu", "float32"))
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", resolution=None, max_steps=2,
                             checkpoint_every=1, stop_at=1))
    assert f"training at {native} px, the model's native size" in capsys.readouterr().out
    assert json.loads((out / "checkpoints" / "step-000001" / "config.json").read_text())["resolution"] == native
    train_lora(options(data_dir, tiny_model_dir, out, resolution=None, max_steps=2, checkpoint_every=1,
                       resume="latest"))
    assert json.loads((out / "training_config.json").read_text())["resolution"] == native


def test_resume_with_changed_config_is_refused_naming_the_difference(trained, data_dir, tiny_model_dir):
    opts = options(data_dir, tiny_model_dir, trained, **{**TRAINED, "weight_decay": 0.1}, resume="latest")
    with pytest.raises(EgakuError, match=r"--weight-decay: checkpoint has 0\.01, now 0\.1"):
        train_lora(opts)


def test_a_resume_may_change_the_learning_rate_which_the_restored_optimizer_takes(tmp_path, data_dir,
                                                                                  tiny_model_dir, capsys):
    """Adam's step is proportional to its rate: from the same checkpoint, half the rate moves each weight half as
    far in the next step. The schedule keeps its place (warmup here) and the token's group gets its own rate."""
    common = dict(max_steps=4, checkpoint_every=1, format="diffusers", lr_scheduler="constant_with_warmup",
                  lr_warmup_steps=4, train_tokens=["star"], weight_decay=0.0)
    run = tmp_path / "run"
    train_lora(options(data_dir, tiny_model_dir, run, stop_at=2, learning_rate=1e-2, token_lr=2e-2, **common))
    half = tmp_path / "half"
    shutil.copytree(run, half)
    train_lora(options(data_dir, tiny_model_dir, run, stop_at=3, resume="latest", learning_rate=1e-2,
                       token_lr=2e-2, **common))
    capsys.readouterr()
    train_lora(options(data_dir, tiny_model_dir, half, stop_at=3, resume="latest", learning_rate=5e-3,
                       token_lr=1e-2, **common))
    said = capsys.readouterr().out
    assert "changed on resume: UNet (--learning-rate) 0.01 -> 0.005; token embeddings (--token-lr) 0.02 -> 0.01" in said
    start = load_file(run / "checkpoints" / "step-000002" / "unet_lora.safetensors")
    full, halved = (load_file(r / "checkpoints" / "step-000003" / "unet_lora.safetensors") for r in (run, half))
    moved = [k for k in start if not torch.equal(full[k], start[k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(halved[key] - start[key], (full[key] - start[key]) / 2, rtol=1e-4, atol=1e-7)
    state = torch.load(half / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    # step 3 of 4 warmup steps: three quarters of each group's new rate
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([5e-3 * 3 / 4, 1e-2 * 3 / 4])


def test_resuming_a_checkpoint_of_another_trainer_says_so(tmp_path, data_dir, tiny_model_dir):
    from egaku.config import to_dict
    from egaku.training.ldm import TrainLdmOptions

    step = tmp_path / "ldm-run" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    (step / "config.json").write_text(json.dumps(to_dict(TrainLdmOptions())))
    with pytest.raises(EgakuError, match=r"not a train-lora checkpoint \(it was written by train-ldm"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "lora-run", resume=str(tmp_path / "ldm-run")))


def test_resume_may_change_what_is_watched_and_a_finished_run_says_nothing_was_left(tmp_path, data_dir,
                                                                                   tiny_model_dir, capsys,
                                                                                   assert_plain_mode):
    common = dict(max_steps=2, checkpoint_every=2, format="diffusers", learning_rate=5e-2)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", **common))
    before = load_file(out / "pytorch_lora_weights.safetensors")
    capsys.readouterr()
    # validation and checkpoint keeping change no weight: a resume may change them
    # (gradient checkpointing gives the same gradients with less memory: the usual fix for running out of it)
    train_lora(options(data_dir, tiny_model_dir, out, **common, resume="latest", keep_checkpoints=5,
                       validation_prompts=["a photo of red star"], validation_steps=2, validation_seeds=[4],
                       gradient_checkpointing=True, min_images=1))
    said = capsys.readouterr().out
    assert "nothing was left to train" in said and "nan" not in said
    after = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_plain_mode(out / "checkpoints" / "step-000002", out / "checkpoints" / "latest",
                      out / "pytorch_lora_weights.safetensors")
    # a new run (no --resume) in that folder would prune its own checkpoints and mix its log with this one's
    with pytest.raises(EgakuError, match="already holds a run's checkpoints .*--resume latest"):
        train_lora(options(data_dir, tiny_model_dir, out, **common))


def test_a_lora_that_cannot_be_written_names_the_checkpoint_that_writes_it_again(tmp_path, data_dir,
                                                                                 tiny_model_dir, monkeypatch, capsys):
    common = dict(max_steps=2, format="diffusers")
    real_save = lora_training.save_lora

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_training, "save_lora", full_disk)
    with pytest.raises(EgakuError, match=r"writing the LoRA into .*run failed at step 2 \(OSError: .*No space left "
                                         r"on device\); the last checkpoint is .*step-000002: free some space .* "
                                         r"--resume latest \(nothing is trained again\)"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", **common))
    monkeypatch.setattr(lora_training, "save_lora", real_save)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", **common, resume="latest"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "nothing was left to train" in capsys.readouterr().out


def apply_loras_to_nothing(path):
    from egaku.lora.apply import apply_loras, resolve_lora

    apply_loras(None, [(resolve_lora(str(path), None), 1.0)])  # refused before the model is touched


def test_a_resume_finds_its_folders_written_another_way_and_replaces_the_other_layouts_file(tmp_path, data_dir,
                                                                                            tiny_model_dir, capsys,
                                                                                            monkeypatch):

    from egaku.lora.apply import resolve_lora
    from egaku.lora.commands import describe_lora

    shutil.copytree(data_dir, tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")
    common = dict(max_steps=2, checkpoint_every=1, learning_rate=5e-2)
    out = train_lora(options("data", tiny_model_dir, tmp_path / "run", stop_at=1, format="diffusers", **common))
    # the run's config names its folders whole, so that a batch script may resume it from anywhere
    assert json.loads((out / "training_config.json").read_text())["data"] == str(tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path)
    train_lora(options("work/./data/", tiny_model_dir, out, resume="latest", format="diffusers", **common))
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    # a resume that writes the other layout takes the first layout's file away: `--lora OUT` would read it
    capsys.readouterr()
    train_lora(options(str(tmp_path / "work" / "data"), tiny_model_dir, out, resume="latest", format="kohya",
                       **common))
    assert f"removed {out / 'pytorch_lora_weights.safetensors'}: an earlier run's LoRA" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["run.safetensors"]
    assert resolve_lora(str(out), None) == out / "run.safetensors"
    # info reads the file's own header before its folder's config (which a later run may have rewritten)
    config = json.loads((out / "training_config.json").read_text())
    (out / "training_config.json").write_text(json.dumps({**config, "learning_rate": 1.0}))
    assert describe_lora(out / "run.safetensors")["training"]["learning rate"] == 0.05

    # a checkpoint is training state, not a LoRA file: said so, with where the LoRA files are
    step = out / "checkpoints" / "step-000002"
    for path in (step, step / "unet_lora.safetensors"):
        for read in (describe_lora, apply_loras_to_nothing):  # egaku info; generate --lora
            with pytest.raises(EgakuError, match="is a train-lora checkpoint .*--save-every N every N steps"):
                read(path)


def test_resume_on_changed_images_or_captions_is_refused_naming_them(tmp_path, data_dir, tiny_model_dir):

    data = tmp_path / "photos"  # the error names the images under the folder given as --data
    shutil.copytree(data_dir, data)
    common = dict(max_steps=3, format="diffusers")
    out = tmp_path / "run"
    train_lora(options(data, tiny_model_dir, out, stop_at=1, **common))

    def resume():
        return train_lora(options(data, tiny_model_dir, out, resume="latest", **common))

    shutil.copy(data / "red_star" / "0.png", data / "red_star" / "9.png")
    with pytest.raises(EgakuError, match=r"images changed .*added: " + re.escape(str(data / "red_star" / "9.png"))):
        resume()
    (data / "red_star" / "9.png").unlink()
    (data / "red_star" / "1.png").rename(tmp_path / "1.png")
    with pytest.raises(EgakuError, match="removed: " + re.escape(str(data / "red_star" / "1.png"))):
        resume()
    (tmp_path / "1.png").rename(data / "red_star" / "1.png")
    (data / "red_star" / "2.txt").write_text("a new caption")
    with pytest.raises(EgakuError,
                       match=r"changed \(file or caption\): " + re.escape(str(data / "red_star" / "2.png"))):
        resume()
    (data / "red_star" / "2.txt").unlink()
    assert (resume() / "pytorch_lora_weights.safetensors").is_file()  # put back as it was: resumes


def test_resume_on_changed_loss_masks_is_refused_naming_them(tmp_path, data_dir, tiny_model_dir):
    masks = write_masks(data_dir, tmp_path / "masks", left_half)
    common = dict(max_steps=3, format="diffusers", mask_dir=str(masks))
    out = tmp_path / "run"
    train_lora(options(data_dir, tiny_model_dir, out, stop_at=1, **common))
    mask = masks / "red_star" / "0.png"
    original = mask.read_bytes()
    with Image.open(mask) as img:
        size = img.size
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0]), dtype=np.uint8))
    noisy.save(mask)  # another mask of the same image: another file size
    with pytest.raises(EgakuError, match=r"changed \(file or caption\): " + re.escape(str(mask))):
        train_lora(options(data_dir, tiny_model_dir, out, resume="latest", **common))
    mask.write_bytes(original)
    assert (train_lora(options(data_dir, tiny_model_dir, out, resume="latest", **common))
            / "pytorch_lora_weights.safetensors").is_file()


def test_nan_loss_stops_at_the_step_keeping_the_last_good_checkpoint(tmp_path, data_dir, tiny_model_dir):
    out = tmp_path / "nan"
    with pytest.raises(EgakuError) as err:
        train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e30, max_grad_norm=0.0,
                           checkpoint_every=1, max_steps=6, format="diffusers"))
    message = str(err.value)
    assert "at step 2" in message and "the last checkpoint is" in message and "step-000001" in message
    saved = load_file(out / "checkpoints" / "step-000001" / "unet_lora.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    # the first step at that rate already ruined the weights step 2's loss was computed from: no checkpoint before
    # it to go back to. It offers only what this run lacks: it has no fp16 to leave, and no gradient clipping
    assert "computed from the weights of step-000001" in message and "--resume latest" not in message
    assert ("train again into a new --out (or into this one after deleting " in message
            and "with a lower --learning-rate than the one that trained it or --max-grad-norm 1.0" in message)
    assert "fp16" not in message


def test_after_a_nan_stop_a_resume_with_a_lower_rate_ends_as_the_run_that_had_it(tmp_path, data_dir,
                                                                                tiny_model_dir):
    """The NaN session writes nothing; its checkpoint resumed with the rate the message asks for ends with the
    weights of a run that had that rate from its last good step on."""
    common = dict(checkpoint_every=1, max_steps=3, format="diffusers")
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", learning_rate=1e-2, **common))
    out = tmp_path / "run"
    train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e-2, stop_at=1, **common))
    with pytest.raises(EgakuError) as err:
        # (this session writes no checkpoint: the weights of its first step are finite and already ruined)
        train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e30, max_grad_norm=0.0, resume="latest",
                           **{**common, "checkpoint_every": 0}))
    assert "step-000001" in str(err.value) and "--resume latest with a lower --learning-rate" in str(err.value)
    train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e-2, resume="latest", **common))
    assert_same_lora(whole, out)


def test_a_resume_that_leaves_the_rates_out_keeps_the_runs_own(tmp_path, data_dir, tiny_model_dir, capsys):
    """Only a rate given again changes: a resume command without --learning-rate continues at the run's (which is
    not the default), as the uninterrupted run does."""
    common = dict(max_steps=3, checkpoint_every=1, format="diffusers")
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", learning_rate=1e-2, max_grad_norm=0.5,
                               **common))
    out = tmp_path / "run"
    train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e-2, max_grad_norm=0.5, stop_at=1, **common))
    capsys.readouterr()
    resumed = options(data_dir, tiny_model_dir, out, resume="latest", max_steps=3, format="diffusers")
    assert resumed.learning_rate != 1e-2 and "learning_rate" not in resumed.given_options
    train_lora(resumed)
    assert "changed on resume" not in capsys.readouterr().out
    assert_same_lora(whole, out)
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["learning_rate"] == 1e-2 and "given_options" not in saved  # the CLI's bookkeeping stays out
    # given again, a rate changes, and the run says so: the clipping too
    train_lora(options(data_dir, tiny_model_dir, out, resume="latest", **{**common, "max_steps": 4},
                       max_grad_norm=1.0))  # (a constant schedule: the run may grow on resume)
    assert "changed on resume: --max-grad-norm 0.5 -> 1" in capsys.readouterr().out


def test_a_nan_from_a_diverged_checkpoint_points_before_it_and_that_resume_ends_as_the_run(tmp_path, data_dir,
                                                                                           tiny_model_dir):
    """A step at a far too high rate saves finite, already ruined weights; the loss of the next step, computed from
    them, is NaN, and would be again after any resume from them. The message names the checkpoint before, and the
    resume it describes ends with the weights of the run that never had the high rate."""
    common = dict(checkpoint_every=1, max_steps=4, format="diffusers", max_grad_norm=0.0)
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", learning_rate=1e-2, **common))
    out = tmp_path / "run"
    train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e-2, stop_at=2, **common))
    with pytest.raises(EgakuError) as err:
        train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e30, resume="latest", **common))
    message = str(err.value)
    assert "at step 4; training stopped, the last checkpoint is" in message
    assert "computed from the weights of step-000003" in message and "have already diverged" in message
    before = out / "checkpoints" / "step-000002"
    assert f"resume from the checkpoint before it (--resume {before}, with step-000003 moved aside)" in message
    assert "lower --learning-rate than the one that trained it" in message and "--resume latest" not in message
    shutil.move(out / "checkpoints" / "step-000003", tmp_path / "aside")
    train_lora(options(data_dir, tiny_model_dir, out, learning_rate=1e-2, resume=str(before), **common))
    assert_same_lora(whole, out)


def test_a_nan_stop_before_any_checkpoint_says_to_train_again(tmp_path, data_dir, tiny_model_dir):
    with pytest.raises(EgakuError) as err:
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "nan", learning_rate=1e30, max_grad_norm=0.0,
                           checkpoint_every=0, max_steps=3, format="diffusers", mixed_precision="no"))
    message = str(err.value)
    assert "no checkpoint was written yet" in message and "--resume" not in message
    assert "Try: a lower --learning-rate or --max-grad-norm 1.0, and train again (into the same --out)" in message


def test_too_few_images_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "few"
    data.mkdir()
    Image.new("RGB", (40, 40), "red").save(data / "one.png")
    (data / "broken.png").write_bytes(b"")
    with pytest.raises(EgakuError, match=r"found 1 usable image, need at least 4"):
        train_lora(options(data, tiny_model_dir, tmp_path / "out", min_images=4))
    assert "broken.png: empty file" in capsys.readouterr().err  # the report, above the error


def test_a_model_that_is_not_stable_diffusion_is_refused_by_the_cli(tmp_path, data_dir, capsys):
    from egaku.cli import main

    not_sd = tmp_path / "not-sd"
    not_sd.mkdir()
    (not_sd / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    code = main(["train-lora", "--data", str(data_dir), "--model", str(not_sd), "--out", str(tmp_path / "o"),
                 "--min-images", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("egaku: error:") and "Stable Diffusion" in err and "Traceback" not in err


def test_lora_from_another_base_names_the_mismatching_layer(trained, tiny_model_dir, tmp_path):
    from egaku.lora.apply import apply_loras

    weights = load_file(trained / "pytorch_lora_weights.safetensors")
    key = next(k for k in sorted(weights) if "attn2.to_k.lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], 768)  # a 768-wide text encoder: SD 1.x, not ours
    bad = tmp_path / "other-base.safetensors"
    save_file(weights, bad)
    layer = key.removesuffix(".lora_A.weight")
    with pytest.raises(EgakuError, match=re.escape(f"{layer} does not fit this model: the LoRA maps 768")):
        apply_loras(tiny_pipe(tiny_model_dir), [(bad, 1.0)])


def test_lora_whose_keys_match_nothing_is_an_error(tiny_model_dir, tmp_path):
    from egaku.lora.apply import apply_loras

    bad = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4)}, bad)
    with pytest.raises(EgakuError, match="is a LoRA for SDXL"):  # its keys say which base it is for
        apply_loras(tiny_pipe(tiny_model_dir), [(bad, 1.0)])
    unprefixed = tmp_path / "bare.safetensors"
    save_file({"down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64)}, unprefixed)
    with pytest.raises(EgakuError, match="none of its LoRA keys match"):
        apply_loras(tiny_pipe(tiny_model_dir), [(unprefixed, 1.0)])


def test_bad_option_values_are_errors():
    with pytest.raises(EgakuError, match="--rank"):
        build(TrainLoraOptions, {"rank": 0})
    with pytest.raises(EgakuError, match="--data is required"):
        train_lora(TrainLoraOptions())
    for field, value, message in (("save_every", -1, "--save-every"), ("input_perturbation", -0.1,
                                  "--input-perturbation"), ("huber_c", 0.0, "--huber-c"), ("max_steps", -1,
                                  "--max-steps and --epochs count"), ("min_snr_gamma", -5.0, "gradient ascent"),
                                  ("validation_steps", 0, "--validation-steps"), ("checkpoint_every", -1,
                                  "--checkpoint-every"), ("validation_every", -1, "--validation-every"),
                                  ("lr_warmup_steps", -3, "--lr-warmup-steps"), ("keep_checkpoints", 0,
                                  "--keep-checkpoints"), ("noise_offset", -0.1, "--noise-offset"),
                                  ("max_grad_norm", -1.0, "--max-grad-norm must be 0 or more, got -1"),
                                  ("token_lr", -0.01, "--token-lr must be 0 or more, got -0.01"),
                                  ("learning_rate", 1e39, "--learning-rate 1e\\+39 is beyond float32's range"),
                                  ("token_lr", float("inf"), "--token-lr inf is beyond float32's range"),
                                  ("conv_rank", -1, "--conv-rank must be 0"), ("conv_alpha", -1.0, "--conv-alpha"),
                                  ("conv_rank", 8, "size the convolution layers' LoRA: add --lora-conv")):
        with pytest.raises(EgakuError, match=message):
            build(TrainLoraOptions, {field: value, "loss_type": "huber"})
    # a preset's choice is checked as argparse checks a flag's, before any training
    for field, value in (("format", "kohyaa"), ("save_precision", "fp8"), ("lr_scheduler", "cosinee"),
                         ("mixed_precision", "fp8"), ("optimizer", "adam"), ("prior_target", "babe")):
        with pytest.raises(EgakuError, match=f"option '{field}': invalid choice '{value}'"):
            build(TrainLoraOptions, {"data": "x", field: value})


def test_target_modules_that_match_no_layer_and_an_out_that_is_a_file_are_clear_errors(tmp_path, data_dir,
                                                                                        tiny_model_dir):
    # kohya's and the GUIs' comma-separated habit is read as several names
    assert build(TrainLoraOptions, {"target_modules": ["to_q, to_k", "to_v"]}).target_modules == ["to_q", "to_k",
                                                                                                    "to_v"]
    with pytest.raises(EgakuError, match=r"--target-modules nosuch: no linear or convolution layer of the UNet has a "
                                         r"name ending so; the layers' names end in: .*to_out\.0, to_q"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "bad", target_modules=["to_q", "nosuch"]))
    assert not (tmp_path / "bad" / "checkpoints").exists()
    a_file = tmp_path / "img.png"
    a_file.write_bytes(b"x")
    for out in (a_file, a_file / "run"):
        with pytest.raises(EgakuError, match=f"--out {out}( cannot be written: {a_file})? is a file, not a folder"):
            train_lora(options(data_dir, tiny_model_dir, out))
    # inside the data folder its samples would be read as a class of training images
    with pytest.raises(EgakuError, match=f"--out {data_dir / 'red_star' / 'run'} lies inside --data {data_dir}"):
        train_lora(options(data_dir, tiny_model_dir, data_dir / "red_star" / "run"))
    assert not (data_dir / "red_star" / "run").exists()


def test_kohya_subsets_are_keyed_by_their_folder_inside_the_data(tmp_path):
    from types import SimpleNamespace

    from egaku.training.lora import dataset_dirs, folder_tags

    def item(path, repeats, caption):
        return SimpleNamespace(path=tmp_path / path, repeats=repeats, caption=caption)

    items = [item("data/10_dog/sub/a.png", 10, "dog"), item("data/10_dog/sub/b.png", 10, "dog"),
             item("data/5_cat/sub/c.png", 5, "cat"), item("data/5_cat/d.png", 5, "cat"), item("data/e.png", 1, "x")]
    assert dataset_dirs([(str(tmp_path / "data"), items)]) == {
        "10_dog/sub": {"n_repeats": 10, "img_count": 2}, "5_cat/sub": {"n_repeats": 5, "img_count": 1},
        "5_cat": {"n_repeats": 5, "img_count": 1}, "data": {"n_repeats": 1, "img_count": 1}}
    assert folder_tags([(str(tmp_path / "data"), items)])["5_cat/sub"] == {"cat": 1}


def test_8bit_adamw_is_bitsandbytes_on_cuda_only_and_plain_adamw_without_it(monkeypatch):
    """--adam-8bit (the default) takes bitsandbytes' AdamW8bit on a CUDA device when the package is there; on the
    CPU, or without the package, the run trains with torch's AdamW (the run's first lines name the class)."""
    import sys
    import types

    from egaku.training.lora import make_optimizer

    class AdamW8bit(torch.optim.AdamW):
        pass

    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    opts = build(TrainLoraOptions, {"weight_decay": 0.02})
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cuda = torch.device("cuda")
    optimizer = make_optimizer(opts, params, cuda)
    assert type(optimizer) is AdamW8bit and optimizer.defaults["weight_decay"] == 0.02
    assert type(make_optimizer(opts, params, torch.device("cpu"))) is torch.optim.AdamW
    assert type(make_optimizer(build(TrainLoraOptions, {"adam_8bit": False}), params, cuda)) is torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: import fails
    assert type(make_optimizer(opts, params, cuda)) is torch.optim.AdamW


def test_loraplus_trains_the_up_matrices_at_the_given_multiple_of_the_rate(tmp_path, data_dir, tiny_model_dir):
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "plus", max_steps=1, learning_rate=1e-3,
                             loraplus_lr_ratio=16, train_text_encoder=True, text_encoder_lr=2e-4,
                             checkpoint_every=1, format="kohya"))
    state = torch.load(out / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([1e-3, 1.6e-2, 2e-4, 3.2e-3])
    # each group holds one side of the pairs: as many A as B matrices, in the UNet and in the text encoder
    sizes = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    assert sizes[0] == sizes[1] > 0 and sizes[2] == sizes[3] > 0
    with safe_open(str(out / f"{out.name}.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"])["loraplus_lr_ratio"] == 16
    with pytest.raises(EgakuError, match="--loraplus-lr-ratio"):
        build(TrainLoraOptions, {"loraplus_lr_ratio": -1})
    # the faster group is the B side
    from peft import LoraConfig, inject_adapter_in_model

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
    layer = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), layer)
    down, up = lora_training.lora_param_groups(layer, 1e-3, 16)
    assert up["params"] == [layer[0].lora_B["default"].weight] and up["lr"] == pytest.approx(1.6e-2)
    assert down["params"] == [layer[0].lora_A["default"].weight] and down["lr"] == 1e-3


# ---- merge --------------------------------------------------------------------------------------------------

def test_merge_lora_writes_a_fused_copy_that_renders_like_base_plus_lora(trained, tiny_model_dir, tmp_path,
                                                                         assert_plain_mode, monkeypatch):

    from egaku.lora.commands import MergeLoraOptions, merge_lora_command

    base = tmp_path / "base"  # a base that declares its default guidance, which the merged copy keeps
    shutil.copytree(tiny_model_dir, base)
    (base / "egaku_defaults.json").write_text('{"guidance_scale": 4.5}')
    merged = tmp_path / "merged"
    merge_lora_command(MergeLoraOptions(model=str(base), lora=[f"{trained}:0.7"], out=str(merged)))
    assert json.loads((merged / "egaku_defaults.json").read_text()) == {"guidance_scale": 4.5}
    reference = tiny_pipe(tiny_model_dir)
    reference.load_lora_weights(str(trained), adapter_name="x")
    reference.set_adapters(["x"], [0.7])
    fused = tiny_pipe(merged)
    assert not any("lora" in k for k in fused.unet.state_dict())
    np.testing.assert_allclose(render(fused), render(reference), atol=1e-4)
    with pytest.raises(EgakuError, match="already exists"):
        merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(trained)], out=str(merged)))
    assert_plain_mode(merged, *merged.rglob("*.safetensors"))

    # a bare name with --lora-dir is the folder's LoRA, as generate reads it, not a namesake in the working directory
    (tmp_path / "loras").mkdir()
    shutil.copytree(trained, tmp_path / "loras" / "star")
    (tmp_path / "star").mkdir()
    (tmp_path / "star" / "pytorch_lora_weights.safetensors").write_bytes(b"not this one")
    monkeypatch.chdir(tmp_path)
    merge_lora_command(MergeLoraOptions(model=str(base), lora=["star:0.7"], lora_dir="loras", out="merged-by-name"))
    np.testing.assert_allclose(render(tiny_pipe(tmp_path / "merged-by-name")), render(fused), atol=1e-5)


def test_merge_lora_keeps_the_precision_of_an_fp16_base_unless_told(trained, tiny_model_dir, tmp_path):
    """An fp16 base merges (in fp32) into an fp16 copy, as big as its base; --save-precision picks another dtype."""
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command

    def unet_dtypes(folder):
        with safe_open(str(next((folder / "unet").glob("*.safetensors"))), framework="pt") as fh:
            return {fh.get_slice(k).get_dtype() for k in fh.keys()}

    half = tmp_path / "half"
    tiny_pipe(tiny_model_dir).to(dtype=torch.float16).save_pretrained(half, safe_serialization=True)
    assert unet_dtypes(half) == {"F16"}
    merge_lora_command(MergeLoraOptions(model=str(half), lora=[str(trained)], out=str(tmp_path / "merged")))
    assert unet_dtypes(tmp_path / "merged") == {"F16"}
    merge_lora_command(MergeLoraOptions(model=str(half), lora=[str(trained)], out=str(tmp_path / "merged32"),
                                        save_precision="fp32"))
    assert unet_dtypes(tmp_path / "merged32") == {"F32"}
    # an fp32 base stays fp32, and bf16 is there when asked for
    merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(trained)], out=str(tmp_path / "m32")))
    assert unet_dtypes(tmp_path / "m32") == {"F32"}
    merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(trained)], out=str(tmp_path / "bf"),
                                        save_precision="bf16"))
    assert unet_dtypes(tmp_path / "bf") == {"BF16"}
    # the fp16 copy is the fp32 merge rounded: the LoRA's change is in it
    merged16 = tiny_pipe(tmp_path / "merged").unet.state_dict()
    merged32 = tiny_pipe(tmp_path / "merged32").unet.state_dict()
    for key, value in merged32.items():
        torch.testing.assert_close(merged16[key].float(), value, rtol=2e-3, atol=2e-3)


def _stored_dtypes(folder) -> dict[str, set[str]]:
    """The dtypes of each model's weight files in a pipeline folder, as stored (safetensors header)."""
    found = {}
    for component in ("unet", "text_encoder", "vae"):
        dtypes = set()
        for file in (folder / component).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as fh:
                dtypes |= {fh.get_slice(k).get_dtype() for k in fh.keys()} - {"I64"}
        found[component] = dtypes
    return found


def test_merge_lora_follows_the_plain_weights_of_a_folder_that_holds_fp16_variants_too(trained, tiny_model_dir,
                                                                                      tmp_path, capsys):
    """A full hub download of SD 1.5 holds diffusion_pytorch_model.safetensors (fp32) and .fp16.safetensors side by
    side; load_pipeline loads the plain file, so the merge is fp32 like it, and the model hash is of that file."""
    import hashlib

    from egaku.lora.commands import MergeLoraOptions, merge_lora_command
    from egaku.models.loading import ModelInfo, _weights_variant, load_pipeline

    full = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full)
    tiny_pipe(tiny_model_dir).to(dtype=torch.float16).save_pretrained(full, safe_serialization=True, variant="fp16")
    plain = full / "unet" / "diffusion_pytorch_model.safetensors"
    assert (full / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file() and plain.is_file()
    loaded = load_pipeline(str(full), "cpu", "float32")
    assert _weights_variant(full) is None  # diffusers reads the plain files
    assert loaded.egaku_info.hash == hashlib.sha256(plain.read_bytes()).hexdigest()[:10]
    assert ModelInfo("full", "folder", full).hash == ModelInfo("tiny", "folder", tiny_model_dir).hash
    capsys.readouterr()
    merge_lora_command(MergeLoraOptions(model=str(full), lora=[str(trained)], out=str(tmp_path / "merged")))
    assert _stored_dtypes(tmp_path / "merged") == {"unet": {"F32"}, "text_encoder": {"F32"}, "vae": {"F32"}}
    assert capsys.readouterr().out.rstrip().endswith(str(tmp_path / "merged"))  # no dtype said: fp32


def test_merge_lora_keeps_the_precision_of_each_model_of_its_base(trained, tiny_model_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """A base with an fp16 UNet and an fp32 text encoder and VAE keeps each one's dtype, as a folder and as a single
    file; --save-precision (spelt fp16 or float16, as convert --dtype spells it) puts them all in one."""
    from egaku.cli import main
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command
    from egaku.models.single_file import save_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pipe = tiny_pipe(tiny_model_dir)
    pipe.unet.to(dtype=torch.float16)
    mixed = tmp_path / "mixed"
    pipe.save_pretrained(mixed, safe_serialization=True)
    single = save_single_file(pipe, tmp_path / "mixed.safetensors")
    kept = {"unet": {"F16"}, "text_encoder": {"F32"}, "vae": {"F32"}}
    assert _stored_dtypes(mixed) == kept
    capsys.readouterr()
    merge_lora_command(MergeLoraOptions(model=str(mixed), lora=[str(trained)], out=str(tmp_path / "merged")))
    assert _stored_dtypes(tmp_path / "merged") == kept
    assert capsys.readouterr().out.rstrip().endswith("(UNet fp16, text encoder fp32, VAE fp32)")
    merge_lora_command(MergeLoraOptions(model=str(single), model_config=str(tiny_model_dir), lora=[str(trained)],
                                        out=str(tmp_path / "merged-single")))
    assert _stored_dtypes(tmp_path / "merged-single") == kept
    capsys.readouterr()
    assert main(["merge-lora", "--model", str(mixed), "--lora", str(trained), "--out", str(tmp_path / "half"),
                 "--save-precision", "float16"]) == 0
    assert _stored_dtypes(tmp_path / "half") == {"unet": {"F16"}, "text_encoder": {"F16"}, "vae": {"F16"}}
    out = capsys.readouterr().out
    assert out.rstrip().endswith("(fp16)") and "float16" not in out
    with pytest.raises(SystemExit):
        main(["merge-lora", "--help"])
    assert "{auto,fp32,fp16,bf16,float32,float16,bfloat16}" in capsys.readouterr().out


def test_merged_and_converted_copies_sample_on_the_timesteps_of_their_base(trained, tiny_model_dir, tmp_path):
    """SD 1.x's scheduler_config.json leaves timestep_spacing to defaults; the copies must leave it so too, or
    DPM++ built from them steps on PNDM's "leading" timesteps instead of its own "linspace" ones."""

    import egaku
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command
    from egaku.models.commands import ConvertOptions, convert_command

    base = tmp_path / "sd15like"
    shutil.copytree(tiny_model_dir, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items()
                                       if k not in ("timestep_spacing", "prediction_type", "steps_offset")}))
    merge_lora_command(MergeLoraOptions(model=str(base), lora=[f"{trained}:0"], out=str(tmp_path / "merged")))
    convert_command(ConvertOptions(model=str(base), out=str(tmp_path / "converted")))

    def image(model):
        pipe = egaku.load_pipeline(str(model), device="cpu", dtype="float32")
        result = egaku.generate(pipe, "a photo of red star", seed=1, steps=2, width=RESOLUTION, height=RESOLUTION,
                                sampler="dpmpp-2m", guidance_scale=3.0)[0]
        return np.asarray(result.image, dtype=np.int16)

    expected = image(base)
    for copy in ("merged", "converted"):
        saved = json.loads((tmp_path / copy / "scheduler" / "scheduler_config.json").read_text())
        assert "timestep_spacing" not in saved and saved["beta_schedule"] == config["beta_schedule"]
        assert np.abs(image(tmp_path / copy) - expected).max() <= 1, copy  # weight 0: the same model


def test_dora_trains_magnitudes_and_loads_in_diffusers_egaku_and_merge_lora(tmp_path, data_dir, tiny_model_dir):
    """--dora: peft's DoRA layers (UNet, conv and text encoder), written with their magnitudes in the diffusers
    layout (the text encoder's as lora_magnitude_vector.weight, the name transformers loads); plain diffusers,
    egaku's apply_loras (alpha folded in) and merge-lora all give the same image and text-encoder output."""
    from egaku.lora.apply import apply_loras, remove_loras
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command

    for layout in ("both", "kohya"):
        with pytest.raises(EgakuError, match="give --format diffusers or leave --format out"):
            options(data_dir, tiny_model_dir, tmp_path / "x", dora=True, format=layout)
    assert options(data_dir, tiny_model_dir, tmp_path / "x", dora=True).format == "diffusers"  # the default follows
    assert options(data_dir, tiny_model_dir, tmp_path / "x").format == "both"
    common = dict(dora=True, lora_conv=True, train_text_encoder=True, learning_rate=5e-2,
                  max_steps=3, checkpoint_every=1)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "dora", **common))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert any(k.startswith("unet.") for k in magnitudes) and any(k.startswith("text_encoder.") for k in magnitudes)
    assert all(k.endswith(".weight") == k.startswith("text_encoder.") for k in magnitudes)
    assert len(magnitudes) == len([k for k in weights if ".lora_A." in k])
    # resume restores the magnitudes with the rest
    split = tmp_path / "split"
    train_lora(options(data_dir, tiny_model_dir, split, stop_at=2, **common))
    train_lora(options(data_dir, tiny_model_dir, split, resume="latest", **common))
    assert_same_lora(out, split)

    # plain diffusers loads the whole file, text-encoder DoRA included, as egaku does; so does egaku a file written
    # before the text encoder's magnitudes had their .weight
    reference = tiny_pipe(tiny_model_dir)
    ids = reference.tokenizer(["a photo of red star"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base_text = reference.text_encoder(ids)[0]
    base = render(reference)
    reference.load_lora_weights(str(out))
    with torch.no_grad():
        expected_text = reference.text_encoder(ids)[0]
    expected = render(reference)
    assert np.abs(expected - base).max() > 1e-3 and (expected_text - base_text).abs().max() > 1e-3
    older = tmp_path / "older"
    older.mkdir()
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
        header = fh.metadata()
    save_file({k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v for k, v in weights.items()},
              older / "pytorch_lora_weights.safetensors", metadata=header)
    pipe = tiny_pipe(tiny_model_dir)
    for written in (out, older):
        apply_loras(pipe, [(written / "pytorch_lora_weights.safetensors", 1.0)])
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder(ids)[0], expected_text, atol=1e-5, rtol=1e-5)
        applied = render(pipe)
        np.testing.assert_allclose(applied, expected, atol=1e-5)
        remove_loras(pipe)
    np.testing.assert_allclose(render(pipe), base, atol=1e-6)
    # merge-lora's fused copy agrees
    merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(out)], out=str(tmp_path / "merged")))
    np.testing.assert_allclose(render(tiny_pipe(tmp_path / "merged")), applied, atol=1e-4)
    # --init-lora checks the adapter kind; info says what it is
    with pytest.raises(EgakuError, match="is a DoRA file .* give --dora"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "y", init_lora=str(out), lora_conv=True,
                           train_text_encoder=True, format="diffusers"))
    restarted = train_lora(options(data_dir, tiny_model_dir, tmp_path / "again", init_lora=str(out),
                                   **{**common, "max_steps": 1, "learning_rate": 1e-12, "weight_decay": 0.0}))
    again = load_file(restarted / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(again[k], weights[k], atol=1e-6) for k in magnitudes)
    assert describe(out)["adapter"] == "DoRA"
    # a kohya/LyCORIS DoRA file (dora_scale) is named as such, not as a LoRA for another model
    from egaku.lora.formats import adaptable_modules, kohya_name

    module = next(m for m in adaptable_modules(pipe) if m.startswith("unet.") and m.endswith("attn1.to_q"))
    layer = adaptable_modules(pipe)[module]
    name = kohya_name("unet", module.split(".", 1)[1])
    kohya = {f"{name}.lora_down.weight": torch.zeros(4, layer.in_features),
             f"{name}.lora_up.weight": torch.zeros(layer.out_features, 4),
             f"{name}.dora_scale": torch.ones(layer.out_features, 1)}
    save_file(kohya, tmp_path / "lyco.safetensors")
    with pytest.raises(EgakuError, match="DoRA layer in the kohya/LyCORIS layout"):
        apply_loras(pipe, [(tmp_path / "lyco.safetensors", 1.0)])


def describe(path):
    from egaku.lora.commands import describe_lora

    return describe_lora(path)


# ---- presets --------------------------------------------------------------------------------------------

def test_every_lora_preset_builds_the_options():
    import tomllib

    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/lora-*.toml"))
    assert presets
    for preset in presets:
        build(TrainLoraOptions, tomllib.loads(preset.read_text()))


def test_yaml_config_with_flags_overriding(tmp_path):
    from egaku.cli import parse

    preset = tmp_path / "lora.yaml"
    preset.write_text("rank: 16\nlearning_rate: 0.0002\nvalidation_prompts: [a red star]\n")
    _, opts = parse(["train-lora", "--config", str(preset), "--rank", "4", "--data", "d"])
    assert (opts.rank, opts.learning_rate, opts.validation_prompts, opts.data) == (4, 2e-4, ["a red star"], "d")


# ---- prior preservation ------------------------------------------------------------------------------

def test_prior_preservation_generates_missing_images_and_weights_their_loss(tmp_path, data_dir, tiny_model_dir):
    """--prior-data: the base model fills the folder up to --prior-images (kept for the next run), the
    images train with their captions, and --prior-loss-weight scales their share of the loss."""
    from safetensors.torch import load_file

    from egaku.lora.formats import LORA_WEIGHTS_NAME

    prior = tmp_path / "prior"
    prompts = ["a photo of green square", "a photo of blue circle"]
    common = dict(max_steps=4, batch_size=2, learning_rate=5e-2, format="diffusers")  # one epoch: every batch
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "first", prior_data=str(prior), prior_images=3,
                       prior_prompts=prompts, **common))
    made = sorted(prior.glob("prior-*.png"))
    assert [p.with_suffix(".txt").read_text().strip() for p in made] == [prompts[0], prompts[1], prompts[0]]
    assert "regularization images" in (tmp_path / "first" / "data_report.txt").read_text()
    stamps = [p.stat().st_mtime_ns for p in made]
    lora_training.fill_prior_folder(tiny_pipe(tiny_model_dir), options(
        data_dir, tiny_model_dir, tmp_path / "x", prior_data=str(prior), prior_images=3, prior_prompts=prompts),
        torch.device("cpu"))
    assert [p.stat().st_mtime_ns for p in sorted(prior.glob("prior-*.png"))] == stamps  # nothing regenerated

    # other pictures under the same captions and sizes
    other = tmp_path / "other"
    other.mkdir()
    for p in made:
        Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(other / p.name)
        (other / p.with_suffix(".txt").name).write_text(p.with_suffix(".txt").read_text())

    def lora_weights(folder, weight, name):
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / name, prior_data=str(folder),
                                 prior_loss_weight=weight, **common))
        return load_file(out / LORA_WEIGHTS_NAME)

    zero_a, zero_b = lora_weights(prior, 0.0, "zero-a"), lora_weights(other, 0.0, "zero-b")
    assert all(torch.allclose(zero_a[k], zero_b[k]) for k in zero_a)  # weight 0: their pixels do not matter
    one_a, one_b = lora_weights(prior, 1.0, "one-a"), lora_weights(other, 1.0, "one-b")
    assert any(not torch.allclose(one_a[k], one_b[k]) for k in one_a)


def test_prior_target_base_trains_regularization_images_towards_the_frozen_model(tmp_path, data_dir, tiny_model_dir):
    """--prior-target base: a regularization image's target is the base model's own prediction. At the first
    step the LoRA is still zero, so those rows add exactly nothing (the loss equals a run that weights them 0);
    after that they pull the LoRA back, unlike a zero weight; the adapters are back on for the training rows."""
    prior = shutil.copytree(data_dir, tmp_path / "prior")  # the training images again, in a folder of their own

    def losses(name, **kw):
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / name, max_steps=3, batch_size=4,
                                 learning_rate=5e-2, prior_data=str(prior), format="diffusers", **kw))
        rows = (out / "loss.csv").read_text().splitlines()[1:]
        return [float(r.split(",")[2]) for r in rows], load_file(out / "pytorch_lora_weights.safetensors")

    # each batch (one aspect bucket) holds both training images of its bucket and their regularization copies
    base_target, base_lora = losses("base", prior_target="base")
    ignored, ignored_lora = losses("ignored", prior_loss_weight=0.0)
    data_target, _ = losses("data")
    assert base_target[0] == pytest.approx(ignored[0], rel=1e-6)
    assert data_target[0] > base_target[0] * 1.01  # a data target is not met by the untrained LoRA
    assert base_target[1:] != pytest.approx(ignored[1:], rel=1e-4)  # the LoRA has moved: the base target now acts
    assert any(not torch.allclose(base_lora[k], ignored_lora[k]) for k in base_lora)
    with pytest.raises(EgakuError, match="--prior-target base needs --prior-data"):
        options(data_dir, tiny_model_dir, tmp_path / "x", prior_target="base")


def test_adapters_off_runs_the_frozen_base_and_switches_back(tiny_model_dir):
    from peft import LoraConfig

    unet = tiny_pipe(tiny_model_dir).unet
    sample, t, states = (torch.randn(1, 4, 16, 16), torch.tensor([10]),
                         torch.randn(1, 77, unet.config.cross_attention_dim))
    with torch.no_grad():
        before = unet(sample, t, states).sample
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_()
        adapted = unet(sample, t, states).sample
        with lora_training.adapters_off(unet):
            off = unet(sample, t, states).sample
        again = unet(sample, t, states).sample
    assert torch.equal(off, before) and torch.equal(again, adapted) and not torch.allclose(adapted, before)


def test_repeats_count_training_images_per_epoch_and_regularization_images_once(tmp_path, data_dir, tiny_model_dir):
    def steps_of_one_epoch(name, **kw):
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / name, max_steps=0, epochs=1, batch_size=1,
                                 format="diffusers", **kw))
        return len((out / "loss.csv").read_text().splitlines()) - 1

    n = steps_of_one_epoch("once")
    assert n >= 2
    # the same images as regularization images: 3 x n training slots + n regularization slots
    prior = shutil.copytree(data_dir, tmp_path / "prior")
    assert steps_of_one_epoch("three", repeats=3, prior_data=str(prior)) == 4 * n
    with pytest.raises(EgakuError, match="--repeats"):
        options(data_dir, tiny_model_dir, tmp_path / "x", repeats=0)
    # kohya's folder names: "3_red_star" holds its images 3 times per epoch, times --repeats

    kohya = tmp_path / "kohya"
    shutil.copytree(data_dir / "red_star", kohya / "3_red_star")
    shutil.copytree(data_dir / "blue_circle", kohya / "1_blue_circle")
    out = train_lora(options(kohya, tiny_model_dir, tmp_path / "kohya-out", max_steps=0, epochs=1, batch_size=1,
                             repeats=2, format="kohya"))
    assert len((out / "loss.csv").read_text().splitlines()) - 1 == 2 * (3 * 3 + 3)
    assert "3_red_star -> 3 x --repeats 2 = 6 repeat(s)" in (out / "data_report.txt").read_text()
    with safe_open(str(out / "kohya-out.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_num_train_images"] == str(2 * (3 * 3 + 3))  # kohya counts the repeats


def test_prior_images_count_only_usable_files_and_a_folder_the_reader_refuses_is_refused_before_generating(
        tmp_path, data_dir, tiny_model_dir, monkeypatch):
    """--prior-images counts the images training will read: damaged files do not make up the number; and a folder
    that reading refuses is refused before minutes of generating, not after."""
    from diffusers import StableDiffusionPipeline

    generated = []
    call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda self, *a, **kw: generated.append(1) or call(self, *a, **kw))
    good = Image.new("RGB", (32, 32), (10, 200, 10))
    reg = tmp_path / "reg"
    reg.mkdir()
    good.save(reg / "ok.png")
    (reg / "empty.png").write_bytes(b"")
    (reg / "cut.png").write_bytes((reg / "ok.png").read_bytes()[:40])
    common = dict(prior_images=3, prior_prompts=["a photo of blue circle"], max_steps=1, format="diffusers")
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", prior_data=str(reg), **common))
    assert len(list(reg.glob("prior-*.png"))) == 2  # 3 wanted, 1 usable there
    mixed = tmp_path / "mixed"
    for folder in ("1_dog", "circle"):
        (mixed / folder).mkdir(parents=True)
        good.save(mixed / folder / "0.png")
    generated.clear()
    with pytest.raises(EgakuError, match="named kohya's way"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "mixed-run", prior_data=str(mixed), **common))
    assert not generated and not list(mixed.rglob("prior-*"))


def test_prior_images_without_a_folder_or_prompts_or_inside_the_data_are_refused(tmp_path, data_dir, tiny_model_dir):
    # each folder is read whole: regularization images inside --data would also train as the concept
    for prior in (data_dir, data_dir / "red_star"):
        with pytest.raises(EgakuError, match=f"--prior-data {re.escape(str(prior))} lies inside --data "
                                             f"{re.escape(str(data_dir))}: its images would also train as the concept"):
            train_lora(options(data_dir, tiny_model_dir, tmp_path / "p", prior_data=str(prior)))
    with pytest.raises(EgakuError, match="--data .* lies inside --prior-data .*: the training images would also be "
                                         "read as regularization images"):
        train_lora(options(data_dir / "red_star", tiny_model_dir, tmp_path / "p", prior_data=str(data_dir)))
    with pytest.raises(EgakuError, match="need --prior-data"):
        options(data_dir, tiny_model_dir, tmp_path / "a", prior_images=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EgakuError, match="give --prior-prompts"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "b", prior_data=str(tmp_path / "empty"),
                           prior_images=2))


def test_caption_dropout_trains_on_the_empty_caption(tmp_path, data_dir, tiny_model_dir):
    """--caption-dropout: a share of the images is trained on the empty caption (from the text cache)."""
    with pytest.raises(EgakuError, match="caption-dropout"):
        options(data_dir, tiny_model_dir, tmp_path / "bad", caption_dropout=1.0)
    common = dict(max_steps=4, batch_size=2, learning_rate=5e-2, format="diffusers")
    plain = train_lora(options(data_dir, tiny_model_dir, tmp_path / "plain", **common))
    dropped = train_lora(options(data_dir, tiny_model_dir, tmp_path / "dropped", caption_dropout=0.9, **common))
    a = load_file(plain / "pytorch_lora_weights.safetensors")
    b = load_file(dropped / "pytorch_lora_weights.safetensors")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    config = json.loads((dropped / "training_config.json").read_text())
    assert config["caption_dropout"] == 0.9


def test_shuffled_and_dropped_tags_are_encoded_each_step_and_resume_exactly(tmp_path, data_dir, tiny_model_dir,
                                                                            monkeypatch):
    """--shuffle-caption / --keep-tokens / --caption-tag-dropout: each step encodes its own version of a tag
    caption (the text encoder is not cached), the run is reproducible across a resume, and the kohya file
    records the options and each folder's tag frequency."""

    tagged = tmp_path / "tagged"
    shutil.copytree(data_dir, tagged)
    for image in sorted(tagged.rglob("*.png")):
        image.with_suffix(".txt").write_text(f"sks, {image.parent.name}, Round, plain background, small")
    encoded: list[str] = []
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    real_call = PreTrainedTokenizerBase.__call__

    def recording_call(self, text=None, *args, **kwargs):
        encoded.extend([text] if isinstance(text, str) else list(text or []))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", recording_call)
    common = dict(max_steps=4, batch_size=2, learning_rate=5e-2, caption_template="{class}", format="both",
                  shuffle_caption=True, keep_tokens=1, caption_tag_dropout=0.2, checkpoint_every=1)
    whole = train_lora(options(tagged, tiny_model_dir, tmp_path / "whole", **common))
    step_texts = [t for t in encoded if t.startswith("sks")]
    assert len(step_texts) >= 4 * 2  # every image of every step went through the text encoder
    assert all(t.split(", ")[0] == "sks" for t in step_texts)
    assert len(set(step_texts)) > 3  # orders and dropped tags differ from step to step
    assert any("small" not in t for t in step_texts)
    plain = train_lora(options(tagged, tiny_model_dir, tmp_path / "plain",
                               **{**common, "shuffle_caption": False, "keep_tokens": 0, "caption_tag_dropout": 0.0}))
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (whole, plain))
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    split = tmp_path / "split"
    train_lora(options(tagged, tiny_model_dir, split, stop_at=2, **common))
    train_lora(options(tagged, tiny_model_dir, split, resume="latest", **common))
    assert_same_lora(whole, split)
    with safe_open(str(whole / "whole.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"
    assert meta["ss_caption_tag_dropout_rate"] == "0.2"
    frequency = json.loads(meta["ss_tag_frequency"])
    # by class folder, as kohya keys its subsets (10_sks dog/ ...)
    assert frequency == {"red_star": {"sks": 3, "red_star": 3, "round": 3, "plain background": 3, "small": 3},
                         "blue_circle": {"sks": 3, "blue_circle": 3, "round": 3, "plain background": 3, "small": 3}}
    with pytest.raises(EgakuError, match="--keep-tokens"):
        options(tagged, tiny_model_dir, tmp_path / "x", keep_tokens=2)
    with pytest.raises(EgakuError, match="--caption-tag-dropout"):
        options(tagged, tiny_model_dir, tmp_path / "x", caption_tag_dropout=1.0)


def test_init_lora_starts_from_a_finished_lora_of_either_layout(tmp_path, trained, data_dir, tiny_model_dir):
    """--init-lora (kohya's network_weights): the run starts where the file ends, its alpha folded in, and a
    file that does not fit this run's rank or layers is refused, naming what to change."""
    from egaku.errors import NotFoundError

    def delta(folder, alpha, conv_alpha):  # every layer's up @ down at its alpha/rank
        weights = load_file(folder / "pytorch_lora_weights.safetensors")
        out = {}
        for key, down in weights.items():
            if ".lora_A." in key:
                up = weights[key.replace(".lora_A.", ".lora_B.")]
                scale = (conv_alpha if ".conv" in key else alpha) / down.shape[0]
                out[key] = (up.flatten(1) @ down.flatten(1)) * scale
        return out

    source = delta(trained, 2.0, 1.0)  # TRAINED: rank 4, alpha 2; convolutions rank 2, alpha 1
    # a learning rate of ~0 and no weight decay: the one step leaves the weights where they started
    still = dict(max_steps=1, learning_rate=1e-12, weight_decay=0.0, lora_conv=True, alpha=4.0, conv_rank=2,
                 conv_alpha=3.0, format="diffusers")
    for layout, precision in (("pytorch_lora_weights.safetensors", "no"), ("starlora.safetensors", "bf16")):
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / layout, init_lora=str(trained / layout),
                                 mixed_precision=precision, **still))
        started = delta(out, 4.0, 3.0)
        assert started.keys() == source.keys()
        assert all(torch.allclose(started[k], source[k], atol=1e-6) for k in source)
    assert any(v.abs().max() > 0 for v in source.values())
    with pytest.raises(EgakuError, match=r"has rank 4 at unet\..*to_.*, this run trains rank 8 there "
                                         r"\(--rank\); give --rank 4"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "r8", init_lora=str(trained), **{**still, "rank": 8}))
    with pytest.raises(EgakuError, match=r"has rank 2 at unet\..*conv.*, this run trains rank 4 there "
                                         r"\(--conv-rank\); give --conv-rank 2"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "c4", init_lora=str(trained),
                           **{**still, "conv_rank": 4}))
    with pytest.raises(EgakuError, match=r"does not train .*--lora-conv"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "noconv", init_lora=str(trained),
                           **{**still, "lora_conv": False, "conv_rank": 0, "conv_alpha": 0.0}))
    with pytest.raises(NotFoundError, match="does not exist"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "none",
                           init_lora=str(tmp_path / "missing.safetensors")))


def test_train_tokens_learns_only_those_embeddings_resumes_and_loads_with_the_lora(tmp_path, data_dir,
                                                                                    tiny_model_dir):
    """Pivotal tuning: the word's embedding trains with the LoRA, is saved beside it and comes with it."""
    from egaku.lora.apply import apply_loras, remove_loras

    common = dict(train_tokens=["star"], token_lr=5e-2, learning_rate=1e-2, max_steps=3, format="both",
                  checkpoint_every=1)
    whole = train_lora(options(data_dir, tiny_model_dir, tmp_path / "whole", **common))
    saved = load_file(whole / "embeddings" / "star.safetensors")
    pipe = tiny_pipe(tiny_model_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    base = table.detach().clone()
    assert saved["emb_params"].shape == (1, table.shape[1])
    assert not torch.allclose(saved["emb_params"][0], base[star])  # it trained
    assert json.loads((whole / "training_config.json").read_text())["train_tokens"] == ["star"]
    # resumed from a checkpoint, the embedding ends where the uninterrupted run's did
    split = tmp_path / "split"
    train_lora(options(data_dir, tiny_model_dir, split, stop_at=2, **common))
    train_lora(options(data_dir, tiny_model_dir, split, resume="latest", **common))
    assert torch.equal(load_file(split / "embeddings" / "star.safetensors")["emb_params"], saved["emb_params"])
    # loading the LoRA (either layout) puts the word's vector in place and nothing else; removing restores it
    for lora_file in (whole / "pytorch_lora_weights.safetensors", whole / "whole.safetensors"):
        apply_loras(pipe, [(lora_file, 1.0)])
        changed = (table != base).any(dim=1).nonzero().flatten().tolist()
        assert changed == [star]
        assert torch.equal(table[star], saved["emb_params"][0])
        remove_loras(pipe)
        assert torch.equal(table, base)
    # two runs that trained the same word: one row cannot hold both, so applying both is refused
    with pytest.raises(EgakuError, match="both trained the word 'star'"):
        apply_loras(pipe, [(whole / "whole.safetensors", 0.5), (split / "split.safetensors", 0.5)])
    remove_loras(pipe)
    assert torch.equal(table, base)
    # merge-lora makes the embedding part of the merged model
    from egaku.lora.commands import MergeLoraOptions, merge_lora_command

    merge_lora_command(MergeLoraOptions(model=str(tiny_model_dir), lora=[str(whole)], out=str(tmp_path / "merged")))
    merged = tiny_pipe(tmp_path / "merged").text_encoder.get_input_embeddings().weight
    assert torch.equal(merged[star], saved["emb_params"][0])
    # --init-lora from that run starts the word from its trained embedding (no step moves it at a rate of 0)
    again = train_lora(options(data_dir, tiny_model_dir, tmp_path / "again", init_lora=str(whole),
                               **{**common, "max_steps": 1, "token_lr": 1e-30, "learning_rate": 1e-30,
                                  "checkpoint_every": 0}))
    assert torch.allclose(load_file(again / "embeddings" / "star.safetensors")["emb_params"], saved["emb_params"])
    with pytest.raises(EgakuError, match="give --train-tokens star"):  # the word must come along
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "wordless", init_lora=str(whole), format="both"))
    with pytest.raises(EgakuError, match=r"'zqxjv' is \d+ tokens for this model's tokenizer"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "bad", train_tokens=["zqxjv"]))
    # a word no caption holds would not train: refused, with the way to put it in
    with pytest.raises(EgakuError, match=r"--train-tokens square: no training caption holds it, .*--trigger square"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "absent", train_tokens=["square"]))


def test_bf16_trains_a_token_and_text_encoder_lora_beside_a_bf16_text_encoder(tmp_path, data_dir, tiny_model_dir):
    """Under --mixed-precision bf16 the frozen text encoder is bf16 while its trained parts (the word's row, its
    LoRA) are fp32: the text encoder's forward runs under autocast, so the two meet in one dtype."""
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "bf16-text", mixed_precision="bf16",
                             train_tokens=["star"], train_text_encoder=True, learning_rate=1e-2, max_steps=2))
    saved = load_file(out / "embeddings" / "star.safetensors")["emb_params"]
    pipe = tiny_pipe(tiny_model_dir)
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    assert saved.dtype == torch.float32 and torch.isfinite(saved).all()
    assert not torch.allclose(saved[0], pipe.text_encoder.get_input_embeddings().weight[star])
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_token_init_starts_a_trained_word_from_another_words_embedding(tmp_path, data_dir, tiny_model_dir):
    """--token-init (textual inversion's initializer token): the new word starts where a related one is."""
    pipe = tiny_pipe(tiny_model_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    star, circle = (pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("star", "circle"))
    assert not torch.allclose(table[star], table[circle])
    # a learning rate of 1e-9 moves it by about 1e-9 in one Adam step: the saved word is still the initializer
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "init", train_tokens=["star"], token_init=["circle"],
                             token_lr=1e-9, max_steps=1))
    saved = load_file(out / "embeddings" / "star.safetensors")["emb_params"][0]
    assert torch.allclose(saved, table[circle], atol=1e-6)
    assert json.loads((out / "training_config.json").read_text())["token_init"] == ["circle"]
    with pytest.raises(EgakuError, match="one initializer word per trained word"):
        options(data_dir, tiny_model_dir, tmp_path / "bad", train_tokens=["star"], token_init=["circle", "square"])
    with pytest.raises(EgakuError, match="--token-init: ' ' holds no token"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "bad", train_tokens=["star"], token_init=[" "]))


def test_weighted_captions_read_a1111_emphasis_in_captions(tmp_path, data_dir, tiny_model_dir):
    """--weighted-captions (kohya's weighted_captions): "(word:1.8)" in a caption is a weight, as in a prompt."""
    def lora(name: str, **overrides) -> dict:
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / name, max_steps=2, **overrides))
        return load_file(out / "pytorch_lora_weights.safetensors")

    plain = lora("plain")
    flag_only = lora("flag-only", weighted_captions=True)  # no brackets in the captions: the same training
    assert all(torch.equal(plain[k], flag_only[k]) for k in plain)
    weighted = dict(caption_template="a photo of ({class}:1.8)")
    as_words = lora("as-words", **weighted)  # without the flag the brackets and the number are words
    read = lora("read", weighted_captions=True, **weighted)
    assert any(not torch.allclose(read[k], as_words[k]) for k in read)
    assert any(not torch.allclose(read[k], plain[k]) for k in read)


def test_max_token_length_reads_captions_past_75_tokens(tmp_path, data_dir, tiny_model_dir, capsys):
    """--max-token-length (kohya's max_token_length): a long caption's end is read, in chunks as generate reads it."""
    tokenizer = tiny_pipe(tiny_model_dir).tokenizer
    filler = "a photo"
    while len(tokenizer(filler, add_special_tokens=False).input_ids) <= 80:
        filler += " of a photo"
    assert len(tokenizer(filler + " red star", add_special_tokens=False).input_ids) < 140

    def lora(name: str, template: str, **overrides) -> dict:
        out = train_lora(options(data_dir, tiny_model_dir, tmp_path / name, max_steps=2, caption_template=template,
                                 format="both", **overrides))
        return load_file(out / "pytorch_lora_weights.safetensors")

    once, twice = filler + " {class}", filler + " {class} {class}"  # the same first 75 tokens
    cut_once, cut_twice = lora("cut-once", once), lora("cut-twice", twice)
    out = capsys.readouterr().out
    assert "6 caption(s) run past 75 tokens and are cut there" in out and "--max-token-length 150 or 225" in out
    assert all(torch.equal(cut_once[k], cut_twice[k]) for k in cut_once)  # what differs was never read
    read_once = lora("read-once", once, max_token_length=150)
    read_twice = lora("read-twice", twice, max_token_length=150)
    assert "run past" not in capsys.readouterr().out
    assert any(not torch.allclose(read_once[k], read_twice[k]) for k in read_once)
    with safe_open(str(tmp_path / "read-once" / "read-once.safetensors"), framework="pt") as fh:
        assert fh.metadata()["ss_max_token_length"] == "150"  # as kohya records it


def test_a_validation_prompt_past_max_token_length_is_reported(data_dir, tiny_model_dir):
    """Validation prompts are read as captions are: a long one is cut where `egaku generate` would read on."""
    tokenizer = tiny_pipe(tiny_model_dir).tokenizer
    long = " ".join(["a red star on a blue circle"] * 20)
    lines = []
    lora_training.report_long_captions(tokenizer, [], options(data_dir, tiny_model_dir, "out",
                                                              validation_prompts=["a red star", long]), lines.append)
    assert len(lines) == 1 and "the validation prompt 'a red star on a blue circle" in lines[0]
    assert "runs past 75 tokens" in lines[0] and "--max-token-length 150 or 225" in lines[0]
    lines.clear()
    lora_training.report_long_captions(tokenizer, [], options(data_dir, tiny_model_dir, "out", max_token_length=225,
                                                              validation_prompts=["a red star"]), lines.append)
    assert lines == []


def test_a_token_init_word_of_several_tokens_starts_from_their_mean(tmp_path, data_dir, tiny_model_dir, capsys):
    pipe = tiny_pipe(tiny_model_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    pieces = pipe.tokenizer("zqxjv", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "init", train_tokens=["star"], token_init=["zqxjv"],
                             token_lr=1e-9, max_steps=1))
    saved = load_file(out / "embeddings" / "star.safetensors")["emb_params"][0]
    assert torch.allclose(saved, table[pieces].mean(0), atol=1e-6)
    assert not torch.allclose(saved, table[pieces[0]], atol=1e-3)
    assert f"--token-init 'zqxjv' is {len(pieces)} tokens" in capsys.readouterr().out


# ---- loss masks ---------------------------------------------------------------------------------------

def write_masks(data: Path, masks: Path, value) -> Path:
    """A mask for each image of ``data`` under the same name: ``value(width, height)`` -> greyscale image."""
    for image in sorted(data.rglob("*.png")):
        target = masks / image.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as img:
            value(*img.size).save(target)
    return masks


def left_half(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def test_loss_masks_weigh_the_loss_and_white_masks_train_as_no_masks(tmp_path, data_dir, tiny_model_dir,
                                                                     monkeypatch):
    common = dict(max_steps=3, batch_size=2, learning_rate=5e-2, random_flip=True, format="diffusers")
    flips_asked = []  # a flipped image takes its mask flipped: both orientations are made for each image
    import egaku.data.masks as masks_module

    real_latent_mask = masks_module.latent_mask
    monkeypatch.setattr(masks_module, "latent_mask",
                        lambda mask, bucket, flip, factor: flips_asked.append(flip) or real_latent_mask(
                            mask, bucket, flip, factor))
    plain = train_lora(options(data_dir, tiny_model_dir, tmp_path / "plain", **common))
    white = write_masks(data_dir, tmp_path / "white", lambda w, h: Image.new("L", (w, h), 255))
    assert_same_lora(plain, train_lora(options(data_dir, tiny_model_dir, tmp_path / "white-run",
                                               mask_dir=str(white), **common)))
    half = write_masks(data_dir, tmp_path / "half", left_half)
    masked = train_lora(options(data_dir, tiny_model_dir, tmp_path / "half-run", mask_dir=str(half), **common))
    weights_plain, weights_masked = (load_file(run / "pytorch_lora_weights.safetensors") for run in (plain, masked))
    assert any(not torch.allclose(weights_plain[k], weights_masked[k]) for k in weights_plain)
    assert f"loss masks: 6 from {half}" in (masked / "data_report.txt").read_text()
    assert sorted(flips_asked) == [False] * 12 + [True] * 12  # two runs with masks, 6 images each
    assert json.loads((masked / "training_config.json").read_text())["mask_dir"] == str(half)
    # the losses differ too: the masked run's is the mean over the left halves only
    losses = [[float(r.split(",")[2]) for r in (run / "loss.csv").read_text().splitlines()[1:]]
              for run in (plain, masked)]
    assert losses[0][0] != losses[1][0]


def test_alpha_mask_trains_as_the_same_mask_given_as_a_file(tmp_path, data_dir, tiny_model_dir):
    """--alpha-mask reads the transparency the RGB image loses when it is composited on white."""
    flat, transparent = tmp_path / "flat", tmp_path / "transparent"
    for image in sorted(data_dir.rglob("*.png")):
        rel = image.relative_to(data_dir)
        for folder in (flat, transparent):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as img:
            rgba = img.convert("RGBA")
        alpha = left_half(*rgba.size)
        rgba.paste((255, 255, 255, 0), (rgba.width // 2, 0, rgba.width, rgba.height))  # clear, white beneath
        rgba.putalpha(alpha)
        rgba.save(transparent / rel)
        rgba.convert("RGB").save(flat / rel)  # the same pixels as the composite on white
    masks = write_masks(flat, tmp_path / "masks", left_half)
    common = dict(max_steps=2, batch_size=2, learning_rate=5e-2, format="diffusers")
    from_alpha = train_lora(options(transparent, tiny_model_dir, tmp_path / "alpha", alpha_mask=True, **common))
    from_files = train_lora(options(flat, tiny_model_dir, tmp_path / "files", mask_dir=str(masks), **common))
    assert_same_lora(from_alpha, from_files)
    assert "loss masks: the transparency of 6 image(s)" in (from_alpha / "data_report.txt").read_text()
    # images without transparency train everywhere, and the report says so
    opaque = train_lora(options(flat, tiny_model_dir, tmp_path / "opaque", alpha_mask=True, **common))
    assert "the transparency of 0 image(s); 6 have none and train everywhere" in \
           (opaque / "data_report.txt").read_text()
    assert_same_lora(opaque, train_lora(options(flat, tiny_model_dir, tmp_path / "unmasked", **common)))


def test_bad_loss_masks_are_clear_errors(tmp_path, data_dir, tiny_model_dir):
    with pytest.raises(EgakuError, match="choose one"):
        options(data_dir, tiny_model_dir, tmp_path / "x", mask_dir="m", alpha_mask=True)
    with pytest.raises(EgakuError, match="--unmasked-weight .* needs --mask-dir or --alpha-mask"):
        options(data_dir, tiny_model_dir, tmp_path / "x", unmasked_weight=0.5)
    with pytest.raises(EgakuError, match=r"--unmasked-weight must be in \[0, 1\]"):
        options(data_dir, tiny_model_dir, tmp_path / "x", mask_dir="m", unmasked_weight=2.0)
    masks = write_masks(data_dir, tmp_path / "masks", left_half)
    (masks / "red_star" / "1.png").unlink()
    with pytest.raises(EgakuError, match=r"1 of 6 training images has no mask .*red_star/1\.png"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "missing", mask_dir=str(masks)))
    Image.new("L", (64, 40), 0).save(masks / "red_star" / "1.png")  # black everywhere
    with pytest.raises(EgakuError, match=r"loss mask of .*1\.png is black everywhere .*--unmasked-weight"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "black", mask_dir=str(masks)))
    # with --unmasked-weight the black mask trains that image a little
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "floor", mask_dir=str(masks), unmasked_weight=0.1,
                             max_steps=1, format="diffusers"))
    assert (out / "pytorch_lora_weights.safetensors").exists()
    Image.new("L", (40, 40), 255).save(masks / "red_star" / "1.png")  # an image of 64x40
    with pytest.raises(EgakuError, match=r"1\.png is 40x40 but its image .* is 64x40"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "shape", mask_dir=str(masks)))


def test_a_batch_size_larger_than_the_fullest_bucket_is_reported_with_the_size_batches_have(tmp_path, data_dir,
                                                                                            tiny_model_dir, capsys):
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "run", batch_size=64, max_steps=1))
    out = capsys.readouterr().out
    fullest = int(re.search(r"batches hold at most (\d+) images, not --batch-size 64", out).group(1))
    assert 1 <= fullest < 64
    assert "optimizer AdamW\n" in out  # the class that trains, not accelerate's wrapper around it
    train_lora(options(data_dir, tiny_model_dir, tmp_path / "run2", batch_size=1, max_steps=1))
    assert "batches hold at most" not in capsys.readouterr().out


def test_train_and_merge_lora_read_a_single_file_model_through_its_model_config(tmp_path, data_dir, tiny_model_dir,
                                                                                monkeypatch):
    """A civitai-style single .safetensors base offline: its configs come from --model-config, as in generate."""
    from egaku.cli import main
    from egaku.models.loading import load_pipeline
    from egaku.models.single_file import save_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    single = save_single_file(load_pipeline(str(tiny_model_dir), "cpu", "float32"), tmp_path / "base.safetensors")
    with pytest.raises(EgakuError, match="pass --model-config"):
        train_lora(options(data_dir, single, tmp_path / "no-config", max_steps=1))
    out = train_lora(options(data_dir, single, tmp_path / "lora", model_config=str(tiny_model_dir), max_steps=1,
                             format="diffusers"))
    assert json.loads((out / "training_config.json").read_text())["model_config"] == str(tiny_model_dir)
    monkeypatch.chdir(tmp_path)  # relative paths, recorded absolute: the merge's config repeats it from anywhere
    assert main(["merge-lora", "--model", "base.safetensors", "--model-config", str(tiny_model_dir), "--lora",
                 "lora:0.5", "--out", "merged"]) == 0
    recorded = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert recorded["lora"] == [f"{out / 'pytorch_lora_weights.safetensors'}:0.5"]
    assert recorded["model"] == str(single)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["merge-lora", "--config", str(tmp_path / "merged" / "merge_config.json"), "--out", "again"]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    first, again = load_file(tmp_path / "merged" / weights), load_file(tmp_path / "elsewhere" / "again" / weights)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_images_scaled_up_more_than_twice_to_their_bucket_are_reported(tmp_path, data_dir, tiny_model_dir):
    folder = shutil.copytree(data_dir, tmp_path / "data")
    Image.new("RGB", (4, 4), (200, 40, 40)).save(folder / "red_star" / "thumb.png")  # 32 px buckets: 8x
    out = train_lora(options(folder, tiny_model_dir, tmp_path / "run", max_steps=1))
    report = (out / "data_report.txt").read_text()
    assert re.search(r"1 image\(s\) are scaled up more than 2x to their bucket and train blurred, most \S*thumb.png "
                     r"\(4x4 -> 32x32, 8x\)", report)
    plain = train_lora(options(data_dir, tiny_model_dir, tmp_path / "plain", max_steps=1))
    assert "scaled up" not in (plain / "data_report.txt").read_text()


def test_inversion_steps_train_the_word_alone_first_then_the_lora(tmp_path, data_dir, tiny_model_dir):
    """--inversion-steps (pivotal tuning's order): for the first N steps only the word's embedding moves; the LoRA,
    text-encoder LoRA included, stays at its start (its up matrices zero) and trains from step N on."""
    common = dict(train_tokens=["star"], token_lr=5e-2, learning_rate=1e-2, max_steps=2, train_text_encoder=True,
                  lora_conv=True)
    pipe = tiny_pipe(tiny_model_dir)
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    base_word = pipe.text_encoder.get_input_embeddings().weight[star].detach()

    def up_matrices(out):
        weights = load_file(out / "pytorch_lora_weights.safetensors")
        ups = {k: v for k, v in weights.items() if "lora_B" in k}
        assert ups and any(k.startswith("text_encoder.") for k in ups) and any("conv" in k for k in ups)
        return ups

    alone = train_lora(options(data_dir, tiny_model_dir, tmp_path / "alone", inversion_steps=2, **common))
    assert all(not v.any() for v in up_matrices(alone).values())
    assert not torch.allclose(load_file(alone / "embeddings" / "star.safetensors")["emb_params"][0], base_word)
    then = train_lora(options(data_dir, tiny_model_dir, tmp_path / "then", inversion_steps=1, **common))
    assert all(v.any() for v in up_matrices(then).values())
    assert json.loads((then / "training_config.json").read_text())["inversion_steps"] == 1
    with pytest.raises(EgakuError, match="name the words with --train-tokens"):
        options(data_dir, tiny_model_dir, tmp_path / "bad", inversion_steps=5)


def test_a_wrong_model_or_mask_folder_is_said_before_the_images_are_read(tmp_path, data_dir, tiny_model_dir,
                                                                          monkeypatch):
    """What needs no loading is checked first: a big folder is not decoded to learn that --model is misspelt."""
    scanned = []
    real_scan = lora_training.scan_image_folder
    monkeypatch.setattr(lora_training, "scan_image_folder", lambda *a, **kw: scanned.append(1) or real_scan(*a, **kw))
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    (tmp_path / "notes.txt").write_text("x")
    # files whose headers say what is wrong: read before the images, as the weights are not
    from egaku.models.single_file import save_single_file
    from egaku.models.tiny import tiny_pipeline

    single = save_single_file(tiny_pipeline(), tmp_path / "single.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[:1000])
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    (tmp_path / "not-a-pipeline").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, overrides, message in (
            (tmp_path / "sd15.safetensors", {}, "not found: no such file or folder"),
            (pickled, {}, r"model\.ckpt is a pickle .*--allow-pickle"),
            (tmp_path / "notes.txt", {}, "unknown model file type '.txt'"),
            (tiny_model_dir, {"mask_dir": str(tmp_path / "masks")}, "--mask-dir .* does not exist"),
            (single, {}, "single.safetensors: a single-file checkpoint needs the configs .* pass --model-config"),
            (single, {"model_config": str(tmp_path / "nowhere")}, "--model-config .*nowhere: no such folder"),
            (cut, {"model_config": str(tiny_model_dir)}, "cut.safetensors is not a complete safetensors file"),
            (lora, {}, r"style\.safetensors is a LoRA, not a model: give it as --lora"),
            (tmp_path / "not-a-pipeline", {}, "not-a-pipeline is a folder but not a diffusers pipeline")):
        with pytest.raises(EgakuError, match=message):
            train_lora(options(data_dir, model, tmp_path / "out", **overrides))
    assert not scanned


def test_epochs_beside_max_steps_and_a_stop_past_the_end_are_said(tmp_path, data_dir, capsys):
    from egaku.cli import main

    code = main(["train-lora", "--data", str(data_dir), "--model", "tiny", "--out", str(tmp_path / "out"),
                 "--resolution", str(RESOLUTION), "--max-steps", "1", "--epochs", "3", "--stop-at", "5",
                 "--min-images", "2", "--no-progress", "--format", "diffusers"])
    said = capsys.readouterr().out
    assert code == 0
    assert "note: --max-steps 1 sets the run's length; --epochs 3 is not used" in said
    assert "note: --stop-at 5 is past the run's 1 step: it runs to the end" in said
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
