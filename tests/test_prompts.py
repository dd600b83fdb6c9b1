"""Midjourney-style prompt parameters, variations and upscale (the tiny pipeline, 2-4 steps)."""

import json

import pytest
from PIL import Image

import egaku
from egaku.errors import EgakuError
from egaku.inference.generate import GenerateOptions
from egaku.inference.prompts import (CHAOS_MAX_STRENGTH, CHAOS_MIN_STRENGTH, VARIATION_STRENGTH,
                                     apply_prompt_parameters, parse_prompt_parameters, upscale, variations)


@pytest.fixture(scope="module")
def pipe():
    from egaku.models.loading import load_pipeline

    return load_pipeline("tiny", "cpu", "float32")


def test_parameters_are_split_from_the_prompt():
    text, params = parse_prompt_parameters("a red cat, <lora:ink:0.5> --ar 16:9 --seed 7 --no text, watermark "
                                           "--steps 30 --chaos 40")
    assert text == "a red cat, <lora:ink:0.5>"
    assert params == {"ar": "16:9", "seed": 7, "no": "text, watermark", "steps": 30, "chaos": 40.0}


def test_aliases_and_a_prompt_without_parameters():
    assert parse_prompt_parameters("x --aspect 2:3 --c 5")[1] == {"ar": "2:3", "chaos": 5.0}
    assert parse_prompt_parameters("  a well-lit room -- quiet  ") == ("a well-lit room -- quiet", {})


@pytest.mark.parametrize("prompt, fragment", [
    ("a cat --v 6", "unknown prompt parameter --v"),
    ("a cat --seed", "needs a value"),
    ("a cat --seed x", "whole number"),
    ("a cat --seed -3", "must be in 0.."),
    ("a cat --steps 0", "must be in 1..1000"),
    ("a cat --chaos 101", "must be in 0..100"),
    ("a cat --ar wide", "W:H"),
    ("a cat --seed 1 --seed 2", "given twice"),
])
def test_bad_parameters_are_refused_with_the_reason(prompt, fragment):
    with pytest.raises(EgakuError, match=fragment) as info:
        parse_prompt_parameters(prompt)
    assert info.value.param == "prompt"


def test_apply_moves_parameters_into_options():
    opts = apply_prompt_parameters(GenerateOptions(prompt="a cat --ar 2:1 --seed 9 --steps 3 --no dog",
                                                   negative_prompt="blur"))
    assert (opts.prompt, opts.aspect_ratio, opts.seed, opts.steps) == ("a cat", "2:1", 9, 3)
    assert opts.negative_prompt == "blur, dog"


def test_chaos_is_strength_with_an_image_and_lower_guidance_without():
    with_image = apply_prompt_parameters(GenerateOptions(prompt="x --chaos 100", init_image="in.png"))
    assert with_image.strength == pytest.approx(CHAOS_MAX_STRENGTH)
    assert apply_prompt_parameters(GenerateOptions(prompt="x --chaos 0"), has_init_image=True).strength == \
        pytest.approx(CHAOS_MIN_STRENGTH)
    text_only = apply_prompt_parameters(GenerateOptions(prompt="x --chaos 50", guidance_scale=8.0))
    assert text_only.guidance_scale == pytest.approx(6.0)
    # a mask is repainted from noise: there, as in text-to-image, chaos lowers the guidance
    masked = apply_prompt_parameters(GenerateOptions(prompt="x --chaos 50", init_image="in.png", mask="mask.png",
                                                     guidance_scale=8.0))
    assert (masked.strength, masked.guidance_scale) == (GenerateOptions.strength, pytest.approx(6.0))


def test_chaos_with_a_mask_lowers_guidance_in_python_as_in_the_cli_and_the_server(pipe, tmp_path):
    """generate() with a mask (an image handed in, or a file) reads --chaos as `egaku generate --mask` and the
    server's edits do. (Was: the img2img strength, so "--chaos 100" with strength=1.0 was "given twice".)"""
    image = Image.new("RGB", (64, 64), (30, 200, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    common = dict(init_image=image, steps=2, seed=2, guidance_scale=4.0)
    for given in (dict(mask_image=mask, strength=1.0), dict(mask=str(tmp_path / "mask.png"), strength=1.0)):
        [result] = egaku.generate(pipe, "a cat --chaos 100", **common, **given)
        assert (result.params["strength"], result.params["guidance_scale"]) == (1.0, 2.0), given
    # without a mask it is still the strength
    [result] = egaku.generate(pipe, "a cat --chaos 100", **common)
    assert (result.params["strength"], result.params["guidance_scale"]) == (CHAOS_MAX_STRENGTH, 4.0)


def test_a_value_given_twice_is_refused():
    with pytest.raises(EgakuError, match="the seed is given twice"):
        apply_prompt_parameters(GenerateOptions(prompt="a cat --seed 3", seed=4))
    with pytest.raises(EgakuError, match="--ar but a width"):
        apply_prompt_parameters(GenerateOptions(prompt="a cat --ar 1:2", width=64))
    # the same value twice is no conflict
    assert apply_prompt_parameters(GenerateOptions(prompt="a cat --seed 3", seed=3)).seed == 3


def test_egaku_generate_reads_prompt_parameters(tmp_path):
    from egaku.cli import main

    out = tmp_path / "out"
    code = main(["generate", "a red circle --ar 4:1 --seed 5 --steps 2 --no blue", "--model", "tiny",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    [png] = sorted(out.glob("*-5.png"))
    with Image.open(png) as img:
        params = json.loads(img.text["egaku"])
        size = img.size
    assert size == (128, 32)  # 4:1 at the tiny model's 64x64 pixel count
    assert (params["prompt"], params["negative_prompt"], params["steps"]) == ("a red circle", "blue", 2)


def test_the_python_api_reads_prompt_parameters_as_the_cli_does(pipe):
    [result] = egaku.generate(pipe, "a red circle --ar 4:1 --seed 5 --no blue", steps=2)
    assert result.image.size == (128, 32) and result.seed == 5
    assert (result.params["prompt"], result.params["negative_prompt"]) == ("a red circle", "blue")
    plain = egaku.generate(pipe, "a red circle", negative_prompt="blue", aspect_ratio="4:1", seed=5, steps=2)[0]
    assert plain.image.tobytes() == result.image.tobytes()
    with pytest.raises(EgakuError, match="the seed is given twice"):
        egaku.generate(pipe, "a red circle --seed 5", seed=6, steps=2)
    with pytest.raises(EgakuError, match="unknown prompt parameter --v"):
        egaku.generate(pipe, "a red circle --v 6", steps=2)


def test_variations_keep_the_size_and_use_new_seeds(pipe):
    source = Image.new("RGB", (48, 64), (200, 40, 40))
    results = variations(pipe, source, "a cat", num_images=2, seed=11, steps=2)
    assert [r.image.size for r in results] == [(48, 64), (48, 64)]
    assert [r.seed for r in results] == [11, 12]
    assert results[0].params["strength"] == VARIATION_STRENGTH
    assert results[0].image.tobytes() != results[1].image.tobytes()


def test_upscale_doubles_the_size_with_a_low_strength_pass(pipe):
    result = upscale(pipe, Image.new("RGB", (32, 48), (10, 120, 200)), "sky", seed=1, steps=4)
    assert result.image.size == (64, 96)
    assert result.params["strength"] == pytest.approx(0.3) and result.params["upscaled_from"] == "32x48"


def test_too_few_img2img_steps_are_refused_before_running(pipe):
    with pytest.raises(EgakuError, match="leave no denoising step"):
        upscale(pipe, Image.new("RGB", (32, 32)), steps=2, strength=0.3)
