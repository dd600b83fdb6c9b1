"""`egaku generate` and `egaku info`: files in, files out, around the Python API."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import absolute_paths, build, option, save_config
from ..errors import EgakuError
from ..progress import progress_bar
from ..models.text import EMPHASIS_MODES, emphasis_mode
from .generate import GenerateOptions, edit_strength, generate, recorded_emphasis, reproduce_options
from .metadata import a1111_parameters, read_params, read_text_chunks, save_png
from .prompts import apply_prompt_parameters, chaos_sets_strength

_NUMBERED = re.compile(r"^(\d{5})-")
# the files egaku itself writes into an output folder: NNNNN-SEED.png, NNNNN-grid.png, NNNNN-options.json
_WRITTEN_HERE = re.compile(r"^\d{5}-(.+\.png|options\.json)$")


def _next_index(out: Path, replaced: list[Path]) -> int:
    """First free file number in ``out`` (A1111-style counter), so earlier images are never replaced; the files
    ``replaced`` (--overwrite's) do not count."""
    if not out.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _NUMBERED.match(p.name)) and p not in replaced]
    return max(numbers, default=-1) + 1


def _claim(out: Path, index: int, name: str) -> tuple[Path, int]:
    """``NNNNN-name`` at the first number from ``index`` on that no file in ``out`` has, created (empty) at once, so
    that a run writing into the same folder at the same time takes other numbers instead of replacing these files
    (each run counted the folder's files when it started)."""
    index = max(index, _next_index(out, []))
    while True:
        path = out / f"{index:05d}-{name}"
        try:
            path.open("xb").close()
            return path, index
        except FileExistsError:
            index += 1


def _fill_claimed(path: Path, write) -> None:
    """``write(path)`` into a file ``_claim`` made; a write that fails (a full disk, Ctrl-C) takes the empty file
    away again rather than leave a numbered file that is no image."""
    try:
        write(path)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # the images written before it stay
            raise EgakuError(f"could not write {path}: {exc.strerror or exc}; free some space or give another "
                             "--out", param="out") from None
        raise


def _numbered_by_egaku(out: Path) -> list[Path]:
    """--overwrite's files: the numbered files of earlier runs (their seeds, and so their names, may differ from
    the new ones). A file egaku does not name this way is the user's and stays, and so does an image named this
    way that egaku did not write (A1111 names its images NNNNN-SEED.png too)."""
    if not out.is_dir():
        return []
    return [path for path in out.iterdir() if _WRITTEN_HERE.match(path.name) and path.is_file()
            and (path.name.endswith(("-options.json", "-grid.png")) or _has_egaku_chunk(path))]


def _has_egaku_chunk(path: Path) -> bool:
    try:
        return "egaku" in read_text_chunks(path)
    except EgakuError:  # not a readable image: not one egaku wrote
        return False


def _prompts(o: GenerateOptions) -> list[str]:
    """The prompts to run, each with its Midjourney-style --parameters still in it."""
    if o.prompt_file:
        path = Path(o.prompt_file)
        if not path.is_file():
            raise EgakuError(f"prompt file {o.prompt_file!r} does not exist; give a text file with one prompt per line",
                             param="prompt_file")
        if o.prompt.strip():
            raise EgakuError("a prompt and --prompt-file are both given; put the prompt into the file as a line of "
                             "its own, or leave one out", param="prompt")
        prompts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not prompts:
            raise EgakuError(f"prompt file {o.prompt_file!r} has no prompts (one per line)", param="prompt_file")
        return prompts
    if not o.prompt.strip():
        raise EgakuError("no prompt given: egaku generate \"a red circle\" (or --prompt-file FILE, or --from IMAGE)",
                         param="prompt")
    return [o.prompt]


