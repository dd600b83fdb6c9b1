"""train-ldm end to end on tiny models: what it writes, that diffusers loads it, exact resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from egaku.config import build, load_preset
from egaku.errors import EgakuError
from egaku.training import ldm

ROOT = Path(__file__).resolve().parent.parent


def tiny_opts(out, **overrides) -> ldm.TrainLdmOptions:
    return build(ldm.TrainLdmOptions, load_preset(ROOT / "configs" / "ldm-tiny.toml"),
                 {"out": str(out), "progress": False, "threads": 1, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm") / "run"
    ldm.train_ldm(tiny_opts(out))
    return out


def _unet_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_whole_chain_writes_a_pipeline_that_plain_diffusers_loads(tiny_run, assert_plain_mode):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    model = tiny_run / "model"
    for part in ("unet", "vae", "text_encoder"):
        assert list((model / part).glob("*.safetensors")), part
    assert_plain_mode(*model.rglob("*.safetensors"))  # safetensors writes 0600
    assert (model / "tokenizer" / "tokenizer_config.json").is_file()
    assert (tiny_run / "checkpoints" / "latest").read_text().strip() == "step-000010"
    assert json.loads((tiny_run / "config.json").read_text())["steps"] == 6
    rows = (tiny_run / "losses.csv").read_text().splitlines()
    assert rows[0].startswith("step,time") and len(rows) > 1
    assert rows[-1].startswith("10,")  # the last step is logged, whatever the logging interval
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["step"] == 10 and np.isfinite(summary["vae_psnr"])
    assert (tiny_run / "samples" / "vae-reconstructions.png").is_file()
    assert (tiny_run / "samples" / "final-step-000010.png").is_file()
    # the grids' guidance is the model's default guidance (egaku generate reads it)
    sample_guidance = json.loads((tiny_run / "config.json").read_text())["sample_guidance"]
    assert json.loads((model / "egaku_defaults.json").read_text()) == {"guidance_scale": sample_guidance}

    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe.safety_checker is None
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    # latents were scaled to unit variance with a factor stored in the VAE config
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert pipe.vae.config.scaling_factor != 0.18215
    images = pipe("a large red circle in the center on a white background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # the exported UNet holds the EMA weights, not the raw training weights
    ckpt = load_file(tiny_run / "checkpoints" / "step-000010" / "ema.safetensors")
    name = next(iter(_unet_weights(model)))
    assert torch.equal(_unet_weights(model)[name], ckpt[f"unet.{name}"])


def train_until_interrupted(out, step_to_stop: int, monkeypatch) -> None:
    """Run the tiny preset into ``out`` and kill it (KeyboardInterrupt) when it reaches ``step_to_stop``."""
    real_check = ldm.check_finite

    def interrupt(loss, step, ckpts, *a, **k):
        if step == step_to_stop:
            raise KeyboardInterrupt
        return real_check(loss, step, ckpts, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(ldm, "check_finite", interrupt)
        with pytest.raises(KeyboardInterrupt):
            ldm.train_ldm(tiny_opts(out))


def test_resume_after_interruption_equals_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    train_until_interrupted(out, 8, monkeypatch)  # after the checkpoint of step 6, in the diffusion stage
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert not (out / "model").exists()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()

    def rebuilt(*args, **kwargs):
        raise AssertionError("a resumed run must use its own saved tokenizer, not build a new one")

    monkeypatch.setattr("egaku.models.tokenizer.build_clip_tokenizer", rebuilt)
    ldm.train_ldm(tiny_opts(out, resume="latest"))
    full, resumed = _unet_weights(tiny_run / "model"), _unet_weights(out / "model")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop_step", [2, 7, 10])  # in the VAE stage, between checkpoints, and the last of 4 + 6
def test_ctrl_c_checkpoints_the_step_it_finishes_and_resume_equals_uninterrupted(tiny_run, tmp_path, ctrl_c_at_step,
                                                                                 stop_step):
    out = tmp_path / "stopped"
    # the signal lands after the step's stop requests were gathered (check_finite comes after): the next step is
    # the last
    ctrl_c_at_step(ldm, stop_step - 1)
    if stop_step == 10:  # the last step: training is done, so the model is exported rather than left to a resume
        ldm.train_ldm(tiny_opts(out))
    else:
        with pytest.raises(KeyboardInterrupt):
            ldm.train_ldm(tiny_opts(out))
        assert not (out / "model").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stop_step:06d}"
    if stop_step < 10:
        ldm.train_ldm(tiny_opts(out, resume="latest"))
    for part in ("unet", "vae"):
        full = load_file(tiny_run / "model" / part / "diffusion_pytorch_model.safetensors")
        resumed = load_file(out / "model" / part / "diffusion_pytorch_model.safetensors")
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_trains_close_to_fp32_resumes_exactly_and_exports_fp32(tiny_run, tmp_path, monkeypatch):
    """--mixed-precision bf16 changes the diffusion stage's arithmetic (the weights differ from fp32's), stays
    close to it, resumes bit for bit like an fp32 run, and writes fp32 weights that plain diffusers loads."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    full = tmp_path / "bf16"
    ldm.train_ldm(tiny_opts(full, mixed_precision="bf16"))
    bf16, fp32 = _unet_weights(full / "model"), _unet_weights(tiny_run / "model")
    assert {t.dtype for t in bf16.values()} == {torch.float32}
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32), "bf16 autocast changed nothing"
    # Both runs start from the same seeded weights: what six steps changed must point the same way.
    opts = tiny_opts(full)
    torch.manual_seed(opts.seed)
    vae = ldm.build_vae(opts)
    ldm.build_text_encoder(opts, CLIPTokenizer.from_pretrained(full / "tokenizer"))
    init = ldm.build_unet(opts, vae).state_dict()
    moved = {name: torch.cat([(w[k] - init[k]).flatten() for k in init])
             for name, w in (("fp32", fp32), ("bf16", bf16))}
    assert moved["fp32"].norm() < 0.05 * torch.cat([v.flatten() for v in init.values()]).norm()  # init rebuilt right
    assert torch.nn.functional.cosine_similarity(moved["fp32"], moved["bf16"], 0) > 0.95
    assert 0.9 < moved["bf16"].norm() / moved["fp32"].norm() < 1.1
    # the VAE stage is fp32 either way
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(a, b) for a, b in zip(load_file(full / "model" / vae).values(),
                                                   load_file(tiny_run / "model" / vae).values()))

    interrupted = tmp_path / "bf16-interrupted"
    real_check = ldm.check_finite

    def interrupt(loss, step, ckpts, *a, **k):
        if step == 8:
            raise KeyboardInterrupt
        return real_check(loss, step, ckpts, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(ldm, "check_finite", interrupt)
        with pytest.raises(KeyboardInterrupt):
            ldm.train_ldm(tiny_opts(interrupted, mixed_precision="bf16"))
    with pytest.raises(EgakuError, match="--mixed-precision: checkpoint has 'bf16', now 'no'"):
        ldm.train_ldm(tiny_opts(interrupted, resume="latest"))
    ldm.train_ldm(tiny_opts(interrupted, mixed_precision="bf16", resume="latest"))
    resumed = _unet_weights(interrupted / "model")
    for key in bf16:
        torch.testing.assert_close(resumed[key], bf16[key], rtol=1e-5, atol=1e-6)
    pipe = StableDiffusionPipeline.from_pretrained(full / "model")
    images = pipe("a large red circle in the center on a white background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(images).all()


def test_mixed_precision_context_autocasts_and_only_fp16_scales():
    cpu = torch.device("cpu")
    forward, scaler = ldm.mixed_precision("no", cpu)
    with forward():
        assert not torch.is_autocast_enabled("cpu")
    assert not scaler.is_enabled()
    forward, scaler = ldm.mixed_precision("bf16", cpu)
    for _ in range(2):  # a fresh context each step
        with forward():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.nn.Linear(4, 4)(torch.randn(2, 4))).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    assert not scaler.is_enabled()  # bf16 has fp32's range: no loss scaling


def test_resume_inside_the_vae_stage(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "vae-stage"
    train_until_interrupted(out, 4, monkeypatch)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    with pytest.raises(EgakuError, match="from the VAE stage"):
        ldm.train_ldm(tiny_opts(out, export_only=True))
    ldm.train_ldm(tiny_opts(out, resume="latest"))
    vae_full = load_file(tiny_run / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    vae_resumed = load_file(out / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    for key in vae_full:
        torch.testing.assert_close(vae_resumed[key], vae_full[key], rtol=1e-5, atol=1e-6)


def test_resume_with_a_different_config_is_refused_naming_the_difference(tiny_run):
    with pytest.raises(EgakuError, match=r"--lr: checkpoint has 0.0006, now 0.001"):
        ldm.train_ldm(tiny_opts(tiny_run, resume="latest", lr=1e-3))


def test_a_constant_schedule_run_can_be_extended_but_a_cosine_one_cannot(tiny_run, tmp_path):
    import shutil

    with pytest.raises(EgakuError, match="--steps: checkpoint has 6, now 8"):
        ldm.train_ldm(tiny_opts(tiny_run, resume="latest", steps=8))
    out = tmp_path / "constant"
    ldm.train_ldm(tiny_opts(out, lr_schedule="constant"))
    shutil.rmtree(out / "model")
    ldm.train_ldm(tiny_opts(out, lr_schedule="constant", resume="latest", steps=8))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000012"
    assert json.loads((out / "summary.json").read_text())["step"] == 12


def test_a_constant_run_resumed_with_a_cooldown_equals_one_trained_with_it(tmp_path):
    import shutil

    # 2 warmup steps, the constant rate, then the last 4 of 8 steps decay to zero: 1, 0.75, 0.5, 0.25 of it.
    lr = ldm._lr_lambda(2, 8, "constant", cooldown=4)
    assert [lr(s) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    whole = tmp_path / "whole"
    ldm.train_ldm(tiny_opts(whole, lr_schedule="constant", steps=8, cooldown_steps=4))
    out = tmp_path / "extended"
    ldm.train_ldm(tiny_opts(out, lr_schedule="constant", steps=4))  # stops where the cooldown starts
    shutil.rmtree(out / "model")
    ldm.train_ldm(tiny_opts(out, lr_schedule="constant", resume="latest", steps=8, cooldown_steps=4))
    full, resumed = _unet_weights(whole / "model"), _unet_weights(out / "model")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    # A cooldown that began before the checkpoint cannot be moved; nor can a new one start before it.
    with pytest.raises(EgakuError, match="its cooldown began at step 8"):
        ldm.train_ldm(tiny_opts(out, lr_schedule="constant", resume="latest", steps=10, cooldown_steps=4))
    plain = tmp_path / "plain"
    ldm.train_ldm(tiny_opts(plain, lr_schedule="constant", steps=4))
    with pytest.raises(EgakuError, match="would start at step 6, before the checkpoint.*at most 4 cooldown steps"):
        ldm.train_ldm(tiny_opts(plain, lr_schedule="constant", resume="latest", steps=8, cooldown_steps=6))
    with pytest.raises(EgakuError, match="--lr-schedule constant"):
        tiny_opts(plain, cooldown_steps=2)


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_default(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "older"
    shutil.copytree(tiny_run, out)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((latest / "config.json").read_text())
    del saved["cooldown_steps"]  # as written by egaku before --cooldown-steps
    (latest / "config.json").write_text(json.dumps(saved))
    # a cosine run, where every option is compared: without the default this is "checkpoint has None, now 0"
    ldm.train_ldm(tiny_opts(out, resume="latest"))
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_export_only_writes_a_model_from_the_latest_checkpoint(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run / "checkpoints", copy / "checkpoints")
    # a cut-short run is exported as it stands, even if --steps now says more
    ldm.train_ldm(tiny_opts(copy, export_only=True, steps=100, log_with="tensorboard"))
    assert not (copy / "logs").exists()  # an export logs nothing: no empty TensorBoard run beside the real one
    for key, value in _unet_weights(tiny_run / "model").items():
        torch.testing.assert_close(_unet_weights(copy / "model")[key], value)
    # the run's config says what was trained (the checkpoint's), not this export's --steps
    assert json.loads((copy / "config.json").read_text())["steps"] == 6
    run_config = (tiny_run / "config.json").read_text()
    (copy / "config.json").write_text(run_config)
    shutil.rmtree(copy / "model")
    ldm.train_ldm(tiny_opts(copy, export_only=True, steps=5000))
    assert (copy / "config.json").read_text() == run_config


def test_an_export_keeps_a_default_guidance_edited_by_hand_and_says_so(tiny_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run / "checkpoints", copy / "checkpoints")
    ldm.train_ldm(tiny_opts(copy, export_only=True, sample_guidance=4.0))
    defaults = copy / "model" / "egaku_defaults.json"
    assert json.loads(defaults.read_text()) == {"guidance_scale": 4.0}
    # not edited: a later export (a resume's too) writes its own --sample-guidance
    ldm.train_ldm(tiny_opts(copy, export_only=True, sample_guidance=5.0))
    assert json.loads(defaults.read_text()) == {"guidance_scale": 5.0}
    defaults.write_text('{"guidance_scale": 6.5, "note": "measured"}')  # after the export, written in by hand
    capsys.readouterr()
    ldm.train_ldm(tiny_opts(copy, export_only=True, sample_guidance=4.0))
    assert json.loads(defaults.read_text()) == {"guidance_scale": 6.5, "note": "measured"}  # untouched
    assert f"kept {defaults} as edited (guidance 6.5)" in capsys.readouterr().err
    ldm.train_ldm(tiny_opts(copy, export_only=True, sample_guidance=6.5))  # and kept again: nothing to say
    assert json.loads(defaults.read_text()) == {"guidance_scale": 6.5, "note": "measured"}
    assert "kept" not in capsys.readouterr().err
    # a file that cannot be read is an error before any work, not a traceback after training
    defaults.write_text('{"guidance_scale": 6.5,}')
    with pytest.raises(EgakuError, match="egaku_defaults.json is not readable JSON"):
        ldm.train_ldm(tiny_opts(copy, export_only=True))
    defaults.unlink()  # as the message says: deleted, the export writes --sample-guidance
    ldm.train_ldm(tiny_opts(copy, export_only=True, sample_guidance=5.5))
    assert json.loads(defaults.read_text()) == {"guidance_scale": 5.5}


def test_failed_checkpoint_write_leaves_the_previous_one_valid(tmp_path, monkeypatch):
    from egaku.training import runtime

    out = tmp_path / "diskfull"
    real_save = runtime.torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (step 6)
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    with pytest.raises(EgakuError, match="No space left.*intact.*--resume latest"):  # one line, what to do
        ldm.train_ldm(tiny_opts(out))
    monkeypatch.setattr(runtime.torch, "save", real_save)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000004"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    ldm.train_ldm(tiny_opts(out, resume="latest"))
    assert (out / "model" / "model_index.json").is_file()


def test_an_interrupted_safetensors_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """atomic_save_file (LoRA files, embeddings, caches, single-file exports): a write cut short leaves
    the old file whole and no temporary file behind."""
    from egaku.training import runtime

    path = tmp_path / "weights.safetensors"
    runtime.atomic_save_file({"w": torch.ones(3)}, path, metadata={"format": "pt"})
    real_save = runtime.save_file

    def cut_short(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "save_file", cut_short)
    with pytest.raises(OSError, match="No space left"):
        runtime.atomic_save_file({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(runtime, "save_file", real_save)
    assert torch.equal(load_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def _write_folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a noisy picture number {i}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_image_folder_training_skips_and_lists_undecodable_images(tmp_path, capsys):
    data = _write_folder(tmp_path / "data")
    model = ldm.train_ldm(tiny_opts(tmp_path / "run", data=str(data), vae_steps=2, steps=2, checkpoint_every=10))
    err = capsys.readouterr().err
    assert "3 images used, 1 skipped" in err and "broken.png" in err
    assert (model / "model_index.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "PSNR is on training images" in summary["data"]
    # a caption changed since the checkpoint: resuming would not continue the run it belongs to
    (data / "img1.txt").write_text("another caption")
    with pytest.raises(EgakuError, match="the training data changed since it was written \\(3 images;"):
        ldm.train_ldm(tiny_opts(tmp_path / "run", data=str(data), vae_steps=2, steps=2, checkpoint_every=10,
                                resume="latest"))


def test_empty_or_missing_dataset_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EgakuError, match="found 0 usable images"):
        ldm.train_ldm(tiny_opts(tmp_path / "a", data=str(tmp_path / "empty")))
    with pytest.raises(EgakuError, match="does not exist"):
        ldm.train_ldm(tiny_opts(tmp_path / "b", data=str(tmp_path / "nowhere")))


def test_bad_options_are_refused():
    with pytest.raises(EgakuError, match="downsampling factor 4"):
        ldm.TrainLdmOptions(vae_channels=[8, 8])
    with pytest.raises(EgakuError, match="one block type per width"):
        ldm.TrainLdmOptions(unet_channels=[8, 16, 32], unet_down_blocks=["DownBlock2D"])
    with pytest.raises(EgakuError, match="caption-dropout"):
        ldm.TrainLdmOptions(caption_dropout=1.5)
    with pytest.raises(EgakuError, match="needs --prediction-type v_prediction"):
        ldm.TrainLdmOptions(zero_terminal_snr=True)
    with pytest.raises(EgakuError, match="set --vae-steps 0"):
        ldm.TrainLdmOptions(vae_from="some/vae")
    if not torch.cuda.is_available():
        with pytest.raises(EgakuError, match="fp16 is for CUDA devices.*use bf16 on the CPU"):
            ldm.TrainLdmOptions(mixed_precision="fp16")


@pytest.mark.parametrize("overrides, message", [
    ({"lr": -1.0}, r"^--lr must be above 0, got -1.0$"),
    ({"vae_lr": 0.0}, r"--vae-lr must be above 0"),
    ({"text_heads": 3},
     r"--text-heads 3 must divide the text width \(--cross-attention-dim 16\); use one of 1, 2, 4, 8, 16$"),
    ({"unet_down_blocks": ["Foo", "CrossAttnDownBlock2D"]},
     r"--unet-down-blocks Foo: not a block type .*use DownBlock2D, CrossAttnDownBlock2D, AttnDownBlock2D"),
    ({"unet_down_blocks": ["SkipDownBlock2D", "CrossAttnDownBlock2D"]}, r"--unet-down-blocks SkipDownBlock2D"),
    ({"latent_channels": 0}, r"--latent-channels must be at least 1, got 0"),
    ({"text_layers": 0}, r"--text-layers must be at least 1"),
    ({"unet_channels": [16, 0]}, r"--unet-channels \[16, 0\]: give block widths of at least 1"),
    ({"attention_head_dim": 3}, r"--unet-channels \[16, 32\]: each width must be divisible by --attention-head-dim 3"),
    ({"vae_crop": -8}, r"--vae-crop -8: use 0 or a multiple of 8"),
    ({"checkpoint_every": 0}, r"--checkpoint-every must be at least 1"),
    ({"keep_checkpoints": 0}, r"--keep-checkpoints must be at least 1"),
    ({"ema_decay": 1.5}, r"--ema-decay 1.5: use a value in \[0, 1\]"),
    ({"warmup_steps": -1}, r"--warmup-steps must be 0 or more"),
])
def test_bad_sizes_rates_and_block_types_are_refused_before_any_work(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(ldm, "load_training_images", lambda opts: pytest.fail("the data was read first"))
    with pytest.raises(EgakuError, match=message):
        ldm.train_ldm(tiny_opts(tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_bad_learning_rate_is_one_line_from_the_cli(tmp_path, capsys):
    from egaku.cli import main as cli_main

    assert cli_main(["train-ldm", "--config", str(ROOT / "configs" / "ldm-tiny.toml"), "--out", str(tmp_path / "run"),
                     "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr must be above 0" in err[0]


def test_a_fresh_run_without_a_vae_stage_is_refused_and_samples_always_get_a_folder(tiny_run, tmp_path,
                                                                                     tensorboard_events):
    import shutil

    with pytest.raises(EgakuError, match=r"--vae-steps 0 skips training the VAE.*--vae-steps N.*--vae-from DIR"):
        tiny_opts(tmp_path / "no-vae", vae_steps=0)
    with pytest.raises(EgakuError, match=r"--vae-steps 0 skips training the VAE"):  # a resume keeps the run's own
        tiny_opts(tmp_path / "no-vae", vae_steps=0, resume="latest")
    # --vae-from names a VAE folder: a whole pipeline, or another model's folder, is named as such before any work
    with pytest.raises(EgakuError, match=f"is a whole pipeline; give its VAE: --vae-from {tiny_run / 'model' / 'vae'}"):
        ldm.train_ldm(tiny_opts(tmp_path / "x", vae_from=str(tiny_run / "model"), vae_steps=0))
    with pytest.raises(EgakuError, match="is a UNet2DConditionModel folder; give a trained AutoencoderKL folder"):
        ldm.train_ldm(tiny_opts(tmp_path / "x", vae_from=str(tiny_run / "model" / "unet"), vae_steps=0))
    with pytest.raises(EgakuError, match="holds no checkpoint to export; train a run there first"):
        ldm.train_ldm(tiny_opts(tmp_path / "never-trained", export_only=True))
    # an --out inside the data folder: its sample grids would be read as training images on the next run
    data = tmp_path / "images"
    (data / "red").mkdir(parents=True)
    with pytest.raises(EgakuError, match=f"--out {data / 'run'} lies inside --data {data}"):
        ldm.train_ldm(tiny_opts(data / "run", data=str(data)))
    with pytest.raises(EgakuError, match="--out is empty"):
        ldm.train_ldm(tiny_opts(""))
    # --sample-every writes into samples/ however the run got past the VAE stage (here: a resume, whose
    # summary already holds the VAE's PSNR, of a run whose samples folder was removed)
    out, vae = tmp_path / "given-vae", str(tiny_run / "model" / "vae")
    ldm.train_ldm(tiny_opts(out, vae_from=vae, vae_steps=0, lr_schedule="constant", steps=2))
    shutil.rmtree(out / "samples")
    shutil.rmtree(out / "model")
    ldm.train_ldm(tiny_opts(out, vae_from=vae, vae_steps=0, lr_schedule="constant", steps=4, sample_every=1,
                            resume="latest", log_with="tensorboard"))
    assert sorted(p.name for p in (out / "samples").glob("step-*.png")) == ["step-000003.png"]
    # --log-with tensorboard from the resume on: the steps it logged to losses.csv, and the grid
    scalars, images = tensorboard_events(out / "logs")
    rows = [line.split(",") for line in (out / "losses.csv").read_text().splitlines()[1:]]
    assert [step for step, _ in scalars["loss"]] == [int(r[0]) for r in rows if int(r[0]) > 2] == [4]
    assert images == {"samples": [3]}


def test_resuming_a_checkpoint_of_another_trainer_says_so(tmp_path, monkeypatch):
    from egaku.config import to_dict
    from egaku.training.gan import TrainGanOptions

    step = tmp_path / "gan-run" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    (step / "config.json").write_text(json.dumps({**to_dict(TrainGanOptions()), "class_names": None}))
    monkeypatch.setattr(ldm, "load_training_images", lambda opts: pytest.fail("the data was read first"))
    with pytest.raises(EgakuError, match=r"not a train-ldm checkpoint \(it was written by train-gan"):
        ldm.train_ldm(tiny_opts(tmp_path / "ldm-run", resume=str(tmp_path / "gan-run")))


def test_zero_terminal_snr_model_on_a_given_vae_samples_from_pure_noise(tiny_run, tmp_path):
    """--vae-from reuses a trained VAE (stage 1 skipped); a zero-terminal-SNR model exports a scheduler
    whose first sampling step is the pure-noise timestep, and plain diffusers draws finite images."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    run = tmp_path / "zsnr"
    model = ldm.train_ldm(tiny_opts(run, vae_from=str(tiny_run / "model" / "vae"), vae_steps=0,
                                    prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=5.0,
                                    timestep_sampling="logit_normal", logit_mean=0.5))
    given = AutoencoderKL.from_pretrained(tiny_run / "model" / "vae")
    exported = AutoencoderKL.from_pretrained(model / "vae")
    for name, tensor in given.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
    assert np.isfinite(json.loads((run / "summary.json").read_text())["vae_psnr"])

    pipe = StableDiffusionPipeline.from_pretrained(model)
    config = pipe.scheduler.config
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert config.prediction_type == "v_prediction"
    # the training schedule really ends in pure noise, and sampling starts there
    assert float(DDPMScheduler.from_config(config).alphas_cumprod[-1]) == 0.0
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == config.num_train_timesteps - 1
    images = pipe("a large red circle in the center on a white background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(images).all()


def test_pooled_caption_embedding_and_short_text_encoder_load_in_plain_diffusers(tiny_run, tmp_path):
    """--unet-pooled-text adds diffusers' own text-pooling embedding to the UNet (no custom code at load
    time) and --max-caption-tokens shortens tokenizer and text encoder together."""
    from diffusers import StableDiffusionPipeline

    model = ldm.train_ldm(tiny_opts(tmp_path / "pooled", vae_from=str(tiny_run / "model" / "vae"), vae_steps=0,
                                    unet_pooled_text=True, max_caption_tokens=24))
    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe.unet.config.addition_embed_type == "text"
    assert pipe.tokenizer.model_max_length == 24 and pipe.text_encoder.config.max_position_embeddings == 24
    prompt = "a large red circle in the center on a white background"

    def draw():
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    with_pool = draw()
    assert np.isfinite(with_pool).all()
    # the pooled caption really conditions the UNet: without it the same seed draws another image
    with torch.no_grad():
        pipe.unet.add_embedding.proj.weight.zero_()
        pipe.unet.add_embedding.proj.bias.zero_()
        pipe.unet.add_embedding.norm2.bias.zero_()
    assert np.abs(draw() - with_pool).max() > 1e-4


def test_logit_normal_timesteps_stay_in_range_and_favour_the_middle():
    opts = ldm.TrainLdmOptions(timestep_sampling="logit_normal")
    t = ldm.sample_timesteps(opts, 20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= opts.num_train_timesteps - 1
    middle = ((t >= 250) & (t < 750)).float().mean()
    assert middle > 0.65  # uniform: 0.5; sigmoid(N(0, 1)) puts ~0.73 in [0.25, 0.75)
    shifted = ldm.sample_timesteps(ldm.TrainLdmOptions(timestep_sampling="logit_normal", logit_mean=1.0), 20000,
                                   torch.Generator().manual_seed(0))
    assert shifted.float().mean() > t.float().mean() + 100  # a positive mean favours noisier steps
    again = ldm.sample_timesteps(opts, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    uniform = ldm.sample_timesteps(ldm.TrainLdmOptions(), 20000, torch.Generator().manual_seed(0))
    assert abs(((uniform >= 250) & (uniform < 750)).float().mean() - 0.5) < 0.02
    # Half uniform: the noisiest tenth gets 0.5 * 10% + 0.5 * 1.4% of the draws (logit-normal alone: 1.4%).
    mixed = ldm.sample_timesteps(ldm.TrainLdmOptions(timestep_sampling="logit_normal", uniform_share=0.5), 20000,
                                 torch.Generator().manual_seed(0))
    noisiest = {name: (x >= 900).float().mean().item() for name, x in (("ln", t), ("mixed", mixed), ("u", uniform))}
    assert noisiest["ln"] < 0.025 and 0.045 < noisiest["mixed"] < 0.07 and 0.09 < noisiest["u"] < 0.11
    with pytest.raises(EgakuError, match="--uniform-share"):
        ldm.TrainLdmOptions(uniform_share=0.5)  # uniform sampling has nothing to mix with


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_clear_error(tmp_path):
    with pytest.raises(EgakuError, match="no CUDA GPU"):
        ldm.train_ldm(tiny_opts(tmp_path / "run", device="cuda"))


def test_presets_load_against_the_options():
    for name in ("ldm-tiny", "ldm-builtin"):
        opts = build(ldm.TrainLdmOptions, load_preset(ROOT / "configs" / f"{name}.toml"))
        assert opts.data == "shapes"


def test_min_snr_weights_are_finite_at_snr_zero_for_both_prediction_types():
    from diffusers import DDPMScheduler

    from egaku.training.runtime import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 999])
    eps = min_snr_weights(scheduler, t, 5.0, "epsilon")
    v = min_snr_weights(scheduler, t, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[2] == 0 and v[2] == 0  # the pure-noise step carries no weight instead of 0/0
    assert eps[0] == pytest.approx(5.0 / float(scheduler.alphas_cumprod[0] / (1 - scheduler.alphas_cumprod[0])))


def test_caption_weights_draw_matching_images_more_often_and_bad_ones_are_refused(tmp_path, capsys):
    captions = ["a small red circle", "a large red circle", "a small blue square", "a large blue square"]
    weights = ldm.image_weights(captions, ldm.parse_caption_weights(["small=3", "Blue=2"]))
    assert weights.tolist() == [3.0, 1.0, 6.0, 2.0]  # factors of several matching words multiply
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([ldm.draw_batch(4, 128, weights, gen) for _ in range(40)])
    share = torch.bincount(idx, minlength=4).double() / len(idx)
    assert torch.allclose(share, weights / weights.sum(), atol=0.02)
    # without weights a batch is the same uniform draw as before the option existed (old runs resume bit for bit)
    assert torch.equal(ldm.draw_batch(20000, 128, None, torch.Generator().manual_seed(5)),
                       torch.randint(0, 20000, (128,), generator=torch.Generator().manual_seed(5)))
    for bad in (["small"], ["small=0"], ["small=x"], ["two words=2"], ["=2"]):
        with pytest.raises(EgakuError, match="WORD=FACTOR"):
            ldm.TrainLdmOptions(caption_weights=bad)
    with pytest.raises(EgakuError, match="no training caption has the word 'star'"):  # before any training
        ldm.train_ldm(tiny_opts(tmp_path / "run", caption_weights=["star=2"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    model = ldm.train_ldm(tiny_opts(tmp_path / "weighted", caption_weights=["small=4"], vae_steps=2, steps=2))
    assert (model / "model_index.json").is_file()
    assert "--caption-weights: small=4; images drawn by their weights" in capsys.readouterr().err


def test_two_process_run_under_torchrun_on_cpu(tiny_run, tmp_path, torchrun):
    """Under a real 2-process launch (gloo on CPU) each process draws its own batches and DDP averages their
    gradients; the run checks at the end that the replicas agree, only the main process writes, a run resumed on
    2 processes ends where an uninterrupted one does, and a resume must use as many processes."""
    from diffusers import StableDiffusionPipeline

    # a constant schedule, so that a run of 3 diffusion steps can be resumed to 6
    common = ("train-ldm", "--config", str(ROOT / "configs" / "ldm-tiny.toml"), "--threads", "1", "--no-progress",
              "--lr-schedule", "constant")
    out = tmp_path / "ddp"
    _, stderr = torchrun(*common, "--out", str(out))
    assert stderr.count(f"wrote {out / 'model'}") == 1 and stderr.count("VAE: held-out PSNR") == 1
    one, two = ((run / "losses.csv").read_text().splitlines() for run in (tiny_run, out))
    assert [row.split(",")[0] for row in two] == [row.split(",")[0] for row in one]
    # the same seed, config and step (the VAE stage's schedule is the same): with the same batch on both processes
    # (or one process training alone) the VAE stage's last loss would be the one-process run's
    assert float(two[1].split(",")[3]) != pytest.approx(float(one[1].split(",")[3]), rel=1e-4)
    assert torch.load(out / "checkpoints" / "step-000010" / "state.pt", weights_only=True)["world"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    image = pipe("a large red circle in the center on a white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all()

    split = tmp_path / "split"
    torchrun(*common, "--out", str(split), "--steps", "3")
    torchrun(*common, "--out", str(split), "--steps", "6", "--resume", "latest")
    whole, resumed = _unet_weights(out / "model"), _unet_weights(split / "model")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)

    with pytest.raises(EgakuError, match=r"written by a run on 2 process\(es\), this one has 1"):
        ldm.train_ldm(tiny_opts(out, resume="latest", lr_schedule="constant"))
