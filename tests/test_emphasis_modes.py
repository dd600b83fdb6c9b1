"""Emphasis modes: how (word:1.3) weighs a word. comfy (egaku's default, ComfyUI's rule), A1111's original (multiply,
then rescale each chunk to its old mean), no-norm (multiply), ignore (brackets read, weights dropped) and none
(brackets are words); recorded in the image as A1111 records them, read back by --from and taken by the server."""

import copy
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import egaku
from egaku.cli import main, parse
from egaku.config import build
from egaku.errors import EgakuError
from egaku.inference.generate import GenerateOptions, reproduce_options
from egaku.inference.metadata import a1111_parameters, parse_a1111, read_params, save_png
from egaku.models.text import (EMPHASIS_MODES, emphasis_mode, encode_prompt_pair, encode_prompts, encode_tokens,
                               final_layer_norm, prompt_chunks)

PROMPT = "a (red:1.5) circle, [blue] square"
FAST = dict(steps=2, seed=5, progress=False)
# A1111's infotext pairs (modules/infotext_utils.py, re_param), to read egaku's text as A1111 reads it
A1111_PAIR = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'


@pytest.fixture(scope="module")
def biased_encoder(tiny_pipe):
    """The tiny text encoder with a bias on its final layer norm: its states' mean is no longer about zero (a layer
    norm without bias centres every token), so that A1111's rescale to the old mean is well defined, as on SD's."""
    encoder = copy.deepcopy(tiny_pipe.text_encoder)
    with torch.no_grad():
        norm = final_layer_norm(encoder)
        norm.bias.copy_(0.5 + 0.1 * torch.arange(norm.bias.numel(), dtype=norm.bias.dtype) / norm.bias.numel())
    return encoder


def states(tok, encoder, text):
    """Each chunk's states, unweighted (chunks, 77, width), and its weights (chunks, 77), as float64 arrays."""
    chunks = prompt_chunks(tok, text)
    with torch.no_grad():
        z = encode_tokens(encoder, torch.tensor([ids for ids, _ in chunks]))
    return z.double().numpy(), np.array([w for _, w in chunks], dtype=np.float64)


def pair(tok, encoder, text, mode):
    """The prompt's states (1, 77 * chunks, width) as generate encodes them in ``mode``."""
    with torch.no_grad():
        return encode_prompt_pair(tok, encoder, text, "", emphasis=mode)[0]


def plain(tok, encoder, text):
    """What the pipelines' own encoding gives for ``text`` (1, 77, width)."""
    with torch.no_grad():
        return encode_prompts(tok, encoder, [text])


def test_original_is_a1111s_multiply_then_rescale_to_the_old_mean(tiny_pipe, biased_encoder):
    tok = tiny_pipe.tokenizer
    z, w = states(tok, biased_encoder, PROMPT)
    assert z.shape[0] == 1 and sorted(set(w[0])) == pytest.approx([1 / 1.1, 1.0, 1.5])
    # by hand: every state times its token's weight, then the chunk times (mean before / mean after)
    weighted = z[0] * w[0][:, None]
    hand = weighted * (z[0].mean() / weighted.mean())
    got = pair(tok, biased_encoder, PROMPT, "original")[0].double().numpy()
    assert np.allclose(got, hand, rtol=1e-5, atol=1e-6)
    assert got.mean() == pytest.approx(z[0].mean(), rel=1e-5)  # the mean is kept
    scale = z[0].mean() / weighted.mean()
    assert scale != pytest.approx(1.0, abs=1e-3)  # (the rescale does something here)
    red = int(np.argmax(w[0]))
    assert np.allclose(got[red], z[0][red] * 1.5 * scale, rtol=1e-5, atol=1e-6)
    # a weight of 1 everywhere is the identity: what the pipelines' own encoding gives, exactly
    for text in ("a (red:1) circle", "a red circle"):
        assert torch.equal(pair(tok, biased_encoder, text, "original"), plain(tok, biased_encoder, "a red circle"))


def test_original_rescales_each_chunk_to_its_own_mean(tiny_pipe, biased_encoder):
    tok = tiny_pipe.tokenizer
    text = "(red:1.4) circle BREAK blue square BREAK [green] star"
    z, w = states(tok, biased_encoder, text)
    assert z.shape[0] == 3
    got = pair(tok, biased_encoder, text, "original")[0].double().numpy().reshape(z.shape)
    for k in range(3):
        weighted = z[k] * w[k][:, None]
        assert np.allclose(got[k], weighted * (z[k].mean() / weighted.mean()), rtol=1e-5, atol=1e-6)
        assert got[k].mean() == pytest.approx(z[k].mean(), rel=1e-5)
    assert np.array_equal(got[1], z[1].astype(np.float32))  # the chunk without weights is kept as it is


