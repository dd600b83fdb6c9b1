"""`egaku merge-lora`: fuse one or more LoRAs into a copy of their base model (a diffusers folder)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import absolute_paths, option, save_config
from ..errors import EgakuError
from .apply import apply_loras, parse_lora_arg, remove_loras, resolve_lora, resolve_lora_option


# the spellings of egaku.models.loading.DTYPES (convert --dtype float16, train-lora --save-precision fp16)
SAVE_PRECISIONS = ["auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]


@dataclass
class MergeLoraOptions:
    model: str = option("builtin", help="base pipeline: built-in name, diffusers folder, single file or hub id")
    model_config: str = option("", help="with a single-file --model: a local diffusers folder of the same "
                               "architecture whose configs describe it (needed offline)")
    allow_pickle: bool = option(False, help="allow a .ckpt/.pt/.bin --model (read with weights_only=True)")
    lora: list[str] = option([], help="LoRA file, folder or hub id (org/name), optionally PATH:SCALE (repeatable)",
                             repeat=True)
    out: str = option("", help="new diffusers folder for the merged model (must not exist)")
    lora_dir: str = option("", help="folder where bare LoRA names are looked up")
    save_precision: str = option("auto", help="dtype of the merged weights: fp32, fp16 or bf16 (or float32, float16, "
                                 "bfloat16); auto: each model (UNet, text encoder, VAE) in the dtype the base stores "
                                 "it in (the merge itself is computed in fp32)", choices=SAVE_PRECISIONS)


def _load(model: str, model_config: str = "", allow_pickle: bool = False):
    from ..models.loading import load_pipeline

    return load_pipeline(model, device="cpu", dtype="float32", model_config=model_config or None,
                         allow_pickle=allow_pickle)


def merge_lora_command(opts: MergeLoraOptions) -> None:
    from ..models.loading import (cast_for_saving, folder_in_place_of, model_defaults, save_pipeline,
                                  saved_dtypes_said, write_model_defaults)

    if not opts.lora:
        raise EgakuError("give at least one --lora PATH[:SCALE] to merge")
    if not opts.out:
        raise EgakuError("--out is required: the folder for the merged copy of the model")
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        raise EgakuError(f"--out {out} already exists; merge into a new folder (the base model is never overwritten)")
    loras = [(resolve_lora_option(path, opts.lora_dir), scale) for path, scale in map(parse_lora_arg, opts.lora)]
    pipe = _load(opts.model, opts.model_config, opts.allow_pickle)
    names = apply_loras(pipe, loras)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)  # the per-adapter scales were set by apply_loras
    remove_loras(pipe, keep_embeddings=True)  # drops the adapter modules; fused deltas and embeddings stay
    for component in ("unet", "text_encoder"):  # a weight so large that the sum overflowed: every image black
        broken = next((name for name, p in getattr(pipe, component).named_parameters()
                       if not torch.isfinite(p).all()), None)
        if broken is not None:
            raise EgakuError(f"the merge overflowed: {component}.{broken} came out NaN/inf, which would draw only "
                             "black images; lower the --lora scales (past about 10 a LoRA swamps the model)",
                             param="lora")
    # each model as its base stores it (an fp16 base stays half the size of an fp32 copy), or all in the
    # --save-precision asked for
    save_dtypes = cast_for_saving(pipe, opts.save_precision)
    with folder_in_place_of(out) as tmp:  # (an empty --out folder is replaced)
        save_pipeline(pipe, tmp)
        write_model_defaults(tmp, model_defaults(pipe))  # the base's recommended guidance holds for the merge
        # the files merged, as absolute paths: `--config merge_config.json` repeats the merge from anywhere
        save_config(absolute_paths(dataclasses.replace(
            opts, lora=[f"{p.resolve()}:{s!r}" for p, s in loras], lora_dir="")), tmp / "merge_config.json")

    print(f"merged {', '.join(f'{p}:{s:g}' for p, s in loras)} into {out}{saved_dtypes_said(save_dtypes)}")


# ---- `egaku info` on a LoRA file ----------------------------------------------------------------------

# what `egaku info` reads, for its messages about what it does not
INFO_READS = ("PNGs written by egaku or A1111 (and A1111's JPEG/WebP), LoRA .safetensors files and train-lora "
              "folders")

# training settings worth showing, from a kohya file's ss_* header or a train-lora folder's training_config.json
# ss_steps is the steps the file was trained for, ss_max_train_steps the run's plan (more, for a --save-every file)
_KOHYA_SHOWN = {"ss_sd_model_name": "base model", "ss_steps": "steps", "ss_max_train_steps": "planned steps",
                "ss_learning_rate": "learning rate",
                "ss_num_train_images": "training images (with repeats)", "ss_resolution": "resolution",
                "ss_clip_skip": "clip skip", "ss_min_snr_gamma": "min-SNR gamma", "ss_seed": "seed"}
_COMPONENTS = ("unet", "text_encoder")  # the models a diffusers-layout key names first
_SAVED_AT_STEP = re.compile(r"-step(\d+)$")  # train-lora's --save-every folders: OUT/steps/NAME-step000500
_CONFIG_SHOWN = {"model": "base model", "max_steps": "steps", "learning_rate": "learning rate",
                 "resolution": "resolution", "clip_skip": "clip skip", "min_snr_gamma": "min-SNR gamma", "seed": "seed"}


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_SQUARE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", re.ASCII)


def _header_value(key: str, value: str):
    """A safetensors header holds strings only: a number there ("3", "0.05", "1e-4") as the int or float it spells,
    and kohya's square resolution "(512, 512)" as 512, as training_config.json gives the same settings, so that a
    field of `egaku info --json` keeps its type from one file to the next. Other strings (a resolution of two
    sides) and the base model's name stay as they are."""
    square = _SQUARE.fullmatch(value.strip()) if key == "ss_resolution" and isinstance(value, str) else None
    if square and square[1] == square[2]:
        return int(square[1])
    if key == "ss_sd_model_name" or not isinstance(value, str) or not _NUMBER.fullmatch(value.strip()):
        return value
    text = value.strip()
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def describe_lora(path: str | Path) -> dict:
    """What a LoRA file holds and how it was trained, without a model: its layout, how many UNet and
    text-encoder layers it adapts (and how many are convolutions), rank and alpha, the training settings
    its header or its train-lora folder records, its most frequent caption tags and its trained words."""
    import json

    from .apply import _alphas_of_diffusers_file, run_config, run_embeddings
    from .formats import (bundled_words, is_bundle_key, is_kohya, is_lora_key, is_model_checkpoint,
                          other_architecture, peft_pairs, read_lora_file, refuse_lycoris)

    path = resolve_lora(str(path), None, names_option="")
    try:  # a whole checkpoint is told apart by its key names alone, before gigabytes are read
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - read_lora_file below names what is wrong with the file
        keys = None
    if keys is not None and not any(is_lora_key(k) for k in keys):
        from .formats import refuse_embedding

        refuse_embedding(keys, str(path))
        if is_model_checkpoint(keys):
            raise EgakuError(f"{path} is a single-file Stable Diffusion checkpoint, a model (egaku generate --model "
                             f"takes it), not a LoRA; egaku info reads {INFO_READS}")
        raise EgakuError(f"{path} holds no LoRA layers (its {len(keys)} tensors have no lora_ keys; a whole model "
                         f"checkpoint?); egaku info reads {INFO_READS}")
    state, metadata = read_lora_file(path)
    # token embeddings bundled in the file (A1111's bundle_emb.WORD...), which come with it: words, not layers
    bundled = bundled_words(state)
    state = {key: tensor for key, tensor in state.items() if not is_bundle_key(key)}
    layers: dict[str, dict] = {}  # name -> component, down weight, alpha
    if is_kohya(state):
        layout = "kohya (A1111, ComfyUI)"
        for key, tensor in state.items():
            name, _, kind = key.partition(".")
            layer = layers.setdefault(name, {"component": "text_encoder" if name.startswith("lora_te") else "unet"})
            if kind == "lora_down.weight":
                layer["down"] = tensor
            elif kind == "alpha":
                layer["alpha"] = float(tensor)
            elif kind == "dora_scale":
                layer["dora"] = True
        unknown = [n for n, layer in layers.items() if "down" not in layer]
        layers = {n: layer for n, layer in layers.items() if "down" in layer}
    else:
        layout = "diffusers/PEFT"
        pairs, unknown = peft_pairs(state)
        alphas = _alphas_of_diffusers_file(pairs, state, metadata) if pairs else {}
        layers = {n: {"component": n.split(".", 1)[0], "down": p["down"], "alpha": alphas[n], "dora": "magnitude" in p}
                  for n, p in pairs.items() if "down" in p}
        # diffusers keys name their model first (unet., text_encoder.); without that prefix (a file saved from
        # one model's state dict) generate and merge-lora match none of its layers, so it is no usable LoRA
        # (a LoRA of another architecture, such as a Flux or SD3 transformer's, is described as one below)
        if layers and not any(layer["component"] in _COMPONENTS for layer in layers.values()) \
                and not other_architecture(list(state), metadata):
            raise EgakuError(f"{path} matches no known LoRA layout: its lora keys (first: {next(iter(layers))}) "
                             "start with neither unet./text_encoder. (diffusers) nor lora_unet_/lora_te_ (kohya), "
                             "so generate and merge-lora refuse it; re-save it with its keys prefixed unet.")
    if not layers:
        refuse_lycoris(state, str(path))
        raise EgakuError(f"{path} holds no LoRA layers (kohya lora_down/lora_up or diffusers lora_A/lora_B keys); "
                         f"egaku info reads {INFO_READS}")
    ranks = sorted({int(layer["down"].shape[0]) for layer in layers.values()})
    alphas_seen = sorted({layer.get("alpha", float(layer["down"].shape[0])) for layer in layers.values()})
    count = {c: sum(1 for layer in layers.values() if layer["component"] == c) for c in _COMPONENTS}
    # the file's own header first: its folder's training_config.json may be a later run's (or a resume's)
    training = {label: _header_value(key, metadata[key]) for key, label in _KOHYA_SHOWN.items()
                if metadata.get(key) not in (None, "", "None", "0", "0.0")}
    training = {label: value for label, value in training.items() if value != 0}  # "0.00" too: off or unset
    config = run_config(path)
    # an option at 0 is off (min-SNR) or unset (max_steps when --epochs counts)
    for key, label in _CONFIG_SHOWN.items():
        if config.get(key) not in (None, "", 0):
            training.setdefault(label, config[key])
    # a --save-every LoRA was written at its folder's step, before the run's planned total: the config's max_steps
    # is that plan. (Files written since record ss_steps in their header, in both layouts; for a diffusers-layout
    # file written before, its folder name is the record.)
    saved_at = _SAVED_AT_STEP.search(Path(path).parent.name) if config else None
    if saved_at and "steps" in training and "ss_steps" not in metadata:
        planned = training["steps"]
        training = {k: int(saved_at[1]) if k == "steps" else v for k, v in training.items()}
        training["planned steps"] = planned
    if "planned steps" in training and training["planned steps"] == training.get("steps"):
        del training["planned steps"]  # a finished run: the one number says it
    tags: dict[str, int] = {}
    try:
        for folder in json.loads(metadata.get("ss_tag_frequency") or "{}").values():
            for tag, n in folder.items():
                tags[tag] = tags.get(tag, 0) + int(n)
    except (ValueError, AttributeError, TypeError):
        tags = {}
    return {
        "file": str(path), "layout": layout,
        "adapter": "DoRA" if any(layer.get("dora") for layer in layers.values()) else "LoRA",
        "unet_layers": count["unet"], "text_encoder_layers": count["text_encoder"],
        "convolution_layers": sum(1 for layer in layers.values() if layer["down"].ndim == 4),
        "ranks": ranks, "alphas": alphas_seen, "unrecognised_keys": len(unknown), "training": training,
        "top_tags": dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:15]),
        "trained_words": sorted(set(run_embeddings(path, have=bundled)) | set(bundled)),
        "bundled_words": bundled,
        "other_architecture": other_architecture(list(state), metadata),
    }


