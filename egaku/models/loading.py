"""Resolve ``--model`` to a loaded Stable Diffusion pipeline; the one place that reads model weights.

A model is one of:
- ``builtin`` (the default): the small LDM egaku trained and ships in ``egaku/models/builtin``;
- ``tiny``: a seeded miniature SD pipeline built in code (tests, demos on a bare machine);
- a diffusers pipeline folder (``model_index.json`` inside);
- a single-file checkpoint (``.safetensors``, A1111/ComfyUI layout), with the component configs taken
  from ``model_config`` (a local diffusers folder) so it loads offline;
- a pickled checkpoint (``.ckpt``/``.pt``/``.bin``/``.pth``): refused unless ``allow_pickle``, then read
  with ``torch.load(weights_only=True)`` (tensors only: no code can run) and converted;
- a hub id (``org/name``): the real ``from_pretrained`` path, using the local cache first; with no network
  it fails in seconds with a message instead of hanging in retries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import EgakuError, first_line
from ..paths import file_sha256

BUILTIN_DIR = Path(__file__).parent / "builtin"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
DEFAULT_GUIDANCE = 7.5  # diffusers' and A1111's usual scale for Stable Diffusion checkpoints
# A pipeline folder may say how it is best sampled: {"guidance_scale": 3.0} in this file beside
# model_index.json. diffusers and other tools ignore it; train-ldm writes it, merge-lora and convert copy it.
# The built-in model's holds its measured best (MODEL_CARD.md, guidance sweep): at 7.5 its
# zero-terminal-SNR sampling shifts colours, and every attribute is right on 0.43 of seen prompts against 0.62 at 3.
MODEL_DEFAULTS_FILE = "egaku_defaults.json"


def model_defaults(pipe) -> dict:
    """The sampling defaults the loaded model declares: its folder's egaku_defaults.json; for a single file,
    those ``egaku convert`` recorded in its metadata, else the file of the --model-config folder it was read
    with. Empty for other sources."""
    info = getattr(pipe, "egaku_info", None)
    path = info.path if info is not None else None
    if path is not None and path.is_file():
        from .single_file import single_file_defaults

        recorded = single_file_defaults(path) if path.suffix.lower() == ".safetensors" else {}
        if recorded:
            return recorded
        path = info.config
    return read_model_defaults(path) if path is not None else {}


def read_model_defaults(folder: Path) -> dict:
    """A pipeline folder's egaku_defaults.json, checked ({} where there is none): a file that is not JSON or holds no
    usable guidance is an error that names it."""
    file = folder / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        defaults = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise EgakuError(f"{file} is not readable JSON ({exc}); fix it or delete it", param="model") from None
    guidance = defaults.get("guidance_scale") if isinstance(defaults, dict) else None
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0:
        raise EgakuError(f'{file} must hold {{"guidance_scale": G}} with G a number >= 0, got {defaults!r}',
                         param="model")
    return {"guidance_scale": float(guidance)}


@contextlib.contextmanager
def folder_in_place_of(out: Path):
    """A new folder beside ``out`` to write into; when the block ends without an error it takes ``out``'s place (a
    folder there goes whole, a link as a link), else it is removed: a failure leaves no half-written folder."""
    from ..training.runtime import permissions_by_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        permissions_by_umask(tmp)  # mkdtemp made it private
        if out.is_symlink():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pipeline(pipe, folder: str | os.PathLike) -> None:
    """``pipe.save_pretrained`` (safetensors), keeping the scheduler's config as the source model gave it.

    diffusers writes every scheduler option out, the ones the source's file left to defaults too. The next
    loader then takes them as the model's choices: SD 1.x's scheduler_config.json names no
    ``timestep_spacing``, so the saved copy would say PNDM's "leading", and DPM++ or Euler built from it
    (``from_config``) would step on other timesteps than from the original, which they build with their own
    default ("linspace"). The options the source left out (``_use_default_values``) are left out again.
    The weight files get the mode a plain open() gives (safetensors writes them 0600), and transformers'
    "Writing model shards" bar is not shown.
    """
    write_pipeline(pipe, folder)
    defaulted = set(pipe.scheduler.config.get("_use_default_values", []))
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if defaulted and path.is_file():
        config = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in defaulted}, indent=2,
                                   sort_keys=True) + "\n")


def write_pipeline(pipe, folder: str | os.PathLike) -> None:
    """``pipe.save_pretrained`` (safetensors) with weight files readable as any other output of the run:
    safetensors writes them 0600, which the other users and services reading a shared model folder cannot
    open. transformers' "Writing model shards" bar is not shown (one shard, and a line in every log)."""
    from transformers.utils import logging as tlogging

    from ..training.runtime import permissions_by_umask

    tlogging.disable_progress_bar()
    pipe.save_pretrained(folder, safe_serialization=True)
    for weights in Path(folder).rglob("*.safetensors"):
        permissions_by_umask(weights)


