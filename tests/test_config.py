"""Options, presets and the CLI plumbing every command shares."""

import dataclasses
from pathlib import Path

import pytest

from egaku.cli import COMMANDS, build_parser, parse
from egaku.config import build, config_difference, load_preset, option, save_config
from egaku.errors import EgakuError

CONFIGS = Path(__file__).parent.parent / "configs"
PRESET_COMMAND = {"ldm": "train-ldm", "lora": "train-lora", "gan": "train-gan", "generate": "generate",
                  "serve": "serve"}


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_builds_its_command_options(preset):
    command = PRESET_COMMAND[preset.stem.split("-")[0]]
    _, _, opts_cls = build_parser(command)
    opts = build(opts_cls, load_preset(preset))
    assert dataclasses.is_dataclass(opts)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_parser(name):
    parser, func, opts_cls = build_parser(name)
    assert callable(func) and dataclasses.is_dataclass(opts_cls)
    text = parser.format_help()  # every help text formats (a bare % in one would garble it)
    assert "--config" in text and "'option_strings'" not in text
    if name == "train-lora":
        assert "~30% slower" in " ".join(text.split())


def test_a_preset_value_of_the_wrong_type_names_the_option_and_the_type(tmp_path):
    for line, message in (('steps = "eight"', "option 'steps' must be a whole number, got 'eight'"),
                          ("guidance_scale = true", "option 'guidance_scale' must be a number"),
                          ("overwrite = 1", "option 'overwrite' must be true or false"),
                          ("sampler = 3", "option 'sampler' must be a string"),
                          ("lora = 3", "option 'lora' must be a list, each item a string")):
        (tmp_path / "p.toml").write_text(line + "\n")
        with pytest.raises(EgakuError, match=message.replace("(", r"\(")):
            parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    (tmp_path / "p.toml").write_text("guidance_scale = 5\nlora = ['a.safetensors:0.5']\n")  # an int is a number
    _, opts = parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    assert opts.guidance_scale == 5 and opts.lora == ["a.safetensors:0.5"]
    # one item where a list goes is a list of one, as one flag gives it
    (tmp_path / "p.toml").write_text("lora = 'a.safetensors'\n")
    assert parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])[1].lora == ["a.safetensors"]
    (tmp_path / "p.toml").write_text("validation_seeds = 7\n")
    assert parse(["train-lora", "--config", str(tmp_path / "p.toml")])[1].validation_seeds == [7]


def test_flags_override_preset_which_overrides_defaults(tmp_path):
    (tmp_path / "p.toml").write_text('steps = 33\nsampler = "euler"\nnegative_prompt = "blurry"\n')
    _, opts = parse(["generate", "a cat", "--config", str(tmp_path / "p.toml"), "--steps", "5"])
    # guidance left unset: generate resolves the model's own default once the model is loaded
    assert (opts.steps, opts.sampler, opts.negative_prompt, opts.guidance_scale) == (5, "euler", "blurry", None)


def test_unknown_preset_key_and_missing_file_are_clear_errors(tmp_path):
    (tmp_path / "p.toml").write_text("stepz = 3\n")
    with pytest.raises(EgakuError, match=r"unknown option 'stepz' \(did you mean steps\?\)"):
        parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    (tmp_path / "p.toml").write_text("smapler = 'euler'\n")  # a typo is matched too
    with pytest.raises(EgakuError, match=r"unknown option 'smapler' \(did you mean sampler\?\)"):
        parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    with pytest.raises(EgakuError, match="does not exist"):
        parse(["generate", "a cat", "--config", str(tmp_path / "nope.toml")])
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    with pytest.raises(EgakuError, match="not valid TOML"):
        parse(["generate", "a cat", "--config", str(tmp_path / "bad.toml")])


