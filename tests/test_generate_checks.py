"""generate's and eval's checks: --from and an A1111 image's Lora hashes, a decimal comma given for a number,
eval adherence --allow-pickle, and --dtype float16 on the CPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image, PngImagePlugin

import egaku.models.loading
from egaku.cli import build_parser, main, parse
from egaku.config import number_list
from egaku.errors import EgakuError
from egaku.evaluation import adherence
from egaku.inference import commands
from egaku.inference.commands import _apply_from_image
from egaku.inference.metadata import lora_short_hash, save_png
from egaku.inference.prompts import parse_prompt_parameters


class Reached(Exception):
    """Raised by a stand-in for the work the checks let through."""


# 1. --from: the Lora hashes of an A1111 image


def _a1111_image(path, prompt: str, lora_hashes: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 32x32, "
                                f'Model: sd15, Lora hashes: "{lora_hashes}"')
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


@pytest.fixture
def ink_dir(style_lora_dir, tmp_path):
    """A LoRA folder holding ink.safetensors (the tiny model's style LoRA)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(style_lora_dir / "style.safetensors", folder / "ink.safetensors")
    return folder


def test_from_an_a1111_image_compares_its_lora_hashes_with_the_files_found(ink_dir, tmp_path, capsys):
    """(Was: an A1111 image's Lora hashes were not compared: a LoRA of the same name but another file was used
    without a word.)"""
    path, found = ink_dir / "ink.safetensors", lora_short_hash(ink_dir / "ink.safetensors")
    other = _a1111_image(tmp_path / "other.png", "a house <lora:ink:0.5>", "ink: 0123456789ab, x: 1234567890ab")
    _, opts = parse(["generate", "--from", other, "--lora-dir", str(ink_dir), "--model", "tiny"])
    applied = _apply_from_image(opts)
    assert applied.prompt == "a house <lora:ink:0.5>" and applied.lora_dir == str(ink_dir)
    out = capsys.readouterr().out
    assert f"egaku: note: the LoRA ink ({path}) is not the file {other} was made with (hash 0123456789ab, now " \
           f"{found})\n" in out, out
    # the same file: nothing to say
    same = _a1111_image(tmp_path / "same.png", "a house <lora:ink:0.5>", f"ink: {found}")
    _, opts = parse(["generate", "--from", same, "--lora-dir", str(ink_dir), "--model", "tiny"])
    _apply_from_image(opts)
    assert "is not the file" not in capsys.readouterr().out
    # a new prompt's tags are the user's choice
    _, opts = parse(["generate", "a dog <lora:ink:1>", "--from", other, "--lora-dir", str(ink_dir), "--model", "tiny"])
    _apply_from_image(opts)
    assert "is not the file" not in capsys.readouterr().out


def test_from_an_egaku_image_with_another_lora_dir_compares_the_recorded_hashes(ink_dir, tmp_path, capsys):
    """An egaku image's tags looked up in a --lora-dir other than the recorded one are compared too."""
    path, found = ink_dir / "ink.safetensors", lora_short_hash(ink_dir / "ink.safetensors")
    params = {"prompt": "a cat <lora:ink:0.5>", "negative_prompt": "", "steps": 2, "sampler": "euler", "seed": 1,
              "guidance_scale": 5.0, "width": 32, "height": 32, "model_source": "tiny", "lora_dir": str(tmp_path),
              "lora_files": [{"name": "ink", "path": str(tmp_path / "ink.safetensors"), "weight": 0.5,
                              "hash": "0123456789ab", "from": "prompt"}]}
    save_png(Image.new("RGB", (32, 32)), tmp_path / "a.png", params)
    _, opts = parse(["generate", "--from", str(tmp_path / "a.png"), "--lora-dir", str(ink_dir)])
    assert _apply_from_image(opts).model == "tiny"
    assert f"egaku: note: the LoRA ink ({path}) is not the file {tmp_path / 'a.png'} was made with (hash " \
           f"0123456789ab, now {found})" in capsys.readouterr().out


# 2. a decimal comma where one number goes


@pytest.mark.parametrize("flag", ["--cfg", "--guidance-scale"])
def test_a_decimal_comma_is_met_with_the_number_to_write(flag, capsys):
    with pytest.raises(SystemExit):
        parse(["generate", "a cat", flag, "7,5"])
    err = capsys.readouterr().err
    assert "egaku generate: error: argument --guidance-scale/--cfg: '7,5' is not a number: write 7.5 (with a " \
           "decimal point, not a comma)\n" in err and len(err.splitlines()) == 2
    assert parse(["generate", "a cat", flag, "7.5"])[1].guidance_scale == 7.5


def test_a_decimal_comma_in_a_preset_or_a_prompt_is_met_with_the_number_to_write(tmp_path, capsys):
    (tmp_path / "p.toml").write_text('guidance_scale = "7,5"\n')
    with pytest.raises(EgakuError, match=r"^option 'guidance_scale': '7,5' is not a number: write guidance_scale = "
                                         r"7\.5 \(with a decimal point, not a comma\)$"):
        parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    (tmp_path / "p.toml").write_text("guidance_scale = 7.5\n")
    assert parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])[1].guidance_scale == 7.5
    with pytest.raises(EgakuError, match=r"^prompt parameter --chaos needs a number, got '12,5': write --chaos 12\.5 "
                                         r"\(with a decimal point, not a comma\)$"):
        parse_prompt_parameters("a cat --chaos 12,5")
    assert parse_prompt_parameters("a cat --chaos 12.5")[1] == {"chaos": 12.5}