def _apply_from_image(o: GenerateOptions) -> GenerateOptions:
    """Stored parameters fill every option no flag or preset set; explicit flags win, even one given at its
    default value (``--model builtin``, ``--steps 20``).

    The model and the LoRA files the image was made with come back too (a missing one is an error that
    says how to choose another); an image that does not record them gets a note saying they are not
    reapplied.
    """
    source = o.from_image
    params = read_params(source)
    try:
        stored = reproduce_options(params)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise EgakuError(f"{source} records parameters egaku cannot read ({type(exc).__name__}: {exc})") from None
    defaults = GenerateOptions()
    # built by the CLI: the options it was given; built in Python: those that differ from the defaults
    given = set(o.given_options) or {f.name for f in dataclasses.fields(o)
                                     if getattr(o, f.name) != getattr(defaults, f.name)}
    merged = {k: v for k, v in stored.items() if k not in given}
    try:  # what the file holds is checked as a preset's values are
        build(GenerateOptions, merged)
    except EgakuError as exc:
        raise EgakuError(f"{source} records a value egaku cannot use: {exc}") from None
    if "model" not in merged:  # the recorded config belongs to the recorded model
        merged.pop("model_config", None)
    if o.prompt_file:  # the file's prompts, with the image's settings
        merged.pop("prompt", None)
    if "init_image" in given and merged.pop("mask", None):  # the recorded mask belongs to the recorded init image,
        merged.pop("strength", None)  # and so does the inpainting's strength (1): the new image is kept in part
    _check_recorded_files(source, params, merged)
    for note in _from_notes(source, params, merged, given, merged.get("lora_dir", o.lora_dir)):
        print(f"egaku: note: {note}")
    if not params.get("model_source"):
        _note_unrecorded(source, params, o, given)
    # the recorded strength counts as set, so that an inpainting image's is not reset to 1 (other recorded values
    # are not: "--steps 30" in a new prompt replaces the image's steps, as a flag would)
    given_after = set(o.given_options) | ({"strength"} & set(merged))
    return dataclasses.replace(o, **merged, from_image=None, given_options=sorted(given_after))


def _from_notes(source: str, params: dict, merged: dict, given: set[str], lora_dir: str | None = None) -> list[str]:
    """What --from cannot make as the image was made, so that a different result is not a surprise. ``lora_dir``:
    the folder the run looks the prompt's <lora:name:w> tags up in."""
    notes = []
    upscaler = str(params.get("hires_upscaler") or "Lanczos")
    if "hires_scale" in merged and upscaler.lower() != "lanczos":
        notes.append(f"{source} was upscaled by A1111's \"{upscaler}\" upscaler; egaku's hires fix upscales with "
                     "Lanczos, so the result differs")
    if "hires_scale" in merged and params.get("hires_width") and params.get("width"):
        scaled = tuple(round(params[k] * merged["hires_scale"]) for k in ("width", "height"))
        if scaled != (params["hires_width"], params["hires_height"]):
            notes.append(f"{source} was resized to {params['hires_width']}x{params['hires_height']} by A1111's hires "
                         f"fix, cropping; egaku scales it by {merged['hires_scale']:g} to about "
                         f"{scaled[0]}x{scaled[1]}")
    from .generate import IMAGE_PLACEHOLDERS

    for key, what, flag in (("init_image", "an init image", "--init-image"), ("mask", "a mask", "--mask")):
        if params.get(key) == IMAGE_PLACEHOLDERS[key] and key not in given:
            notes.append(f"{source} was made from {what} handed in as an image, not read from a file, so it is not "
                         f"made again from it; give {flag} FILE")
    texts = [str(params.get(k) or "") for k in ("prompt", "negative_prompt")]
    syntax = any(c in t for t in texts for c in "()[]\\") or any(re.search(r"\bBREAK\b", t) for t in texts)
    emphasis_given = "emphasis" in given  # (--no-emphasis is --emphasis none)
    if "egaku_version" in params and "emphasis" not in params and not emphasis_given and syntax:
        # made before egaku read A1111's syntax (its egaku chunk has no "emphasis"): brackets were words then
        notes.append(f"{source} was made by an egaku that read brackets and BREAK as words; pass --no-emphasis to "
                     "read them so again (prompts over 77 tokens were also cut there)")
    mode = recorded_emphasis(params)
    if mode is not None and mode not in EMPHASIS_MODES and not emphasis_given:
        notes.append(f"{source} records the emphasis mode {mode!r}, which egaku does not have; it is made with "
                     "original, A1111's default, as A1111 reads a name it does not know (--emphasis chooses another)")
    from .embeddings import embedding_short_hash

    for entry in params.get("embeddings") or [] if "embedding_dir" in merged else []:
        path = Path(str(entry.get("path") or ""))
        now = embedding_short_hash(path) if path.is_file() and entry.get("hash") else entry.get("hash")
        if now != entry.get("hash"):
            notes.append(f"the embedding {entry.get('name')} ({path}) has changed since {source} was made (hash "
                         f"{entry['hash']}, now {now})")
    from .metadata import lora_short_hash

    for entry in params.get("lora_files") or []:
        # reused: an option's LoRA through the recorded --lora, a tag's through the recorded prompt and folder
        reused = "lora" in merged if entry.get("from") == "option" else {"prompt", "lora_dir"} <= set(merged)
        path = Path(str(entry.get("path") or ""))
        if not (reused and entry.get("hash") and path.is_file()):
            continue
        now = lora_short_hash(path)
        if now != entry["hash"]:
            notes.append(f"the LoRA {entry.get('name')} ({path}) has changed since {source} was made (hash "
                         f"{entry['hash']}, now {now})")
    if "prompt" in merged and "lora_dir" not in merged and lora_dir:
        notes += _other_tag_loras(source, params, merged["prompt"], lora_dir)
    return notes