def format_lora_description(d: dict) -> str:
    lines = [f"{d['file']}: {d['adapter']}, {d['layout']} layout",
             # (the convolutions are the UNet's: said after it, not after the text encoder, which has none)
             f"  layers: {d['unet_layers']} UNet ({d['convolution_layers']} of them convolutions), "
             f"{d['text_encoder_layers']} text encoder",
             f"  rank: {'/'.join(map(str, d['ranks']))}, alpha: {'/'.join(f'{a:g}' for a in d['alphas'])}"]
    if d["other_architecture"]:
        lines.append(f"  for {d['other_architecture']}: egaku's pipelines are Stable Diffusion 1.x/2.x, so generate and "
                     "merge-lora refuse it")
    if d["unrecognised_keys"]:
        lines.append(f"  {d['unrecognised_keys']} keys of other adapter types (LoHa, LoKr...) that egaku does not load")
    if d["training"]:
        lines.append("  trained: " + ", ".join(f"{k} {v}" for k, v in d["training"].items()))
    if d["top_tags"]:
        lines.append("  caption tags: " + ", ".join(f"{t} ({n})" for t, n in d["top_tags"].items()))
    if d["trained_words"]:
        bundled = set(d.get("bundled_words", ()))
        lines.append("  trained words (applied with the LoRA): " + ", ".join(
            word + (" (bundled in the file)" if word in bundled else "") for word in d["trained_words"]))
    return "\n".join(lines)
