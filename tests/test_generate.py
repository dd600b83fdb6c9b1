"""Generation on the tiny pipeline: every option, reproducibility, metadata, formats, bad input."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import egaku
from egaku.cli import main
from egaku.inference.generate import decode_latents, resolve_size
from egaku.errors import EgakuError
from egaku.inference.samplers import SAMPLERS, canonical_sampler
from egaku.models.single_file import save_single_file

FAST = dict(steps=2)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")


def px(result):
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_pixels_and_different_seed_differs(pipe):
    a = egaku.generate(pipe, "a red cat", seed=3, **FAST)[0]
    b = egaku.generate(pipe, "a red cat", seed=3, **FAST)[0]
    c = egaku.generate(pipe, "a red cat", seed=4, **FAST)[0]
    assert np.array_equal(px(a), px(b))
    assert np.abs(px(a) - px(c)).mean() > 1.0
    assert a.image.size == (64, 64)


def test_image_i_of_a_batch_equals_it_generated_alone(pipe):
    batch = egaku.generate(pipe, "a blue star", seed=10, num_images=3, batch_size=3, **FAST)
    assert [r.seed for r in batch] == [10, 11, 12]
    alone = egaku.generate(pipe, "a blue star", seed=12, num_images=1, **FAST)[0]
    # batched and single convolutions may differ in the last float bit; after 8-bit rounding at most 1
    assert np.abs(px(batch[2]) - px(alone)).max() <= 1
    split = egaku.generate(pipe, "a blue star", seed=10, num_images=3, batch_size=2, **FAST)
    assert np.abs(px(split[2]) - px(alone)).max() <= 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_and_is_deterministic(pipe, sampler):
    a = egaku.generate(pipe, "a cat", seed=1, sampler=sampler, **FAST)[0]
    b = egaku.generate(pipe, "a cat", seed=1, sampler=sampler, **FAST)[0]
    assert np.array_equal(px(a), px(b))
    assert a.params["sampler"] == sampler


def test_samplers_are_built_from_the_model_scheduler_config(pipe):
    from egaku.inference.samplers import make_scheduler

    for name in SAMPLERS:
        sched = make_scheduler(name, dict(pipe.scheduler.config))
        assert sched.config.beta_schedule == "scaled_linear"
        assert sched.config.beta_start == pipe.scheduler.config.beta_start
    assert make_scheduler("dpmpp-2m-karras", dict(pipe.scheduler.config)).config.use_karras_sigmas is True


def test_karras_sigmas_on_a_zero_terminal_snr_model_are_noted_under_15_steps(pipe, capsys):
    from egaku.inference.samplers import sampler_note

    zero_snr = {**pipe.scheduler.config, "rescale_betas_zero_snr": True}
    assert "start at 4096" in sampler_note("DPM++ 2M Karras", zero_snr, 8)
    assert "dpmpp-2m, whose steps are evenly spaced" in sampler_note("dpmpp-2m-karras", zero_snr, 8)
    assert sampler_note("dpmpp-2m-karras", zero_snr, 15) is None
    assert sampler_note("dpmpp-2m", zero_snr, 4) is None
    assert sampler_note("dpmpp-2m-karras", dict(pipe.scheduler.config), 4) is None  # SD's sigma_max is 14.6
    egaku.generate(pipe, "a cat", seed=1, steps=2, sampler="dpmpp-2m-karras")  # the tiny model: no note
    assert "Karras" not in capsys.readouterr().out


def test_zero_terminal_snr_models_get_only_samplers_that_keep_their_schedule(pipe):
    from egaku.inference.samplers import make_scheduler, supports_zero_terminal_snr

    config = {**pipe.scheduler.config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}
    usable = [s for s in SAMPLERS.values() if supports_zero_terminal_snr(s)]
    assert {"dpmpp-2m", "euler", "ddim", "unipc"} <= {s.name for s in usable}
    for sampler in SAMPLERS.values():
        if sampler in usable:
            assert make_scheduler(sampler.name, config).config.rescale_betas_zero_snr is True
        else:
            with pytest.raises(EgakuError, match="zero-terminal-SNR.*choose one of: dpmpp-2m"):
                make_scheduler(sampler.name, config)
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(config)
    try:
        for sampler in usable:  # the pure-noise first step gives finite images with every usable sampler
            image = egaku.generate(pipe, "a cat", seed=1, sampler=sampler.name, **FAST)[0]
            assert np.isfinite(px(image)).all() and px(image).std() > 0, sampler.name
    finally:
        pipe.scheduler = original


def test_negative_prompt_guidance_and_steps_change_the_image(pipe):
    base = px(egaku.generate(pipe, "a cat", seed=2, **FAST)[0])
    assert np.abs(base - px(egaku.generate(pipe, "a cat", negative_prompt="red dog", seed=2, **FAST)[0])).max() > 0
    assert np.abs(base - px(egaku.generate(pipe, "a cat", guidance_scale=1.0, seed=2, **FAST)[0])).max() > 0
    assert np.abs(base - px(egaku.generate(pipe, "a cat", seed=2, steps=3)[0])).max() > 0


def test_default_guidance_is_the_models_own(pipe, tiny_model_dir, tmp_path):
    """Unset guidance: the model folder's egaku_defaults.json (3 for the built-in model, its measured best),
    else SD's usual 7.5; convert carries the file to the new folder; a bad file is an error naming it."""
    import shutil

    from egaku.models.loading import BUILTIN_DIR, load_pipeline, recommended_guidance

    default = egaku.generate(pipe, "a cat", seed=2, **FAST)[0]
    assert default.params["guidance_scale"] == 7.5
    assert np.array_equal(px(default), px(egaku.generate(pipe, "a cat", seed=2, guidance_scale=7.5, **FAST)[0]))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "egaku_defaults.json").write_text('{"guidance_scale": 5.5}')
    own = load_pipeline(str(folder), "cpu", "float32")
    assert egaku.generate(own, "a cat", seed=2, **FAST)[0].params["guidance_scale"] == 5.5
    assert egaku.generate(own, "a cat", seed=2, guidance_scale=2.0, **FAST)[0].params["guidance_scale"] == 2.0
    assert main(["convert", str(folder), "--out", str(tmp_path / "converted")]) == 0
    assert recommended_guidance(load_pipeline(str(tmp_path / "converted"), "cpu", "float32")) == 5.5
    (folder / "egaku_defaults.json").write_text('{"guidance_scale": "high"}')
    with pytest.raises(EgakuError, match="egaku_defaults.json must hold"):
        recommended_guidance(own)
    # the shipped model, by name or by its folder
    assert recommended_guidance(load_pipeline("builtin", "cpu", "float32")) == 3.0
    assert recommended_guidance(load_pipeline(str(BUILTIN_DIR), "cpu", "float32")) == 3.0


def test_size_aspect_ratio_and_rounding(pipe, capsys):
    r = egaku.generate(pipe, "a cat", seed=1, width=96, height=64, **FAST)[0]
    assert r.image.size == (96, 64)
    assert resolve_size(pipe, 104, 64, None)[:2] == (104, 64)
    w, h, note = resolve_size(pipe, 70, 64, None)
    assert (w, h) == (72, 64) and "rounded" in note
    w, h, _ = resolve_size(pipe, None, None, "16:9")
    assert w > h and abs(w / h - 16 / 9) < 0.15 and w % 8 == 0 and h % 8 == 0
    r = egaku.generate(pipe, "a cat", seed=1, width=70, **FAST)[0]
    assert r.image.size == (72, 64)
    assert "rounded to 72x64" in capsys.readouterr().out
    # 104 / VAE factor 2 = 52 latents: not a multiple of the UNet's downsampling, which diffusers handles
    assert egaku.generate(pipe, "a cat", seed=1, width=104, **FAST)[0].image.size == (104, 64)


