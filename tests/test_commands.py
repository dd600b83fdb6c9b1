"""`egaku convert` and `egaku info` on the command line: a wrong --out is one line before any loading, and info
prints an A1111 image's own text."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file

import egaku.models.commands as convert_module
from egaku.cli import build_parser, main


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model is an error: each mistake in --out must be named before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(convert_module, "load_pipeline", load)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_convert_names_an_out_it_cannot_write_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "some.png").write_text("an image")
    (tmp_path / "folder.safetensors").mkdir()
    for out, said in [
        (tmp_path / "some.png" / "x.safetensors", f"{tmp_path / 'some.png'} is a file, not a folder"),
        (tmp_path / "some.png" / "deeper" / "pipe", f"{tmp_path / 'some.png'} is a file, not a folder"),
        (tmp_path / "some.png", "is a file, and an --out that does not end in .safetensors is written as a "
                                "diffusers folder"),
        (tmp_path / "folder.safetensors", "is a folder, and a NAME.safetensors --out is written as one file"),
    ]:
        for extra in ([], ["--overwrite"]):  # --overwrite replaces a target; it cannot make a file a folder
            err = one_line_error(capsys, ["convert", "tiny", "--out", str(out), *extra])
            assert said in err and "choose another --out" in err, err
    # a folder that takes no files, whoever runs it (root too): /proc
    if Path("/proc").is_dir():
        for out in ("/proc/x.safetensors", "/proc/new/pipe"):
            err = one_line_error(capsys, ["convert", "tiny", "--out", out])
            assert "cannot be written: no file can be made in /proc" in err, err
    # a target that exists still needs --overwrite
    (tmp_path / "old.safetensors").write_text("")
    err = one_line_error(capsys, ["convert", "tiny", "--out", str(tmp_path / "old.safetensors")])
    assert "already exists; pass --overwrite" in err


def test_convert_without_out_says_what_it_takes(capsys, no_loading):
    err = one_line_error(capsys, ["convert", "tiny"])
    assert "--out is required: NAME.safetensors for one original-layout file" in err
    assert "or a folder for a diffusers pipeline" in err and "__init__" not in err
    help_text = " ".join(build_parser("convert")[0].format_help().split())
    assert "--out OUT required; the target: NAME.safetensors" in help_text


def test_convert_write_failure_is_one_line(tmp_path, capsys, monkeypatch):
    class Pipe:  # each model cast to the dtype it is written in
        def to(self, dtype):
            return self

        unet = text_encoder = vae = property(lambda self: self)

    def full_disk(pipe, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(convert_module, "load_pipeline", lambda *a, **k: Pipe())
    monkeypatch.setattr(convert_module, "model_defaults", lambda pipe: {})
    monkeypatch.setattr(convert_module, "save_pipeline", full_disk)
    err = one_line_error(capsys, ["convert", "tiny", "--out", str(tmp_path / "pipe")])
    assert f"could not write --out {tmp_path / 'pipe'}" in err and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # no half-written folder is left


def test_convert_overwrite_replaces_a_pipeline_folder_whole_and_no_other_folder(tmp_path, capsys, tiny_model_dir,
                                                                                monkeypatch):
    out = tmp_path / "pipe"
    assert main(["convert", str(tiny_model_dir), "--out", str(out)]) == 0
    (out / "unet" / "old-weights.safetensors").write_text("from an earlier conversion")
    assert main(["convert", str(tiny_model_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "unet" / "old-weights.safetensors").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # the temporary folder is gone
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("a photo")
    err = one_line_error(capsys, ["convert", str(tiny_model_dir), "--out", str(photos), "--overwrite"])
    assert "is a folder that is not a diffusers pipeline" in err and (photos / "a.jpg").is_file()
    monkeypatch.chdir(out)  # the working folder itself would be removed
    err = one_line_error(capsys, ["convert", str(tiny_model_dir), "--out", ".", "--overwrite"])
    assert "is the working folder" in err and (out / "model_index.json").is_file()


def test_convert_makes_missing_folders_of_a_good_out(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "tiny.safetensors"
    assert main(["convert", "tiny", "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out


A1111_TEXT = ("a cat, <lora:x:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 7, Seed: 12, Size: 512x768, Model hash: abc, Model: sd15, ADetailer model: face, "
              "Version: v1.9.4")


def test_info_prints_an_a1111_image_s_own_text(tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)  # as A1111 writes it: no egaku chunk
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert main(["info", str(tmp_path / "a1111.png")]) == 0
    assert capsys.readouterr().out == A1111_TEXT + "\n"  # verbatim: keys egaku does not read are kept
    assert main(["info", str(tmp_path / "a1111.png"), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert (params["seed"], params["sampler"], params["width"]) == (12, "DPM++ 2M Karras", 512)


def test_info_into_a_pipe_closed_by_its_reader_ends_quietly_with_sigpipe_status(tmp_path):
    """`egaku info x.png | head -1` ended in a BrokenPipeError traceback and status 1. A text longer than the pipe
    holds meets the closed pipe in print, a short one in the flush at exit: both end with no word, status 141."""
    texts = {"long": "\n".join(f"{A1111_TEXT} {i}" for i in range(1000)), "short": A1111_TEXT}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a user's shell
    runs = {}
    for name, text in texts.items():
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png", pnginfo=info)
        runs[name] = subprocess.Popen([sys.executable, "-m", "egaku", "info", str(tmp_path / f"{name}.png")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        runs[name].stdout.close()  # the reader is gone before egaku writes: `| head -0`
    for name, run in runs.items():
        err = run.stderr.read()
        assert (name, run.wait(), err) == (name, 141, "")


def test_a_command_with_stdout_or_both_streams_closed_does_its_work_without_a_traceback(tmp_path):
    """`egaku ... >&-`: Python's sys.stdout is then None, and the first flush failed with an AttributeError traceback
    (status 1). The output is dropped and the command does its work: `generate` still writes its image."""
    closed = {"stdout": ["1>&-"], "both": ["1>&-", "2>&-"]}
    for name, redirects in closed.items():
        out = tmp_path / name
        command = " ".join([sys.executable, "-m", "egaku", "generate", "'a red circle'", "--model", "tiny",
                            "--steps", "1", "--out", str(out), *redirects])
        run = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        assert (name, run.returncode) == (name, 0), run.stderr
        assert "Traceback" not in run.stderr
        assert len(list(out.glob("*.png"))) == 1


def test_info_takes_a_lora_hub_id_and_a_missing_image_stays_an_image(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["info", "someone/star-lora"])
    assert "LoRA 'someone/star-lora' is not a local file or folder, nor in the hub cache" in err
    err = one_line_error(capsys, ["info", "outputs/missing.png"])
    assert "outputs/missing.png does not exist" in err and "hub" not in err


def test_convert_onto_its_own_folder_keeps_the_source_s_other_files(tmp_path, capsys, tiny_model_dir):
    source = tmp_path / "sd"
    shutil.copytree(tiny_model_dir, source)
    (source / "MODEL_CARD.md").write_text("the model's card")
    for out in (source, tmp_path / "sd" / ".." / "sd"):
        err = one_line_error(capsys, ["convert", str(source), "--out", str(out), "--overwrite", "--dtype", "float16"])
        assert "is the source model's folder" in err and "write the converted copy to another --out" in err
    assert (source / "MODEL_CARD.md").read_text() == "the model's card"


def test_convert_writes_an_upper_case_safetensors_out_as_one_file(tmp_path, capsys):
    out = tmp_path / "Tiny.SAFETENSORS"
    assert main(["convert", "tiny", "--out", str(out)]) == 0
    assert out.is_file() and "model.diffusion_model.out.2.weight" in load_file(out)


def _stored_dtypes(path: Path) -> dict[str, set[str]]:
    """Each model's dtypes as stored (safetensors header): a pipeline folder's files, or a single file's keys."""
    from safetensors import safe_open

    prefixes = {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.", "vae": "first_stage_model."}
    found = {}
    for component, prefix in prefixes.items():
        files = [path] if path.is_file() else list((path / component).glob("*.safetensors"))
        found[component] = set()
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                found[component] |= {fh.get_slice(k).get_dtype() for k in fh.keys()
                                     if path.is_dir() or k.startswith(prefix)} - {"I64"}
    return found


def test_convert_keeps_each_model_s_stored_dtype_unless_dtype_is_given(tmp_path, capsys, tiny_model_dir):
    """An fp16 UNet beside an fp32 text encoder and VAE stays so, through a single file and back, as merge-lora's
    --save-precision auto keeps it; an fp16 copy is not written at twice its size. --dtype puts all in one."""
    import torch

    from egaku.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="float32")
    pipe.unet.to(dtype=torch.float16)
    mixed = tmp_path / "mixed"
    pipe.save_pretrained(mixed, safe_serialization=True)
    kept = {"unet": {"F16"}, "text_encoder": {"F32"}, "vae": {"F32"}}
    assert _stored_dtypes(mixed) == kept
    capsys.readouterr()
    assert main(["convert", str(mixed), "--out", str(tmp_path / "mixed.safetensors")]) == 0
    assert _stored_dtypes(tmp_path / "mixed.safetensors") == kept
    assert f"wrote {tmp_path / 'mixed.safetensors'} (UNet fp16, text encoder fp32, VAE fp32)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "mixed.safetensors"), "--model-config", str(tiny_model_dir),
                 "--out", str(tmp_path / "back")]) == 0
    assert _stored_dtypes(tmp_path / "back") == kept
    capsys.readouterr()
    assert main(["convert", str(mixed), "--out", str(tmp_path / "half"), "--dtype", "float16"]) == 0
    assert _stored_dtypes(tmp_path / "half") == dict.fromkeys(kept, {"F16"})
    assert f"wrote {tmp_path / 'half'} (fp16) in" in capsys.readouterr().out
    assert main(["convert", str(tiny_model_dir), "--out", str(tmp_path / "full")]) == 0  # an fp32 source stays fp32
    assert _stored_dtypes(tmp_path / "full") == dict.fromkeys(kept, {"F32"})
    assert f"wrote {tmp_path / 'full'} in" in capsys.readouterr().out
    help_text = " ".join(build_parser("convert")[0].format_help().split())
    assert "{auto,float32,float16,bfloat16}" in help_text and "auto keeps each model's" in help_text