def write_model_defaults(folder: str | os.PathLike, defaults: dict) -> None:
    """Write ``defaults`` (from ``model_defaults``) into a pipeline folder; nothing when there are none."""
    if defaults:
        (Path(folder) / MODEL_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")


def recommended_guidance(pipe) -> float:
    """The guidance scale used when none is given: the model folder's own, else SD's usual 7.5."""
    return model_defaults(pipe).get("guidance_scale", DEFAULT_GUIDANCE)


@dataclass
class ModelInfo:
    """Where a loaded pipeline came from; written into every image's metadata."""

    name: str  # what the user passed (or "builtin")
    kind: str  # builtin | tiny | folder | single-file | pickle | hub
    path: Path | None  # the folder or file on disk, if any
    _hash: str | None = None
    config: Path | None = None  # a single file's --model-config folder

    @property
    def hash(self) -> str | None:
        """A1111's short model hash: first 10 hex digits of the sha256 of the weights file (for a
        folder: of the UNet weights that load_pipeline loads, the part that identifies a fine-tune)."""
        if self._hash is None and self.path is not None:
            target = component_weights_file(self.path, "unet") if self.path.is_dir() else self.path
            if target is not None and target.is_file():
                self._hash = file_sha256(target)[:10]
        return self._hash


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# the keys of each model in an original-layout single file (SD 1.x and 2.x)
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "cond_stage_model."}
# the weight file names diffusers (unet, vae) and transformers (text_encoder) look for, safetensors first
_WEIGHTS_NAMES = {"text_encoder": ("model.safetensors", "pytorch_model.bin")}
_DIFFUSERS_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' ``_add_variant``: model.safetensors -> model.fp16.safetensors, x.safetensors.index.json ->
    x.safetensors.index.fp16.json."""
    if not variant:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def component_weights_file(folder: Path, component: str) -> Path | None:
    """The weights file of ``component`` (unet, vae, text_encoder) in the pipeline folder ``folder``: the one
    load_pipeline loads, so variant-aware like it (``_weights_variant``). A full hub download holds
    diffusion_pytorch_model.safetensors and diffusion_pytorch_model.fp16.safetensors side by side; the plain
    file is the one loaded, the variant only where the UNet has no plain weights (and then, for a component
    without the variant, its plain file, as diffusers falls back). For sharded weights: the first shard.
    None where the folder holds no weights for it."""
    sub = Path(folder) / component
    if not sub.is_dir():
        return None
    variant = _weights_variant(Path(folder))
    for name in _WEIGHTS_NAMES.get(component, _DIFFUSERS_WEIGHTS_NAMES):
        for v in ((variant, None) if variant else (None,)):
            file = sub / _with_variant(name, v)
            if file.is_file():
                return file
            index = sub / _with_variant(name + ".index.json", v)
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    shards = []
                if shards and (sub / shards[0]).is_file():
                    return sub / shards[0]
    return None


def stored_weights_dtype(info: ModelInfo, component: str = "unet") -> torch.dtype | None:
    """The dtype ``component``'s weights (unet, vae, text_encoder) are stored in on disk (a pipeline is loaded in
    whatever dtype was asked for, so this reads the safetensors header of its source: the file load_pipeline
    loaded, or a single file's keys of that model); None where there is no such file to read."""
    from safetensors import safe_open

    target, prefix = info.path, ""
    if target is not None and target.is_dir():
        target = component_weights_file(target, component)
    elif component in SINGLE_FILE_PREFIXES:
        prefix = SINGLE_FILE_PREFIXES[component]  # a single file holds every model: the keys name each
    else:
        return None
    if target is None or not target.is_file() or target.suffix.lower() != ".safetensors":
        return None
    with safe_open(str(target), framework="pt") as fh:
        for key in fh.keys():
            if key.startswith(prefix):
                dtype = _SAFETENSORS_DTYPES.get(fh.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return None


# the models of a pipeline that hold weights, as messages name them
WEIGHT_COMPONENTS = {"unet": "UNet", "text_encoder": "text encoder", "vae": "VAE"}


def cast_for_saving(pipe, precision: str = "auto") -> dict[str, torch.dtype]:
    """Cast each model of ``pipe`` (UNet, text encoder, VAE) to the dtype it is written in, and return those dtypes:
    with ``precision`` "auto" (or ""), each as its source stores it (``stored_weights_dtype``: an fp16 source's copy
    stays half the size of an fp32 one; a source with an fp16 UNet and an fp32 VAE keeps both), fp32 where that
    cannot be read (tiny, pickled weights); else all in ``precision`` (a DTYPES name). merge-lora and convert write
    with it, so that both keep a source's precision alike."""
    info = getattr(pipe, "egaku_info", None)
    auto = precision in ("auto", "")
    dtypes = {name: ((stored_weights_dtype(info, name) if info is not None else None) if auto else DTYPES[precision])
              or torch.float32 for name in WEIGHT_COMPONENTS}
    for name, dtype in dtypes.items():
        getattr(pipe, name).to(dtype=dtype)
    return dtypes


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as --save-precision spells it (fp16), not as torch does (float16)."""
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")


def saved_dtypes_said(dtypes: dict[str, torch.dtype]) -> str:
    """``cast_for_saving``'s dtypes for the line that names the written copy: " (UNet fp16, text encoder fp32, VAE
    fp32)" where they differ, " (fp16)" where all are one, and nothing for fp32, the usual."""
    if len(set(dtypes.values())) > 1:
        return " (" + ", ".join(f"{WEIGHT_COMPONENTS[n]} {dtype_name(d)}" for n, d in dtypes.items()) + ")"
    dtype = next(iter(dtypes.values()))
    return f" ({dtype_name(dtype)})" if dtype != torch.float32 else ""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise EgakuError(f"unknown device {device!r}; use auto, cpu, cuda or mps", param="device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EgakuError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto",
                         param="device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EgakuError("--device mps was asked for but MPS is not available; use --device cpu or auto",
                         param="device")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU (fp16 matmuls there are slow or unsupported); fp16 on GPUs, SD's usual precision.
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise EgakuError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16", param="dtype")
    return DTYPES[dtype]


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_pipeline_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file() and (folder / "model" / "model_index.json").is_file():
        raise EgakuError(f"{folder} is a train-ldm run; its pipeline is {folder / 'model'}: pass --model "
                         f"{folder / 'model'}", param="model")
    if not index.is_file():
        raise EgakuError(f"{folder} is a folder but not a diffusers pipeline (no model_index.json); "
                         "pass a Stable Diffusion pipeline folder, a .safetensors checkpoint or a hub id",
                         param="model")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise EgakuError(f"{index} is not valid JSON ({exc})", param="model") from None
    missing = [c for c in SD_COMPONENTS if c not in spec]
    if missing or "XL" in spec.get("_class_name", ""):
        raise EgakuError(f"{folder} holds a {spec.get('_class_name', 'unknown')} pipeline, not a Stable Diffusion "
                         f"1.x/2.x one (missing: {', '.join(missing) or 'none'}); egaku needs vae, text_encoder, "
                         "tokenizer, unet and scheduler", param="model")
    # diffusers reports a missing component folder as "no file named config.json found in directory <folder>", as if
    # the pipeline folder itself were wrong: name the one that is missing. (The safety checker is never loaded:
    # load_pipeline passes None for it. [null, null] entries name no folder.)
    absent = [name for name, entry in spec.items() if not name.startswith("_") and name != "safety_checker"
              and isinstance(entry, list) and entry and entry[0] is not None and not (folder / name).is_dir()]
    if absent:
        names = ", ".join(f"{name}/" for name in absent)
        raise EgakuError(f"{folder} is an incomplete pipeline: its model_index.json names the folder"
                         f"{'s' * (len(absent) > 1)} {names}, which {'is' if len(absent) == 1 else 'are'} not there; "
                         f"copy or download {'it' if len(absent) == 1 else 'them'} into {folder} from the same model",
                         param="model")