def test_img2img_keeps_the_init_images_aspect_ratio(pipe, tmp_path, capsys):
    Image.new("RGB", (70, 50), (250, 20, 20)).save(tmp_path / "wide.png")
    # 70:50 at the model's 64x64 pixels is 76x54, rounded to multiples of 8 as --ar 70:50 is
    r = egaku.generate(pipe, "a cat", seed=1, init_image=str(tmp_path / "wide.png"), strength=0.5, steps=4)[0]
    assert r.image.size == resolve_size(pipe, None, None, "70:50")[:2] == (80, 56)
    assert "76x54 rounded to 80x56" in capsys.readouterr().out
    tall = egaku.generate(pipe, "a cat", seed=1, init_image=Image.new("RGB", (30, 60)), strength=0.5, steps=4)[0]
    assert tall.image.size == resolve_size(pipe, None, None, "1:2")[:2] and tall.image.height > tall.image.width
    # a size or aspect ratio that is given wins
    assert egaku.generate(pipe, "a cat", seed=1, init_image=Image.new("RGB", (70, 50)), strength=0.5, steps=4,
                          width=64, height=64)[0].image.size == (64, 64)
    assert egaku.generate(pipe, "a cat", seed=1, init_image=Image.new("RGB", (70, 50)), strength=0.5, steps=4,
                          aspect_ratio="1:1")[0].image.size == (64, 64)


def progress_of(pipe, **kwargs) -> list[tuple[int, int]]:
    calls = []
    egaku.generate(pipe, "a cat", seed=1, on_step=lambda done, total: calls.append((done, total)), **kwargs)
    return calls


@pytest.mark.parametrize("kwargs, per_batch", [
    (dict(steps=3, sampler="heun"), 5),  # Heun's scheduler runs 2 x steps - 1 timesteps
    (dict(steps=3, sampler="pndm"), 4),  # PLMS: steps + 1
    (dict(steps=4, sampler="heun", strength=0.5), 3),  # the last 2 of 4 steps: timesteps[2 x 2:] of 7
    (dict(steps=8, sampler="euler", strength=0.25), 2),
    (dict(steps=3, hires_scale=1.5, hires_steps=4, hires_strength=0.5), 5),  # 3, then the hires pass's 2 of 4
])
def test_progress_reaches_exactly_its_total(pipe, kwargs, per_batch):
    if "strength" in kwargs:
        kwargs["init_image"] = Image.new("RGB", (64, 64), (250, 20, 20))
    calls = progress_of(pipe, num_images=2, batch_size=1, **kwargs)
    total = 2 * per_batch
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_seeds_past_the_largest_are_refused_up_front(pipe):
    from egaku.inference.generate import MAX_SEED

    with pytest.raises(EgakuError, match=f"would use seeds {MAX_SEED - 1}..{MAX_SEED + 1}, past the largest seed "
                                         f"{MAX_SEED}; use --seed {MAX_SEED - 2} or lower"):
        egaku.generate(pipe, "a cat", seed=MAX_SEED - 1, num_images=3, **FAST)
    assert [r.seed for r in egaku.generate(pipe, "a cat", seed=MAX_SEED - 1, num_images=2, **FAST)] == [
        MAX_SEED - 1, MAX_SEED]


def test_dir_lists_the_lazily_loaded_api():
    names = dir(egaku)
    assert {"load_pipeline", "generate", "GenerateOptions", "EgakuError", "train_lora"} <= set(names)
    assert all(hasattr(egaku, name) for name in egaku.__all__)


def vae_roundtrip(pipe, image):
    """What the (untrained) VAE makes of an image: the limit of img2img as strength -> 0."""
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        return np.asarray(pipe.image_processor.postprocess(decode_latents(pipe, z))[0], dtype=np.int16)


def test_an_init_image_too_far_from_square_names_its_shape(pipe):
    with pytest.raises(egaku.EgakuError, match="the init image's shape 2000:4 is too far from square .*--width and --height"):
        egaku.generate(pipe, "a cat", init_image=Image.new("RGB", (2000, 4)), strength=0.5, steps=2)
    # with a size given, its shape is no matter
    assert egaku.generate(pipe, "a cat", init_image=Image.new("RGB", (2000, 4)), strength=0.5, steps=2, width=64,
                          height=32)[0].image.size == (64, 32)


def test_img2img_uses_the_init_image(pipe, tmp_path):
    init = Image.new("RGB", (64, 64), (250, 20, 20))
    init.save(tmp_path / "init.png")
    roundtrip = vae_roundtrip(pipe, init)
    steps_seen = []
    low = egaku.generate(pipe, "a cat", seed=1, init_image=str(tmp_path / "init.png"), strength=0.25, steps=8,
                         on_step=lambda done, total: steps_seen.append(total))[0]
    high = egaku.generate(pipe, "a cat", seed=1, init_image=str(tmp_path / "init.png"), strength=1.0, steps=8)[0]
    assert steps_seen[-1] == 2  # only the last quarter of the schedule runs
    assert np.abs(px(low) - roundtrip).mean() < np.abs(px(high) - roundtrip).mean()
    assert low.params["strength"] == 0.25
    other = egaku.generate(pipe, "a cat", seed=1, init_image=Image.new("RGB", (64, 64), (20, 20, 250)),
                           strength=0.25, steps=8)[0]
    assert np.abs(px(low) - px(other)).mean() > 1.0


def test_vae_falls_back_to_fp32_when_half_precision_gives_nan(pipe, monkeypatch, capsys):
    vae = pipe.vae
    calls = []
    real_decode = vae.decode

    def flaky_decode(z, *a, **k):
        calls.append(vae.dtype)
        out = real_decode(z.to(vae.dtype), *a, **k)
        if vae.dtype != torch.float32:
            out.sample = torch.full_like(out.sample, float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", flaky_decode)
    vae.to(torch.bfloat16)
    try:
        images = decode_latents(pipe, torch.randn(1, 4, 16, 16))
    finally:
        vae.to(torch.float32)
    assert calls == [torch.bfloat16, torch.float32]
    assert not torch.isnan(images).any()
    assert "float32" in capsys.readouterr().out


def test_metadata_roundtrip_info_and_from(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "a red cat", "--model", str(tiny_model_dir), "--negative-prompt", "blurry", "--steps", "2",
               "--seed", "42", "-n", "2", "--sampler", "euler", "--cfg", "5", "--out", str(out), "--no-progress"])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png", "00002-grid.png"]
    assert (out / "00000-options.json").is_file()
    params = egaku.read_params(files[1])
    assert params["prompt"] == "a red cat" and params["negative_prompt"] == "blurry"
    assert (params["seed"], params["steps"], params["sampler"], params["guidance_scale"]) == (43, 2, "euler", 5.0)
    text = Image.open(files[1]).text["parameters"]
    assert text.startswith("a red cat\nNegative prompt: blurry\n"
                           "Steps: 2, Sampler: Euler, CFG scale: 5, Seed: 43, Size: 64x64")
    assert "Model hash: " in text
    capsys.readouterr()
    assert main(["info", str(files[1])]) == 0
    assert "Seed: 43" in capsys.readouterr().out
    # --from regenerates the same pixels into a fresh folder
    again = tmp_path / "again"
    assert main(["generate", "--from", str(files[1]), "--model", str(tiny_model_dir), "--out", str(again),
                 "--no-progress"]) == 0
    regenerated = sorted(again.glob("*.png"))[0]
    assert regenerated.name == "00000-43.png"
    assert np.abs(np.asarray(Image.open(regenerated), np.int16) - np.asarray(Image.open(files[1]), np.int16)).max() <= 1


