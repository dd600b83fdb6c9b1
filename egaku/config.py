"""Typed option dataclasses: the single source of defaults for the CLI, the Python API and presets.

Each concern has one dataclass. A field's ``metadata`` carries its help text (``help``), and optionally
``positional=True``, ``short="-n"``, ``choices=[...]`` or ``repeat=True`` (a list field that can be given
several times). The same dataclass is filled from, in increasing priority: its defaults, a TOML preset
(``--config configs/x.toml``), then command-line flags. ``save_config`` writes the resolved values beside
every checkpoint and output so a run can be reproduced.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import EgakuError
from .paths import RESERVED_NAMES

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with help text; list/dict defaults are copied per instance."""
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# kohya sd-scripts' names (train_network.py's flags and their TOML --config_file keys) of options egaku spells
# otherwise; a kohya user's first command or config file is met with the name to use, not only "unknown". Names egaku
# shares (--learning_rate, --clip_skip, --noise_offset, --min_snr_gamma, --seed, --resolution...) need no entry: the
# CLI names their dashed form, and a preset reads them as they are
KOHYA_NAMES = {
    "pretrained_model_name_or_path": "model", "train_data_dir": "data", "reg_data_dir": "prior_data",
    "output_dir": "out", "network_dim": "rank", "network_alpha": "alpha", "network_dropout": "dropout",
    "network_weights": "init_lora", "conv_dim": "conv_rank", "max_train_steps": "max_steps",
    "max_train_epochs": "epochs", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation", "unet_lr": "learning_rate",
    "optimizer_type": "optimizer", "use_8bit_adam": "adam_8bit", "save_every_n_steps": "save_every",
    "sample_prompts": "validation_prompts", "sample_every_n_steps": "validation_every", "flip_aug": "random_flip",
    "caption_dropout_rate": "caption_dropout", "caption_tag_dropout_rate": "caption_tag_dropout",
    "debiased_estimation_loss": "debiased_estimation", "ip_noise_gamma": "input_perturbation",
    "conditioning_data_dir": "mask_dir", "init_word": "token_init", "config_file": "config",
    # kohya's options egaku has no equivalent of: the option that does their work, with what KOHYA_NOTES says
    "output_name": "out", "save_model_as": "format", "network_module": "dora", "network_args": "lora_conv",
    "caption_extension": "caption_template", "optimizer_args": "weight_decay", "enable_bucket": "max_aspect",
    "min_bucket_reso": "max_aspect", "max_bucket_reso": "max_aspect", "bucket_reso_steps": "max_aspect",
    "bucket_no_upscale": "max_aspect", "save_every_n_epochs": "save_every",
    "sample_every_n_epochs": "validation_every", "cache_latents_to_disk": "cache_dir", "masked_loss": "mask_dir",
    "save_state": "checkpoint_every", "network_train_unet_only": "train_text_encoder",
    "no_half_vae": "mixed_precision", "full_fp16": "mixed_precision", "full_bf16": "mixed_precision",
    "lr_scheduler_num_cycles": "lr_scheduler", "lr_scheduler_power": "lr_scheduler", "logging_dir": "log_with",
    "dataset_config": "data",
}
_BUCKETS = ("bucket setting: egaku always buckets the images by aspect ratio, the most elongated bucket --max-aspect, "
            "each bucket's area at most --resolution squared")
_HALF = ("switch for half-precision LoRA weights: egaku trains them in fp32, and --mixed-precision runs the frozen "
         "base in fp16 or bf16")