def _pickle_to_safetensors(path: Path) -> Path:
    """Read a pickled checkpoint as tensors only, and write it as a temporary safetensors file."""
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the message is what matters to the user
        raise EgakuError(f"{path} could not be read as a tensors-only checkpoint ({first_line(exc)}); "
                         "convert it to .safetensors with the tool that made it") from None
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EgakuError(f"{path} holds no tensors; it is not a model checkpoint")
    out = Path(tempfile.mkdtemp(prefix="egaku-ckpt-")) / (path.stem + ".safetensors")
    save_file(tensors, out)
    return out


def _single_file_configs(path: Path, model_config: str | None) -> dict:
    """The from_single_file arguments that give a single file its architecture: --model-config, checked, else the
    hub's (an error that says what to pass when it cannot be reached). Checked before a pickle is read."""
    if model_config:
        cfg = Path(model_config)
        if not cfg.is_dir():  # _check_pipeline_folder's message is about --model, and calls it a folder
            raise EgakuError(f"--model-config {cfg}: no such folder; give a local diffusers pipeline folder "
                             f"(model_index.json inside) of the architecture of {path.name}", param="model_config")
        _check_pipeline_folder(cfg)
        return {"config": str(cfg), "local_files_only": True}
    if not hub_reachable():
        raise EgakuError(f"{path.name}: a single-file checkpoint needs the configs of its architecture; "
                         "pass --model-config DIR (a local diffusers folder of the same architecture, e.g. "
                         "one made by `egaku convert` or any SD 1.x/2.x pipeline folder), since the hub "
                         "cannot be reached to fetch them", param="model")
    return {}


