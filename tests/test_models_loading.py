"""load_pipeline on the files users bring: pickles only with allow_pickle (and no copy left behind), a truncated
safetensors file and a --model-config that does not fit are one message that says what to do."""

import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from egaku.errors import EgakuError
from egaku.models.loading import load_pipeline
from egaku.models.single_file import save_single_file
from egaku.models.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save_single_file(tiny_pipeline(), tmp_path_factory.mktemp("single") / "tiny.safetensors")


def test_a_pickle_is_read_after_its_configs_are_known_and_leaves_no_copy(tmp_path, monkeypatch, tiny_file,
                                                                          tiny_model_dir):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_file)}, ckpt)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EgakuError) as err:  # no configs: said before the pickle is read, naming the user's file
        load_pipeline(ckpt, device="cpu", allow_pickle=True)
    assert str(err.value).startswith("tiny.ckpt: a single-file checkpoint needs the configs") and not any(temp.iterdir())
    with pytest.raises(EgakuError, match="--model-config .*nowhere: no such folder"):
        load_pipeline(ckpt, device="cpu", allow_pickle=True, model_config=str(tmp_path / "nowhere"))
    pipe = load_pipeline(ckpt, device="cpu", allow_pickle=True, model_config=str(tiny_model_dir))
    assert pipe.egaku_info.kind == "pickle" and pipe.egaku_info.path == ckpt.resolve()
    assert list(temp.iterdir()) == []  # the temporary safetensors copy of the checkpoint is gone


def test_a_folder_of_pickled_weights_needs_allow_pickle(tmp_path, monkeypatch):
    folder = tmp_path / "old-sd"
    tiny_pipeline().save_pretrained(folder, safe_serialization=False)  # unet/vae as diffusion_pytorch_model.bin
    real_load = torch.load

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was read without allow_pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(EgakuError) as err:
        load_pipeline(folder, device="cpu")
    said = str(err.value)
    assert "holds pickled weights (unet/diffusion_pytorch_model.bin, vae/diffusion_pytorch_model.bin)" in said
    assert "pass --allow-pickle" in said and f"egaku convert {folder} --allow-pickle --out NEW_DIR" in said
    monkeypatch.setattr(torch, "load", real_load)
    assert load_pipeline(folder, device="cpu", allow_pickle=True).egaku_info.kind == "folder"


def test_a_truncated_safetensors_file_says_to_get_it_again(tmp_path, tiny_file, tiny_model_dir):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(EgakuError, match="cut.safetensors is not a complete safetensors file .*truncated or corrupt; "
                                         "download or convert the checkpoint again"):
        load_pipeline(cut, device="cpu", model_config=str(tiny_model_dir))
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_model_dir, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    with pytest.raises(EgakuError, match="diffusion_pytorch_model.safetensors is not a complete safetensors file"):
        load_pipeline(folder, device="cpu")


def test_a_model_config_of_another_architecture_is_named(tmp_path, tiny_model_dir):
    other = tmp_path / "other"
    pipe = tiny_pipeline()
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer) + 1)  # one weight of another shape
    save_single_file(pipe, other.with_suffix(".safetensors"))
    with pytest.raises(EgakuError) as err:
        load_pipeline(other.with_suffix(".safetensors"), device="cpu", model_config=str(tiny_model_dir))
    said = str(err.value)
    assert f"does not fit the architecture of --model-config {tiny_model_dir}" in said and "expected shape" in said
    assert "ignore_mismatched_sizes" not in said and "pass the diffusers folder of the model it was made from" in said


def test_a_pipeline_folder_without_a_model_folder_names_it(tmp_path, tiny_model_dir):
    """diffusers says "no file named config.json found in directory <folder>", as if the folder were no pipeline."""
    import json

    folder = shutil.copytree(tiny_model_dir, tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(EgakuError) as err:
        load_pipeline(folder, device="cpu")
    said = str(err.value)
    assert f"{folder} is an incomplete pipeline: its model_index.json names the folder vae/, which is not there" in said
    assert "config.json" not in said
    shutil.copytree(tiny_model_dir / "vae", folder / "vae")  # and one that model_index.json names besides egaku's five
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "feature_extractor": ["transformers",
                                                                                         "CLIPImageProcessor"]}))
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(EgakuError, match=r"names the folders feature_extractor/, tokenizer/, which are not there"):
        load_pipeline(folder, device="cpu")


def test_a_model_config_beside_a_folder_or_named_model_is_said_to_be_unused(tiny_model_dir, tmp_path, capsys):
    """A note, not an error: serve shares one --model-config among its --model sources, folders among them."""
    pipe = load_pipeline(tiny_model_dir, device="cpu", model_config=str(tmp_path))
    assert pipe.egaku_info.kind == "folder"
    out = capsys.readouterr().out
    assert f"--model-config {tmp_path} is not used for {tiny_model_dir}: a pipeline folder holds its own configs" in out
    load_pipeline(tiny_model_dir, device="cpu")
    assert capsys.readouterr().out == ""
    # the named models hold their configs too: said, not silently passed over
    load_pipeline("tiny", device="cpu", model_config=str(tmp_path))
    assert f"--model-config {tmp_path} is not used for the tiny test model" in capsys.readouterr().out