# what a KOHYA_NAMES entry is in kohya's trainer, where it is not the same option under another name: "kohya's" and
# this phrase take the place of "kohya's name" in the hint (no ';': the CLI joins several hints with it)
KOHYA_NOTES = {
    "output_name": "name of the LoRA file: egaku names its kohya file after the --out folder, so --out loras/sks "
                   "writes loras/sks/sks.safetensors",
    "save_model_as": "file type: egaku writes .safetensors, in the layouts --format names: kohya, diffusers or both",
    "network_module": "network type: egaku trains LoRA through peft, or DoRA with --dora, and --lora-conv adapts "
                      "the convolutions too, as LoCon does",
    "network_args": "network options: conv_dim and conv_alpha are --lora-conv with --conv-rank and --conv-alpha, "
                    "loraplus_lr_ratio is --loraplus-lr-ratio",
    "caption_extension": "caption file extension: egaku reads IMAGE.txt, else IMAGE.caption, and an image with neither "
                         "takes its class folder's name through --caption-template",
    "optimizer_args": "optimizer arguments: weight_decay is --weight-decay, the others are egaku's own",
    "optimizer_type": "optimizer class: AdamW is --optimizer adamw, AdamW8bit --optimizer adamw --adam-8bit, Prodigy "
                      "and Adafactor --optimizer prodigy and adafactor",
    "enable_bucket": _BUCKETS, "min_bucket_reso": _BUCKETS, "max_bucket_reso": _BUCKETS,
    "bucket_reso_steps": _BUCKETS, "bucket_no_upscale": _BUCKETS,
    "save_every_n_epochs": "saves by epochs: egaku's --save-every counts steps",
    "sample_every_n_epochs": "samples by epochs: egaku's --validation-every counts steps",
    "cache_latents_to_disk": "disk cache switch: egaku's --cache-dir takes the folder to keep the cache in",
    "masked_loss": "masked loss switch: egaku's is --mask-dir FOLDER, kohya's conditioning_data_dir, or --alpha-mask",
    "save_state": "training state switch: egaku writes checkpoints every --checkpoint-every steps and at the end, "
                  "which --resume latest continues",
    "network_train_unet_only": "switch for the UNet alone: egaku's default, --train-text-encoder trains the text "
                               "encoder too",
    "no_half_vae": "switch for an fp32 VAE: egaku encodes with the VAE in fp32 whatever --mixed-precision is",
    "full_fp16": _HALF, "full_bf16": _HALF,
    "lr_scheduler_num_cycles": "cycles of cosine_with_restarts: egaku's --lr-scheduler schedules take diffusers' "
                               "default, one cycle",
    "lr_scheduler_power": "power of the polynomial schedule: egaku's --lr-scheduler schedules take diffusers' "
                          "default, power 1",
    "logging_dir": "log folder: egaku writes loss.csv into the --out folder, and with --log-with tensorboard "
                   "TensorBoard's files into OUT/logs",
    "dataset_config": "dataset file: egaku trains one --data folder, whose class folders named N_class give "
                      "their repeats, with --prior-data for regularization images",
}


# other common names of options, no spelling of which is close to egaku's: torch's and most scripts' lr for the
# learning rate (train-ldm's is --lr: there --learning-rate is met with it)
SYNONYMS = {"lr": "learning_rate", "learning_rate": "lr"}


def other_name_hint(key: str, names: typing.Iterable[str]) -> tuple[str, str] | None:
    """(egaku's name, whose name ``key`` is: "kohya's name", what kohya's option is (``KOHYA_NOTES``), or "") for
    another tool's name of an option (with - or _), where ``names`` (the command's fields) has egaku's."""
    key, names = key.lstrip("-").replace("-", "_"), set(names)
    for table, whose in ((KOHYA_NAMES, "kohya's name"), (SYNONYMS, "")):
        if table.get(key) in names:
            return table[key], (f"kohya's {KOHYA_NOTES[key]}" if whose and key in KOHYA_NOTES else whose)
    return None


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) for annotations like ``int``, ``str | None``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# a number written with a decimal comma, as much of Europe writes 7.5
_DECIMAL_COMMA = re.compile(r"\s*([+-]?\d+),(\d+)\s*")


def decimal_comma(text: str) -> str | None:
    """``text`` with its decimal comma made a point ("7,5" -> "7.5"), where it is a number written so; else None."""
    match = _DECIMAL_COMMA.fullmatch(text)
    return f"{match[1]}.{match[2]}" if match else None


