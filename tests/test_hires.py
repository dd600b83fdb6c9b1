"""A1111's hires fix: a text-to-image pass, a Lanczos upscale and an img2img pass from the same seeds."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import egaku
from egaku.cli import main
from egaku.errors import EgakuError
from egaku.inference.metadata import a1111_parameters, parse_a1111

HIRES = dict(steps=2, hires_scale=2, hires_steps=4, hires_strength=0.5, seed=7)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")


def test_the_hires_fix_upscales_and_redraws_from_the_same_seeds(pipe):
    [first] = egaku.generate(pipe, "a red circle", steps=2, seed=7)
    [hires] = egaku.generate(pipe, "a red circle", **HIRES)
    assert first.image.size == (64, 64) and hires.image.size == (128, 128)
    resized = np.asarray(first.image.resize((128, 128), Image.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(hires.image, dtype=np.int16) - resized).mean() > 1  # redrawn, not only resized
    again = egaku.generate(pipe, "a red circle", num_images=2, batch_size=2, **HIRES)
    assert np.abs(np.asarray(again[0].image, dtype=np.int16) - np.asarray(hires.image, dtype=np.int16)).max() <= 1
    # recorded as A1111 records it: the first pass's size, the hires settings beside it
    params = hires.params
    assert (params["width"], params["height"]) == (64, 64)
    assert (params["hires_scale"], params["hires_steps"], params["hires_strength"]) == (2, 4, 0.5)
    # weights and long prompts reach the hires pass too
    egaku.generate(pipe, "a (red:1.5) circle, " + "on a plain ground, " * 20, **HIRES)
    # a scale that is not a whole number rounds to the model's multiple
    assert egaku.generate(pipe, "a cat", **{**HIRES, "hires_scale": 1.3})[0].image.size == (80, 80)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hires_scale=5), "--hires-scale must be in 1..4"),
    (dict(hires_scale=2, hires_strength=0), "--hires-strength must be in"),
    (dict(hires_scale=2, hires_steps=1, hires_strength=0.5), "give --hires-steps 2 or more"),
    (dict(hires_scale=2, hires_steps=2, hires_strength=0.3), "give --hires-steps 4 or more"),
    (dict(hires_scale=2, init_image=Image.new("RGB", (64, 64))), "for text-to-image"),
])
def test_bad_hires_options_are_refused(pipe, kwargs, message):
    with pytest.raises(EgakuError, match=message):
        egaku.generate(pipe, "a cat", steps=2, **kwargs)


def test_the_fewest_steps_named_are_the_fewest_that_run_one():
    from egaku.inference.generate import min_steps_at

    for strength in [i / 100 for i in range(1, 101)] + [1 / 3, 0.7, 0.55, 1e-3]:
        steps = min_steps_at(strength)
        assert int(steps * strength) >= 1 and int((steps - 1) * strength) < 1, strength


def test_a1111_hires_text_is_written_and_read_back():
    params = {"prompt": "a cat", "steps": 20, "sampler": "euler", "guidance_scale": 7.0, "seed": 1, "width": 512,
              "height": 768, "hires_scale": 2.0, "hires_steps": 10, "hires_strength": 0.45, "hires_upscaler": "Lanczos"}
    text = a1111_parameters(params)
    assert "Size: 512x768" in text and "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, " \
                                     "Hires upscaler: Lanczos" in text
    back = parse_a1111(text)
    assert (back["hires_scale"], back["hires_steps"], back["hires_strength"]) == (2.0, 10, 0.45)
    assert "strength" not in back  # in A1111's text-to-image, the denoising strength is the hires pass's
    # a hires fix to a size, as A1111 writes it when one is set instead of a scale
    sized = parse_a1111("a dog\nSteps: 20, Seed: 3, Size: 512x512, Denoising strength: 0.7, Hires resize: 1024x1024, "
                        "Hires upscaler: Latent")
    assert (sized["hires_scale"], sized["hires_strength"], sized["hires_upscaler"]) == (2.0, 0.7, "Latent")
    # an img2img image keeps its strength
    assert parse_a1111("a dog\nSteps: 20, Seed: 3, Size: 512x512, Denoising strength: 0.3")["strength"] == 0.3


def test_from_makes_a_hires_image_again_and_names_an_upscaler_egaku_lacks(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "3",
                 "--hires-scale", "2", "--hires-steps", "4", "--out", str(out), "--no-progress"]) == 0
    made = next(out.glob("*.png"))
    assert Image.open(made).size == (128, 128)
    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(next(again.glob("*.png")))))
    # an A1111 image with its latent upscaler: made with Lanczos, and said so
    png = Image.open(made)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.loads(png.text["egaku"])["prompt"] + "\nSteps: 2, Sampler: Euler, CFG scale: 3, "
                  "Seed: 3, Size: 64x64, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 4, "
                  "Hires upscaler: Latent")
    png.save(tmp_path / "a1111.png", pnginfo=info)
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "a1111.png"), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "from-a1111"), "--no-progress"]) == 0
    assert "\"Latent\" upscaler" in capsys.readouterr().out
    assert Image.open(next((tmp_path / "from-a1111").glob("*.png"))).size == (128, 128)


def test_hires_notes_a_scale_that_rounds_back_and_an_a1111_resize_it_cannot_crop(pipe, tiny_model_dir, tmp_path,
                                                                                 capsys):
    assert egaku.generate(pipe, "a cat", **{**HIRES, "hires_scale": 1.05})[0].image.size == (64, 64)
    assert "rounds back to 64x64" in capsys.readouterr().out
    png = tmp_path / "resize.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a dog\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 3, Size: 64x96, "
                                "Denoising strength: 0.5, Hires resize: 128x128, Hires steps: 4, "
                                "Hires upscaler: Lanczos")
    Image.new("RGB", (128, 128)).save(png, pnginfo=info)
    assert main(["generate", "--from", str(png), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert "resized to 128x128 by A1111's hires fix, cropping; egaku scales it by 2 to about 128x192" in \
        capsys.readouterr().out
