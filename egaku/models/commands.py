"""`egaku convert`: between diffusers folders and single-file checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import EgakuError
from ..paths import check_output
from .loading import (BUILTIN_DIR, cast_for_saving, folder_in_place_of, load_pipeline, model_defaults,
                      save_pipeline, saved_dtypes_said, write_model_defaults)

_OUT_FORMS = "NAME.safetensors for one original-layout file (A1111/ComfyUI), or a folder for a diffusers pipeline"


@dataclass
class ConvertOptions:
    model: str = option(help="source: builtin, a diffusers folder, a .safetensors checkpoint or a hub id",
                        positional=True)
    # "" and checked in convert_command, as other commands' required options: a --config preset may give it
    out: str = option("", help=f"required; the target: {_OUT_FORMS}")
    model_config: str | None = option(None, help="local diffusers folder with the configs of a single-file source")
    allow_pickle: bool = option(False, help="allow a .ckpt/.pt/.bin source (read with weights_only=True)")
    dtype: str = option("auto", help="precision of the written weights: auto keeps each model's (UNet, text encoder, "
                        "VAE) as the source stores it (fp32 where it cannot be read); float32, float16 or bfloat16 "
                        "writes all in that", choices=["auto", "float32", "float16", "bfloat16"])
    overwrite: bool = option(False, help="replace the target if it exists")


def _check_out(out: Path, overwrite: bool) -> None:
    """An --out that cannot be written is named before the model loads, which can take minutes."""
    single = out.suffix.lower() == ".safetensors"  # any case, as --model reads it
    if single and out.is_dir():
        raise EgakuError(f"--out {out} is a folder, and a NAME.safetensors --out is written as one file; choose "
                         "another --out, or one without .safetensors to write a diffusers folder", param="out")
    if not single and out.exists() and not out.is_dir():
        raise EgakuError(f"--out {out} is a file, and an --out that does not end in .safetensors is written as a "
                         f"diffusers folder; choose another --out: {_OUT_FORMS}", param="out")
    if out.exists() and not overwrite:
        raise EgakuError(f"{out} already exists; pass --overwrite to replace it, or choose another --out", param="out")
    if not single and out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise EgakuError(f"--out {out} is the working folder (or holds it), which --overwrite would remove; give a "
                         "folder of its own", param="out")
    if not single and out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        # --overwrite replaces a pipeline folder whole; a folder of other files is never removed
        raise EgakuError(f"--out {out} is a folder that is not a diffusers pipeline (no model_index.json), and "
                         "--overwrite replaces the folder whole; choose another --out", param="out")
    check_output(out, folder=not single)


def convert_command(opts: ConvertOptions) -> None:
    from .single_file import save_single_file

    started = time.perf_counter()
    if not opts.out:
        raise EgakuError(f"--out is required: {_OUT_FORMS}", param="out")
    out = Path(opts.out)
    _check_out(out, opts.overwrite)
    source = BUILTIN_DIR if opts.model in ("builtin", "") else Path(opts.model).expanduser()
    if out.suffix.lower() != ".safetensors" and source.is_dir() and out.resolve() == source.resolve():
        # the copy replaces the folder whole: the source's other files (model card, train config) would go
        raise EgakuError(f"--out {out} is the source model's folder, which --overwrite would replace whole, removing "
                         "its files that are not part of the pipeline; write the converted copy to another --out",
                         param="out")
    pipe = load_pipeline(opts.model, device="cpu", dtype="float32", model_config=opts.model_config,
                         allow_pickle=opts.allow_pickle)
    defaults = model_defaults(pipe)  # kept in the copy: a folder's egaku_defaults.json, a single file's metadata
    # loaded in fp32 whatever the source stores: written back as it stores each model (an fp16 source's copy is not
    # twice its size), as merge-lora writes its merges, or all in the --dtype asked for
    dtypes = cast_for_saving(pipe, opts.dtype)
    try:  # what the check above cannot foresee: a full disk, a folder made read-only meanwhile
        if out.suffix.lower() == ".safetensors":
            save_single_file(pipe, out, defaults=defaults)
        else:  # nothing of the folder it replaces stays behind
            with folder_in_place_of(out) as tmp:
                save_pipeline(pipe, tmp)
                write_model_defaults(tmp, defaults)
    except OSError as exc:
        raise EgakuError(f"could not write --out {out}: {exc}", param="out") from None
    print(f"wrote {out}{saved_dtypes_said(dtypes)} in {time.perf_counter() - started:.1f} s")
