"""Option mistakes train-lora can see in the model's configs and a file's header are said before the images are
read and the model loads (a folder of thousands of images is not decoded to learn of a typo); the report above a
data error counts as the run's report does; kohya's flags are met with what egaku does instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from egaku.config import KOHYA_NAMES, KOHYA_NOTES
from egaku.errors import EgakuError
from egaku.training import lora as lora_training
from egaku.training.lora import TrainLoraOptions, train_lora
from test_lora import options as lora_options


def make_folder(root: Path, per_class: int = 2) -> Path:
    """Two class folders of small images ("red star", "blue circle")."""
    for n, cls in enumerate(("red_star", "blue_circle")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((32, 32, 3), 40 * (2 * n + i), np.uint8)).save(root / cls / f"{i}.png")
    return root


def options(data: Path, model, out: Path, **overrides) -> TrainLoraOptions:
    """test_lora's options at one step, in the diffusers layout only."""
    return lora_options(data, model, out, **{"max_steps": 1, "format": "diffusers", **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("early-data"))


# a run with convolutions at their own rank and a trained word: what the --init-lora checks compare with
FIRST = dict(lora_conv=True, conv_rank=2, conv_alpha=1.0, train_tokens=["star"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_dir, tiny_model_dir) -> Path:
    return train_lora(options(data_dir, tiny_model_dir, tmp_path_factory.mktemp("early-run") / "first", format="both",
                              **FIRST))


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """What the run did of the slow work, in order: 'scan' (the images decoded) and 'load' (the model loaded)."""
    done = []
    real_scan, real_load = lora_training.scan_image_folder, lora_training._load_base
    monkeypatch.setattr(lora_training, "scan_image_folder", lambda *a, **kw: done.append("scan") or real_scan(*a, **kw))
    monkeypatch.setattr(lora_training, "_load_base", lambda *a, **kw: done.append("load") or real_load(*a, **kw))
    return done


TARGETS = (r"--target-modules nosuch: no linear or convolution layer of the UNet has a name ending so; the layers' "
           r"names end in: .*to_out\.0, to_q")


def test_target_modules_that_match_no_layer_are_said_before_the_images_are_read(tmp_path, data_dir, tiny_model_dir,
                                                                                 reads):
    from egaku.models.single_file import save_single_file
    from egaku.models.tiny import tiny_pipeline

    single = save_single_file(tiny_pipeline(), tmp_path / "single.safetensors")
    # a pipeline folder, egaku's built-in and tiny models, a single file with --model-config: configs at hand
    for model, overrides in ((tiny_model_dir, {}), ("builtin", {}), ("tiny", {}),
                             (single, {"model_config": str(tiny_model_dir)}),
                             (tiny_model_dir, {"lora_conv": True, "dora": True, "train_text_encoder": True})):
        with pytest.raises(EgakuError, match=TARGETS):
            train_lora(options(data_dir, model, tmp_path / "out", target_modules=["to_q", "nosuch"], **overrides))
    assert reads == []
    assert not (tmp_path / "out" / "data_report.txt").exists()


def test_where_the_configs_are_not_at_hand_the_loaded_model_is_checked_with_the_same_message(tmp_path, data_dir,
                                                                                              tiny_model_dir, reads,
                                                                                              monkeypatch):
    monkeypatch.setattr(lora_training, "model_layers", lambda *a, **kw: None)  # a hub id, a single file alone
    with pytest.raises(EgakuError, match=TARGETS):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "out", target_modules=["to_q", "nosuch"]))
    assert reads == ["scan", "load"]