def _other_tag_loras(source: str, params: dict, prompt: str, lora_dir: str) -> list[str]:
    """The recorded prompt's <lora:name:w> tags looked up in a folder the image does not record (an A1111 image's
    tags in --lora-dir, or an egaku image's in another --lora-dir): a file of the tag's name there that is not the
    one the image records the hash of (A1111's ``Lora hashes``, egaku's ``lora_files``) is said, as a file that
    has changed is."""
    from ..lora.apply import has_prompt_loras, parse_prompt_loras, resolve_lora
    from .metadata import lora_short_hash

    # A1111 writes a name without its ':' and ',' (lora_hashes_text)
    def key(name: str) -> str:
        return str(name).replace(":", "").replace(",", "").strip()

    recorded = {key(name): str(h).strip() for name, h in params.get("lora_hashes") or [] if str(h).strip()}
    recorded.update({key(e.get("name") or ""): str(e["hash"]) for e in params.get("lora_files") or []
                     if e.get("from") == "prompt" and e.get("hash")})
    if not recorded or not has_prompt_loras(prompt):
        return []
    try:
        tags = parse_prompt_loras(prompt)[1]
    except EgakuError:  # generation says what is wrong with the tag
        return []
    notes, seen = [], set()
    for name, _ in tags:
        expected = recorded.get(key(name))
        if not expected or key(name) in seen:
            continue
        seen.add(key(name))
        try:
            path = resolve_lora(name, lora_dir)
        except EgakuError:  # not there (or two files of the name): generation says so
            continue
        now = lora_short_hash(path)
        # a short hash is the sha256's first digits: one of fewer digits compares as far as it goes
        if now and not now.lower().startswith(expected.lower()[:len(now)]):
            notes.append(f"the LoRA {name} ({path}) is not the file {source} was made with (hash {expected}, "
                         f"now {now})")
    return notes


def _check_recorded_files(source: str, params: dict, merged: dict) -> None:
    """The model and LoRA files --from is about to reuse must still be there."""
    from ..lora.apply import parse_lora_arg

    def gone(what: str, flag: str, param: str) -> EgakuError:
        return EgakuError(f"{source} was made with {what}, which no longer exists; pass {flag} to generate "
                          "with another", param=param)

    model = merged.get("model")
    if model and Path(model).is_absolute() and not Path(model).exists():
        raise gone(f"the model {model}", "--model", "model")
    config = merged.get("model_config")
    if config and not Path(config).is_dir():
        raise gone(f"the model config folder {config}", "--model (and --model-config)", "model")
    for item in merged.get("lora", []):
        path, weight = parse_lora_arg(item)
        if not Path(path).is_file():
            raise gone(f"the LoRA {path} (weight {weight:g})",
                       "--lora PATH[:SCALE] (which replaces all the LoRAs it recorded)", "lora")
    for key, flag in (("init_image", "--init-image"), ("mask", "--mask")):
        if merged.get(key) and not Path(merged[key]).is_file():
            raise gone(f"the {'init image' if key == 'init_image' else 'mask'} {merged[key]}",
                       f"{flag} FILE", key)
    folder = merged.get("embedding_dir")
    if folder and not Path(folder).is_dir():
        raise gone(f"the embedding folder {folder}", "--embedding-dir with a folder that holds its embeddings",
                   "embedding_dir")
    if "prompt" in merged and "lora_dir" in merged:  # its <lora:name:w> tags are read from the recorded folder
        for entry in params.get("lora_files") or []:
            if entry.get("from") == "prompt" and not Path(entry["path"]).is_file():
                raise gone(f"the LoRA {entry['path']} (its prompt's <lora:{entry['name']}> tag)",
                           "--lora-dir with a folder that holds it", "lora")