def test_yaml_presets_read_exponents_as_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; training configs write learning rates that way
    (tmp_path / "p.yaml").write_text("steps: 7\nguidance_scale: 1e1\nnegative_prompt: 1e-3x\n")
    _, opts = parse(["generate", "a cat", "--config", str(tmp_path / "p.yaml")])
    assert (opts.steps, opts.guidance_scale, opts.negative_prompt) == (7, 10.0, "1e-3x")
    (tmp_path / "lora.yml").write_text("data: d\nlearning_rate: 1e-3\nlogit_mean: -2.5E+2\n")
    _, opts = parse(["train-lora", "--config", str(tmp_path / "lora.yml")])
    assert (opts.learning_rate, opts.logit_mean) == (1e-3, -250.0)


def test_save_config_and_difference(tmp_path):
    @dataclasses.dataclass
    class Opts:
        lr: float = option(1e-4, help="learning rate")
        names: list[str] = option(["a"], help="names")

    a, b = Opts(), Opts(lr=2e-4)
    assert a.names is not Opts().names  # list defaults are not shared between instances
    import json

    saved = json.loads(save_config(a, tmp_path / "c.json").read_text())
    assert saved == {"lr": 1e-4, "names": ["a"]}
    assert config_difference(saved, dataclasses.asdict(b)) == ["--lr: checkpoint has 0.0001, now 0.0002"]


def test_two_word_command_needs_its_second_word():
    with pytest.raises(EgakuError, match="needs one of: adherence, gan"):
        parse(["eval"])


def test_a_moved_folder_is_the_same_folder_to_a_resume(tmp_path, monkeypatch):
    (tmp_path / "new" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "new")
    saved = {"data": str(tmp_path / "old" / "data"), "seed": 1}  # the project was moved from old/ to new/
    assert config_difference(saved, {"data": "data", "seed": 1}) == []
    (tmp_path / "old" / "data").mkdir(parents=True)  # while the old folder is there, the other one is another
    assert config_difference(saved, {"data": "data", "seed": 1})[0].startswith("--data: checkpoint has")


def test_a_runs_saved_config_json_is_a_preset_that_repeats_it(tmp_path):
    _, first = parse(["train-ldm", "--config", str(CONFIGS / "ldm-tiny.toml"), "--steps", "7",
                      "--unet-channels", "8", "--unet-channels", "16", "--out", "a"])
    saved = save_config(first, tmp_path / "config.json")
    _, again = parse(["train-ldm", "--config", str(saved), "--out", "b"])
    assert dataclasses.replace(again, out="a") == first
    # the config a resumed session saved repeats the run, not the resume (nor a lora run's --stop-at)
    _, resumed = parse(["train-ldm", "--config", str(CONFIGS / "ldm-tiny.toml"), "--resume", "latest", "--out", "a"])
    _, again = parse(["train-ldm", "--config", str(save_config(resumed, tmp_path / "resumed.json")), "--out", "c"])
    assert not again.resume and not again.export_only
    _, stopped = parse(["train-lora", "--data", "d", "--stop-at", "3", "--resume", "latest"])
    _, again = parse(["train-lora", "--config", str(save_config(stopped, tmp_path / "training_config.json"))])
    assert not again.resume and not again.stop_at and again.data == "d"
    (tmp_path / "bad.json").write_text("{steps: 3")
    with pytest.raises(EgakuError, match="not valid JSON"):
        parse(["train-ldm", "--config", str(tmp_path / "bad.json")])


def test_a_preset_value_outside_an_options_choices_is_named_with_the_nearest_choice(tmp_path):
    (tmp_path / "p.toml").write_text('dtype = "float61"\n')
    with pytest.raises(EgakuError, match=r"option 'dtype': invalid choice 'float61' \(did you mean 'float16'\?\); "
                                         r"choose from auto, float32, float16, bfloat16"):
        parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])
    (tmp_path / "p.toml").write_text('dtype = "float16"\n')
    assert parse(["generate", "a cat", "--config", str(tmp_path / "p.toml")])[1].dtype == "float16"