def test_from_an_img2img_or_inpainting_image_uses_its_init_image_and_mask_again(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths given, whole paths recorded
    Image.new("RGB", (64, 64), (30, 200, 30)).save("init.png")
    Image.new("L", (64, 64), 255).crop((0, 0, 32, 64)).resize((64, 64)).save("mask.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save("mask.png")
    common = ["--model", str(tiny_model_dir), "--steps", "4", "--seed", "3", "--no-progress"]
    assert main(["generate", "a blue square", "--init-image", "init.png", "--mask", "mask.png", "--strength", "0.75",
                 "--out", "made", *common]) == 0
    made = tmp_path / "made" / "00000-3.png"
    params = egaku.read_params(made)
    assert (params["init_image"], params["mask"]) == (str(tmp_path / "init.png"), str(tmp_path / "mask.png"))
    monkeypatch.chdir(tmp_path / "made")  # from elsewhere
    assert main(["generate", "--from", str(made), "--model", str(tiny_model_dir), "--out", "again",
                 "--no-progress"]) == 0
    again = tmp_path / "made" / "again" / "00000-3.png"
    assert np.abs(np.asarray(Image.open(again), np.int16) - np.asarray(Image.open(made), np.int16)).max() <= 1
    # a new init image replaces the recorded one, and the recorded mask with it (it belongs to the old image)
    Image.new("RGB", (48, 64), (200, 30, 30)).save(tmp_path / "other.png")
    assert main(["generate", "--from", str(made), "--model", str(tiny_model_dir), "--init-image",
                 str(tmp_path / "other.png"), "--out", "other", "--no-progress"]) == 0
    other = egaku.read_params(tmp_path / "made" / "other" / "00000-3.png")
    assert other["init_image"] == str(tmp_path / "other.png") and "mask" not in other
    assert other["strength"] == egaku.GenerateOptions().strength  # img2img's, not the inpainting's 0.75
    # a recorded file that is gone is an error that says what to give
    (tmp_path / "mask.png").unlink()
    capsys.readouterr()
    assert main(["generate", "--from", str(made), "--model", str(tiny_model_dir), "--out", "gone",
                 "--no-progress"]) == 2
    assert f"made with the mask {tmp_path / 'mask.png'}, which no longer exists; pass --mask FILE" in \
        capsys.readouterr().err


def test_from_an_image_whose_init_image_was_handed_in_says_it_is_not_reused(pipe, tmp_path, capsys):
    from egaku.inference.commands import _apply_from_image
    from egaku.inference.metadata import save_png

    result = egaku.generate(pipe, "a cat", seed=1, init_image=Image.new("RGB", (64, 64)), strength=0.5, steps=4)[0]
    assert result.params["init_image"] == "image"
    save_png(result.image, tmp_path / "a.png", result.params)
    capsys.readouterr()
    applied = _apply_from_image(egaku.GenerateOptions(from_image=str(tmp_path / "a.png"), model="tiny"))
    assert applied.init_image is None
    assert "handed in as an image, not read from a file, so it is not made again from it; give --init-image FILE" \
        in capsys.readouterr().out


def test_a1111_text_is_parsed_when_no_json(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a house\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M Karras, "
                                "CFG scale: 6.5, Seed: 7, Size: 512x768, Model: sd15")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    p = egaku.read_params(tmp_path / "a.png")
    assert p == {"prompt": "a house", "negative_prompt": "ugly", "steps": 30, "sampler": "DPM++ 2M Karras",
                 "guidance_scale": 6.5, "seed": 7, "width": 512, "height": 768, "model_name": "sd15"}
    from egaku.inference.generate import reproduce_options

    assert reproduce_options(p)["sampler"] == "dpmpp-2m-karras"
    # A1111 1.9+ writes the schedule apart from the sampler
    from egaku.inference.metadata import parse_a1111

    newer = parse_a1111("a house\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 7")
    assert reproduce_options(newer)["sampler"] == "dpmpp-2m-karras"
    automatic = parse_a1111("a house\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 7")
    assert reproduce_options(automatic)["sampler"] == "euler-a"


def test_from_an_image_with_a_sampler_egaku_lacks_takes_sampler_or_names_it(tmp_path):
    from PIL import PngImagePlugin

    from egaku.cli import parse
    from egaku.inference.commands import _apply_from_image

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a house\nSteps: 3, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 6, Seed: 7")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    _, opts = parse(["generate", "--from", str(tmp_path / "a.png"), "--sampler", "euler", "--model", "tiny"])
    assert _apply_from_image(opts).sampler == "euler"
    _, opts = parse(["generate", "--from", str(tmp_path / "a.png"), "--model", "tiny"])
    applied = _apply_from_image(opts)
    with pytest.raises(egaku.EgakuError, match="unknown sampler 'DPM\\+\\+ SDE Karras'; choose one of"):
        canonical_sampler(applied.sampler)
    # a new prompt's --steps replaces the image's steps, as a flag would (the recorded value is no flag)
    from egaku.inference.prompts import apply_prompt_parameters

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a house\nSteps: 20, Sampler: Euler, CFG scale: 6, Seed: 7")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", pnginfo=info)
    _, opts = parse(["generate", "a dog --steps 30", "--from", str(tmp_path / "b.png"), "--model", "tiny"])
    assert apply_prompt_parameters(_apply_from_image(opts)).steps == 30


def test_existing_files_are_not_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "o"

    def run(seed, *extra):
        return main(["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--seed", str(seed),
                     "--out", str(out), "--no-progress", *extra])

    assert run(1) == 0
    first = (out / "00000-1.png").read_bytes()
    assert run(9) == 0
    assert (out / "00000-1.png").read_bytes() == first
    assert (out / "00001-9.png").is_file()
    assert run(9, "--overwrite") == 0
    assert (out / "00000-9.png").is_file()


def test_overwrite_replaces_the_numbered_files_egaku_wrote_and_nothing_else(tiny_model_dir, tmp_path):
    out = tmp_path / "o"

    def run(seed, *extra):
        return main(["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--seed", str(seed),
                     "--out", str(out), "--no-progress", *extra])

    assert run(1, "-n", "2") == 0
    assert run(5) == 0
    users = ["notes.txt", "00000-mine.txt", "1234-x.png", "cat.png"]
    for name in users:
        (out / name).write_text("the user's")
    (out / "00009-folder.png").mkdir()  # not a file egaku wrote
    # A1111's images are named NNNNN-SEED.png too: one without egaku's chunk (A1111's parameters only) stays
    from PIL import Image, PngImagePlugin

    a1111 = PngImagePlugin.PngInfo()
    a1111.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 64x64")
    Image.new("RGB", (8, 8)).save(out / "00012-12.png", pnginfo=a1111)
    Image.new("RGB", (8, 8)).save(out / "00013-photo.png")
    users += ["00012-12.png", "00013-photo.png"]
    assert run(9, "--overwrite") == 0  # numbered after what stays, so that nothing kept is written over
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["00014-9.png", "00014-options.json", "00009-folder.png", *users])
    assert egaku.read_params(out / "00014-9.png")["seed"] == 9