def test_whole_number_options_and_lists_keep_their_own_reading(capsys):
    with pytest.raises(SystemExit):  # a whole number has no decimals: the list message stays
        parse(["generate", "a cat", "--steps", "7,5"])
    assert "argument --steps: takes one number, not the list '7,5' (denoising steps)\n" in capsys.readouterr().err
    assert number_list("0,1", int) == [0, 1] and number_list("0.5,2", float) == [0.5, 2.0]
    with pytest.raises(ValueError):
        number_list("0,x", int)


# 3. eval adherence --allow-pickle


def test_eval_adherence_takes_allow_pickle_as_generate_does(tmp_path, monkeypatch, capsys):
    def option_help(command: str) -> str:
        parser = build_parser(command)[0]
        return next(a.help for a in parser._actions if "--allow-pickle" in a.option_strings)

    assert option_help("eval adherence") == option_help("generate")
    monkeypatch.setattr(adherence, "load_judge", lambda folder: None)
    calls = []

    def load_pipeline(model, **kwargs):
        calls.append((model, kwargs))
        raise Reached

    monkeypatch.setattr(egaku.models.loading, "load_pipeline", load_pipeline)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    args = ["eval", "adherence", "--model", str(ckpt), "--out", str(tmp_path / "r.json"), "--seen-prompts", "1",
            "--threads", "1"]  # (the tests run on one thread)
    assert main(args) == 2  # refused before the judge or the model is read, with the flag eval now takes
    err = capsys.readouterr().err
    assert "model.ckpt is a pickle (.ckpt)" in err and "pass --allow-pickle" in err and not calls
    with pytest.raises(Reached):
        main([*args, "--allow-pickle"])
    assert calls == [(str(ckpt), {"device": "auto", "dtype": "float32", "allow_pickle": True})]
    assert parse(["eval", "adherence"])[1].allow_pickle is False


# 4. --dtype float16 on the CPU


def test_float16_on_the_cpu_is_noted_and_still_used(tiny_model_dir, tmp_path, monkeypatch, capsys):
    seen = []

    def fake_generate(pipe, opts, on_step):
        seen.append(pipe.unet.dtype)
        raise Reached

    monkeypatch.setattr(commands, "generate", fake_generate)
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "o"),
            "--steps", "1", "--no-progress"]
    with pytest.raises(Reached):
        main([*args, "--dtype", "float16"])
    out = capsys.readouterr().out
    assert out.count("egaku: note: --dtype float16 on the CPU is no faster than float32 (often slower) and some of "
                     "torch's CPU operations lack it; use --dtype float32 there (or bfloat16 for half the memory)\n") \
        == 1, out
    assert seen == [torch.float16]  # what was asked
    for dtype, made in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        with pytest.raises(Reached):
            main([*args, "--dtype", dtype])
        assert "note" not in capsys.readouterr().out and seen[-1] == made


def test_a_half_precision_error_on_the_cpu_says_which_dtype_to_use(tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    error = RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    def fake_generate(pipe, opts, on_step):
        raise error

    monkeypatch.setattr(commands, "generate", fake_generate)
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "o"),
            "--steps", "1", "--no-progress"]
    assert main([*args, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err == ("egaku: error: torch cannot run this model in float16 on the CPU (--dtype float16): "
                   "\"addmm_impl_cpu_\" not implemented for 'Half'; use --dtype float32 or bfloat16 on the CPU\n")
    error = RuntimeError("something else")  # other errors are left as they are
    with pytest.raises(RuntimeError, match="^something else$"):
        main([*args, "--dtype", "float16"])