def _check_safetensors_file(file: Path, what: str) -> None:
    """A truncated or corrupt .safetensors file is named with what to do, before diffusers reports it as
    "Unable to load weights from checkpoint file" (safe_open checks the header covers the whole file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise EgakuError(f"{file} is not a complete safetensors file ({first_line(exc)}): it is "
                         f"truncated or corrupt; download or convert {what} again", param="model") from None
    from ..lora.formats import is_lora_key

    if keys and all(is_lora_key(key) or key.endswith(".alpha") for key in keys):
        # read as a model, a LoRA's missing layers would be reported as a broken checkpoint
        raise EgakuError(f"{file} is a LoRA, not a model: give it as --lora (with --model the checkpoint it was "
                         "trained for)", param="model")


def _from_single_file(path: Path, model_config: str | None, dtype: torch.dtype, name: Path | None = None,
                      configs: dict | None = None):
    """``name``: the file the user gave, where ``path`` is the temporary copy of a pickle; ``configs``:
    ``_single_file_configs`` of it where the caller has them already."""
    from diffusers import StableDiffusionPipeline

    name = name or path
    if configs is None:
        configs = _single_file_configs(name, model_config)
    kwargs = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False, **configs}
    try:
        return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except EgakuError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        if model_config and "expected shape" in first:  # diffusers' advice (ignore_mismatched_sizes) is not ours
            raise EgakuError(f"{name} does not fit the architecture of --model-config {model_config} "
                             f"({first.split('because ', 1)[-1].split('. ', 1)[0]}); pass the diffusers folder of "
                             "the model it was made from (or one of the same architecture)",
                             param="model_config") from None
        raise EgakuError(f"{name} could not be loaded as a Stable Diffusion checkpoint: {first}",
                         param="model") from None


def _weights_variant(folder: Path) -> str | None:
    """The variant ("fp16") of a pipeline folder whose UNet holds only variant weights, as a hub download limited to
    ``*.fp16.safetensors`` leaves it: diffusers reads those only when told, and otherwise asks for a .bin file.
    None where the plain weights are there (diffusers' own default, which they then stay)."""
    names = [p.name for p in (folder / "unet").glob("diffusion_pytorch_model*")]
    if not names or any(n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                              "diffusion_pytorch_model.safetensors.index.json") for n in names):
        return None
    for variant in ("fp16", "bf16"):
        if any(f".{variant}." in n or f".{variant}-" in n for n in names):
            return variant
    return None