def _not_a_decimal(text: str, write: str) -> str | None:
    """The error for a single fractional number written with a decimal comma (``--cfg 7,5``); ``write`` is how the
    option is set, to format with the number. None where ``text`` is not such a number."""
    number = decimal_comma(text)
    if number is None:
        return None
    return f"{text.strip()!r} is not a number: write {write.format(number)} (with a decimal point, not a comma)"


def number_list(text: str, tp: type) -> list[Any]:
    """"0,1" as a list of numbers of type ``tp``, as kohya and the GUIs write lists (ValueError where an item is no
    such number): a flag's value and a preset's string read the same."""
    return [tp(item) for item in text.split(",")]


def _one_number(items: list[Any], help_text: str, write: str) -> str:
    """The error for a list given to a single-number option: kohya writes ``--resolution 512,512`` (its largest
    bucket's width,height) where egaku's --resolution is one side. ``write`` is how the option is set, to format
    with the number."""
    items = [str(item).strip() for item in items]
    what = help_text.split(" (")[0].split("; ")[0]  # what the number is, from the start of its help
    what = f" ({what})" if what else ""
    instead = f": write {write.format(items[0])}" if len(set(items)) == 1 else ""
    return f"takes one number, not the list {','.join(items)!r}{what}{instead}"


def _number_type(tp: type, name: str, help_text: str, is_list: bool) -> typing.Callable[[str], Any]:
    """argparse's ``type`` for a number option. A list option reads "0,1", as kohya and the GUIs write lists, as
    well as the flag repeated (with action="extend"); a single-number option given a list names what to write."""
    flag = "--" + name.replace("_", "-")

    def convert(text: str) -> Any:
        if is_list:
            try:
                return number_list(text, tp)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {_KINDS[tp].removeprefix('a ')}s, one per flag or "
                                                 f"separated by commas, got {text!r}") from None
        if "," in text:
            decimal = _not_a_decimal(text, "{}") if tp is float else None  # --cfg 7,5: a decimal comma
            raise argparse.ArgumentTypeError(decimal or _one_number(text.split(","), help_text, flag + " {}"))
        return tp(text)

    convert.__name__ = tp.__name__  # argparse names it in its "invalid int value: 'x'"
    return convert


def _list_from_preset(value: Any, annotation: Any) -> Any:
    """A preset's value for a list option written as the flag reads it: "0,1" for a list of numbers, and one item
    (``validation_seeds = 0``, ``validation_prompts = "a cat"``) for a list of one; what does not read as either is
    left to ``_check_type`` to name."""
    tp, is_list = _base_type(annotation)
    if not is_list or isinstance(value, (list, tuple)):
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            return number_list(value, tp)
        except ValueError:
            return value
    return [value] if tp in (int, float, str) and _fits(value, tp) else value


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass ``cls``; defaults stay unset so presets can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if is_list and not f.metadata.get("positional"):
            help_text += "; repeat the flag for several" + (", or separate them with commas" if tp in (int, float)
                                                            else "")
        if default not in (None, "", [], dataclasses.MISSING) and tp is not bool:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: "~30% slower" would break it
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(f.name, type=tp, nargs="?" if default is not None else None, **kwargs)
            continue
        names = ["--" + f.name.replace("_", "-")]
        if f.metadata.get("short"):
            names.insert(0, f.metadata["short"])
        names += f.metadata.get("aliases", [])
        # flags that each set the option to one value (``--no-emphasis`` is ``--emphasis none``): given with the
        # option's own flag, argparse refuses the pair ("not allowed with")
        const_flags = f.metadata.get("const_flags", {})
        target = parser.add_mutually_exclusive_group() if const_flags else parser
        for flag, value in const_flags.items():
            target.add_argument(flag, action="store_const", const=value, default=argparse.SUPPRESS, dest=f.name,
                                help=f"the same as {names[0]} {value}")
        if tp is bool:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif tp in (int, float):
            number = _number_type(tp, f.name, f.metadata.get("help", ""), is_list)
            target.add_argument(*names, type=number, action="extend" if is_list else None, **kwargs)
        elif is_list:
            target.add_argument(*names, type=tp, action="append", **kwargs)
        else:
            target.add_argument(*names, type=tp, **kwargs)