def test_prompt_file(tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert main(["generate", "--prompt-file", str(tmp_path / "p.txt"), "--model", str(tiny_model_dir), "--steps", "2",
                 "--seed", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    prompts = [egaku.read_params(p)["prompt"] for p in sorted((tmp_path / "o").glob("*.png"))]
    assert prompts == ["a cat", "a dog"]
    # each line's --parameters apply to that line
    (tmp_path / "q.txt").write_text("a cat --ar 2:1 --seed 5 --no dog\na bird\n")
    assert main(["generate", "--prompt-file", str(tmp_path / "q.txt"), "--model", str(tiny_model_dir), "--steps", "2",
                 "--out", str(tmp_path / "q"), "--no-progress"]) == 0
    first, second = (egaku.read_params(p) for p in sorted((tmp_path / "q").glob("*.png")))
    assert (first["prompt"], first["seed"], first["negative_prompt"]) == ("a cat", 5, "dog")
    assert first["width"] > 1.5 * first["height"]  # 2:1 on the model's pixel grid
    assert (second["prompt"], second["negative_prompt"], second["width"]) == ("a bird", "", 64)


def test_prompt_and_prompt_file_together_and_a_parameter_given_twice_are_errors(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    assert main(["generate", "also this", "--prompt-file", str(tmp_path / "p.txt"), "--model", "tiny"]) == 2
    assert "a prompt and --prompt-file are both given" in capsys.readouterr().err
    # a flag given at its default value is still given: the prompt may not set it again
    assert main(["generate", "a cat --steps 3", "--steps", "20", "--model", "tiny"]) == 2
    assert "the number of steps is given twice" in capsys.readouterr().err


def test_single_file_checkpoint_generates_the_same_image(pipe, tiny_model_dir, tmp_path):
    path = save_single_file(pipe, tmp_path / "tiny.safetensors")
    keys = __import__("safetensors").safe_open(str(path), "pt").keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    single = egaku.load_pipeline(str(path), model_config=str(tiny_model_dir), device="cpu")
    assert single.egaku_info.kind == "single-file"
    a = px(egaku.generate(pipe, "a red cat", seed=5, **FAST)[0])
    b = px(egaku.generate(single, "a red cat", seed=5, **FAST)[0])
    assert np.array_equal(a, b)


def test_a_folder_of_fp16_variant_weights_only_loads_as_its_variant(tiny_model_dir, tmp_path):
    """A hub download limited to *.fp16.safetensors: diffusers reads it only with variant="fp16"."""
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "variant")
    renamed = 0
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
        renamed += 1
    assert renamed >= 3  # unet, vae, text encoder
    variant = egaku.load_pipeline(str(folder), device="cpu", dtype="float32")
    plain = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    for part in ("unet", "vae", "text_encoder"):  # the same weights, every one of them
        a, b = getattr(plain, part).state_dict(), getattr(variant, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert egaku.generate(variant, "a red cat", seed=5, **FAST)[0].image.size == (64, 64)


def test_single_file_export_refuses_a_unet_the_original_layout_cannot_hold(tiny_model_dir, tmp_path):
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu")
    pipe.unet.register_to_config(addition_embed_type="text")  # as a --unet-pooled-text model has
    with pytest.raises(EgakuError, match="addition_embed_type='text'.*write a diffusers folder instead"):
        save_single_file(pipe, tmp_path / "pooled.safetensors")
    assert not (tmp_path / "pooled.safetensors").exists()


def test_convert_command_writes_both_layouts(tiny_model_dir, tmp_path, capsys, assert_plain_mode):
    assert main(["convert", str(tiny_model_dir), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), "--model-config", str(tiny_model_dir),
                 "--out", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "model_index.json").is_file()
    assert "Writing model shards" not in capsys.readouterr().err
    assert_plain_mode(tmp_path / "m.safetensors", *(tmp_path / "folder").rglob("*.safetensors"))
    assert main(["convert", str(tiny_model_dir), "--out", str(tmp_path / "m.safetensors")]) == 2  # exists


def test_pickles_are_refused_unless_allowed_then_loaded_weights_only(pipe, tiny_model_dir, tmp_path, capsys):
    from egaku.models.single_file import pipeline_to_original

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_original(pipe)}, ckpt)
    assert main(["generate", "a cat", "--model", str(ckpt), "--model-config", str(tiny_model_dir),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    loaded = egaku.load_pipeline(str(ckpt), model_config=str(tiny_model_dir), allow_pickle=True, device="cpu")
    assert np.array_equal(px(egaku.generate(pipe, "a cat", seed=1, **FAST)[0]),
                          px(egaku.generate(loaded, "a cat", seed=1, **FAST)[0]))
    # a pickle that would run code on load is rejected by weights_only, with a message
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    assert main(["generate", "a cat", "--model", str(tmp_path / "evil.ckpt"), "--allow-pickle", "--model-config",
                 str(tiny_model_dir), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out and "tensors-only" in captured.err


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch, capsys):
    """A machine without a network: every connection fails at once. The hub id is an error after a connection
    attempt or two, not after download retries."""
    import socket

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: unreachable(address))
    monkeypatch.setattr(time, "sleep", lambda seconds: attempts.append(("sleep", seconds)))  # a retry's back-off
    assert main(["generate", "a cat", "--model", "someone/some-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hub cannot be reached" in err and "--model DIR" in err
    assert not [a for a in attempts if a[0] == "sleep"] and len(attempts) <= 3


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nope"], "unknown sampler 'nope'; choose one of: dpmpp-2m, dpmpp-2m-karras, euler"),
    (["--width", "2"], "width 2 is outside what this model can take"),
    (["--width", "-64"], "width -64 is outside"),
    (["--height", "100000"], "height 100000 is outside"),
    (["--aspect-ratio", "wide"], "aspect ratio 'wide' is not W:H"),
    (["--ar", "1:100"], "aspect ratio 1:100 is too far from square for this model: at its native pixel count "
                        "(64x64) it gives 6x640, and a side must be 8..4096 pixels; give the size in pixels "
                        "(--width and --height; the API's size)"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["-n", "0"], "--num-images must be at least 1"),
    (["--seed", "4294967295", "-n", "2"], "2 images from --seed 4294967295 would use seeds 4294967295..4294967296"),
    (["--strength", "1.5", "--init-image", "x.png"], "--strength must be in (0, 1]"),
    (["--prompt-file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
])
def test_bad_input_gives_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, args, message):
    rc = main(["generate", "a cat", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--no-progress",
               *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_model_and_init_image(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "notimg.png").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "model").mkdir(parents=True)  # a train-ldm run folder: its pipeline is in model/
    (tmp_path / "run" / "model" / "model_index.json").write_text("{}")
    cases = [
        (["--model", str(tmp_path / "run")], f"is a train-ldm run; its pipeline is {tmp_path / 'run' / 'model'}"),
        (["--model", str(tmp_path / "nope")], "not found: no such file or folder"),
        (["--model", str(tmp_path / "empty")], "not a diffusers pipeline (no model_index.json)"),
        (["--model", str(tmp_path / "notimg.png")], "unknown model file type"),
        (["--model", str(tmp_path / "notimg.png"), "--model-config", str(tiny_model_dir)], "unknown model file type"),
        (["--model", str(tiny_model_dir), "--init-image", str(tmp_path / "notimg.png")], "not an image file"),
        (["--model", str(tiny_model_dir), "--init-image", str(tmp_path / "missing.png")], "file does not exist"),
        # a bad image is found before the model loads (this model does not exist)
        (["--model", str(tmp_path / "nope"), "--init-image", str(tmp_path / "notimg.png")], "--init-image"),
    ]
    for args, message in cases:
        rc = main(["generate", "a cat", "--out", str(tmp_path / "o"), "--steps", "2", "--no-progress", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)
    assert main(["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "no prompt given" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("generate", "train-lora", "train-ldm", "train-gan", "serve"):
        assert name in out


def test_options_json_is_the_resolved_config(tiny_model_dir, tmp_path):
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "00000-options.json").read_text())
    assert saved["steps"] == 2 and saved["seed"] == 1 and saved["sampler"] == "dpmpp-2m"


def test_inpainting_repaints_only_under_the_mask(pipe):
    init = Image.new("RGB", (64, 64), (250, 20, 20))
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))  # repaint the left half only
    everything = Image.new("L", (64, 64), 255)
    a = egaku.generate(pipe, "a cat", seed=1, init_image=init, mask_image=left, strength=1.0, steps=4)[0]
    b = egaku.generate(pipe, "a cat", seed=1, init_image=init, mask_image=everything, strength=1.0, steps=4)[0]
    assert a.image.size == (64, 64) and a.params["mask"] == "mask"
    # the kept right half is the init image's pixels; repainted everywhere, it is not
    assert np.array_equal(px(a)[:, 32:], np.asarray(init, np.int16)[:, 32:])
    assert not np.array_equal(px(b)[:, 32:], np.asarray(init, np.int16)[:, 32:])
    assert not np.array_equal(px(a)[:, :32], np.asarray(init, np.int16)[:, :32])
    with pytest.raises(egaku.EgakuError, match="must be the same size"):
        egaku.generate(pipe, "a cat", init_image=init, mask_image=Image.new("L", (32, 32)), **FAST)
    with pytest.raises(egaku.EgakuError, match="needs an image"):
        egaku.generate(pipe, "a cat", mask_image=left, **FAST)
    with pytest.raises(egaku.EgakuError, match="leave no denoising step"):
        egaku.generate(pipe, "a cat", init_image=init, strength=0.1, steps=2)


def test_the_python_api_repaints_a_mask_from_noise_unless_given_a_strength(pipe):
    """generate(mask_image=...) with no strength runs at 1, as `egaku generate --mask` and the server's edits do (one
    rule: edit_strength); a strength given, even img2img's default 0.6, is kept. (Was: 0.6, the img2img default.)"""
    from egaku.inference.generate import GenerateOptions
    from egaku.server.requests import Limits, parse_image_request

    init = Image.new("RGB", (64, 64), (250, 20, 20))
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))

    def inpaint(**kwargs):
        return egaku.generate(pipe, "a cat", seed=1, init_image=init, mask_image=left, **FAST, **kwargs)[0]

    default = inpaint()
    assert default.params["strength"] == 1.0 and np.array_equal(px(default), px(inpaint(strength=1.0)))
    assert inpaint(strength=0.5).params["strength"] == 0.5 and inpaint(strength=0.6).params["strength"] == 0.6
    # an options object: its strength where it differs from the default, or where it records it as given
    assert inpaint(opts=GenerateOptions(strength=0.5)).params["strength"] == 0.5
    assert inpaint(opts=GenerateOptions(given_options=["strength"])).params["strength"] == 0.6
    assert inpaint(opts=GenerateOptions()).params["strength"] == 1.0
    # without a mask, img2img keeps its default
    assert egaku.generate(pipe, "a cat", seed=1, init_image=init, **FAST)[0].params["strength"] == 0.6
    # the server's edit with a mask and no strength: the same
    edit = parse_image_request("edit", {"prompt": "a cat"}, pipe, Limits(), form=True, image=init, mask=left)
    assert edit.options["strength"] == default.params["strength"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder with one random (non-zero) UNet LoRA for the tiny pipeline, in diffusers' format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from egaku.models.tiny import tiny_pipeline

    unet = tiny_pipeline().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    root = tmp_path_factory.mktemp("loras")
    StableDiffusionPipeline.save_lora_weights(
        root / "style", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return root


def test_inpainting_works_on_the_built_in_model_whose_latents_have_8_channels():
    """diffusers' inpaint pipeline takes UNets of 4 or 9 input channels only; egaku blends the latents itself."""
    from egaku.models.loading import load_pipeline

    builtin = load_pipeline("builtin", "cpu", "float32")
    assert builtin.unet.config.in_channels not in (4, 9)
    init = Image.new("RGB", (64, 64), (20, 20, 110))
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    kwargs = dict(seed=3, init_image=init, strength=1.0, steps=6)
    a = egaku.generate(builtin, "a large yellow square in the center on a white background", mask_image=left,
                       **kwargs)[0]
    b = egaku.generate(builtin, "a large yellow square in the center on a white background",
                       mask_image=Image.new("L", (64, 64), 255), **kwargs)[0]
    # outside the mask the input's own pixels; inside, a new image (a square on white, not navy)
    assert np.array_equal(px(a)[:, 32:], np.asarray(init, np.int16)[:, 32:])
    assert np.abs(px(a)[:, :32] - np.asarray(init, np.int16)[:, :32]).mean() > 40
    assert np.abs(px(b) - np.asarray(init, np.int16)).mean() > 40


def test_lora_flag_and_prompt_tag_apply_the_same_lora_and_are_removed_after(tiny_model_dir, lora_dir, tmp_path):
    def run(name, *args):
        out = tmp_path / name
        assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "3",
                     "--out", str(out), "--no-progress", *args]) == 0
        return out / "00000-3.png"

    base = run("base")
    by_path = run("path", "--lora", f"{lora_dir / 'style'}:1.0")
    assert main(["generate", "a cat <lora:style:1.0>", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "3",
                 "--lora-dir", str(lora_dir), "--out", str(tmp_path / "tag2"), "--no-progress"]) == 0
    by_tag = tmp_path / "tag2" / "00000-3.png"

    def load(p):
        return np.asarray(Image.open(p), dtype=np.int16)

    assert np.abs(load(base) - load(by_path)).mean() > 1.0  # the LoRA changes the image
    assert np.abs(load(by_path) - load(by_tag)).max() <= 1  # flag and tag are the same LoRA
    assert egaku.read_params(by_path)["loras"] == [["style", 1.0]]
    # a bare name given to --lora is looked up in --lora-dir
    assert np.abs(load(run("bare", "--lora", "style:1.0", "--lora-dir", str(lora_dir))) - load(by_path)).max() <= 1


def test_options_json_names_files_absolute_so_its_config_repeats_the_run_from_anywhere(tiny_model_dir, lora_dir,
                                                                                       tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "model")
    shutil.copytree(lora_dir / "style", work / "style")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(work / "init.png")
    monkeypatch.chdir(work)
    assert main(["generate", "a cat", "--model", "model", "--steps", "4", "--seed", "3", "--init-image", "init.png",
                 "--lora", "style:0.8", "--out", "first", "--no-progress"]) == 0
    saved = json.loads((work / "first" / "00000-options.json").read_text())
    assert saved["model"] == str(work / "model") and saved["init_image"] == str(work / "init.png")
    assert saved["lora"] == [f"{work / 'style'}:0.8"]
    monkeypatch.chdir(tmp_path)  # elsewhere, where none of the relative names exist
    assert main(["generate", "--config", str(work / "first" / "00000-options.json"), "--out", "again",
                 "--no-progress"]) == 0
    first = np.asarray(Image.open(work / "first" / "00000-3.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "00000-3.png")), first)
    # a name looked up in --lora-dir stays a name, its folder absolute
    monkeypatch.chdir(work)
    assert main(["generate", "a cat", "--model", "model", "--steps", "2", "--seed", "3", "--lora", "style:0.8",
                 "--lora-dir", ".", "--out", "by-name", "--no-progress"]) == 0
    saved = json.loads((work / "by-name" / "00000-options.json").read_text())
    assert saved["lora"] == ["style:0.8"] and saved["lora_dir"] == str(work)
    # a drawn seed is recorded, so the config repeats the images; a LoRA's scale keeps every digit
    assert main(["generate", "a cat", "--model", "model", "--steps", "2", "-n", "2", "--lora", "style:0.33333333",
                 "--out", "drawn", "--no-progress"]) == 0
    saved = json.loads((work / "drawn" / "00000-options.json").read_text())
    assert saved["lora"] == [f"{work / 'style'}:0.33333333"]
    drawn = sorted((work / "drawn").glob("0000[01]-*.png"))
    assert saved["seed"] == int(drawn[0].stem.split("-")[1])
    assert main(["generate", "--config", str(work / "drawn" / "00000-options.json"), "--out", "redrawn",
                 "--no-progress"]) == 0
    for first, again in zip(drawn, sorted((work / "redrawn").glob("0000[01]-*.png"))):
        assert first.name == again.name
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_lora_is_removed_after_the_call_and_scale_matters(pipe, lora_dir):
    base = px(egaku.generate(pipe, "a cat", seed=1, **FAST)[0])
    full = px(egaku.generate(pipe, "a cat", seed=1, lora=[f"{lora_dir / 'style'}:1.0"], **FAST)[0])
    half = px(egaku.generate(pipe, "a cat", seed=1, lora=[f"{lora_dir / 'style'}:0.5"], **FAST)[0])
    after = px(egaku.generate(pipe, "a cat", seed=1, **FAST)[0])
    assert np.array_equal(base, after)
    assert np.abs(base - half).mean() < np.abs(base - full).mean()
    with pytest.raises(egaku.EgakuError, match="not found"):
        egaku.generate(pipe, "a cat <lora:nope:1>", lora_dir=str(lora_dir), **FAST)
    # A1111's <lyco:...> alias is the same tag (was: left in the prompt as words, and no LoRA applied)
    by_lyco = egaku.generate(pipe, "a cat <lyco:style:1.0>", seed=1, lora_dir=str(lora_dir), **FAST)[0]
    by_lora = egaku.generate(pipe, "a cat <lora:style:1.0>", seed=1, lora_dir=str(lora_dir), **FAST)[0]
    assert np.array_equal(px(by_lyco), px(by_lora)) and np.array_equal(px(by_lyco), full)
    assert by_lyco.params["loras"] == [("style", 1.0)]
    # a file that fails to load after another loaded leaves neither behind, nor do embeddings that do not load
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8), "lora_unet_nowhere.lora_up.weight":
               torch.zeros(8, 4)}, lora_dir / "nowhere.safetensors")
    try:
        with pytest.raises(egaku.EgakuError, match="match"):
            egaku.generate(pipe, "a cat", seed=1, lora=[str(lora_dir / "style"), str(lora_dir / "nowhere.safetensors")],
                           **FAST)
        with pytest.raises(egaku.EgakuError, match="is not a folder"):
            egaku.generate(pipe, "a cat", seed=1, lora=[str(lora_dir / "style")], embedding_dir=str(lora_dir / "x"),
                           **FAST)
    finally:
        (lora_dir / "nowhere.safetensors").unlink()
    assert np.array_equal(base, px(egaku.generate(pipe, "a cat", seed=1, **FAST)[0]))


def test_a_tag_with_two_weights_gives_the_unet_the_second_and_is_recorded_as_a1111_records_it(pipe, lora_dir,
                                                                                                 tmp_path):
    """<lora:style:0.3:0.5> is A1111's text-encoder weight 0.3 and UNet weight 0.5: the fixture's LoRA adapts the
    UNet only, so it draws as <lora:style:0.5>. The A1111 text keeps the tag as written, with the usual Lora hashes;
    egaku's JSON has both weights. (Was: "weight '0.3:0.5' is not a number".)"""
    from egaku.inference.metadata import read_text_chunks

    def draw(prompt):
        return egaku.generate(pipe, prompt, seed=1, lora_dir=str(lora_dir), **FAST)[0]

    split, half = draw("a cat <lora:style:0.3:0.5>"), draw("a cat <lora:style:0.5>")
    assert np.array_equal(px(split), px(half))
    assert np.array_equal(px(draw("a cat <lyco:style:te=1:unet=0>")), px(draw("a cat")))  # UNet weight 0: no LoRA
    both = {"text_encoder": 0.3, "unet": 0.5}
    assert split.params["loras"] == [("style", both)] and half.params["loras"] == [("style", 0.5)]
    assert [(f["name"], f["weight"], f["from"]) for f in split.params["lora_files"]] == [("style", both, "prompt")]
    egaku.save_png(split.image, tmp_path / "split.png", split.params)
    text = read_text_chunks(tmp_path / "split.png")["parameters"]
    assert text.startswith("a cat <lora:style:0.3:0.5>\n")
    short_hash = addnet_short_hash(lora_dir / "style" / "pytorch_lora_weights.safetensors")
    assert a1111_reads(text)["Lora hashes"] == f"style: {short_hash}"
    assert egaku.read_params(tmp_path / "split.png")["loras"] == [["style", both]]


def test_a_tag_without_a_name_is_refused_by_generate_as_by_the_server(pipe, tiny_model_dir, tmp_path, capsys):
    """(Was: <lora::1> and <lora:> stayed in the prompt as words, without a message; only the server refused them.)"""
    for prompt, kind in (("a cat <lora::1>", "lora"), ("<lyco:>, a cat", "lyco")):
        with pytest.raises(EgakuError, match=f"the prompt has a <{kind}:...> tag without a name; "
                                             f"write <{kind}:NAME:WEIGHT>") as err:
            egaku.generate(pipe, prompt, **FAST)
        assert err.value.param == "prompt"
    capsys.readouterr()
    rc = main(["generate", "a cat <lora::0.5>", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "the prompt has a <lora:...> tag without a name; write <lora:NAME:WEIGHT>" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_negative_prompt_note_is_about_tags_as_the_prompt_matches_them(pipe, capsys):
    """The prompt's tags are matched in lower case, as A1111 matches them; the note on tags in the negative prompt
    is given for those only. (Was: for <LORA:x> too, which is words in either prompt.)"""
    capsys.readouterr()
    egaku.generate(pipe, "a cat", negative_prompt="<LORA:glow:1>, <Lyco:ink> ugly", **FAST)
    assert "tags are applied from the prompt only" not in capsys.readouterr().out
    egaku.generate(pipe, "a cat", negative_prompt="ugly <lyco:glow:1>", **FAST)
    assert "tags are applied from the prompt only" in capsys.readouterr().out


def test_transformers_torchvision_fallback_notice_is_silenced_and_other_messages_are_not():
    """Importing diffusers' pipelines makes transformers announce its PIL image processors; egaku hides that one
    notice (torchvision cannot be installed beside the pinned CPU torch) and nothing else. The child processes
    run without TRANSFORMERS_VERBOSITY, which would hide both."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}

    script = ("import {first}, logging\n"
              "from diffusers import StableDiffusionPipeline\n"
              "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
              "logging.getLogger('transformers.utils.import_utils').warning('another message')\n")
    runs = {first: subprocess.run([sys.executable, "-c", script.format(first=first)], capture_output=True,
                                  text=True, timeout=120, env=env) for first in ("egaku", "os")}
    assert all(run.returncode == 0 for run in runs.values()), {k: r.stderr[-500:] for k, r in runs.items()}
    assert "requires torchvision (not installed)" in runs["os"].stderr  # what it hides is really there
    assert "requires torchvision (not installed)" not in runs["egaku"].stderr
    assert "another message" in runs["egaku"].stderr


def test_clip_skip_reads_an_earlier_text_layer_as_diffusers_does_and_is_recorded(pipe, tiny_model_dir, tmp_path):
    """--clip-skip 2 (A1111's and kohya's count) is diffusers' clip_skip=1: the layer before the last, through
    the final layer norm; it changes the image, is written into the PNG as A1111 writes it, and --from keeps it."""
    from egaku.models.text import encode_tokens, final_layer_norm

    ids = pipe.tokenizer(["a red cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    te = pipe.text_encoder
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        skipped, last = encode_tokens(te, ids, 2), encode_tokens(te, ids, 1)
        # the model's own output is its last hidden state through final_layer_norm; clip skip 2 reads the
        # hidden state before it the same way (diffusers' encode_prompt with clip_skip=1)
        assert torch.allclose(final_layer_norm(te)(hidden[-1]), last, atol=1e-6)
        assert torch.allclose(final_layer_norm(te)(hidden[-2]), skipped, atol=1e-6)
    assert not torch.allclose(skipped, last, atol=1e-3)
    a = egaku.generate(pipe, "a red cat", seed=3, **FAST)[0]
    b = egaku.generate(pipe, "a red cat", seed=3, clip_skip=2, **FAST)[0]
    assert np.abs(px(a) - px(b)).mean() > 0.5 and b.params["clip_skip"] == 2
    with pytest.raises(EgakuError, match="has 2 layers; give 1 to 2"):
        egaku.generate(pipe, "a red cat", clip_skip=3, **FAST)
    out = tmp_path / "skip"
    assert main(["generate", "a red cat", "--model", str(tiny_model_dir), "--clip-skip", "2", "--steps", "2",
                 "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    first = sorted(out.glob("*.png"))[0]
    assert "Clip skip: 2" in Image.open(first).text["parameters"]
    assert "Clip skip" not in a1111_text(a.params)  # A1111 leaves the default out
    again = tmp_path / "again"
    assert main(["generate", "--from", str(first), "--model", str(tiny_model_dir), "--out", str(again),
                 "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(sorted(again.glob("*.png"))[0])), np.asarray(Image.open(first)))
    from egaku.inference.metadata import parse_a1111

    assert parse_a1111("x\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 8x8, Clip skip: 2")["clip_skip"] == 2


def a1111_text(params):
    from egaku.inference.metadata import a1111_parameters

    return a1111_parameters(params)


# A1111's infotext parser (modules/infotext_utils.py): the settings line is split into "Key: value" pairs, a value
# being a double-quoted JSON string or anything up to the next comma. The tests read egaku's text with it.
A1111_PAIR = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'


def a1111_reads(text):
    import re

    pairs = re.findall(A1111_PAIR, text.split("\n")[-1])
    return {k: (json.loads(v) if v[:1] == '"' == v[-1:] else v) for k, v in pairs}


def addnet_short_hash(path):
    """A1111's LoRA short hash, computed here independently: sha256 of the bytes after the safetensors header."""
    import hashlib

    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def copy_lora(lora_dir, path):
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(lora_dir / "style" / "pytorch_lora_weights.safetensors", path)
    return path


def test_lora_hashes_are_written_as_a1111_writes_them_and_read_back(lora_dir, tmp_path, monkeypatch):
    from egaku.inference import metadata
    from egaku.inference.metadata import a1111_parameters, lora_short_hash, parse_a1111

    first = copy_lora(lora_dir, tmp_path / "out1.safetensors")
    second = copy_lora(lora_dir, tmp_path / "out 2 ü.safetensors")
    hashed = []
    real = metadata._addnet_hash
    monkeypatch.setattr(metadata, "_addnet_hash", lambda p: hashed.append(p) or real(p))
    h = lora_short_hash(first)
    assert h == addnet_short_hash(first) and len(h) == 12
    assert lora_short_hash(first) == h and lora_short_hash(second) == h and len(hashed) == 2  # once per file
    params = {"prompt": "a cat,\nsitting", "negative_prompt": "blur, dog", "steps": 2, "sampler_label": "DPM++ 2M",
              "guidance_scale": 7.5, "seed": 4, "width": 32, "height": 32, "model_hash": "0123456789",
              "model_name": "my, model: v2", "clip_skip": 2, "egaku_version": "1.0",
              "loras": [["out1", 0.7], ["out 2 ü", 0.5]],
              "lora_files": [{"name": "out1", "path": str(first), "weight": 0.7, "hash": h, "from": "option"},
                             {"name": "out 2 ü", "path": str(second), "weight": 0.5, "hash": h, "from": "option"}]}
    text = a1111_parameters(params)
    assert f'Lora hashes: "out1: {h}, out 2 ü: {h}"' in text
    # the weights are in the prompt's tags, where A1111 writes (and civitai reads) them
    assert text.startswith("a cat,\nsitting <lora:out1:0.7> <lora:out 2 ü:0.5>\n")
    assert 'Model: "my, model: v2"' in text
    # A1111 reads every pair back whole: no weight taken for a hash, no LoRA name taken for a key
    read = a1111_reads(text)
    assert read["Lora hashes"] == f"out1: {h}, out 2 ü: {h}" and read["Model"] == "my, model: v2"
    assert set(read) == {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Clip skip",
                         "Lora hashes", "Version"}
    assert parse_a1111(text) == {"prompt": "a cat,\nsitting <lora:out1:0.7> <lora:out 2 ü:0.5>",
                                 "negative_prompt": "blur, dog", "steps": 2,
                                 "sampler": "DPM++ 2M", "guidance_scale": 7.5, "seed": 4, "width": 32, "height": 32,
                                 "model_hash": "0123456789", "model_name": "my, model: v2", "clip_skip": 2,
                                 "lora_hashes": [["out1", h], ["out 2 ü", h]]}
    # A1111 drops ':' and ',' from names in the list; a value it cannot read is skipped, as A1111 skips it
    odd = {**params, "lora_files": [{"name": "a:b,c", "hash": h}]}
    assert f'Lora hashes: "abc: {h}"' in a1111_parameters(odd)
    assert "steps" not in parse_a1111("x\nSteps: many, Sampler: Euler, Seed: 3")
    # a LoRA file that changes is hashed again
    second.write_bytes(second.read_bytes() + b"\0")
    assert lora_short_hash(second) != h and len(hashed) == 3


def test_from_reapplies_the_model_and_loras_it_was_made_with(lora_dir, tmp_path, monkeypatch, capsys):
    """--from uses the model and LoRA files recorded in the egaku chunk (flags override); a recorded file that is
    gone is a one-line error naming it; each LoRA file is hashed once per run."""
    from egaku.inference import metadata

    out1 = copy_lora(lora_dir, tmp_path / "out1" / "out1.safetensors")
    tags = tmp_path / "tags"
    ink = copy_lora(lora_dir, tags / "ink.safetensors")
    (tmp_path / "p.txt").write_text("a cat <lora:ink:0.5>\na dog\n")
    hashed = []
    real = metadata._addnet_hash
    monkeypatch.setattr(metadata, "_addnet_hash", lambda p: hashed.append(p.name) or real(p))
    small = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]

    def run(*args):
        return main(["generate", *args, *small])

    assert run("--prompt-file", str(tmp_path / "p.txt"), "--model", "tiny", "--seed", "4", "--lora", f"{out1}:0.7",
               "--lora-dir", str(tags), "--out", str(tmp_path / "o1")) == 0
    assert sorted(hashed) == ["ink.safetensors", "out1.safetensors"]  # two prompts, each file hashed once
    made = tmp_path / "o1" / "00000-4.png"
    params = egaku.read_params(made)
    assert params["model_source"] == "tiny" and params["lora_dir"] == str(tags)
    assert [(f["path"], f["weight"], f["from"]) for f in params["lora_files"]] == [
        (str(ink), 0.5, "prompt"), (str(out1), 0.7, "option")]
    capsys.readouterr()

    def pixels(path):
        return np.asarray(Image.open(path))

    assert run("--from", str(made), "--out", str(tmp_path / "o2")) == 0
    assert "note" not in capsys.readouterr().out
    again = tmp_path / "o2" / "00000-4.png"
    assert np.array_equal(pixels(again), pixels(made))
    assert egaku.read_params(again)["lora_files"] == params["lora_files"]
    # gone: a one-line error naming the file and the flag that overrides it
    out1.rename(tmp_path / "moved.safetensors")
    assert run("--from", str(made), "--out", str(tmp_path / "o3")) == 2
    err = capsys.readouterr().err
    assert f"was made with the LoRA {out1} (weight 0.7), which no longer exists; pass --lora" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    moved = f"{tmp_path / 'moved.safetensors'}:0.7"
    assert run("--from", str(made), "--lora", moved, "--out", str(tmp_path / "o4")) == 0
    assert np.array_equal(pixels(tmp_path / "o4" / "00000-4.png"), pixels(made))  # the same LoRA, moved
    ink.unlink()
    assert run("--from", str(made), "--lora", moved, "--out", str(tmp_path / "o5")) == 2
    err = capsys.readouterr().err
    assert f"the LoRA {ink} (its prompt's <lora:ink> tag)" in err and "--lora-dir" in err


def test_from_a_missing_model_is_an_error_and_model_overrides_it(tmp_path, capsys):
    from egaku.inference.metadata import save_png

    params = {"prompt": "a cat", "negative_prompt": "", "steps": 2, "sampler": "euler", "sampler_label": "Euler",
              "guidance_scale": 7.5, "seed": 1, "width": 32, "height": 32, "clip_skip": 1, "loras": [],
              "lora_files": [], "model_name": "gone", "model_source": str(tmp_path / "gone-model")}
    save_png(Image.new("RGB", (32, 32)), tmp_path / "a.png", params)
    argv = ["generate", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"was made with the model {tmp_path / 'gone-model'}, which no longer exists; pass --model" in err
    assert "Traceback" not in err
    assert main([*argv, "--model", "tiny"]) == 0
    assert egaku.read_params(tmp_path / "o" / "00000-1.png")["model_source"] == "tiny"


def test_a_png_with_a_broken_egaku_chunk_is_a_clear_error(tmp_path, capsys):
    from PIL import PngImagePlugin

    from egaku.inference.metadata import save_png

    for name, chunk, said in [("bad.png", "{not json", "not valid JSON"), ("list.png", "[1, 2]", "not a JSON object"),
                              ("typed.png", '{"prompt": 5, "steps": "many"}', "records a value egaku cannot use"),
                              ("loras.png", '{"prompt": "x", "lora_files": [{"from": "option", "weight": 1}]}',
                               "cannot read")]:
        info = PngImagePlugin.PngInfo()
        info.add_text("egaku", chunk)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
        for argv in (["info", str(tmp_path / name)], ["generate", "--from", str(tmp_path / name), "--model", "tiny",
                                                      "--steps", "2", "--out", str(tmp_path / "o")]):
            code = main(argv)
            err = capsys.readouterr().err
            if argv[0] == "info" and name in ("typed.png", "loras.png"):
                assert code == 0  # info shows what is there
                continue
            assert code == 2 and said in err and "Traceback" not in err, (name, argv[0], err)
    # a minimal parameter set still writes both chunks (the Python API's save_png)
    save_png(Image.new("RGB", (8, 8)), tmp_path / "min.png", {"prompt": "x"})
    assert Image.open(tmp_path / "min.png").text["parameters"].startswith("x\n")


def test_from_keeps_a_flag_given_at_its_default_value(tmp_path):
    """`--from IMG --model builtin --steps 20` means the built-in model at 20 steps even though both are the
    defaults: the CLI records which options it was given."""
    from egaku.cli import parse
    from egaku.inference.commands import _apply_from_image
    from egaku.inference.metadata import save_png

    params = {"prompt": "a cat", "negative_prompt": "", "steps": 2, "sampler": "euler", "sampler_label": "Euler",
              "guidance_scale": 7.5, "seed": 1, "width": 32, "height": 32, "clip_skip": 1, "loras": [],
              "lora_files": [], "model_name": "tiny", "model_source": "tiny"}
    save_png(Image.new("RGB", (32, 32)), tmp_path / "a.png", params)
    _, opts = parse(["generate", "--from", str(tmp_path / "a.png"), "--model", "builtin", "--steps", "20"])
    applied = _apply_from_image(opts)
    assert (applied.model, applied.steps, applied.sampler, applied.seed) == ("builtin", 20, "euler", 1)
    _, opts = parse(["generate", "--from", str(tmp_path / "a.png")])
    assert (_apply_from_image(opts).model, _apply_from_image(opts).steps) == ("tiny", 2)


def test_from_an_a1111_image_says_its_model_and_loras_are_not_reapplied(tmp_path, capsys):
    from PIL import PngImagePlugin

    from egaku.inference.commands import _apply_from_image
    from egaku.inference.generate import GenerateOptions

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", 'a house\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 32x32, '
                                'Model hash: 0123456789, Model: sd15, Lora hashes: "ink: 0123456789ab"')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    opts = _apply_from_image(GenerateOptions(from_image=str(tmp_path / "a.png")))
    assert (opts.model, opts.lora, opts.prompt, opts.seed) == ("builtin", [], "a house", 1)
    out = capsys.readouterr().out
    assert "does not record its model and LoRA files" in out
    assert "its model (sd15, 0123456789) is not reapplied (this run uses builtin; pass --model" in out
    assert "its LoRAs (ink) are not reapplied" in out
    _apply_from_image(GenerateOptions(from_image=str(tmp_path / "a.png"), model="tiny", lora=["x.safetensors"]))
    assert "note" not in capsys.readouterr().out  # both chosen on the command line: nothing to say


def test_convert_through_a_single_file_keeps_the_models_default_guidance(tiny_model_dir, tmp_path):
    """Folder -> .safetensors -> folder keeps egaku_defaults.json: recorded in the file's metadata, and, for a
    file without it, taken from the --model-config folder the configs come from."""
    import shutil

    from egaku.models.loading import load_pipeline, recommended_guidance

    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    (source / "egaku_defaults.json").write_text('{"guidance_scale": 3.0}')
    assert main(["convert", str(source), "--out", str(tmp_path / "m.safetensors")]) == 0
    config = tmp_path / "configs-only"  # the same configs, without the defaults: the file's own metadata counts
    shutil.copytree(tiny_model_dir, config)
    assert main(["convert", str(tmp_path / "m.safetensors"), "--model-config", str(config),
                 "--out", str(tmp_path / "back")]) == 0
    assert recommended_guidance(load_pipeline(str(tmp_path / "back"), "cpu", "float32")) == 3.0
    # generate reads the file's own metadata too
    single = load_pipeline(str(tmp_path / "m.safetensors"), "cpu", "float32", model_config=str(config))
    assert recommended_guidance(single) == 3.0
    # a single file written elsewhere (no metadata of ours): the --model-config folder's defaults
    pipe = load_pipeline(str(tiny_model_dir), "cpu", "float32")
    save_single_file(pipe, tmp_path / "plain.safetensors")
    assert main(["convert", str(tmp_path / "plain.safetensors"), "--model-config", str(source),
                 "--out", str(tmp_path / "from-config")]) == 0
    assert recommended_guidance(load_pipeline(str(tmp_path / "from-config"), "cpu", "float32")) == 3.0


def test_the_cli_inpaints_with_a_mask_file_white_or_transparent(tiny_model_dir, tmp_path, capsys):
    init = Image.new("RGB", (64, 64), (250, 20, 20))
    init.save(tmp_path / "init.png")
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    white_left.save(tmp_path / "white.png")
    clear_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    clear_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    clear_left.save(tmp_path / "clear.png")
    for name in ("white", "clear"):
        out = tmp_path / name / "o"
        assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--init-image", str(tmp_path / "init.png"),
                     "--mask", str(tmp_path / f"{name}.png"), "--strength", "1", "--steps", "2", "--seed", "1",
                     "--out", str(out), "--no-progress"]) == 0
        made = next(out.glob("*-1.png"))
        pixels = np.asarray(Image.open(made), np.int16)
        assert np.array_equal(pixels[:, 32:], np.asarray(init, np.int16)[:, 32:])  # kept
        assert not np.array_equal(pixels[:, :32], np.asarray(init, np.int16)[:, :32])  # repainted
        assert egaku.read_params(made)["mask"] == str(tmp_path / f"{name}.png")
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "white.png"), "--steps", "2", "--seed", "1", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    assert egaku.read_params(next((tmp_path / "d").glob("*-1.png")))["strength"] == 1.0  # without --strength
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--mask", str(tmp_path / "white.png"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "a mask needs an image to repaint" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x")]) == 2
    assert "--mask" in capsys.readouterr().err


