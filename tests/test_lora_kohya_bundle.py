"""train-lora's kohya file as A1111 and kohya's tools read it: the --train-tokens words bundled in it in A1111's
layout (bundle_emb.WORD.string_to_param.*), which egaku reads back from any kohya file, and kohya's ss_bucket_info
and SAI model spec (modelspec.*) entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import egaku
from egaku.errors import EgakuError
from egaku.lora.apply import apply_loras, lora_trained_words, remove_loras
from egaku.lora.formats import base_model_metadata
from egaku.training.lora import train_lora
from test_lora import RESOLUTION, make_folder, options, render, tiny_pipe

WORD_KEY = "bundle_emb.star.string_to_param.*"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A short run that trains the word "star" beside the LoRA, in both layouts, the word bundled."""
    data = make_folder(tmp_path_factory.mktemp("bundle-data"))
    out = tmp_path_factory.mktemp("bundle-run") / "wordrun"
    return train_lora(options(data, tiny_model_dir, out, train_tokens=["star"], token_lr=5e-2, learning_rate=1e-2,
                              max_steps=2, format="both", bundle_words=True))


@pytest.fixture(scope="module")
def trained_vector(run) -> torch.Tensor:
    return load_file(run / "embeddings" / "star.safetensors")["emb_params"]


@pytest.fixture
def kohya_alone(run, tmp_path) -> Path:
    """The run's kohya file copied out of its folder: no embeddings/ folder or training_config.json beside it."""
    (tmp_path / "loras").mkdir()
    return Path(shutil.copy(run / "wordrun.safetensors", tmp_path / "loras" / "wordrun.safetensors"))