def test_no_norm_ignore_none_and_comfy(tiny_pipe, biased_encoder):
    tok, enc = tiny_pipe.tokenizer, biased_encoder
    z, w = states(tok, enc, PROMPT)

    def encoded(mode, text=PROMPT):
        return pair(tok, enc, text, mode)[0].double().numpy()

    # no-norm: multiplied, not rescaled; tokens at weight 1 are kept exactly
    no_norm = encoded("no-norm")
    assert np.allclose(no_norm, z[0] * w[0][:, None], rtol=1e-6, atol=1e-7)
    ones = w[0] == 1
    assert np.array_equal(no_norm[ones], z[0][ones].astype(np.float32))
    # comfy: away from the empty prompt's states by the weight, tokens at weight 1 kept
    empty, _ = states(tok, enc, "")
    comfy = encoded("comfy")
    assert np.allclose(comfy, empty[0] + (z[0] - empty[0]) * w[0][:, None], rtol=1e-5, atol=1e-6)
    assert np.array_equal(comfy, encoded(True)) and np.array_equal(comfy[ones], z[0][ones].astype(np.float32))
    # ignore: the brackets are read and their weights dropped; none: the brackets are words
    assert np.array_equal(encoded("ignore"), plain(tok, enc, "a red circle, blue square")[0].double().numpy())
    none = plain(tok, enc, PROMPT)[0].double().numpy()
    assert np.array_equal(encoded("none"), none) and np.array_equal(encoded(False), none)
    # each mode reads the prompt otherwise
    results = {mode: encoded(mode) for mode in EMPHASIS_MODES}
    assert all(not np.allclose(results[a], results[b]) for a in results for b in results if a < b)


def test_mode_names_and_their_errors():
    assert [emphasis_mode(n) for n in ("No norm", "ORIGINAL", "no_norm", " none ", "Comfy", True, False)] == [
        "no-norm", "original", "no-norm", "none", "comfy", "comfy", "none"]
    with pytest.raises(EgakuError, match="choose from comfy, original, no-norm, ignore, none"):
        emphasis_mode("fancy")
    _, opts = parse(["generate", "x", "--emphasis", "No norm"])
    assert opts.emphasis == "no-norm"
    with pytest.raises(SystemExit):
        parse(["generate", "x", "--emphasis", "fancy"])
    # --no-emphasis is --emphasis none; --emphasis beside it is refused by the parser
    _, opts = parse(["generate", "x", "--no-emphasis"])
    assert opts.emphasis == "none" and "emphasis" in opts.given_options
    for both in (["--no-emphasis", "--emphasis", "none"], ["--emphasis", "original", "--no-emphasis"]):
        with pytest.raises(SystemExit):
            parse(["generate", "x", *both])
    # the older on/off, as options files and presets of earlier runs hold it
    assert emphasis_mode(build(GenerateOptions, {"emphasis": False}).emphasis) == "none"
    assert emphasis_mode(build(GenerateOptions, {"emphasis": True}).emphasis) == "comfy"


def test_modes_make_different_images_and_are_recorded(tiny_pipe):
    made = {mode: egaku.generate(tiny_pipe, PROMPT, emphasis=mode, **FAST)[0] for mode in EMPHASIS_MODES}
    pixels = {mode: np.asarray(r.image, dtype=np.int16) for mode, r in made.items()}
    assert all(not np.array_equal(pixels[a], pixels[b]) for a in pixels for b in pixels if a < b)
    for mode, r in made.items():
        assert r.params["emphasis_mode"] == mode and r.params["emphasis"] is (mode != "none")
    # without brackets every mode reads the prompt the same
    plain = [egaku.generate(tiny_pipe, "a red circle", emphasis=mode, **FAST)[0].image.tobytes()
             for mode in ("comfy", "original")]
    assert plain[0] == plain[1]


@pytest.mark.parametrize("mode, written", [("comfy", "Comfy"), ("original", "Original"), ("no-norm", "No norm"),
                                           ("ignore", "Ignore"), ("none", "None")])
