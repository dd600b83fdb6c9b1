"""`egaku convert`: between diffusers folders and single-file checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import EgakuError
from .loading import DTYPES, load_pipeline, model_defaults, save_pipeline, write_model_defaults


@dataclass
class ConvertOptions:
    model: str = option(help="source: builtin, a diffusers folder, a .safetensors checkpoint or a hub id",
                        positional=True)
    out: str = option(help="target: NAME.safetensors for one original-layout file (A1111/ComfyUI), "
                      "else a diffusers folder")
    model_config: str | None = option(None, help="local diffusers folder with the configs of a single-file source")
    allow_pickle: bool = option(False, help="allow a .ckpt/.pt/.bin source (read with weights_only=True)")
    dtype: str = option("float32", help="precision of the written weights", choices=["float32", "float16", "bfloat16"])
    overwrite: bool = option(False, help="replace the target if it exists")


def convert_command(opts: ConvertOptions) -> None:
    from .single_file import save_single_file

    started = time.perf_counter()
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise EgakuError(f"{out} already exists; pass --overwrite to replace it, or choose another --out", param="out")
    pipe = load_pipeline(opts.model, device="cpu", dtype="float32", model_config=opts.model_config,
                         allow_pickle=opts.allow_pickle)
    defaults = model_defaults(pipe)  # kept in the copy: a folder's egaku_defaults.json, a single file's metadata
    if out.suffix == ".safetensors":
        save_single_file(pipe, out, dtype=DTYPES[opts.dtype], defaults=defaults)
    else:
        save_pipeline(pipe.to(dtype=DTYPES[opts.dtype]), out)
        write_model_defaults(out, defaults)
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