def test_info_says_a_model_is_a_model_and_what_info_reads(tmp_path, capsys, tiny_model_dir):
    """A pipeline folder was "a LoRA folder without pytorch_lora_weights.safetensors", a .ckpt "not a readable
    image"."""
    from egaku.models.single_file import save_single_file
    from egaku.models.tiny import tiny_pipeline

    reads = "egaku info reads PNGs written by egaku or A1111 (and A1111's JPEG/WebP), LoRA .safetensors files and " \
            "train-lora folders"
    err = one_line_error(capsys, ["info", str(tiny_model_dir)])
    assert f"{tiny_model_dir} is a diffusers pipeline folder, a model (egaku generate --model takes it)" in err
    assert reads in err and "LoRA folder" not in err
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "model")  # a train-ldm run
    err = one_line_error(capsys, ["info", str(tmp_path / "run")])
    assert f"is a train-ldm run; its model is {tmp_path / 'run' / 'model'}" in err and reads in err
    (tmp_path / "sd15.ckpt").write_bytes(b"a pickle")
    err = one_line_error(capsys, ["info", str(tmp_path / "sd15.ckpt")])
    assert "sd15.ckpt is a pickled checkpoint (.ckpt), which egaku info does not read" in err
    assert "egaku generate --model FILE --allow-pickle" in err and reads in err and "not a readable image" not in err
    single = save_single_file(tiny_pipeline(), tmp_path / "sd.safetensors")
    err = one_line_error(capsys, ["info", str(single)])
    assert "is a single-file Stable Diffusion checkpoint, a model (egaku generate --model takes it)" in err
    assert reads in err


def test_ctrl_c_says_interrupted_once_for_a_distributed_run(monkeypatch, capsys):
    """Every process of a torchrun run gets the SIGINT: only the first (RANK 0) says so."""
    import egaku.cli as cli

    def stopped(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse", stopped)
    for rank, said in (("1", ""), ("0", "egaku: interrupted\n")):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["generate", "x"]) == 130
        assert capsys.readouterr().err == said