def test_an_init_lora_that_does_not_fit_the_run_is_said_before_the_images_are_read(tmp_path, data_dir,
                                                                                    tiny_model_dir, first_run, reads):
    still = dict(FIRST, learning_rate=1e-12, weight_decay=0.0)
    for layout in ("pytorch_lora_weights.safetensors", "first.safetensors"):
        for overrides, message in (
                ({"rank": 8}, r"has rank 4 at unet\..*to_.*, this run trains rank 8 there \(--rank\); give --rank 4 to "
                              r"train it further at its own "
                              "rank"),
                ({"conv_rank": 4}, r"has rank 2 at unet\..*conv.*, this run trains rank 4 there \(--conv-rank\); "
                                   r"give --conv-rank 2"),
                ({"lora_conv": False, "conv_rank": 0, "conv_alpha": 0.0}, r"adapts \d+ layer\(s\) this run does not "
                                                                         r"train .*; give --lora-conv"),
                ({"dora": True}, "is a plain LoRA file and this run trains DoRA: give --no-dora"),
                ({"train_tokens": []}, "was trained with the word\\(s\\) star as token embeddings: give --train-tokens "
                                       "star")):
            with pytest.raises(EgakuError, match=message):
                train_lora(options(data_dir, tiny_model_dir, tmp_path / "out",
                                   init_lora=str(first_run / layout), **{**still, **overrides}))
    assert reads == []
    # a kohya file of layers no option here trains (CLIP's MLP), read from its header: the same words as before
    from egaku.models.tiny import tiny_components

    text_encoder = tiny_components()["text_encoder"]
    fc1 = dict(text_encoder.named_modules())["encoder.layers.0.mlp.fc1"]  # (transformers 5's CLIP is flat)
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, fc1.in_features),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(fc1.out_features, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}, tmp_path / "mlp.safetensors")
    with pytest.raises(EgakuError, match=r"its text-encoder layers fc1 are ones train-lora cannot train"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "out", init_lora=str(tmp_path / "mlp.safetensors")))
    # a file for another architecture: checked_lora_layers' refusal, from the header
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(EgakuError, match=r"other\.safetensors is a LoRA for SDXL \(keys such as "):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "out", init_lora=str(tmp_path / "other.safetensors")))
    assert reads == []


def test_an_init_lora_that_fits_trains_and_the_late_checks_still_refuse_one_that_does_not(
        tmp_path, data_dir, tiny_model_dir, first_run, reads, monkeypatch):
    still = dict(FIRST, learning_rate=1e-12, weight_decay=0.0)
    out = train_lora(options(data_dir, tiny_model_dir, tmp_path / "again", init_lora=str(first_run), **still))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert reads == ["scan", "load"]
    # from a single file with --model-config, the early checks pass it too
    from egaku.models.single_file import save_single_file
    from egaku.models.tiny import tiny_pipeline

    single = save_single_file(tiny_pipeline(), tmp_path / "single.safetensors")
    assert (train_lora(options(data_dir, single, tmp_path / "single-run", model_config=str(tiny_model_dir)))
            / "pytorch_lora_weights.safetensors").is_file()
    # where the configs are not at hand, the loaded model's check says the same
    monkeypatch.setattr(lora_training, "model_layers", lambda *a, **kw: None)
    reads.clear()
    with pytest.raises(EgakuError, match=r"has rank 4 at unet\..*to_.*, this run trains rank 8 there "
                                         r"\(--rank\); give --rank 4"):
        train_lora(options(data_dir, tiny_model_dir, tmp_path / "late", init_lora=str(first_run),
                           **{**still, "rank": 8}))
    assert reads == ["scan", "load"]


def test_the_early_checks_leave_the_runs_random_draws_as_they_were(tmp_path, data_dir, tiny_model_dir, monkeypatch):
    """The adapters added to the layers without weights draw from the global generator: the run's own draws,
    from --seed, are the same as without the early checks."""
    from safetensors.torch import load_file

    # targets of the user's own, so that the early checks run (the default ones need no check)
    targets = ["to_q", "to_v"]
    with_checks = train_lora(options(data_dir, tiny_model_dir, tmp_path / "a", max_steps=2, target_modules=targets))
    monkeypatch.setattr(lora_training, "check_layers_early", lambda opts: None)
    without = train_lora(options(data_dir, tiny_model_dir, tmp_path / "b", max_steps=2, target_modules=targets))
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (with_checks, without))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the report above a data error -------------------------------------------------------------------------

