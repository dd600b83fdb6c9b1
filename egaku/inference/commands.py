"""`egaku generate` and `egaku info`: files in, files out, around the Python API."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import option, save_config
from ..errors import EgakuError
from .generate import GenerateOptions, generate, reproduce_options
from .metadata import a1111_parameters, read_params, save_png
from .prompts import apply_prompt_parameters

_NUMBERED = re.compile(r"^(\d{5})-")


def _next_index(out: Path, overwrite: bool) -> int:
    """First free file number in ``out`` (A1111-style counter), so earlier images are never replaced."""
    if overwrite or not out.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _prompts(o: GenerateOptions) -> list[str]:
    if o.prompt_file:
        path = Path(o.prompt_file)
        if not path.is_file():
            raise EgakuError(f"prompt file {o.prompt_file!r} does not exist; give a text file with one prompt per line",
                             param="prompt_file")
        prompts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not prompts:
            raise EgakuError(f"prompt file {o.prompt_file!r} has no prompts (one per line)", param="prompt_file")
        return prompts
    if not o.prompt.strip():
        raise EgakuError("no prompt given: egaku generate \"a red circle\" (or --prompt-file FILE, or --from IMAGE)",
                         param="prompt")
    return [o.prompt]


def _apply_from_image(o: GenerateOptions) -> GenerateOptions:
    """Stored parameters fill every option still at its default; explicit flags win."""
    stored = reproduce_options(read_params(o.from_image))
    defaults = GenerateOptions()
    merged = {k: v for k, v in stored.items() if getattr(o, k) == getattr(defaults, k)}
    return dataclasses.replace(o, **merged, from_image=None)


def generate_command(opts: GenerateOptions) -> None:
    from ..data.images import image_grid
    from ..models.loading import load_pipeline, recommended_guidance

    started = time.perf_counter()
    if opts.from_image:
        opts = _apply_from_image(opts)
    _prompts(apply_prompt_parameters(opts))  # the prompt and its --parameters are checked before the model loads
    out = Path(opts.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EgakuError(f"cannot create output folder {out}: {exc.strerror}", param="out") from None
    pipe = load_pipeline(opts.model, opts.device, opts.dtype, opts.model_config, opts.allow_pickle)
    if opts.guidance_scale is None:  # the model's own default, before --chaos in the prompt scales it
        opts = dataclasses.replace(opts, guidance_scale=recommended_guidance(pipe))
    opts = apply_prompt_parameters(opts)  # Midjourney-style "--ar 16:9 --seed 7 --no text" in the prompt
    prompts = _prompts(opts)

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(desc="generating", unit="step", file=sys.stderr, leave=False)

    def on_step(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    index = _next_index(out, opts.overwrite)
    first_index = index
    written: list[Path] = []
    for prompt in prompts:
        results = generate(pipe, opts=dataclasses.replace(opts, prompt=prompt), on_step=on_step)
        for r in results:
            path = out / f"{index:05d}-{r.seed}.png"
            save_png(r.image, path, r.params)
            written.append(path)
            index += 1
        if opts.grid and len(results) > 1:
            grid_path = out / f"{index:05d}-grid.png"
            image_grid([r.image for r in results]).save(grid_path)
            index += 1
    if bar is not None:
        bar.close()
    save_config(opts, out / f"{first_index:05d}-options.json")
    elapsed = time.perf_counter() - started
    names = written[0].name if len(written) == 1 else f"{written[0].name} .. {written[-1].name}"
    print(f"wrote {len(written)} image{'s' * (len(written) != 1)} to {out}/ ({names}) "
          f"in {elapsed:.1f} s ({elapsed / len(written):.2f} s/image incl. {pipe.egaku_load_seconds:.1f} s loading)")


@dataclass
class InfoOptions:
    image: str = option(help="a PNG written by egaku or A1111, or a LoRA (.safetensors file or train-lora folder)",
                        positional=True)
    json: bool = option(False, help="print the parameters as JSON instead of A1111 text")


def info_command(opts: InfoOptions) -> None:
    path = Path(opts.image)
    if path.suffix.lower() == ".safetensors" or path.is_dir():
        from ..lora.commands import describe_lora, format_lora_description

        found = describe_lora(path)
        print(json.dumps(found, indent=2) if opts.json else format_lora_description(found))
        return
    params = read_params(opts.image)
    if opts.json:
        print(json.dumps(params, indent=2, sort_keys=True))
    elif "sampler_label" in params:
        print(a1111_parameters(params))
    else:
        print(json.dumps(params, indent=2, sort_keys=True))


__all__ = ["generate_command", "info_command", "InfoOptions"]