def _note_unrecorded(source: str, params: dict, o: GenerateOptions, given: set[str]) -> None:
    """An A1111 image (or one from an older egaku) names its model and LoRAs but not their files: say what
    is not reapplied instead of quietly generating with the default model."""
    parts = []
    if "model" not in given:
        known = ", ".join(str(params[k]) for k in ("model_name", "model_hash") if params.get(k))
        parts.append(f"its model{f' ({known})' if known else ''} is not reapplied (this run uses {o.model}; "
                     "pass --model to choose one)")
    if "lora" not in given:
        names = ", ".join(n for n, _ in params.get("loras") or params.get("lora_hashes") or [])
        parts.append(f"its LoRAs{f' ({names})' if names else ''} are not reapplied, except "
                     "through <lora:name:w> tags in its prompt (pass --lora to choose them)")
    if params.get("embedding_hashes") and "embedding_dir" not in given:
        names = ", ".join(n for n, _ in params["embedding_hashes"])
        parts.append(f"its embeddings ({names}) are read only with --embedding-dir (a folder that holds them)")
    if parts:
        print(f"egaku: note: {source} does not record its model and LoRA files; " + "; ".join(parts))


# generate's options that name a file or folder, besides PATH_OPTIONS (model, model_config)
_GENERATE_FILES = ("init_image", "mask", "lora_dir", "embedding_dir", "prompt_file", "from_image")


def recorded_options(opts: GenerateOptions, seed: int | None = None) -> GenerateOptions:
    """``opts`` as NNNNN-options.json keeps them: every file they name that exists made absolute, so that
    ``--config`` of it repeats the run from any working directory. A ``--lora`` looked up by name in
    ``--lora-dir`` stays a name (its folder is made absolute), and a hub id stays as typed. ``seed``: the one
    drawn for a run without ``--seed``, recorded in its place."""
    from ..lora.apply import parse_lora_arg

    def absolute(value: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(value)) if value and os.path.exists(os.path.expanduser(value)) \
            else value

    loras = []
    for item in opts.lora:
        name, scale = parse_lora_arg(item)
        by_name = bool(opts.lora_dir) and not any(c in name for c in "/\\~")  # as resolve_lora_option reads it
        loras.append(item if by_name or absolute(name) == name else f"{absolute(name)}:{scale!r}")
    return dataclasses.replace(absolute_paths(opts), lora=loras, seed=opts.seed if seed is None else seed,
                               **{field: absolute(getattr(opts, field)) for field in _GENERATE_FILES})