def test_a_single_file_without_model_config_asks_for_its_configs(pipe, tmp_path, monkeypatch):
    """(not "unknown model file type": the file type is known, only its configs are missing offline)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    with pytest.raises(egaku.EgakuError, match="needs the configs of its architecture; pass --model-config"):
        egaku.load_pipeline(str(path), device="cpu")


def test_an_error_during_generation_starts_its_own_line_after_the_progress_bar(tiny_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    import egaku.inference.commands as commands

    def fails_after_a_step(pipe, opts, on_step):
        on_step(1, 4)
        raise EgakuError("the sampler gave up")

    monkeypatch.setattr(commands, "generate", fails_after_a_step)
    rc = main(["generate", "a cat", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "generating" in err  # the bar was drawn
    line = err[err.rindex("egaku: error"):]
    assert line == "egaku: error: the sampler gave up\n"
    assert err[err.rindex("egaku: error") - 1] in "\r\n"  # the bar was cleared, not continued


def test_generate_writes_plain_progress_lines_when_stderr_is_a_log(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    assert main(["generate", "--prompt-file", str(prompts), "--model", str(tiny_model_dir), "--steps", "2",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # no carriage-return redraws piling up in a log
    assert err.splitlines()[-1].startswith("generating: 4/4 steps (100%)")  # one bar over both prompts


def test_a_model_name_of_egakus_is_refused_where_a_folder_of_that_name_is_here(tmp_path, monkeypatch):
    from egaku.models.loading import load_pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # the user's own folder: --model tiny would load egaku's test model instead
    with pytest.raises(EgakuError, match=r"--model tiny names egaku's tiny test model, and ./tiny is here too: write "
                                         r"--model ./tiny for that folder"):
        load_pipeline("tiny")
    (tmp_path / "builtin").write_text("")
    with pytest.raises(EgakuError, match=r"--model ./builtin for that file"):
        load_pipeline("builtin")


def test_extra_network_tags_egaku_does_not_apply_are_taken_out_of_the_prompt_as_a1111_does(pipe, capsys):
    from egaku.lora.apply import take_out_other_network_tags

    assert take_out_other_network_tags("a cat <hypernet:anime:0.8>, <lora:x:1> sitting") == (
        "a cat, <lora:x:1> sitting", ["<hypernet:anime:0.8>"])
    assert take_out_other_network_tags("a cat (sitting:1.2)") == ("a cat (sitting:1.2)", [])
    tagged = egaku.generate(pipe, "a cat <hypernet:anime:0.8>", seed=3, **FAST)[0]
    assert "<hypernet:anime:0.8>: egaku applies <lora:...> and <lyco:...> tags only" in capsys.readouterr().out
    plain = egaku.generate(pipe, "a cat", seed=3, **FAST)[0]
    assert np.array_equal(np.asarray(tagged.image), np.asarray(plain.image))
    assert tagged.params["prompt"] == "a cat <hypernet:anime:0.8>"  # recorded as written, as A1111 records it