def test_metadata_round_trip(tmp_path, mode, written):
    import re

    params = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "sampler_label": "Euler", "seed": 3,
              "guidance_scale": 7.0, "width": 32, "height": 32, "egaku_version": "1.0", "emphasis": mode != "none",
              "emphasis_mode": mode}
    text = a1111_parameters(params)
    pairs = dict(re.findall(A1111_PAIR, text.split("\n")[-1]))
    assert pairs["Emphasis"] == written  # A1111 reads the whole name
    assert parse_a1111(text)["emphasis_mode"] == mode and reproduce_options(parse_a1111(text))["emphasis"] == mode
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", params)
    stored = read_params(tmp_path / "a.png")
    assert stored["emphasis_mode"] == mode and reproduce_options(stored)["emphasis"] == mode
    # as A1111, no Emphasis where the prompts hold no bracket (the modes make the same image there)
    assert "Emphasis" not in a1111_parameters({**params, "prompt": "a red circle", "negative_prompt": ""})


def test_emphasis_read_from_texts_and_older_images():
    a1111 = "a (red:1.5) circle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 32x32, Version: v1.10.1"
    assert "emphasis_mode" not in parse_a1111(a1111)
    assert reproduce_options(parse_a1111(a1111))["emphasis"] == "original"  # A1111 leaves its default out
    assert reproduce_options(parse_a1111(a1111 + ", Emphasis: No norm"))["emphasis"] == "no-norm"
    assert reproduce_options(parse_a1111(a1111 + ", Emphasis: Fancy"))["emphasis"] == "original"  # as A1111 reads it
    none = parse_a1111(a1111 + ", Emphasis: None")
    assert none["emphasis"] is False and reproduce_options(none)["emphasis"] == "none"
    # egaku's text from before it wrote its mode: brackets read by comfy's rule
    assert parse_a1111(a1111.replace("v1.10.1", "egaku 0.9"))["emphasis_mode"] == "comfy"
    # egaku's JSON from before it had modes: its on/off
    assert reproduce_options({"egaku_version": "0.9", "emphasis": True})["emphasis"] == "comfy"
    assert reproduce_options({"egaku_version": "0.9", "emphasis": False})["emphasis"] == "none"
    assert "emphasis" not in reproduce_options({"egaku_version": "0.8"})  # before it read A1111's syntax
    # the none mode's BREAK is a word, which A1111's Original would read as a break: written too
    assert "Emphasis: None" in a1111_parameters({"prompt": "sky BREAK sea", "emphasis_mode": "none"})
    assert "Emphasis" not in a1111_parameters({"prompt": "sky BREAK sea", "emphasis_mode": "no-norm"})


def a1111_png(path, settings=""):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a (red:1.5) circle, [blue] square\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, "
                                f"Size: 32x32, Model hash: 0123456789, Version: v1.10.1{settings}")
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def made_with(out):
    made = next(out.glob("*.png"))
    return json.loads(Image.open(made).text["egaku"])["emphasis_mode"], Image.open(made)


@pytest.mark.parametrize("settings, flags, expected", [
    ("", [], "original"),  # an A1111 image without Emphasis was made with A1111's default
    (", Emphasis: No norm", [], "no-norm"),
    ("", ["--emphasis", "comfy"], "comfy"),  # a flag replaces it
    (", Emphasis: No norm", ["--no-emphasis"], "none"),
])
def test_from_makes_an_a1111_image_with_its_mode(tiny_model_dir, tiny_pipe, tmp_path, settings, flags, expected):
    source = a1111_png(tmp_path / "a1111.png", settings)
    out = tmp_path / "out"
    assert main(["generate", "--from", str(source), "--model", str(tiny_model_dir), "--out", str(out),
                 "--no-progress", *flags]) == 0
    mode, image = made_with(out)
    assert mode == expected and f"Emphasis: {EMPHASIS_MODES[expected]}" in image.text["parameters"]
    if expected == "original":  # the image generate makes with that mode
        again = egaku.generate(tiny_pipe, "a (red:1.5) circle, [blue] square", emphasis="original", steps=2, seed=5,
                               sampler="euler", guidance_scale=7, width=32, height=32)[0]
        assert np.array_equal(np.asarray(image), np.asarray(again.image))