def generate_command(opts: GenerateOptions) -> None:
    from ..data.images import image_grid
    from ..models.loading import load_pipeline, recommended_guidance

    started = time.perf_counter()
    if opts.from_image:
        opts = _apply_from_image(opts)
    # the mode an older options file's on/off asks for, as options.json records it
    opts = dataclasses.replace(opts, emphasis=emphasis_mode(opts.emphasis))
    if opts.mask:  # an edit repaints its mask from noise unless --strength is given, as the server's and generate()'s
        opts = dataclasses.replace(opts, strength=edit_strength(opts, has_mask=True))
    # --chaos is the img2img strength with an init image; with a mask (repainted from noise) it lowers the guidance,
    # as the server's edits and generate() read it
    chaos_is_strength = chaos_sets_strength(opts.init_image is not None, bool(opts.mask))
    for prompt in _prompts(opts):  # each prompt and its --parameters are checked before the model loads
        apply_prompt_parameters(dataclasses.replace(opts, prompt=prompt), has_init_image=chaos_is_strength)
    from ..data.images import ImageError, decode_image
    from .generate import _validate

    _validate(opts)  # the options' own ranges first, as generate() checks them
    for flag, path in (("--init-image", opts.init_image), ("--mask", opts.mask)):  # so are the images
        try:
            if path:
                decode_image(path).close()
        except ImageError as exc:
            raise EgakuError(f"{flag} {exc}", param="image" if flag == "--init-image" else "mask") from None
    from ..paths import check_output

    out = check_output(opts.out)  # a folder that cannot be written is named before the model loads
    on_cpu = _half_on_cpu_note(opts)
    pipe = load_pipeline(opts.model, opts.device, opts.dtype, opts.model_config, opts.allow_pickle)
    try:  # made once the model has loaded: a model that fails to load leaves no empty --out folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EgakuError(f"cannot create output folder {out}: {exc.strerror}", param="out") from None
    if opts.guidance_scale is None:  # the model's own default, before --chaos in the prompt scales it
        opts = dataclasses.replace(opts, guidance_scale=recommended_guidance(pipe))
    # Midjourney-style "--ar 16:9 --seed 7 --no text" in each prompt (a prompt file's lines too)
    prompts = _prompts(opts)
    runs = [apply_prompt_parameters(dataclasses.replace(opts, prompt=prompt), has_init_image=chaos_is_strength)
            for prompt in prompts]

    replaced = _numbered_by_egaku(out) if opts.overwrite else []  # numbering starts after the files that stay
    index = _next_index(out, replaced)
    first_index = None
    written: list[Path] = []
    written_seeds: list[int] = []
    # a terminal's bar is cleared when generation ends; a log gets a plain line every 30 s and the last one
    # (its total starts as the prompts' --steps; the first step of each says how many it really runs: img2img
    # runs fewer, a hires pass more)
    bar = progress_bar(sum(run.steps for run in runs), desc="generating", disable=not opts.progress, leave=False)

    number, finished = 0, 0  # one bar over all prompts: the run in progress, and the steps of those before it

    def on_step(done: int, total: int) -> None:  # each prompt's steps count from 1 again
        bar.total = finished + total * (len(runs) - number)  # the prompts still to come: as many steps
        bar.update(finished + done - bar.n)

    try:  # a failed run clears the bar, so that its error starts a line of its own
        for number, run in enumerate(runs):
            finished = bar.n
            try:
                results = generate(pipe, opts=run, on_step=on_step)
            except RuntimeError as exc:
                _refuse_half_on_cpu(exc, on_cpu, opts.dtype)
                raise
            if opts.overwrite and not written:  # once generation has worked, so a failed run leaves the old files
                for path in replaced:
                    path.unlink(missing_ok=True)
            for r in results:
                path, index = _claim(out, index, f"{r.seed}.png")
                first_index = index if first_index is None else first_index
                _fill_claimed(path, lambda p: save_png(r.image, p, r.params))
                written.append(path)
                written_seeds.append(r.seed)
                index += 1
            if opts.grid and len(results) > 1:
                grid_path, index = _claim(out, index, "grid.png")
                _fill_claimed(grid_path, image_grid([r.image for r in results]).save)
                index += 1
    finally:
        bar.close()
    # a drawn seed is recorded where one prompt ran (each of several prompts draws its own: those stay unset)
    drawn = written_seeds[0] if opts.seed is None and len(runs) == 1 and written_seeds else None
    save_config(recorded_options(opts, seed=drawn), out / f"{first_index:05d}-options.json",
                omit=_set_by_prompts(opts, prompts, chaos_is_strength))
    elapsed = time.perf_counter() - started
    names = written[0].name if len(written) == 1 else f"{written[0].name} .. {written[-1].name}"
    print(f"wrote {len(written)} image{'s' * (len(written) != 1)} to {out}/ ({names}) "
          f"in {elapsed:.1f} s ({elapsed / len(written):.2f} s/image incl. {pipe.egaku_load_seconds:.1f} s loading)")


# torch's CPU kernels that lack a reduced precision say: "addmm_impl_cpu_" not implemented for 'Half'
_NOT_FOR = re.compile(r"not implemented for '(Half|BFloat16)'")


def _half_on_cpu_note(opts: GenerateOptions) -> bool:
    """Whether the run is on the CPU; there, --dtype float16 gets a note: the pipeline is made as asked, but torch's
    CPU has few half-precision kernels (no speed-up, often slower) and some operations have none."""
    from ..models.loading import resolve_device

    on_cpu = resolve_device(opts.device).type == "cpu"
    if on_cpu and opts.dtype == "float16":
        print("egaku: note: --dtype float16 on the CPU is no faster than float32 (often slower) and some of torch's "
              "CPU operations lack it; use --dtype float32 there (or bfloat16 for half the memory)")
    return on_cpu