def test_the_report_above_a_data_error_counts_the_repeats_as_the_runs_report_does(tmp_path, capsys):
    from egaku.cli import main
    from egaku.data.folder import scan_image_folder

    (tmp_path / "data" / "10_sks dog").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / "data" / "10_sks dog" / f"{i}.png")
    repeated = "10_sks dog -> 10 x --repeats 2 = 20 repeat(s) of class 'sks dog'"
    code = main(["train-lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--repeats", "2",
                 "--min-images", "5", "--model", "tiny", "--max-steps", "1", "--resolution", "32", "--no-progress"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines[-1].startswith("egaku: error: ") and "need at least 5" in lines[-1]
    assert any(repeated in line for line in lines[:-1])
    # the metadata error's report too, and scan_image_folder's own default is the plain count
    (tmp_path / "data" / "metadata.csv").write_text("file_name,text\nnope.png,a caption\n")
    with pytest.raises(EgakuError, match="gives a caption to none"):
        scan_image_folder(tmp_path / "data", kohya_names=True, repeats=2)
    assert repeated in capsys.readouterr().err
    with pytest.raises(EgakuError, match="gives a caption to none"):
        scan_image_folder(tmp_path / "data", kohya_names=True)
    assert "10_sks dog -> 10 repeat(s) of class 'sks dog'" in capsys.readouterr().err


# ---- kohya's flags ---------------------------------------------------------------------------------------

def test_kohyas_flags_are_met_with_egakus_or_with_what_egaku_does_instead(capsys, tmp_path):
    from egaku.cli import parse

    with pytest.raises(SystemExit):
        parse(["train-lora", "--data", "d", "--output_name", "sks", "--network_module", "networks.lora",
               "--save_model_as", "safetensors", "--caption_extension", ".txt", "--cache_latents_to_disk",
               "--conditioning_data_dir", "masks", "--config_file", "k.toml"])
    err = capsys.readouterr().err
    assert ("--output_name -> --out (kohya's name of the LoRA file: egaku names its kohya file after the --out "
            "folder, so --out loras/sks writes loras/sks/sks.safetensors)") in err
    assert "--network_module -> --dora (kohya's network type: egaku trains LoRA through peft, or DoRA" in err
    assert "--save_model_as -> --format (kohya's file type: egaku writes .safetensors" in err
    assert "--caption_extension -> --caption-template (kohya's caption file extension: egaku reads IMAGE.txt" in err
    assert "--cache_latents_to_disk -> --cache-dir (kohya's disk cache switch" in err
    assert "--conditioning_data_dir -> --mask-dir (kohya's name)" in err
    assert "--config_file -> --config (kohya's name)" in err
    # the flags egaku shares under kohya's spelling are named in their dashed form
    shared = ["max_token_length", "clip_skip", "noise_offset", "min_snr_gamma", "mixed_precision", "save_precision",
              "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "keep_tokens", "shuffle_caption", "cache_latents",
              "prior_loss_weight", "max_grad_norm", "gradient_checkpointing", "weighted_captions", "loraplus_lr_ratio"]
    with pytest.raises(SystemExit):
        parse(["train-lora", "--data", "d", *(f"--{name}" for name in shared)])
    err = capsys.readouterr().err
    assert all(f"--{name} -> --{name.replace('_', '-')}" in err for name in shared)
    # and a kohya config file: the shared names are read, the others named with egaku's
    (tmp_path / "kohya.toml").write_text('data = "d"\nclip_skip = 2\nmax_token_length = 150\nnoise_offset = 0.05\n'
                                         'min_snr_gamma = 5.0\nseed = 42\nmixed_precision = "bf16"\nresolution = 512\n'
                                         'lr_warmup_steps = 10\nshuffle_caption = true\nkeep_tokens = 1\n')
    _, opts = parse(["train-lora", "--config", str(tmp_path / "kohya.toml")])
    assert (opts.clip_skip, opts.max_token_length, opts.seed, opts.keep_tokens) == (2, 150, 42, 1)
    for key, value, message in (
            ("output_name", '"sks"', "unknown option 'output_name': kohya's name of the LoRA file: egaku names its "
                                     "kohya file after the --out folder, .*; egaku's is 'out'"),
            ("save_model_as", '"safetensors"', "unknown option 'save_model_as': kohya's file type: .*; egaku's is "
                                               "'format'"),
            ("network_module", '"networks.lora"', "unknown option 'network_module': kohya's network type"),
            ("save_every_n_epochs", "1", "kohya's saves by epochs: egaku's --save-every counts steps; egaku's is "
                                         "'save_every'")):
        (tmp_path / "k.toml").write_text(f'data = "d"\n{key} = {value}\n')
        with pytest.raises(EgakuError, match=message):
            parse(["train-lora", "--config", str(tmp_path / "k.toml")])


def test_every_kohya_name_leads_to_an_option_of_train_lora():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainLoraOptions)}
    assert {ours for ours in KOHYA_NAMES.values()} - fields == {"config"}  # the CLI's --config
    assert set(KOHYA_NOTES) <= set(KOHYA_NAMES) and not set(KOHYA_NAMES) & fields
    assert not any(";" in note for note in KOHYA_NOTES.values())  # the CLI joins several hints with ';'