def _is_hub_id(spec: str, path: Path) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix


def check_model_source(model: str | os.PathLike | None, allow_pickle: bool = False) -> None:
    """The checks of ``load_pipeline`` that read nothing: a --model that names no file, folder or hub id, a file of
    an unknown type, a pickle without --allow-pickle. Trainers call it first, so that such a mistake is said before
    minutes of reading their data rather than after."""
    spec = "builtin" if model in (None, "") else str(model)
    path = Path(spec).expanduser()
    if spec in ("tiny", "builtin") or path.is_dir():
        return
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise EgakuError(f"{path.name} is a pickle ({suffix}), which can run arbitrary code when loaded; "
                             "convert it to .safetensors, or pass --allow-pickle to load its tensors only "
                             "(weights_only=True)", param="model")
        if suffix not in PICKLE_SUFFIXES and suffix != ".safetensors":
            raise EgakuError(f"{path}: unknown model file type {suffix!r}; use a .safetensors checkpoint or a "
                             "diffusers folder", param="model")
    elif not _is_hub_id(spec, path):
        raise EgakuError(f"model {spec!r} not found: no such file or folder (and not a hub id like org/name)",
                         param="model")


def _check_folder_files(path: Path, allow_pickle: bool) -> None:
    """A pipeline folder's index, and its weight files: pickles refused unless allowed, safetensors whole."""
    _check_pipeline_folder(path)
    files = {c: component_weights_file(path, c) for c in ("unet", "vae", "text_encoder")}
    pickled = [f"{c}/{f.name}" for c, f in files.items() if f is not None and f.suffix.lower() == ".bin"]
    if pickled and not allow_pickle:  # diffusers and transformers would torch.load them unasked
        raise EgakuError(f"{path} holds pickled weights ({', '.join(pickled)}), which can run arbitrary code "
                         "when loaded; pass --allow-pickle to load their tensors only (weights_only=True), or "
                         f"write a safetensors copy once: egaku convert {path} --allow-pickle --out NEW_DIR",
                         param="model")
    for f in files.values():
        if f is not None and f.suffix.lower() == ".safetensors":
            _check_safetensors_file(f, "the model")


def check_model_files(model: str | os.PathLike | None, model_config: str | None = None,
                      allow_pickle: bool = False) -> None:
    """``check_model_source``, then the checks of ``load_pipeline`` that read files' headers but no weights: a
    folder that is not a pipeline, a truncated safetensors file, a LoRA given as the model, a single file without
    the configs of its architecture (no --model-config and no hub). Trainers call it before reading their data."""
    check_model_source(model, allow_pickle)
    spec = "builtin" if model in (None, "") else str(model)
    path = Path(spec).expanduser()
    if spec in ("tiny", "builtin"):
        return
    if path.is_dir():
        _check_folder_files(path, allow_pickle)
    elif path.is_file():
        if path.suffix.lower() == ".safetensors":
            _check_safetensors_file(path, "the checkpoint")
        _single_file_configs(path, model_config)