def _refuse_half_on_cpu(exc: RuntimeError, on_cpu: bool, dtype: str) -> None:
    """torch's "not implemented for 'Half'" of a CPU run as what to change; other errors are left as they are."""
    match = _NOT_FOR.search(str(exc))
    if not (on_cpu and match):
        return
    precision = "float16" if match[1] == "Half" else "bfloat16"
    instead = "--dtype float32 or bfloat16" if precision == "float16" else "--dtype float32"
    given = f"--dtype {dtype}" if dtype != "auto" else f"{precision} weights"
    raise EgakuError(f"torch cannot run this model in {precision} on the CPU ({given}): {str(exc).strip()}; use "
                     f"{instead} on the CPU", param="dtype") from None


# the options a prompt's --parameters set (by take() in apply_prompt_parameters, which refuses a value given twice)
_PROMPT_SETS = {"ar": "aspect_ratio", "seed": "seed", "steps": "steps", "chaos": "strength"}


def _set_by_prompts(opts: GenerateOptions, prompts: list[str], chaos_is_strength: bool) -> set[str]:
    """The options that the prompts' --parameters set and no flag or preset gave ("--steps 4" in the prompt: steps),
    which the run's options.json leaves out, so that --config of it reads them from the prompts again, as this run
    did, instead of finding each given twice (the file's default beside the prompt's value)."""
    from .prompts import parse_prompt_parameters

    fields = {_PROMPT_SETS[name] for prompt in prompts for name in parse_prompt_parameters(prompt)[1]
              if name in _PROMPT_SETS and (name != "chaos" or chaos_is_strength)}
    return fields - set(opts.given_options)


@dataclass
class InfoOptions:
    image: str = option(help="a PNG written by egaku or A1111 (or A1111's JPEG/WebP), or a LoRA (.safetensors file "
                             "or train-lora folder)",
                        positional=True)
    json: bool = option(False, help="print the parameters as JSON instead of A1111 text")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def info_command(opts: InfoOptions) -> None:
    from ..lora.apply import HUB_LORA
    from ..lora.commands import INFO_READS
    from ..models.loading import PICKLE_SUFFIXES

    path = Path(opts.image)
    # models are not what info reads: said as what they are, before the LoRA lookup calls a pipeline folder a LoRA
    # folder without its LoRA file and the image reader calls a checkpoint an unreadable image
    if path.is_dir() and (path / "model_index.json").is_file():
        raise EgakuError(f"{path} is a diffusers pipeline folder, a model (egaku generate --model takes it); "
                         f"egaku info reads {INFO_READS}")
    if path.is_dir() and (path / "model" / "model_index.json").is_file():
        raise EgakuError(f"{path} is a train-ldm run; its model is {path / 'model'} (egaku generate --model takes "
                         f"it); egaku info reads {INFO_READS}")
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        from ..lora.formats import refuse_training_checkpoint

        refuse_training_checkpoint(path)  # a train-lora checkpoint's state.pt: where the run's LoRA files are
        raise EgakuError(f"{path} is a pickled checkpoint ({path.suffix}), which egaku info does not read (unpickling "
                         "can run code); a model checkpoint loads with egaku generate --model FILE --allow-pickle, "
                         "and egaku convert FILE --allow-pickle --out NAME.safetensors writes a safetensors copy; "
                         f"egaku info reads {INFO_READS}")
    # a LoRA: a .safetensors file, a train-lora folder, or a hub id (org/name) that is no local path nor image name
    hub_id = not path.exists() and HUB_LORA.fullmatch(opts.image) and path.suffix.lower() not in IMAGE_SUFFIXES
    if path.suffix.lower() == ".safetensors" or path.is_dir() or hub_id:
        from ..lora.commands import describe_lora, format_lora_description

        found = describe_lora(opts.image)
        print(json.dumps(found, indent=2) if opts.json else format_lora_description(found))
        return
    chunks = read_text_chunks(opts.image)
    params = read_params(opts.image, chunks)
    if opts.json:
        print(json.dumps(params, indent=2, sort_keys=True))
    elif "sampler_label" in params:  # egaku's own parameters: its A1111 text, written as generate writes it
        print(a1111_parameters(params))
    elif "parameters" in chunks:  # A1111's (or another tool's) text: as it is, keys egaku does not read too
        print(str(chunks["parameters"]))
    else:  # an egaku chunk without the sampler's label and no text beside it: nothing to write A1111's text from
        print(json.dumps(params, indent=2, sort_keys=True))


__all__ = ["generate_command", "info_command", "InfoOptions"]