def test_from_an_egaku_image_keeps_its_mode(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "--no-progress"]
    assert main(["generate", PROMPT, "--emphasis", "no-norm", "--out", str(tmp_path / "a"), *args]) == 0
    mode, first = made_with(tmp_path / "a")
    assert mode == "no-norm" and "Emphasis: No norm" in first.text["parameters"]
    assert main(["generate", "--from", str(next((tmp_path / "a").glob("*.png"))), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    mode, again = made_with(tmp_path / "b")
    assert mode == "no-norm" and np.array_equal(np.asarray(first), np.asarray(again))
    # a mode beside --no-emphasis is refused before the model loads
    with pytest.raises(SystemExit) as refused:
        main(["generate", PROMPT, "--emphasis", "original", "--no-emphasis", "--out", str(tmp_path / "c"), *args])
    assert refused.value.code == 2
    assert not (tmp_path / "c").exists()


def test_the_server_takes_an_emphasis_field(tiny_pipe):
    from egaku.server.app import LiveServer, ServeOptions, create_app
    from egaku.server.requests import Limits, parse_image_request

    req = parse_image_request("generation", {"prompt": PROMPT, "emphasis": "No norm"}, tiny_pipe, Limits())
    assert req.options["emphasis"] == "no-norm"
    assert parse_image_request("generation", {"prompt": PROMPT}, tiny_pipe, Limits()).options["emphasis"] == "comfy"
    form = parse_image_request("edit", {"prompt": PROMPT, "emphasis": ""}, tiny_pipe, Limits(), form=True,
                               image=Image.new("RGB", (32, 32)))
    assert form.options["emphasis"] == "comfy"
    for bad in ("fancy", True, 1):
        with pytest.raises(EgakuError, match="'emphasis' must be one of 'comfy', 'original', 'no-norm'") as info:
            parse_image_request("generation", {"prompt": PROMPT, "emphasis": bad}, tiny_pipe, Limits())
        assert info.value.param == "emphasis"
    with LiveServer(create_app({"tiny": tiny_pipe}, ServeOptions(model=["tiny"]), api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        body = {"prompt": PROMPT, "steps": 2, "seed": 5, "response_format": "b64_json"}
        r = http.post("/v1/images/generations", json={**body, "emphasis": "original"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["egaku"]["emphasis_mode"] == "original"
        r = http.post("/v1/images/generations", json={**body, "emphasis": "a1111"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "emphasis", r.text
        assert "'comfy', 'original', 'no-norm', 'ignore', 'none'" in r.json()["error"]["message"]
    # a variation reuses the mode the image was made with, as it reuses its prompt, unless the request gives one
    for stored, asked, expected in (({"prompt": PROMPT, "emphasis_mode": "no-norm", "egaku_version": "x"}, None,
                                     "no-norm"),
                                    ({"prompt": PROMPT}, None, "original"),  # A1111's text without the entry
                                    ({"prompt": PROMPT, "emphasis_mode": "no-norm", "egaku_version": "x"}, "comfy",
                                     "comfy"),
                                    ({"prompt": PROMPT, "emphasis_mode": "Fancy"}, None, "comfy")):  # unknown: default
        body = {} if asked is None else {"emphasis": asked}
        req = parse_image_request("variation", body, tiny_pipe, Limits(), image=Image.new("RGB", (32, 32)),
                                  stored=stored)
        assert req.options["emphasis"] == expected, stored


def test_options_json_repeats_a_no_emphasis_run_and_older_files_are_read(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "--no-progress"]
    assert main(["generate", PROMPT, "--no-emphasis", "--out", str(tmp_path / "a"), *args]) == 0
    options = next((tmp_path / "a").glob("*-options.json"))
    saved = json.loads(options.read_text())
    assert saved["emphasis"] == "none" and "emphasis_syntax" not in saved
    mode, first = made_with(tmp_path / "a")
    assert mode == "none" and "Emphasis: None" in first.text["parameters"]
    assert main(["generate", "--config", str(options), "--out", str(tmp_path / "b")]) == 0
    mode, again = made_with(tmp_path / "b")
    assert mode == "none" and np.array_equal(np.asarray(first), np.asarray(again))
    # an options file of egaku before it had modes: "emphasis" was on or off
    older = saved | {"emphasis": False}
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert main(["generate", "--config", str(tmp_path / "older.json"), "--out", str(tmp_path / "c")]) == 0
    mode, older_image = made_with(tmp_path / "c")
    assert mode == "none" and np.array_equal(np.asarray(first), np.asarray(older_image))