def a1111_bundle(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The bundled embeddings A1111's Lora extension (networks.py load_network) collects from a LoRA's keys."""
    bundle: dict[str, dict] = {}
    for key, weight in state.items():
        head, _, rest = key.partition(".")
        if head == "bundle_emb":
            name, part = rest.split(".", 1)
            if part.split(".")[0] == "string_to_param":
                bundle.setdefault(name, {})["string_to_param"] = {part.split(".", 1)[1]: weight}
            else:
                bundle.setdefault(name, {})[part] = weight
    return bundle


def without_bundle(path: Path, to: Path) -> Path:
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("bundle_emb.")}, to, metadata=metadata)
    return to


def test_the_kohya_file_bundles_the_trained_word_as_a1111_reads_it(run, trained_vector):
    from egaku.inference.metadata import lora_short_hash

    path = run / "wordrun.safetensors"
    state = load_file(path)
    assert [k for k in state if not k.startswith(("lora_unet_", "lora_te_"))] == [WORD_KEY]
    assert a1111_bundle(state).keys() == {"star"}
    vector = a1111_bundle(state)["star"]["string_to_param"]["*"]
    assert vector.dtype == torch.float32 and torch.equal(vector, trained_vector)  # the embedding file's, exactly
    # the separate file is still written, for A1111's and ComfyUI's embeddings folder
    assert (run / "embeddings" / "star.safetensors").is_file()
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["sshs_model_hash"][:12] == lora_short_hash(path)  # the hash counts the bundle too


def test_without_bundle_words_the_kohya_file_holds_only_layers_that_diffusers_loads(run, tiny_model_dir, tmp_path):
    """By default the word stays out of the kohya file (in embeddings/ only), so that diffusers' kohya converter,
    which refuses any key that is not a lora_unet_/lora_te_ one, loads the file as the diffusers export."""
    data = make_folder(tmp_path / "data")
    plain = train_lora(options(data, tiny_model_dir, tmp_path / "plain", train_tokens=["star"], token_lr=5e-2,
                               learning_rate=1e-2, max_steps=2, format="both"))
    state = load_file(plain / "plain.safetensors")
    assert state and all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert (plain / "embeddings" / "star.safetensors").is_file()
    bundled = load_file(run / "wordrun.safetensors")
    assert state.keys() == {k for k in bundled if not k.startswith("bundle_emb.")}  # the same run, bundle aside
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(plain))
    expected = render(pipe)
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(plain / "plain.safetensors"))
    np.testing.assert_allclose(render(pipe), expected, atol=1e-5)


def test_diffusers_kohya_converter_loads_the_layers_beside_the_bundle(run, tiny_model_dir):
    """diffusers converts a kohya state dict only when every key is a lora_unet_/lora_te_ one: it refuses the file
    with its bundle, and loads its layers to the diffusers file's images without it."""
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights(str(run))  # the diffusers-layout file
    expected = render(pipe)
    state = load_file(run / "wordrun.safetensors")
    pipe = tiny_pipe(tiny_model_dir)
    pipe.load_lora_weights({k: v for k, v in state.items() if not k.startswith("bundle_emb.")})
    np.testing.assert_allclose(render(pipe), expected, atol=1e-5)


def test_generate_with_the_kohya_file_alone_applies_its_word(kohya_alone, trained_vector, tiny_model_dir, tmp_path):
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    table = pipe.text_encoder.get_input_embeddings().weight
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    base = table.detach().clone()
    fast = dict(steps=2, seed=3, width=RESOLUTION, height=RESOLUTION)
    with_word = egaku.generate(pipe, "a photo of red star", lora=[str(kohya_alone)], **fast)[0]
    assert torch.equal(table, base)  # taken off again after the call
    layers_only = without_bundle(kohya_alone, tmp_path / "layers.safetensors")
    without_word = egaku.generate(pipe, "a photo of red star", lora=[str(layers_only)], **fast)[0]
    difference = np.abs(np.asarray(with_word.image, np.int16) - np.asarray(without_word.image, np.int16))
    assert difference.mean() > 0.5  # (1.6 grey levels on average after 2 steps at lr 5e-2)
    # the word's row is the trained vector, and no other row changes
    apply_loras(pipe, [(kohya_alone, 1.0)])
    assert (table != base).any(dim=1).nonzero().flatten().tolist() == [star]
    assert torch.equal(table[star], trained_vector[0])
    assert lora_trained_words(pipe) == {"star": str(kohya_alone)}
    remove_loras(pipe)
    assert torch.equal(table, base)


def test_a_run_folders_files_apply_the_word_once(run, trained_vector, tiny_model_dir):
    """The kohya file bundles the word and its folder's embeddings/ holds it too: one word, applied once; the
    diffusers file in the same folder takes it from embeddings/."""
    pipe = tiny_pipe(tiny_model_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    base = table.detach().clone()
    from egaku.lora.apply import resolve_lora, trained_embeddings

    for lora in (run / "wordrun.safetensors", run / "pytorch_lora_weights.safetensors", resolve_lora(str(run), None)):
        assert list(trained_embeddings(lora)) == ["star"]
        apply_loras(pipe, [(lora, 1.0)])
        assert (table != base).any(dim=1).nonzero().flatten().tolist() == [star]
        assert torch.equal(table[star], trained_vector[0])
        remove_loras(pipe)


def test_info_lists_bundled_words(kohya_alone, capsys):
    from egaku.cli import main
    from egaku.lora.commands import describe_lora

    described = describe_lora(kohya_alone)
    assert (described["trained_words"], described["bundled_words"]) == (["star"], ["star"])
    assert described["unrecognised_keys"] == 0 and described["unet_layers"] > 0
    assert main(["info", str(kohya_alone)]) == 0
    assert "trained words (applied with the LoRA): star (bundled in the file)" in capsys.readouterr().out


def test_the_kohya_header_has_kohyas_bucket_and_model_spec_entries(run):
    with safe_open(str(run / "wordrun.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert {k: meta[k] for k in meta if k.startswith("modelspec.") and k != "modelspec.date"} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "wordrun",
        "modelspec.resolution": f"{RESOLUTION}x{RESOLUTION}", "modelspec.prediction_type": "epsilon",
        "modelspec.encoder_layer": "1", "modelspec.trigger_phrase": "star"}
    assert len(meta["modelspec.date"]) == 19 and meta["modelspec.date"][10] == "T"
    # make_folder's 6 images, 2 in each of 3 aspect buckets (48x48, 64x40, 40x64 at 32 px: 32x32, 40x24, 24x40)
    info = json.loads(meta["ss_bucket_info"])
    assert sorted((tuple(b["resolution"]), b["count"]) for b in info["buckets"].values()) == [
        ((24, 40), 2), ((32, 32), 2), ((40, 24), 2)]
    assert all(key.isdigit() for key in info["buckets"])
    # |bucket aspect - image aspect|: 0 (square), 40/24 - 64/40, 40/64 - 24/40, each class once
    assert info["mean_img_ar_error"] == pytest.approx((0 + (40 / 24 - 64 / 40) + (40 / 64 - 24 / 40)) / 3)
    assert (meta["ss_enable_bucket"], meta["ss_flip_aug"], meta["ss_epoch"]) == ("True", "False", "1")


@pytest.mark.parametrize("config, prediction, architecture, written", [
    ({"cross_attention_dim": 768, "sample_size": 64}, "epsilon", "stable-diffusion-v1", "epsilon"),
    ({"cross_attention_dim": 768, "sample_size": 64}, "v_prediction", "stable-diffusion-v1", "v"),
    ({"cross_attention_dim": 1024, "sample_size": 96}, "v_prediction", "stable-diffusion-v2-768-v", "v"),
    ({"cross_attention_dim": 1024, "sample_size": 64}, "epsilon", "stable-diffusion-v2-512", "epsilon"),
    # kohya names a 2.x base by its prediction type (--v_parameterization), not its size
    ({"cross_attention_dim": 1024, "sample_size": 96}, "epsilon", "stable-diffusion-v2-512", "epsilon"),
    ({"cross_attention_dim": 1024, "sample_size": 96}, None, "stable-diffusion-v2-768-v", None),
])
def test_model_spec_names_the_prediction_type_as_kohya_does(config, prediction, architecture, written):
    entries = base_model_metadata(config, prediction)
    assert entries["modelspec.architecture"] == f"{architecture}/lora"
    assert entries.get("modelspec.prediction_type") == written  # not written where it is not known


def test_other_trainers_bundles_load_and_unusable_ones_are_named(kohya_alone, tiny_model_dir, tmp_path):
    """A1111's other bundle spellings (one tensor of another name, as OneTrainer writes) load as ours do; a file of
    bundles only, an SDXL bundle, a word of several tokens or vectors are refused, naming the file."""
    from egaku.lora.apply import checked_lora_layers
    from egaku.lora.formats import adaptable_modules

    pipe = tiny_pipe(tiny_model_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    width = table.shape[1]
    state = load_file(kohya_alone)
    layers = {k: v for k, v in state.items() if not k.startswith("bundle_emb.")}
    vector = torch.randn(1, width)
    save_file({**layers, "bundle_emb.circle.emb_params": vector}, tmp_path / "other.safetensors")
    apply_loras(pipe, [(tmp_path / "other.safetensors", 1.0)])
    circle = pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]
    assert torch.equal(table[circle], vector[0]) and lora_trained_words(pipe) == {
        "circle": str(tmp_path / "other.safetensors")}
    remove_loras(pipe)
    # the server's check from the header: the bundle is no layer that matches nothing
    assert checked_lora_layers(state, {}, adaptable_modules(pipe), "wordrun") is not None
    for name, tensors, message in (
            ("only", {WORD_KEY: vector}, r"holds only token embeddings bundled in A1111's layout .*star"),
            ("sdxl", {**layers, "bundle_emb.star.clip_l": vector, "bundle_emb.star.clip_g": torch.randn(1, 1280)},
             "SDXL embedding"),
            ("split", {**layers, "bundle_emb.zqxjv.string_to_param.*": vector}, r"'zqxjv' is a word of \d+ tokens"),
            ("long", {**layers, WORD_KEY: torch.randn(3, width)}, r"'star' is 3 vectors"),
            ("nan", {**layers, WORD_KEY: torch.full((1, width), float("nan"))}, "NaN or inf")):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(EgakuError, match=message):
            apply_loras(pipe, [(tmp_path / f"{name}.safetensors", 1.0)])
        remove_loras(pipe)
    assert not lora_trained_words(pipe)
