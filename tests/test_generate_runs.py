"""`egaku generate` runs: an options.json of prompts with --parameters, --chaos with a mask, two runs into one folder."""

import json

import egaku
from PIL import Image

from egaku.cli import main


def test_config_of_a_saved_options_json_repeats_a_run_whose_prompt_sets_steps_and_chaos(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (30, 200, 30)).save("init.png")
    common = ["--model", str(tiny_model_dir), "--no-progress"]
    assert main(["generate", "a cat --steps 3 --seed 4 --chaos 50", "--init-image", "init.png", "--out", "first",
                 *common]) == 0
    saved = json.loads((tmp_path / "first" / "00000-options.json").read_text())
    # the prompt sets them: the file leaves them to it (it would give each twice otherwise)
    assert not {"steps", "seed", "strength"} & set(saved) and saved["prompt"].endswith("--chaos 50")
    assert main(["generate", "--config", "first/00000-options.json", "--out", "again", "--no-progress"]) == 0
    first, again = (egaku.read_params(tmp_path / d / "00000-4.png") for d in ("first", "again"))
    assert (again["steps"], again["seed"], again["strength"]) == (3, 4, 0.575)
    assert {k: v for k, v in first.items() if k != "init_image"} == \
        {k: v for k, v in again.items() if k != "init_image"}
    # a flag given is kept in the file
    assert main(["generate", "a cat --seed 4", "--steps", "2", "--out", "flag", *common]) == 0
    assert json.loads((tmp_path / "flag" / "00000-options.json").read_text())["steps"] == 2


def test_chaos_with_a_mask_lowers_guidance_as_the_servers_edits_do(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (30, 200, 30)).save("init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save("mask.png")
    # was: "the img2img strength is given twice: 1.0 as an option" (the mask's own default), with no strength given
    assert main(["generate", "a cat --chaos 100 --seed 2", "--init-image", "init.png", "--mask", "mask.png",
                 "--steps", "2", "--guidance-scale", "4", "--model", str(tiny_model_dir), "--out", "o",
                 "--no-progress"]) == 0, capsys.readouterr().err
    params = egaku.read_params(tmp_path / "o" / "00000-2.png")
    assert (params["strength"], params["guidance_scale"]) == (1.0, 2.0)


def test_a_run_writing_into_the_same_folder_meanwhile_keeps_its_files(tiny_model_dir, tmp_path, monkeypatch):
    from egaku.inference import commands

    out = tmp_path / "o"
    real = commands.generate

    def and_another_run_writes(*args, **kwargs):  # as a second `egaku generate --out o` started at the same time
        results = real(*args, **kwargs)
        Image.new("RGB", (8, 8)).save(out / "00000-7.png")
        (out / "00000-options.json").write_text("{}")
        return results

    monkeypatch.setattr(commands, "generate", and_another_run_writes)
    assert main(["generate", "a cat", "--seed", "7", "--steps", "2", "--model", str(tiny_model_dir),
                 "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00000-options.json", "00001-7.png",
                                                     "00001-options.json"]
    assert Image.open(out / "00000-7.png").size == (8, 8) and (out / "00000-options.json").read_text() == "{}"
    assert egaku.read_params(out / "00001-7.png")["seed"] == 7
    assert json.loads((out / "00001-options.json").read_text())["prompt"] == "a cat"


def test_a_model_that_fails_to_load_leaves_no_out_folder_and_a_bad_out_is_named_before_loading(tiny_model_dir,
                                                                                              tmp_path, monkeypatch,
                                                                                              capsys):
    import shutil

    import egaku.models.loading as loading

    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    out = tmp_path / "new" / "o"
    assert main(["generate", "a cat", "--model", str(broken), "--out", str(out), "--no-progress"]) == 2
    assert "names the folder vae/, which is not there" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()  # made only once the model has loaded
    (tmp_path / "a-file").write_text("")

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(loading, "load_pipeline", load)
    assert main(["generate", "a cat", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a-file" / "o")]) == 2
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err


def test_an_image_that_cannot_be_written_is_one_line_and_leaves_no_empty_numbered_file(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    from egaku.inference import commands

    def disk_full(image, path, params):
        path.write_bytes(b"\x89PNG")  # part of it, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commands, "save_png", disk_full)
    assert main(["generate", "a cat", "--seed", "7", "--steps", "2", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "00000-7.png: No space left on device; free some space" in err
    assert list((tmp_path / "o").iterdir()) == []


def test_from_notes_a_lora_file_that_has_changed_since_the_image_was_made(style_lora_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """(Was: --from reused the changed file without a word, and the image differed; embeddings had this note.)"""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    for name in ("tagged", "optioned"):
        shutil.copy(style_lora_dir / "style.safetensors", tmp_path / "loras" / f"{name}.safetensors")
    assert main(["generate", "a cat <lora:tagged:0.5> --seed 1", "--lora", "loras/optioned.safetensors:0.5",
                 "--lora-dir", "loras", "--model", "tiny", "--steps", "1", "--out", "first", "--no-progress"]) == 0
    image = str(tmp_path / "first" / "00000-1.png")
    assert main(["generate", "--from", image, "--out", "same", "--no-progress"]) == 0
    assert "has changed since" not in capsys.readouterr().out
    for name in ("tagged", "optioned"):
        path = tmp_path / "loras" / f"{name}.safetensors"
        save_file({k: v * 2 for k, v in load_file(path).items()}, path)
        os.utime(path, (1, 1))  # a new mtime for certain: the short hash is cached per (path, mtime, size)
    assert main(["generate", "--from", image, "--out", "again", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in ("tagged", "optioned"):
        assert f"egaku: note: the LoRA {name} ({tmp_path / 'loras' / name}.safetensors) has changed since {image} " \
               "was made (hash " in out, out