# egaku's presets (configs/ beside the package in a source checkout)
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def _preset_path(path: Path) -> Path:
    """``path``, or where it names one of egaku's presets from another folder (``configs/lora-tiny.toml``,
    ``lora-tiny.toml`` or ``lora-tiny``), that preset."""
    if path.is_file() or path.parent.name not in ("", "configs"):
        return path
    for name in (path.name, path.name + ".toml"):
        if (PRESETS_DIR / name).is_file():
            return PRESETS_DIR / name
    return path


def load_preset(path: str | Path) -> dict[str, Any]:
    path = _preset_path(Path(path))
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        presets = f" or one of egaku's presets by name ({', '.join(known)})" if known else ""
        raise EgakuError(f"config file {str(path)!r} does not exist; pass a TOML, YAML or JSON file such as "
                         f"configs/<name>.toml{presets}")
    suffix = path.suffix.lower()
    if suffix == ".json":  # a run's resolved config.json: repeat that run
        kind, parse, errors = "JSON", json.loads, (json.JSONDecodeError,)
    elif suffix in (".yaml", ".yml"):
        import yaml

        kind, parse, errors = "YAML", lambda text: yaml.load(text, Loader=_yaml_loader()) or {}, (yaml.YAMLError,)
    else:
        kind, parse, errors = "TOML", tomllib.loads, (tomllib.TOMLDecodeError,)
    try:
        data = parse(path.read_text(encoding="utf-8"))  # TOML, JSON and YAML files are UTF-8
    except errors as exc:
        raise EgakuError(f"config file {str(path)!r} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise EgakuError(f"config file {str(path)!r} must hold a mapping of option: value")
    if suffix == ".json":  # a run's saved config repeats the run, not the session that wrote it (a resume of it)
        for key in SESSION_OPTIONS:
            data.pop(key, None)
    return data


# options of one session of a run, which its saved config records but a new run from that config does not take
SESSION_OPTIONS = ("resume", "export_only", "stop_at")


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-4`` as a number: YAML 1.1 wants a dot (``1.0e-4``) and PyYAML gives the
    string "1e-4", the way learning rates are written in every training config."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string (in quotes)"}


def _fits(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, Path))
    return True  # other types are the dataclass's own to check


def _check_type(key: str, value: Any, annotation: Any, help_text: str = "") -> None:
    """A preset's value of the wrong type (``rank = "eight"``) is named here, before the dataclass's own checks
    compare it with numbers and fail with a TypeError that names neither the option nor the fix."""
    tp, is_list = _base_type(annotation)
    if tp not in _KINDS or (value is None and type(None) in typing.get_args(annotation)):
        return
    if tp in (int, float) and not is_list and (isinstance(value, (list, tuple)) or
                                               isinstance(value, str) and "," in value):  # kohya's "512,512"
        decimal = _not_a_decimal(value, key + " = {}") if tp is float and isinstance(value, str) else None
        if decimal:  # guidance_scale = "7,5"
            raise EgakuError(f"option {key!r}: {decimal}")
        items = value if isinstance(value, (list, tuple)) else value.split(",")
        raise EgakuError(f"option {key!r} {_one_number(items, help_text, key + ' = {}')}")
    if is_list:
        if isinstance(value, (list, tuple)) and all(_fits(v, tp) for v in value):
            return
        want = f"a list, each item {_KINDS[tp]}"
    elif _fits(value, tp):
        return
    else:
        want = _KINDS[tp]
    raise EgakuError(f"option {key!r} must be {want}, got {value!r}")


def _check_choice(key: str, value: Any, choices: list[Any] | None) -> None:
    """Flags are checked against their choices by argparse; a preset's values (``format = "kohyaa"``) are checked
    here, with the same one-line error, before a run spends its time training towards a crash or a silent no-op."""
    if not choices or value is None:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EgakuError(f"option {key!r}: invalid choice {item!r}{hint}; choose from "
                             f"{', '.join(map(str, choices))}")


