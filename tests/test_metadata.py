"""The PNG parameters: LoRAs given as options reach A1111's text as <lora:name:weight> tags."""

from __future__ import annotations

import re

import pytest

from PIL import Image

from egaku.inference.metadata import a1111_parameters, parse_a1111, read_params, save_png
from egaku.errors import EgakuError
from egaku.lora.apply import parse_prompt_loras

# A1111's extra-network tags in a prompt (modules/extra_networks.py, re_extra_net); its Lora extension reads
# the first argument as the name and the second as the weight
A1111_TAG = re.compile(r"<(\w+):([^>]+)>")


def params(prompt="a cat <lora:ink:0.5>", **more):
    return {"prompt": prompt, "negative_prompt": "blurry", "steps": 2, "sampler_label": "Euler", "seed": 3,
            "guidance_scale": 7.0, "width": 32, "height": 32, "egaku_version": "1.0",
            "loras": [["ink", 0.5], ["style", 0.8], ["run", 1.0], ["neg", -0.25]],
            "lora_files": [
                {"name": "ink", "path": "/l/ink.safetensors", "weight": 0.5, "hash": "aaaaaaaaaaaa", "from": "prompt"},
                {"name": "style", "path": "/m/style.safetensors", "weight": 0.8, "hash": "bbbbbbbbbbbb",
                 "from": "option"},
                {"name": "run", "path": "/m/run/pytorch_lora_weights.safetensors", "weight": 1.0,
                 "hash": "cccccccccccc", "from": "option"},
                {"name": "neg", "path": "/m/neg.safetensors", "weight": -0.25, "hash": None, "from": "option"}],
            **more}


def test_loras_given_as_options_are_tags_in_the_a1111_prompt_as_a1111_writes_them():
    text = a1111_parameters(params())
    prompt = "a cat <lora:ink:0.5> <lora:style:0.8> <lora:run:1> <lora:neg:-0.25>"
    assert text.split("\n")[0] == prompt  # the prompt's own tag once, the options' after it
    assert text.split("\n")[1] == "Negative prompt: blurry"
    assert 'Lora hashes: "ink: aaaaaaaaaaaa, style: bbbbbbbbbbbb, run: cccccccccccc"' in text
    # A1111 (send to txt2img, civitai) reads each LoRA and its weight from the tags
    assert [(kind, *args.split(":")) for kind, args in A1111_TAG.findall(text)] == [
        ("lora", "ink", "0.5"), ("lora", "style", "0.8"), ("lora", "run", "1"), ("lora", "neg", "-0.25")]
    # and so does egaku from A1111's text alone
    read = parse_a1111(text)
    assert read["prompt"] == prompt and read["negative_prompt"] == "blurry" and read["steps"] == 2
    assert parse_prompt_loras(read["prompt"]) == ("a cat", [("ink", 0.5), ("style", 0.8), ("run", 1.0),
                                                            ("neg", -0.25)])


def test_the_prompt_is_as_given_without_option_loras_and_a_name_no_tag_can_hold_is_left_out():
    plain = params(prompt="a cat,\nsitting ")
    plain["lora_files"] = [f for f in plain["lora_files"] if f["from"] == "prompt"]
    assert a1111_parameters(plain).startswith("a cat,\nsitting \nNegative prompt: blurry\n")
    odd = params(prompt="")
    odd["lora_files"] = [{"name": "a:b", "weight": 0.5, "hash": "dddddddddddd", "from": "option"},
                         {"name": "x>y", "weight": 0.5, "from": "option"},
                         {"name": "style", "weight": 2.0, "from": "option"}]
    assert a1111_parameters(odd).split("\n")[0] == "<lora:style:2>"


def test_the_egaku_chunk_and_from_are_unchanged(tmp_path):
    from egaku.inference.generate import reproduce_options

    p = params()
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", p)
    stored = read_params(tmp_path / "a.png")  # egaku's chunk first, as --from reads it
    assert stored["prompt"] == "a cat <lora:ink:0.5>" and stored["lora_files"] == p["lora_files"]
    again = reproduce_options(stored)
    assert again["prompt"] == "a cat <lora:ink:0.5>"
    assert again["lora"] == ["/m/style.safetensors:0.8", "/m/run/pytorch_lora_weights.safetensors:1.0",
                             "/m/neg.safetensors:-0.25"]
    assert "<lora:style:0.8>" in Image.open(tmp_path / "a.png").text["parameters"]


def _a1111_exif(text: str, encoding: str = "utf-16-be") -> Image.Exif:
    """EXIF as A1111 writes a JPEG's or WebP's parameters (piexif's UserComment: "UNICODE\\0" and UTF-16)."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode(encoding)
    return exif


def test_a1111_parameters_in_a_jpeg_or_webp_exif_comment_are_read(tmp_path):
    from egaku.inference.metadata import read_text_chunks

    text = "a cat, 猫\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, CFG scale: 6.5, Seed: 5, Size: 8x8"
    for name, encoding in (("a.jpg", "utf-16-be"), ("b.webp", "utf-16-be"), ("c.jpg", "utf-16-le")):
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=_a1111_exif(text, encoding))
        assert read_text_chunks(tmp_path / name)["parameters"] == text
        params = read_params(tmp_path / name)
        assert (params["prompt"], params["steps"], params["seed"], params["guidance_scale"]) == ("a cat, 猫", 4, 5, 6.5)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    with pytest.raises(EgakuError, match="no A1111 EXIF comment"):
        read_params(tmp_path / "plain.jpg")


def test_a_variation_of_an_a1111_jpeg_reuses_its_prompt(tmp_path):
    import io

    from egaku.server.app import _stored_params

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=_a1111_exif("a red circle\nSteps: 3, Seed: 9, Size: 8x8"))
    assert _stored_params({"image": buffer.getvalue()})["prompt"] == "a red circle"