def test_a_mistyped_flag_is_one_line_naming_the_flag_it_was_meant_to_be(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["generate", "a cat", "--guidance_scale", "5", "--stpes", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--guidance_scale -> --guidance-scale" in err and "--stpes -> --steps" in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 2
    with pytest.raises(SystemExit):
        parse(["generate", "a cat", "--zzzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzz\n" in err and "did you mean" not in err



def test_kohyas_option_names_are_met_with_egakus_on_the_command_line_and_in_config_files(capsys, tmp_path):
    from egaku.inference.generate import GenerateOptions
    from egaku.training.lora import TrainLoraOptions

    with pytest.raises(SystemExit):
        parse(["train-lora", "--data", "d", "--network_dim", "16", "--network-alpha", "8", "--train_batch_size", "2"])
    err = capsys.readouterr().err
    assert "--network_dim -> --rank (kohya's name)" in err and "--network-alpha -> --alpha (kohya's name)" in err
    assert "--train_batch_size -> --batch-size (kohya's name)" in err
    (tmp_path / "kohya.toml").write_text('pretrained_model_name_or_path = "sd15"\ntrain_data_dir = "d"\n')
    with pytest.raises(EgakuError, match="unknown option 'pretrained_model_name_or_path': kohya's name; egaku's is "
                                         "'model'"):
        parse(["train-lora", "--config", str(tmp_path / "kohya.toml")])
    (tmp_path / "sections.toml").write_text('[model_arguments]\npretrained_model_name_or_path = "sd15"\n')
    with pytest.raises(EgakuError, match=r"unknown option 'model_arguments': a section \(\[model_arguments\]\) of "
                                         "options, as kohya's config files group them; egaku's presets are flat"):
        parse(["train-lora", "--config", str(tmp_path / "sections.toml")])
    # a kohya name is hinted only where the command has egaku's option (generate has no --rank)
    with pytest.raises(EgakuError, match=r"unknown option 'network_dim'$"):
        build(GenerateOptions, {"network_dim": 4})
    assert build(TrainLoraOptions, {"data": "d", "rank": 4}).rank == 4


def test_a_second_value_after_a_list_flag_is_named_with_the_flag_to_repeat(capsys):
    with pytest.raises(SystemExit):
        parse(["train-lora", "--data", "d", "--target-modules", "to_q", "to_k"])
    err = capsys.readouterr().err
    assert "to_k -> --target-modules to_k (--target-modules takes one value per flag: repeat it)" in err
    # where the command takes a prompt, a left-over word may be a second prompt: no guess
    with pytest.raises(SystemExit):
        parse(["generate", "--lora", "a.safetensors", "b.safetensors", "a cat"])
    assert "did you mean" not in capsys.readouterr().err

def test_a_list_of_numbers_is_taken_with_commas_as_well_as_the_flag_repeated(capsys, tmp_path):
    """kohya and the GUIs write lists "0,1"; argparse said "invalid int value: '0,1'"."""
    _, opts = parse(["train-lora", "--data", "d", "--validation-seeds", "0,1", "--validation-seeds", "5"])
    assert opts.validation_seeds == [0, 1, 5]
    assert parse(["train-ldm", "--vae-channels", "8,16,16"])[1].vae_channels == [8, 16, 16]
    help_text = " ".join(build_parser("train-lora")[0].format_help().split())
    assert "one column each); repeat the flag for several, or separate them with commas (default: [0, 1])" in help_text
    with pytest.raises(SystemExit):
        parse(["train-lora", "--data", "d", "--validation-seeds", "0,x"])
    assert "argument --validation-seeds: expected whole numbers, one per flag or separated by commas, got '0,x'\n" \
        in capsys.readouterr().err
    (tmp_path / "p.toml").write_text('validation_seeds = "0,1"\n')  # a preset's string reads as the flag's does
    assert parse(["train-lora", "--data", "d", "--config", str(tmp_path / "p.toml")])[1].validation_seeds == [0, 1]


def test_a_list_given_to_a_one_number_option_says_what_number_to_write(capsys, tmp_path):
    """kohya's --resolution 512,512 (width,height) was "invalid int value: '512,512'"; egaku's is one side."""
    for given, said in (("512,512", "takes one number, not the list '512,512' (bucket area is at most "
                                    "resolution^2): write --resolution 512\n"),
                        ("512,768", "takes one number, not the list '512,768' (bucket area is at most "
                                    "resolution^2)\n")):
        with pytest.raises(SystemExit):
            parse(["train-lora", "--data", "d", "--resolution", given])
        err = capsys.readouterr().err
        assert f"egaku train-lora: error: argument --resolution: {said}" in err and len(err.splitlines()) == 2
    for line in ('resolution = "512,512"', "resolution = [512, 512]"):  # a preset is told the same, in its spelling
        (tmp_path / "p.toml").write_text(line + "\n")
        with pytest.raises(EgakuError, match=r"^option 'resolution' takes one number, not the list '512,512' \(bucket "
                                             r"area is at most resolution\^2\): write resolution = 512$"):
            parse(["train-lora", "--data", "d", "--config", str(tmp_path / "p.toml")])
    assert parse(["train-lora", "--data", "d", "--resolution", "512"])[1].resolution == 512


def test_flags_are_matched_whole_and_lr_is_met_with_learning_rate(capsys, tmp_path):
    """--lr was "ambiguous option: --lr could match --lr-scheduler, --lr-warmup-steps", and --learning-rat was taken
    for --learning-rate without a word."""
    for flag, said in (("--lr", "--lr -> --learning-rate"), ("--learning-rat", "--learning-rat -> --learning-rate")):
        with pytest.raises(SystemExit):
            parse(["train-lora", "--data", "d", flag, "1e-4"])
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {flag} 1e-4 (did you mean: {said}?)\n" in err and "ambiguous" not in err
    assert parse(["train-ldm", "--lr", "3e-4"])[1].lr == 3e-4  # train-ldm's own --lr
    with pytest.raises(SystemExit):
        parse(["train-ldm", "--learning-rate", "3e-4"])
    assert "(did you mean: --learning-rate -> --lr?)" in capsys.readouterr().err
    (tmp_path / "p.toml").write_text("lr = 1e-4\n")
    with pytest.raises(EgakuError, match=r"^unknown option 'lr' \(did you mean learning_rate\?\)$"):
        parse(["train-lora", "--data", "d", "--config", str(tmp_path / "p.toml")])


def test_run_paths_are_absolute_and_out_is_checked_against_input_folders_not_builtin_names(tmp_path, monkeypatch):
    from egaku.paths import checked_run_paths

    @dataclasses.dataclass
    class RunOptions:
        out: str = "run"
        data: str = "shapes"
        prior_data: str = ""

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()  # a folder named like the built-in data set: --data shapes is not this folder
    assert checked_run_paths(RunOptions(out="shapes/run"), {"--data": "data"}).data == "shapes"
    (tmp_path / "mine" / "a").mkdir(parents=True)
    opts = checked_run_paths(RunOptions(data="mine/", prior_data="mine/a"), {"--data": "data", "--prior-data": "prior_data"})
    assert opts.data == str(tmp_path / "mine") and opts.prior_data == str(tmp_path / "mine" / "a")
    with pytest.raises(EgakuError, match="--out mine/a/run lies inside --prior-data"):
        checked_run_paths(RunOptions(out="mine/a/run", data="elsewhere", prior_data="mine/a"),
                          {"--data": "data", "--prior-data": "prior_data"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(EgakuError, match="--out file is a file, not a folder"):
        checked_run_paths(RunOptions(out="file"), {"--data": "data"})


def test_egakus_presets_are_found_by_name_from_any_folder_and_a_local_file_comes_first(tmp_path, monkeypatch):
    from egaku.config import PRESETS_DIR, load_preset

    shipped = load_preset(PRESETS_DIR / "lora-tiny.toml")
    monkeypatch.chdir(tmp_path)
    assert load_preset("configs/lora-tiny.toml") == shipped == load_preset("lora-tiny")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "lora-tiny.toml").write_text("rank = 3\n")  # the user's own file of that name
    assert load_preset("configs/lora-tiny.toml") == {"rank": 3}
    with pytest.raises(EgakuError, match=r"'configs/lora-tny.toml' does not exist; .*presets by name \(.*lora-tiny"):
        load_preset("configs/lora-tny.toml")