def build(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Instantiate ``cls`` from dicts applied in order (later wins); unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = fields.keys()
    values: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in names:
                ours, whose = other_name_hint(key, names) or (None, "")
                if whose:
                    raise EgakuError(f"unknown option {key!r}: {whose}; egaku's is {ours!r}")
                if isinstance(value, dict):  # kohya's config files group their options in sections; ours do not
                    raise EgakuError(f"unknown option {key!r}: a section ([{key}]) of options, as kohya's config "
                                     "files group them; egaku's presets are flat: write its options at the top of "
                                     "the file, with egaku's names")
                close = {n for n in names if n.split("_")[0] == key.split("_")[0]}
                close |= set(difflib.get_close_matches(key, names, n=3, cutoff=0.75))  # typos: rnak -> rank
                close = {ours} if ours else close  # lr is learning_rate, not lr_scheduler
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise EgakuError(f"unknown option {key!r}{hint}")
            values[key] = value
    if "given_options" in names:  # which options were set, for commands that fill the others (generate --from)
        values["given_options"] = sorted(set(values) - {"given_options"})
    hints = typing.get_type_hints(cls)
    for key in values:
        value = values[key] = _list_from_preset(values[key], hints[key])
        _check_type(key, value, hints[key], fields[key].metadata.get("help", ""))
        _check_choice(key, value, fields[key].metadata.get("choices"))
    try:
        return cls(**values)
    except TypeError as exc:
        raise EgakuError(f"{cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def save_config(obj: Any, path: str | Path, omit: typing.Iterable[str] = ()) -> Path:
    """Write the resolved options as JSON (readable by humans and by ``build``). Fields the CLI fills for itself
    (``cli=False``: which options a command gave) are left out: ``build`` of the file fills them again; so are
    ``omit``, fields a run set from elsewhere (generate's prompt parameters) that ``build`` must not find given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own = {f.name for f in dataclasses.fields(obj) if f.metadata.get("cli") is False} \
        if dataclasses.is_dataclass(obj) else set()
    own |= set(omit)
    values = {k: v for k, v in to_dict(obj).items() if k not in own}
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path


# options that name files or folders: the same one written two ways ('d2', './d2/', '/home/me/d2') is the same
PATH_OPTIONS = frozenset({"data", "prior_data", "mask_dir", "init_lora", "model", "model_config", "vae_from"})


def _same_path_form(value: Any) -> Any:
    if isinstance(value, str) and value and value not in RESERVED_NAMES:
        return os.path.abspath(os.path.expanduser(value))
    return value


def _moved(saved: Any, current: Any) -> bool:
    """A saved absolute path that no longer exists, and a current one of the same name that does: the project was
    moved (or mounted elsewhere). The checks of the data's content say whether it is still the same."""
    return (isinstance(saved, str) and isinstance(current, str) and os.path.isabs(saved)
            and not os.path.exists(saved) and os.path.exists(os.path.expanduser(current))
            and os.path.basename(saved.rstrip(os.sep)) == os.path.basename(_same_path_form(current)))


def absolute_paths(opts: T) -> T:
    """``opts`` with each ``PATH_OPTIONS`` field that names an existing file or folder made absolute, so that the
    run's saved config finds it again from another working directory (a resume from a batch script)."""
    changes = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name in PATH_OPTIONS and isinstance(value, str) and value not in RESERVED_NAMES and value \
                and os.path.exists(os.path.expanduser(value)):
            changes[f.name] = _same_path_form(value)
    return dataclasses.replace(opts, **changes) if any(changes[k] != getattr(opts, k) for k in changes) else opts


def config_difference(saved: dict[str, Any], current: dict[str, Any], ignore: set[str] = frozenset()) -> list[str]:
    """Human-readable list of fields whose values differ (used to refuse resuming a changed config); a path
    written another way (relative, with a trailing slash) is the same path."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if key in PATH_OPTIONS and _same_path_form(saved.get(key)) == _same_path_form(current.get(key)):
            continue
        if key in PATH_OPTIONS and _moved(saved.get(key), current.get(key)):
            continue
        if saved.get(key) != current.get(key):
            # named by its flag, which is what the user changes
            diffs.append(f"--{key.replace('_', '-')}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}")
    return diffs
