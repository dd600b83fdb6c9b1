"""`egaku merge-lora`: fuse one or more LoRAs into a copy of their base model (a diffusers folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import option, save_config
from ..errors import EgakuError
from .apply import apply_loras, remove_loras, resolve_lora


@dataclass
class MergeLoraOptions:
    model: str = option("builtin", help="base pipeline: built-in name, diffusers folder, single file or hub id")
    lora: list[str] = option([], help="LoRA file or folder, optionally PATH:SCALE (repeatable)", repeat=True)
    out: str = option("", help="new diffusers folder for the merged model (must not exist)")
    lora_dir: str = option("", help="folder where bare LoRA names are looked up")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (a Windows drive letter's colon is not a scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _load(model: str):
    try:
        from ..models.loading import load_pipeline
    except ImportError:
        load_pipeline = None
    if load_pipeline is not None:
        return load_pipeline(model, device="cpu", dtype="float32")
    from ..training.lora import _load_base

    return _load_base(model)


def _resolve(arg: str, lora_dir: str) -> Path:
    """On the command line a path is trusted; a bare name that is not a path is looked up in --lora-dir."""
    is_path = Path(arg).exists() or "/" in arg or "\\" in arg
    return resolve_lora(arg, None if is_path or not lora_dir else lora_dir)


def merge_lora_command(opts: MergeLoraOptions) -> None:
    from ..models.loading import model_defaults, write_model_defaults

    if not opts.lora:
        raise EgakuError("give at least one --lora PATH[:SCALE] to merge")
    if not opts.out:
        raise EgakuError("--out is required: the folder for the merged copy of the model")
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        raise EgakuError(f"--out {out} already exists; merge into a new folder (the base model is never overwritten)")
    loras = [(_resolve(path, opts.lora_dir), scale) for path, scale in map(parse_lora_arg, opts.lora)]
    pipe = _load(opts.model)
    names = apply_loras(pipe, loras)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)  # the per-adapter scales were set by apply_loras
    remove_loras(pipe, keep_embeddings=True)  # drops the adapter modules; fused deltas and embeddings stay
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_model_defaults(tmp, model_defaults(pipe))  # the base's recommended guidance holds for the merge
        save_config(opts, tmp / "merge_config.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {', '.join(f'{p}:{s:g}' for p, s in loras)} into {out}")