def load_pipeline(model: str | os.PathLike | None = "builtin", device: str = "auto", dtype: str = "auto",
                  model_config: str | None = None, allow_pickle: bool = False, quiet: bool = True):
    """Load a ``StableDiffusionPipeline`` from any source egaku accepts, on ``device`` in ``dtype``.

    The returned pipeline carries ``egaku_info`` (a ``ModelInfo``) for image metadata.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    started = time.perf_counter()
    if quiet:
        from transformers.utils import logging as tlogging

        dlogging.disable_progress_bar()
        dlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
        tlogging.set_verbosity_error()  # e.g. its "indexing errors" warning for a long prompt: egaku says what happens
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    spec = "builtin" if model in (None, "") else str(model)
    path = Path(spec).expanduser()
    common = {"dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}

    if spec in ("tiny", "builtin") and path.exists():  # the name would win, and the user's folder go unused unnoticed
        raise EgakuError(f"--model {spec} names egaku's {'built-in model' if spec == 'builtin' else 'tiny test model'}"
                         f", and ./{spec} is here too: write --model ./{spec} for that {'folder' if path.is_dir() else 'file'}"
                         f", or run from another folder for egaku's", param="model")
    check_model_source(spec, allow_pickle)
    if model_config and not path.is_file():
        # a folder, the built-in and tiny models and a hub id hold their own configs (model_index.json, one config
        # per model), which diffusers reads whatever --model-config says. A note, not an error: serve shares one
        # --model-config among all its --model sources, where it is for the single files among them
        source = {"tiny": "the tiny test model", "builtin": "the built-in model"}.get(
            spec, str(path) if path.is_dir() else f"the hub model {spec}")
        print(f"egaku: note: --model-config {model_config} is not used for {source}: a pipeline folder holds its "
              "own configs, and --model-config is read for single-file checkpoints only (drop it here)")
    if spec == "tiny":
        from .tiny import tiny_pipeline

        pipe, info = tiny_pipeline().to(dtype=torch_dtype), ModelInfo("tiny", "tiny", None)
    elif spec == "builtin":
        if not (BUILTIN_DIR / "model_index.json").is_file():
            raise EgakuError("the built-in model is not installed in this copy of egaku "
                             f"({BUILTIN_DIR} has no model_index.json); pass --model DIR|FILE|HUB_ID, or --model tiny "
                             "for a small untrained model built in code", param="model")
        pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_DIR, local_files_only=True, **common)
        info = ModelInfo("egaku-builtin", "builtin", BUILTIN_DIR)
    elif path.is_dir():
        _check_folder_files(path, allow_pickle)
        variant = _weights_variant(path)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **common,
                                                           **({"variant": variant} if variant else {}),
                                                           **({} if allow_pickle else {"use_safetensors": True}))
        except Exception as exc:  # noqa: BLE001
            raise EgakuError(f"{path} could not be loaded as a Stable Diffusion pipeline: {first_line(exc)}",
                             param="model") from None
        info = ModelInfo(path.resolve().name, "folder", path.resolve())
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            configs = _single_file_configs(path, model_config)  # a missing --model-config is said before it is read
            converted = _pickle_to_safetensors(path)
            try:
                pipe = _from_single_file(converted, model_config, torch_dtype, name=path, configs=configs)
            finally:  # a full copy of the checkpoint: not left in the temp folder at every load
                shutil.rmtree(converted.parent, ignore_errors=True)
            info = ModelInfo(path.stem, "pickle", path.resolve())
        else:  # .safetensors (check_model_source refused other types)
            _check_safetensors_file(path, "the checkpoint")
            pipe = _from_single_file(path, model_config, torch_dtype)
            info = ModelInfo(path.stem, "single-file", path.resolve())
        if model_config:
            info.config = Path(model_config).resolve()
    else:  # a hub id (check_model_source refused every other name)
        pipe, info = _load_hub(spec, {**common, **({} if allow_pickle else {"use_safetensors": True})})

    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.egaku_info = info
    pipe.egaku_load_seconds = time.perf_counter() - started
    return pipe


def _load_hub(repo_id: str, common: dict):
    from diffusers import StableDiffusionPipeline

    try:  # the cache first: works offline for anything downloaded before
        pipe = StableDiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **common)
    except Exception:  # noqa: BLE001 - not cached (or incomplete): fall through to the network
        if not hub_reachable():
            raise EgakuError(f"model {repo_id!r} is not a local path and is not in the hub cache, and the hub "
                             "cannot be reached (no network); download it on a connected machine and pass its "
                             "folder with --model DIR", param="model") from None
        try:
            pipe = StableDiffusionPipeline.from_pretrained(repo_id, **common)
        except Exception as exc:  # noqa: BLE001
            raise EgakuError(f"could not load {repo_id!r} from the hub: {first_line(exc)}",
                             param="model") from None
    snapshot = getattr(pipe, "name_or_path", None)
    return pipe, ModelInfo(repo_id, "hub", Path(snapshot) if snapshot and Path(snapshot).is_dir() else None)
