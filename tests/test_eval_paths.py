"""sample-gan, eval gan and eval adherence: wrong paths and options are refused in one line before any work,
and a diffusion model given where a GAN goes is named as what it is."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import egaku.models.loading
from egaku import paths
from egaku.cli import main as cli_main
from egaku.config import build
from egaku.errors import EgakuError
from egaku.evaluation import adherence, gan_eval
from egaku.evaluation.adherence import AdherenceOptions
from egaku.evaluation.gan_eval import EvalGanOptions, JudgeRecipe, eval_gan_command
from egaku.gan import commands as gan_commands
from egaku.gan.commands import SampleGanOptions, sample_gan_command
from egaku.gan.models import build_gan
from egaku.training.runtime import TRAINER_OPTIONS


def _no_work(what: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"{what} ran before the paths were checked")
    return refuse


@pytest.fixture
def gan_dir(tmp_path) -> Path:
    """A train-gan output folder with an untrained tiny MLP generator (the weights are never read here)."""
    gen, _ = build_gan("mlp", image_size=8)
    gen.save_pretrained(tmp_path / "g1" / "generator")
    return tmp_path / "g1"


@pytest.fixture
def no_gan_work(monkeypatch):
    for module in (gan_commands, gan_eval):
        monkeypatch.setattr(module, "load_generator", _no_work("load_generator"))
    monkeypatch.setattr(gan_eval, "load_or_train_judge", _no_work("the judge"))


@pytest.fixture
def no_adherence_work(monkeypatch):
    monkeypatch.setattr(adherence, "load_judge", _no_work("load_judge"))
    monkeypatch.setattr(egaku.models.loading, "load_pipeline", _no_work("load_pipeline"))


@pytest.fixture
def unwritable(monkeypatch):
    """``unwritable(folder)``: no file can be made in ``folder`` (as in /sys, or on a read-only disk)."""
    real = tempfile.TemporaryFile

    def patch(folder: Path) -> None:
        def temporary_file(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(paths.tempfile, "TemporaryFile", temporary_file)

    return patch


class Reached(Exception):
    """Raised by a stand-in for the work the checks let through."""


def _raise(exc: Exception):
    raise exc


def _one_line_error(capsys, args: list[str], match: str) -> None:
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egaku: error:"), err
    assert match in err[0], err[0]


# 1. sample-gan --out


def test_sample_gan_refuses_a_bad_out_before_loading(gan_dir, tmp_path, no_gan_work, unwritable, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable(locked)
    for out, message in ((afile, "is a file, not a folder"), (afile / "x", f"{afile} is a file"),
                         (locked / "x", "no file can be made in"), (" ", "--out is empty")):
        with pytest.raises(EgakuError, match=message):
            sample_gan_command(build(SampleGanOptions, {"model": str(gan_dir), "n": 2, "out": str(out)}))
    _one_line_error(capsys, ["sample-gan", "--model", str(gan_dir), "-n", "2", "--out", str(afile)], "is a file")
    # the default, MODEL/samples-gan, is checked too
    unwritable(gan_dir)
    with pytest.raises(EgakuError, match="samples-gan cannot be written"):
        sample_gan_command(build(SampleGanOptions, {"model": str(gan_dir), "n": 2}))


def test_sample_gan_still_writes_to_a_new_out(gan_dir, tmp_path):
    sample_gan_command(build(SampleGanOptions, {"model": str(gan_dir), "n": 2, "out": str(tmp_path / "a" / "b")}))
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["0000.png", "0001.png", "config.json",
                                                                       "grid.png"]


# 2. eval adherence --out


def test_eval_adherence_refuses_a_bad_out_before_any_work(tmp_path, no_adherence_work, unwritable, capsys):
    folder = tmp_path / "ad1"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable(locked)
    (tmp_path / "sheet.png").mkdir()  # where the contact sheet of --out sheet.json would go
    small = {"seen_prompts": 1, "held_out_prompts": 0, "star_prompts": 0, "steps": 1}
    for out, message in ((folder, "is a folder; give a file name"), (afile / "r.json", f"{afile} is a file"),
                         (locked / "r.json", "no file can be made in"), (tmp_path / "r.png", "ends in .png"),
                         (tmp_path / "sheet.json", "sheet.png is a folder"), ("", "--out is empty")):
        with pytest.raises(EgakuError, match=message):
            adherence.eval_adherence_command(AdherenceOptions(model="builtin", out=str(out), **small))
    _one_line_error(capsys, ["eval", "adherence", "--out", str(folder), "--seen-prompts", "1"], "is a folder")


# 3. eval gan --out and --judge-dir


def test_eval_gan_refuses_a_bad_out_or_judge_dir_before_any_work(gan_dir, tmp_path, no_gan_work, unwritable,
                                                                 capsys):
    folder = tmp_path / "ad1"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    judge = str(tmp_path / "judge")
    for overrides, message in (({"out": str(folder)}, "--out .*ad1 is a folder"),
                               ({"out": str(afile / "r.json")}, f"{afile} is a file"),
                               ({"judge_dir": str(afile)}, "--judge-dir .*afile is a file, not a folder"),
                               ({"judge_dir": str(afile / "j")}, "--judge-dir .* cannot be written")):
        with pytest.raises(EgakuError, match=message):
            eval_gan_command(build(EvalGanOptions, {"model": str(gan_dir), "n": 10, "judge_dir": judge, **overrides}))
    _one_line_error(capsys, ["eval", "gan", "--model", str(gan_dir), "-n", "10", "--judge-dir", str(afile)],
                    "--judge-dir")
    # the default report, MODEL/eval-gan.json, is checked too
    unwritable(gan_dir)
    with pytest.raises(EgakuError, match="eval-gan.json cannot be written"):
        eval_gan_command(build(EvalGanOptions, {"model": str(gan_dir), "n": 10, "judge_dir": judge}))


def test_eval_gan_reads_a_cached_judge_from_a_folder_it_cannot_write(gan_dir, tmp_path, monkeypatch, unwritable):
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "training.json").write_text(json.dumps({"recipe": JudgeRecipe().__dict__, "held_out_accuracy": 0.9}))
    unwritable(judge)
    monkeypatch.setattr(gan_eval, "load_or_train_judge", lambda folder, *a, **k: _raise(Reached(folder)))
    with pytest.raises(Reached, match="judge"):
        eval_gan_command(build(EvalGanOptions, {"model": str(gan_dir), "n": 10, "judge_dir": str(judge)}))
    # a judge of another recipe would be trained and written there: then the folder must be writable
    (judge / "training.json").write_text(json.dumps({"recipe": {"epochs": 1}, "held_out_accuracy": 0.9}))
    with pytest.raises(EgakuError, match="--judge-dir .* cannot be written"):
        eval_gan_command(build(EvalGanOptions, {"model": str(gan_dir), "n": 10, "judge_dir": str(judge)}))


# 4. eval adherence options


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "--steps must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"seen_prompts": 0, "held_out_prompts": 0, "star_prompts": 0}, "all 0: ask for at least one prompt"),
    ({"star_prompts": -1}, "--star-prompts must be 0 or more, got -1"),
    ({"sampler": "bogus"}, "unknown sampler 'bogus'"),
])
def test_adherence_options_are_checked_on_construction(overrides, message):
    with pytest.raises(EgakuError, match=message):
        AdherenceOptions(**overrides)
    with pytest.raises(EgakuError, match=message):
        build(AdherenceOptions, overrides)


def test_adherence_options_accept_one_split_and_a1111_sampler_names():
    AdherenceOptions(seen_prompts=0, held_out_prompts=0, star_prompts=3, steps=1, sampler="DPM++ 2M")


def test_eval_adherence_cli_refuses_zero_steps_and_no_prompts(tmp_path, no_adherence_work, capsys):
    out = str(tmp_path / "r.json")
    _one_line_error(capsys, ["eval", "adherence", "--steps", "0", "--out", out], "--steps must be at least 1")
    _one_line_error(capsys, ["eval", "adherence", "--seen-prompts", "0", "--held-out-prompts", "0",
                             "--star-prompts", "0", "--out", out], "ask for at least one prompt")
    assert not Path(out).exists()


# 5. a train-ldm run given to sample-gan or eval gan


def _ldm_run(root: Path, exported: bool = True) -> Path:
    """What `egaku train-ldm --out RUN` leaves: config.json, checkpoints/step-N/, and model/ once it finishes."""
    run = root / "r1"
    step = run / "checkpoints" / "step-000006"
    step.mkdir(parents=True)
    config = {key: 1 for key in TRAINER_OPTIONS["train-ldm"]}
    for folder in (run, step):
        (folder / "config.json").write_text(json.dumps(config))
    (step / "state.pt").write_bytes(b"")
    if exported:
        (run / "model").mkdir()
        (run / "model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return run


@pytest.mark.parametrize("command", [["sample-gan"], ["eval", "gan", "-n", "10"]])
def test_a_train_ldm_run_is_named_as_a_diffusion_model(command, tmp_path, no_gan_work, capsys):
    run = _ldm_run(tmp_path)
    model = run / "model"
    for given, what in ((run, "is a train-ldm run"), (model, "is a diffusers pipeline folder"),
                        (run / "checkpoints" / "step-000006", "is a train-ldm checkpoint")):
        _one_line_error(capsys, [*command, "--model", str(given)], what)
        assert cli_main([*command, "--model", str(given)]) == 2
        err = capsys.readouterr().err
        assert "not a GAN" in err and "no exported generator" not in err
        assert f"`egaku generate --model {model}`" in err and f"`egaku eval adherence --model {model}`" in err


def test_an_unfinished_train_ldm_run_and_a_gan_run_keep_their_own_messages(tmp_path, no_gan_work):
    run = _ldm_run(tmp_path, exported=False)
    with pytest.raises(EgakuError, match="train-ldm run .* model is not written yet.*egaku generate --model"):
        sample_gan_command(build(SampleGanOptions, {"model": str(run)}))
    gan_run = tmp_path / "g1"
    (gan_run / "checkpoints").mkdir(parents=True)
    (gan_run / "config.json").write_text(json.dumps({key: 1 for key in TRAINER_OPTIONS["train-gan"]}))
    with pytest.raises(EgakuError, match="no exported generator yet; let train-gan finish"):
        eval_gan_command(build(EvalGanOptions, {"model": str(gan_run), "n": 10}))
    # a checkpoint of a run that has exported its generator points at the run
    step = gan_run / "checkpoints" / "step-000020"
    step.mkdir()
    (step / "state.pt").write_bytes(b"")
    (gan_run / "generator").mkdir()
    (gan_run / "generator" / "config.json").write_text("{}")
    with pytest.raises(EgakuError, match=f"is a training checkpoint; the run's generator .* pass --model {gan_run}"):
        eval_gan_command(build(EvalGanOptions, {"model": str(step), "n": 10}))


def test_a_train_lora_run_is_named_as_a_lora(tmp_path, no_gan_work):
    run = tmp_path / "lora1"
    run.mkdir()
    (run / "training_config.json").write_text(json.dumps({key: 1 for key in TRAINER_OPTIONS["train-lora"]}))
    with pytest.raises(EgakuError, match="train-lora run .*not a GAN.*egaku generate --lora"):
        sample_gan_command(build(SampleGanOptions, {"model": str(run)}))
