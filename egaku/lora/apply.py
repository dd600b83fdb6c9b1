"""Using LoRAs at generation time: prompt tags, name resolution, loading several adapters at once.

Every file is checked against the model before diffusers sees it (``formats.check_coverage``): diffusers
only logs a warning when no key matches, which turns a wrong file into a silent no-op.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import weakref
from pathlib import Path

import torch

from ..errors import EgakuError, NotFoundError, first_line
from .formats import (EMBEDDINGS_DIR, LORA_WEIGHTS_NAME, adaptable_modules, adapter_alphas, bake_alpha,
                      bundled_words, check_coverage, is_bundle_key, is_kohya, is_model_checkpoint, kohya_to_peft,
                      model_module_name, peft_pairs, read_bundled_embeddings, read_embedding, read_lora_file,
                      refuse_embedding, refuse_lycoris, refuse_non_finite, refuse_training_checkpoint,
                      single_token_ids)

# text encoder -> {token id: its base embedding}, so that remove_loras can put trained tokens back
_TOKEN_BACKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# text encoder -> {word: the LoRA file that trained it}, of the LoRAs applied now (``lora_trained_words``)
_TOKEN_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# A1111 syntax: <lora:name> or <lora:name:0.8>; A1111 1.5+ reads <lyco:...>, the LyCORIS extension's tag, as the
# same (prompts written for it still carry them), so both name a LoRA here (a LyCORIS file is refused on loading).
# The kind is matched in lower case only, as A1111 looks it up (<LORA:x> is not a tag there either); a tag without a
# name (<lora:>, <lora::1>) matches too, so that it is refused rather than left in the prompt as words
TAG_KINDS = ("lora", "lyco")
LORA_TAG = re.compile(rf"<({'|'.join(TAG_KINDS)}):([^>]*)>")
# the text encoder's and the UNet's weight of a tag with two (A1111's te_multiplier and unet_multiplier), in the
# form diffusers' set_adapters takes per component
TEXT_ENCODER, UNET = "text_encoder", "unet"


# any other extra-network tag A1111 reads (<hypernet:name:1>, an extension's): A1111 takes each out of the prompt,
# applied or not, so a prompt written for it reaches the text encoder without them
OTHER_NETWORK_TAG = re.compile(rf"<(?!(?:{'|'.join(TAG_KINDS)}):)(\w+):([^>]+)>")


def take_out_other_network_tags(text: str) -> tuple[str, list[str]]:
    """``text`` without the extra-network tags egaku does not apply (``<hypernet:name:1>``), and those tags."""
    found = [match[0] for match in OTHER_NETWORK_TAG.finditer(text)]
    if not found:
        return text, []
    clean = re.sub(r"\s{2,}", " ", OTHER_NETWORK_TAG.sub(" ", text))
    return re.sub(r"\s+,", ",", clean).strip().strip(",").strip(), found


def has_prompt_loras(text: str) -> bool:
    """Whether ``text`` may hold a LoRA tag (``<lora:`` or ``<lyco:``): a cheap check before ``parse_prompt_loras``."""
    return any(f"<{kind}:" in text for kind in TAG_KINDS)


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float | dict[str, float]]]]:
    """Remove A1111-style <lora:name:weight> tags (and <lyco:name:weight>, its alias; weight optional, default
    1.0) from a prompt; return (clean prompt, [(name, weight)]).

    As in A1111, a tag may give the text encoder and the UNet weights of their own: ``<lora:name:0.8:0.5>`` or
    ``<lora:name:te=0.8:unet=0.5>`` (the UNet's defaults to the text encoder's); such a weight is
    ``{"text_encoder": 0.8, "unet": 0.5}``, which ``apply_loras`` takes, and one of two equal weights a number.
    A third value (A1111's ``dyn``, a DyLoRA rank) is ignored, as A1111 ignores it for a LoRA. A tag without a
    name is an error (it would otherwise stay in the prompt as words)."""
    loras: list[tuple[str, float | dict[str, float]]] = []
    for match in LORA_TAG.finditer(prompt):
        kind, (name, *values) = match[1], match[2].split(":")
        name = name.strip()
        if not name:
            raise EgakuError(f"the prompt has a <{kind}:...> tag without a name; write <{kind}:NAME:WEIGHT>",
                             param="prompt")
        te, unet = _tag_weights(match[0], kind, name, values)
        loras.append((name, te if te == unet else {TEXT_ENCODER: te, UNET: unet}))
    clean = LORA_TAG.sub(" ", prompt)
    clean = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", clean))
    clean = re.sub(r",(\s*,)+", ",", clean).strip().strip(",").strip()
    return clean, loras


def _tag_weights(tag: str, kind: str, name: str, values: list[str]) -> tuple[float, float]:
    """(text encoder, UNet) weight of a tag's values after its name, read as A1111's Lora extension reads them:
    positional te, unet, dyn, or named ``te=``, ``unet=``, ``dyn=`` (a named one wins); an empty value is not given.
    A key named twice (``te=1:te=2``, which A1111 reads as the last) is an error: one of them would be dropped."""
    positional, named = [], {}
    for value in values:
        key, sep, number = value.partition("=")
        if sep:
            key = key.strip()  # as A1111 reads them: TE= is not te=
            if key not in ("te", "unet", "dyn"):
                raise EgakuError(f"prompt tag {tag!r}: unknown value {value.strip()!r}; a LoRA tag takes te=, unet= "
                                 f"and dyn= (as in <{kind}:{name}:te=0.8:unet=0.5>)", param="prompt")
            if key in named:
                raise EgakuError(f"prompt tag {tag!r} gives {key}= twice ({key}={named[key]}, then "
                                 f"{key}={number.strip()}); keep the one you mean", param="prompt")
            named[key] = number.strip()
        else:
            positional.append(value.strip())
    if len(positional) > 3:
        raise EgakuError(f"prompt tag {tag!r} has {len(positional)} values after the name; it takes a weight "
                         f"(<{kind}:{name}:0.8>), or the text encoder's and the UNet's (<{kind}:{name}:0.8:0.5>)",
                         param="prompt")
    given = dict(zip(("te", "unet", "dyn"), positional))
    given.update(named)

    def number(key: str, default: float) -> float:
        text = given.get(key) or ""
        try:
            value = float(text) if text else default
        except ValueError:
            what = "weight" if key == "te" and not values[1:] else f"{'text-encoder' if key == 'te' else 'UNet'} weight"
            raise EgakuError(f"prompt tag {tag!r}: {what} {text!r} is not a number; write <{kind}:{name}:0.8> (or "
                             f"<{kind}:{name}:0.8:0.5>: text encoder 0.8, UNet 0.5)", param="prompt") from None
        if not math.isfinite(value):  # inf/nan would turn every pixel to NaN: a black image
            raise EgakuError(f"prompt tag {tag!r}: the weight must be a finite number, such as 0.8", param="prompt")
        return value

    dyn = given.get("dyn") or ""  # a DyLoRA's rank: A1111 reads it as a whole number, then leaves a LoRA as it is
    if dyn and not re.fullmatch(r"[+-]?\d+", dyn):
        raise EgakuError(f"prompt tag {tag!r}: dyn {dyn!r} is not a whole number (it is ignored for a LoRA, as "
                         "A1111 ignores it; take it out)", param="prompt")
    te = number("te", 1.0)
    return te, number("unet", te)


def component_weights(weight: float | dict[str, float]) -> tuple[float, float]:
    """(text encoder, UNet) weight of a LoRA weight: one number for both, or ``{"text_encoder", "unet"}`` (either
    left out: 1.0, as diffusers' set_adapters reads a missing component)."""
    if isinstance(weight, dict):
        unknown = set(weight) - {TEXT_ENCODER, UNET}
        if unknown:
            raise EgakuError(f"a LoRA weight's parts are {TEXT_ENCODER!r} and {UNET!r}; got {sorted(unknown)}",
                             param="lora")
        return float(weight.get(TEXT_ENCODER, 1.0)), float(weight.get(UNET, 1.0))
    return float(weight), float(weight)


def lora_file_in(folder: Path) -> Path | None:
    """A train-lora folder's LoRA: the diffusers file, else (--format kohya) the kohya file named after the folder."""
    for path in (folder / LORA_WEIGHTS_NAME, folder / f"{folder.resolve().name}.safetensors"):
        if path.is_file():
            return path
    return None


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` of ``--lora`` (generate, merge-lora, the server's names): a Windows drive
    letter's colon is not a scale."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")) and not Path(text).expanduser().exists():
        try:
            return head, float(tail)
        except ValueError:
            # a name with a colon in it is still a name; a LoRA that exists with a bad scale after it is a typo
            if not Path(text).expanduser().exists() and Path(head).expanduser().exists():
                raise EgakuError(f"--lora {text!r}: the scale after ':' must be a number (as in {head}:0.8), "
                                 f"got {tail!r}", param="lora") from None
    return text, 1.0


def _is_run_folder(folder: Path) -> bool:
    """A train-lora output folder is one LoRA, named after the folder: its steps/, checkpoints/ and embeddings/
    hold files that are not LoRAs of their own."""
    return (folder / LORA_WEIGHTS_NAME).is_file() or (
        (folder / "training_config.json").is_file() and lora_file_in(folder) is not None)


def loras_under(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """Every LoRA under ``root`` by name, as A1111 lists its Lora folder: a .safetensors file's stem, or a
    train-lora run folder's name, in any sub-folder. Each name maps to [(its path in ``root`` without
    .safetensors, such as ``styles/deep``, its file)], one entry per distinct file.

    Linked folders are followed, each real folder once (as ``egaku.data.folder.files_under`` does); hidden
    files and folders are left out.
    """
    found: dict[str, list[tuple[str, Path]]] = {}
    seen_folders, seen_files = set(), set()

    def add(name: str, relative: Path, file: Path) -> None:
        real = (name, os.path.realpath(file))
        if real not in seen_files:  # a link to a LoRA, of the LoRA's own name, is that LoRA, not a second one
            seen_files.add(real)
            found.setdefault(name, []).append((relative.as_posix(), file))

    for folder, subfolders, names in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if real in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add(real)
        if here != root and _is_run_folder(here):
            add(here.name, here.relative_to(root), lora_file_in(here))
            subfolders[:] = []
            continue
        if (here / "state.pt").is_file():  # a checkpoint: training state, whose unet_lora file is no LoRA to apply
            subfolders[:] = []
            continue
        # a run that has not ended yet: its checkpoints are training state and its words go with its LoRA, which is
        # not written yet; its steps/ (--save-every) are LoRAs
        unfinished = (here / "training_config.json").is_file()
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and not (unfinished and d in ("checkpoints", "embeddings")))
        for name in sorted(names):
            file = here / name
            if name.endswith(".safetensors") and not name.startswith(".") and file.is_file():
                add(file.stem, file.relative_to(root).with_suffix(""), file)
    return found


def lora_catalog(root: Path) -> list[str]:
    """The names a prompt tag or request may give for the LoRAs under ``root``: each name, or where two files
    share one, each file's path in the folder (``./deep``, ``styles/deep``)."""
    names = []
    for name, places in loras_under(root).items():
        names += [name] if len(places) == 1 else [_sub_path(root, relative, file) for relative, file in places]
    return sorted(names)


def _sub_path(root: Path, relative: str, file: Path) -> str:
    """The path in the folder that ``resolve_lora`` takes to ``file`` and to no other file."""
    if (root / f"{relative}.safetensors").is_file() and file != root / f"{relative}.safetensors":
        relative = file.relative_to(root).with_suffix("").as_posix()  # a run folder beside a file of its name
    return relative if "/" in relative else f"./{relative}"


def resolve_lora(name_or_path: str, lora_dir: str | None, names_option: str = "--lora-dir") -> Path:
    """A path to a .safetensors file or a folder holding pytorch_lora_weights.safetensors; with lora_dir, a name is
    looked up there as A1111 does: by file stem (or train-lora folder name) in the folder and all its sub-folders,
    or by its path inside the folder ('styles/deep'). A name two files share, and a path that leaves the folder
    (absolute, '~' or '..'), are refused with EgakuError (param='lora'); a missing one raises
    egaku.errors.NotFoundError.

    Without ``lora_dir`` (``--lora PATH`` on the command line) the argument is a path. With ``lora_dir``
    (prompt tags, the server) only names inside that folder are accepted, so a request cannot read
    files elsewhere on the machine.
    """
    text = str(name_or_path).strip()
    if not text:
        raise EgakuError("empty LoRA name", param="lora")
    has_separator = "/" in text or "\\" in text or text.startswith("~") or Path(text).is_absolute()
    if lora_dir is not None:
        return _lora_in_folder(text, Path(lora_dir))
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = lora_file_in(path)
        if found:
            return found
        refuse_training_checkpoint(path)
        if (path / "model_index.json").is_file():
            raise EgakuError(f"{path} is a diffusers pipeline folder, a model, not a LoRA: give it as --model",
                             param="lora")
        if (path / "training_config.json").is_file():
            raise NotFoundError(f"{path} is a train-lora run that has not written its LoRA yet (it is written when the "
                                "run ends; with --save-every N every N steps into its steps/): `egaku train-lora ... "
                                f"--out {path} --resume latest` continues it", param="lora")
        raise NotFoundError(f"LoRA folder {path} has no {LORA_WEIGHTS_NAME} (nor {path.resolve().name}.safetensors, "
                            "train-lora's kohya file); give the LoRA file itself", param="lora")
    if HUB_LORA.fullmatch(text) and not (text.count("/") == 1 and Path(text).suffix.lower() in MODEL_FILE_SUFFIXES):
        return hub_lora(text)  # (a missing "loras/x.safetensors" is a local path, not a repository named so)
    hint = ("" if has_separator or not names_option else
            f"; to use a name from a LoRA folder, also give the folder ({names_option})")
    raise NotFoundError(f"LoRA {text!r} does not exist{hint}", param="lora")


# org/name, or org/name/path/in/repo.safetensors: what diffusers' load_lora_weights takes as a repo id and weight_name
HUB_LORA = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[^:]+\.safetensors)?")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def hub_lora(spec: str) -> Path:
    """The LoRA file of a hub id (``org/name``: its pytorch_lora_weights.safetensors, or the repository's only
    .safetensors file; ``org/name/file.safetensors``: that file), from the local cache first, so that a LoRA
    downloaded once loads offline. Only safetensors files are fetched."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from ..models.loading import hub_reachable

    parts = spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError:  # "old/my--lora": no repository can be named so, so it is a missing local path
        raise NotFoundError(f"LoRA {spec!r} does not exist", param="lora") from None
    try:  # the cache
        if filename:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.safetensors"]))
    except LocalEntryNotFoundError:
        pass
    else:
        cached = sorted(p.name for p in snapshot.glob("*.safetensors"))
        if cached:
            return snapshot / _hub_weight_name(repo_id, cached)
    if not hub_reachable():
        raise NotFoundError(f"LoRA {spec!r} is not a local file or folder, nor in the hub cache, and the hub cannot "
                            "be reached (no network); give the path of a LoRA file, or download it on a connected "
                            "machine", param="lora") from None
    from huggingface_hub import HfApi

    try:
        if not filename:
            files = [f for f in HfApi().list_repo_files(repo_id) if "/" not in f]
            filename = _hub_weight_name(repo_id, [f for f in files if f.endswith(".safetensors")])
        return Path(hf_hub_download(repo_id, filename))
    except EgakuError:
        raise
    except Exception as exc:  # noqa: BLE001 - no such repository or file, no access: the hub's first line says which
        raise NotFoundError(f"LoRA {spec!r}: not a local path, and the hub says: {first_line(exc)}",
                            param="lora") from None


def _hub_weight_name(repo_id: str, names: list[str]) -> str:
    """Which of a hub repository's top-level .safetensors files is its LoRA (diffusers' choice of weight_name)."""
    if LORA_WEIGHTS_NAME in names:
        return LORA_WEIGHTS_NAME
    if len(names) == 1:
        return names[0]
    if not names:
        raise NotFoundError(f"hub repository {repo_id!r} holds no .safetensors file at its top level; give the "
                            f"file's path in it ({repo_id}/FOLDER/FILE.safetensors)", param="lora")
    raise EgakuError(f"hub repository {repo_id!r} holds {len(names)} .safetensors files ({', '.join(sorted(names))}); "
                     f"say which: {repo_id}/{sorted(names)[0]}", param="lora")


def resolve_lora_option(name: str, lora_dir: str | None) -> Path:
    """``resolve_lora`` of a ``--lora`` value (generate, merge-lora): with a LoRA folder, a bare name (no path
    separator) is looked up in it as a prompt tag is, even where the working directory holds a file of that
    name; anything else is a path or a hub id."""
    bare = bool(lora_dir) and not any(c in name for c in "/\\~")
    try:
        return resolve_lora(name, lora_dir if bare else None)
    except NotFoundError:
        # parse_lora_arg checks a bad scale against paths only: "mine:O.8" of a name in the folder is that typo too
        head, sep, tail = name.rpartition(":")
        if bare and sep and head:
            try:
                resolve_lora(head, lora_dir)
            except EgakuError:
                pass
            else:
                raise EgakuError(f"--lora {name!r}: the scale after ':' must be a number (as in {head}:0.8), got "
                                 f"{tail!r}", param="lora") from None
        raise


def _lora_in_folder(text: str, root: Path) -> Path:
    """``resolve_lora`` of a name in the LoRA folder ``root``."""
    # the name may come from a request: what it names must stay inside the folder, whatever the folder holds
    relative = text.replace("\\", "/")
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if relative.startswith(("/", "~")) or Path(text).is_absolute() or ".." in parts or not parts:
        raise EgakuError(f"LoRA name {text!r} points outside the LoRA folder {root}; give a LoRA's name, or its "
                         "path inside that folder (such as styles/deep)", param="lora")
    if parts[-1].endswith(".safetensors"):
        parts[-1] = parts[-1][: -len(".safetensors")]
    if "/" in relative:  # a path inside the folder: that file (or train-lora folder) only
        places = [candidate for candidate in (root.joinpath(*parts[:-1], f"{parts[-1]}.safetensors"),
                                              root.joinpath(*parts)) if candidate.is_file()
                  or candidate.is_dir() and lora_file_in(candidate)]
        if places:
            return places[0] if places[0].is_file() else lora_file_in(places[0])
    else:
        matches = loras_under(root).get(parts[0], []) if root.is_dir() else []
        if len(matches) > 1:
            files = ", ".join(str(file.relative_to(root)) for _, file in matches)
            choices = " or ".join(_sub_path(root, relative, file) for relative, file in matches)
            raise EgakuError(f"LoRA name {text!r} fits {len(matches)} files in {root} ({files}); give the one you "
                             f"mean by its path in the folder: {choices}", param="lora")
        if matches:
            return matches[0][1]
    if not root.is_dir():  # not "the folder has no LoRAs": there is no folder to hold them
        state = "is a file" if root.exists() else "does not exist"
        raise NotFoundError(f"LoRA {text!r}: the LoRA folder {root} {state}; give the folder that holds your LoRAs "
                            "(--lora-dir)", param="lora")
    _refuse_other_case(text, root, parts, is_path="/" in relative)
    available = lora_catalog(root)
    listing = f"; available: {', '.join(available)}" if available else " (the folder has no LoRAs)"
    folder = root.joinpath(*parts)
    if folder.is_dir():  # a folder of that name is there, but nothing in it is a LoRA file
        raise NotFoundError(f"LoRA {text!r}: the folder {'/'.join(parts)!r} in {root} holds no {LORA_WEIGHTS_NAME} "
                            f"(nor {parts[-1]}.safetensors, train-lora's kohya file){listing}", param="lora")
    raise NotFoundError(f"LoRA {text!r} not found in {root}{listing}", param="lora")


def _refuse_other_case(text: str, root: Path, parts: list[str], is_path: bool) -> None:
    """A LoRA the name ``text`` (split into ``parts``) misses only by letter case is named, with how to write it.
    It is not taken in its place: a case-sensitive file system would not find it, so a prompt would find a LoRA on
    one machine and not on another."""
    wanted = "/".join(parts).lower()
    found = []  # (what to write, the file)
    for name, places in loras_under(root).items():
        for relative, file in places:
            if (relative if is_path else name).lower() == wanted:
                write = _sub_path(root, relative, file) if is_path or len(places) > 1 else name
                found.append((write, file.relative_to(root).as_posix()))
    if not found:
        return
    files = ", ".join(file for _, file in found)
    write = " or ".join(repr(w) for w, _ in found)
    raise NotFoundError(f"LoRA {text!r} not found in {root}; {files} there {'differs' if len(found) == 1 else 'differ'}"
                        f" from it only in letter case: write {write} (LoRA names are matched in their exact case)",
                        param="lora")


def _adapter_name(path: Path, index: int, taken: set[str]) -> str:
    stem = path.parent.name if path.name == LORA_WEIGHTS_NAME else path.stem
    base = re.sub(r"\W", "_", stem) or "lora"
    name = base
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


def _alphas_of_diffusers_file(pairs, state_dict, metadata) -> dict[str, float]:
    """Per-module alpha: old ``.alpha`` keys, else the adapter metadata diffusers writes, else alpha = rank."""
    alphas = {}
    for full, pair in pairs.items():
        component, module = full.split(".", 1)
        default, pattern = adapter_alphas(metadata, component)
        alpha = state_dict.get(f"{full}.alpha")
        if alpha is not None:
            alphas[full] = float(alpha)
            continue
        alpha = next((float(v) for k, v in pattern.items() if module == k or module.endswith("." + k)), None)
        alphas[full] = alpha if alpha is not None else float(default if default is not None else pair["down"].shape[0])
    return alphas


def _load_text_encoder_lora(text_encoder, pairs: dict, alphas: dict, name: str) -> None:
    """Inject a LoRA into the CLIP text encoder with peft directly.

    diffusers goes through transformers' ``load_adapter``, which transformers 5 gates on peft >= 0.22;
    peft's own injection makes the same layers, and diffusers' ``set_adapters``/``unload_lora_weights``/
    ``fuse_lora`` handle them like their own.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    modules = {full.split(".", 1)[1]: pair for full, pair in pairs.items()}
    ranks = {m: int(p["down"].shape[0]) for m, p in modules.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    differing = {m: r for m, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, rank_pattern=differing, alpha_pattern=differing,
                        target_modules=sorted(modules), init_lora_weights=False,
                        use_dora=any("magnitude" in p for p in modules.values()))
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    baked = bake_alpha({f"x.{m}": p for m, p in modules.items()},
                       {f"x.{m}": alphas[f"text_encoder.{m}"] for m in modules})
    state = {k[2:]: v.to(text_encoder.dtype) for k, v in baked.items()}
    result = set_peft_model_state_dict(text_encoder, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise EgakuError(f"text-encoder LoRA keys not placed: {unexpected[:3]}", param="lora")


def apply_loras(pipe, loras: list[tuple[Path, float | dict[str, float]]]) -> list[str]:
    """Load each LoRA (diffusers/PEFT or kohya layout, detected from keys) into pipe's UNet (and text encoder if
    present) as a named adapter and activate them all with their weights (pipe.set_adapters). A weight is one
    number, or ``{"text_encoder": 0.8, "unet": 0.5}`` (a tag's two weights, ``parse_prompt_loras``). A file whose
    keys match nothing in the model, or whose shapes do not fit (trained on another base: name the mismatching
    layer), raises EgakuError. Returns adapter names.

    Both layouts are resolved here against the model's own module names, with alpha folded into the up
    weights, so the same numbers reach the model whichever layout a file uses.
    """
    if not loras:
        return []
    modules = adaptable_modules(pipe)
    listed = getattr(pipe, "get_list_adapters", lambda: {})()
    taken = {n for names in listed.values() for n in names}
    names, weights = [], []
    word_source: dict[str, Path] = {}
    for index, (path, weight) in enumerate(loras):
        path = Path(path)
        te_weight, unet_weight = component_weights(weight)
        if not (math.isfinite(te_weight) and math.isfinite(unet_weight)):
            raise EgakuError(f"{path}: LoRA weight {weight} is not a finite number; give one such as 0.8",
                             param="lora")
        embeddings = trained_embeddings(path)
        for word in embeddings:
            # one row of the token table holds one embedding: the second file's would silently replace the first's
            if word in word_source and word_source[word] != path:
                raise EgakuError(f"{word_source[word]} and {path} both trained the word {word!r}; its embedding can "
                                 "hold one of them: apply one of these LoRAs at a time", param="lora")
            word_source[word] = path
        pairs, alphas = lora_layers(path, modules)
        name = _adapter_name(path, index, taken)
        taken.add(name)
        unet_pairs = {k: v for k, v in pairs.items() if k.startswith("unet.")}
        te_pairs = {k: v for k, v in pairs.items() if k.startswith("text_encoder.")}
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters at once is what this is for
                warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute in the model")
                if unet_pairs:
                    pipe.load_lora_weights(bake_alpha(unet_pairs, alphas), adapter_name=name)
                if te_pairs:
                    _load_text_encoder_lora(pipe.text_encoder, te_pairs, alphas, name)
        except (ValueError, RuntimeError) as exc:
            raise EgakuError(f"{path}: could not be loaded into this model ({first_line(exc)})",
                             param="lora") from None
        names.append(name)
        # a part the file lacks gets no weight: diffusers warns of a weight for a component the adapter is not in
        parts = {TEXT_ENCODER: te_weight} if te_pairs else {}
        parts.update({UNET: unet_weight} if unet_pairs else {})
        weights.append(next(iter(parts.values())) if len(set(parts.values())) == 1 else parts)
        apply_token_embeddings(pipe, embeddings, source=str(path))
    pipe.set_adapters(names, adapter_weights=weights)
    _note_repeated_files(loras)
    return names


def _note_repeated_files(loras: list[tuple[Path, float | dict[str, float]]]) -> None:
    """Say when one file is in the list more than once (a tag and --lora of the same LoRA, say): it is applied
    each time, as A1111 does, so its weights add up (the text encoder's and the UNet's each, where they differ)."""
    weights: dict[str, list[tuple[float, float]]] = {}
    for path, weight in loras:
        weights.setdefault(os.path.realpath(path), []).append(component_weights(weight))
    for real, repeated in weights.items():
        if len(repeated) > 1:
            path = next(Path(p) for p, _ in loras if os.path.realpath(p) == real)
            name = path.parent.name if path.name == LORA_WEIGHTS_NAME else path.stem
            times = "twice" if len(repeated) == 2 else f"{len(repeated)} times"

            def total(ws: list[float]) -> str:
                return " + ".join(f"{w:g}" for w in ws) + f" = {sum(ws):g}"

            te, unet = ([w[i] for w in repeated] for i in (0, 1))
            added = total(te) if te == unet else f"text encoder {total(te)}, UNet {total(unet)}"
            print(f"egaku: {name} is applied {times} (weights add up: {added})")


def lora_layers(path: Path, modules: dict[str, torch.nn.Module]
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """A LoRA file of either layout resolved against the model's modules (``adaptable_modules``):
    (``{"unet.<module>": {"down", "up"}}``, ``{"unet.<module>": alpha}``), checked by ``checked_lora_layers``."""
    state_dict, metadata = read_lora_file(path)
    return checked_lora_layers(state_dict, metadata, modules, str(path))


def checked_lora_layers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
                        modules: dict[str, torch.nn.Module], shown: str, values: bool = True
                        ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """``lora_layers`` of a file already read (``shown``: how messages name it): a model checkpoint, a LyCORIS or
    embedding file, NaN/inf weights, keys of another architecture or base (``check_coverage``) and a mix of DoRA and
    plain layers are refused. ``values=False`` for a file's header read as meta tensors (the server's LoRA list):
    everything but the weights' values is checked. Embeddings bundled in the file (``bundle_emb.*``, A1111's
    layout) are no layers: ``trained_embeddings`` reads them; a file that holds nothing else is refused."""
    words = bundled_words(state_dict)
    if words:
        state_dict = {key: tensor for key, tensor in state_dict.items() if not is_bundle_key(key)}
        if not state_dict:
            raise EgakuError(f"{shown} holds only token embeddings bundled in A1111's layout (bundle_emb.*, of "
                             f"{', '.join(words)}) and no LoRA layers; egaku applies bundled words with the LoRA "
                             "they come in", param="lora")
    if is_model_checkpoint(state_dict):
        raise EgakuError(f"{shown} is a single-file Stable Diffusion checkpoint, a model, not a LoRA: give it as "
                         "--model", param="lora")
    refuse_lycoris(state_dict, shown)
    refuse_embedding(state_dict, shown)
    if values:
        refuse_non_finite(state_dict, shown)
    if is_kohya(state_dict):
        module_names: dict[str, list[str]] = {}
        for full in modules:
            component, name = full.split(".", 1)
            module_names.setdefault(component, []).append(name)
        pairs, alphas, unknown = kohya_to_peft(state_dict, module_names)
    else:
        raw_pairs, unknown = peft_pairs(state_dict)
        raw_alphas = _alphas_of_diffusers_file(raw_pairs, state_dict, metadata)
        pairs = {model_module_name(k, modules): v for k, v in raw_pairs.items()}
        alphas = {model_module_name(k, modules): v for k, v in raw_alphas.items()}
    check_coverage(pairs, modules, shown, unknown)
    dora = [name for name, pair in pairs.items() if "magnitude" in pair]
    if dora and len(dora) != len(pairs):  # peft's DoRA switch is per adapter
        raise EgakuError(f"{shown}: {len(dora)} of its {len(pairs)} layers are DoRA layers (with a magnitude) and the "
                         "others plain LoRA; egaku loads a file that is all one or the other", param="lora")
    return pairs, alphas


def trained_clip_skip(lora_file: Path) -> int | None:
    """The clip skip a LoRA was trained at, from its kohya header (``ss_clip_skip``) or its train-lora folder's
    training_config.json; None when neither says."""
    from safetensors import safe_open

    config = run_config(lora_file)
    try:
        if config:
            value = config.get("clip_skip")
        else:
            with safe_open(str(lora_file), framework="pt") as fh:
                value = (fh.metadata() or {}).get("ss_clip_skip")
        return int(value) if value not in (None, "", "None") else None
    except Exception:  # noqa: BLE001 - a file that cannot say (unreadable: SafetensorError) is loaded, and refused
        return None    # with a clear error, by apply_loras as usual


def run_config(lora_file: Path) -> dict:
    """The resolved options of the train-lora run whose output folder holds ``lora_file`` (its
    training_config.json beside pytorch_lora_weights.safetensors); {} for a LoRA from elsewhere or an
    unreadable config."""
    folder = Path(lora_file).parent
    config = folder / "training_config.json"
    if not (config.is_file() and lora_file_in(folder)):
        return {}
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def trained_embeddings(lora_file: Path) -> dict[str, torch.Tensor]:
    """The token embeddings that come with a LoRA file, by word: those bundled in the file itself (``bundle_emb.*``,
    A1111's layout, which train-lora's kohya file and other trainers' files carry) and those a train-lora run wrote
    beside it (``run_embeddings``). A word in both is the file's own (train-lora writes one vector into both), so a
    run folder's kohya file and its embeddings/ folder apply each word once."""
    bundled = read_bundled_embeddings(lora_file)
    return {**run_embeddings(lora_file, have=bundled), **bundled}


def run_embeddings(lora_file: Path, have=()) -> dict[str, torch.Tensor]:
    """The token embeddings a train-lora run wrote beside this LoRA file (its --train-tokens), by word, but for the
    words in ``have`` (the file's bundled ones).

    Only a run folder's own words are taken (from its training_config.json), so an ``embeddings/``
    folder next to a collection of LoRA files is never applied to all of them.
    """
    folder = Path(lora_file).parent
    config = folder / "training_config.json"
    if not (folder / EMBEDDINGS_DIR).is_dir() or not config.is_file():
        return {}
    try:
        words = json.loads(config.read_text()).get("train_tokens") or []
    except (OSError, json.JSONDecodeError):
        return {}
    found = {w: folder / EMBEDDINGS_DIR / f"{w}.safetensors" for w in words if w not in have}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise EgakuError(f"{lora_file} was trained with token embeddings that are not there: {', '.join(missing)}",
                         param="lora")
    return {word: read_embedding(path) for word, path in found.items()}


def apply_token_embeddings(pipe, embeddings: dict[str, torch.Tensor], source: str) -> None:
    """Put trained embeddings in the text encoder's token table: one vector per word, each word one token.

    ``remove_loras`` puts the base rows back. ``source`` names where they came from, for errors.
    """
    if not embeddings:
        return
    table = pipe.text_encoder.get_input_embeddings().weight
    backup = _TOKEN_BACKUPS.setdefault(pipe.text_encoder, {})
    sources = _TOKEN_SOURCES.setdefault(pipe.text_encoder, {})
    for word, vectors in embeddings.items():
        vectors = vectors if vectors.ndim == 2 else vectors[None]
        if vectors.shape[1] != table.shape[1]:
            raise EgakuError(f"{source}: embedding of {word!r} has shape {tuple(vectors.shape)}, but this model's "
                             f"text encoder takes one vector of {table.shape[1]} per token; it was trained on "
                             "another base", param="lora")
        pieces = pipe.tokenizer(word, add_special_tokens=False).input_ids if word.strip() else []
        if vectors.shape[0] != 1 or len(pieces) != 1:  # (a train-lora word is always one of each)
            what = (f"{vectors.shape[0]} vectors" if vectors.shape[0] != 1 else
                    f"a word of {len(pieces)} tokens for this model's tokenizer")
            raise EgakuError(f"{source}: its embedding of {word!r} is {what}; egaku applies a LoRA's words as one "
                             "token's row of the token table each (one vector for a one-token word), so this LoRA "
                             "cannot be applied with its word", param="lora")
        token = single_token_ids(pipe.tokenizer, [word], what=source)[0]
        with torch.no_grad():
            backup.setdefault(token, table[token].detach().clone())
            table[token] = vectors[0].to(table)
        sources[word] = source


def lora_trained_words(pipe) -> dict[str, str]:
    """The words whose embeddings the LoRAs applied to ``pipe`` put in its token table, each with where it came from
    (``apply_token_embeddings``'s source); ``remove_loras`` forgets them."""
    text_encoder = getattr(pipe, "text_encoder", None)
    return dict(_TOKEN_SOURCES.get(text_encoder, {})) if text_encoder is not None else {}


def remove_loras(pipe, keep_embeddings: bool = False) -> None:
    """Unload every adapter so the pipeline is back to its base weights.

    Trained token embeddings go back to the base's too, unless ``keep_embeddings`` (merge-lora, which
    makes them part of the merged model).
    """
    pipe.unload_lora_weights()
    text_encoder = getattr(pipe, "text_encoder", None)
    backup = _TOKEN_BACKUPS.pop(text_encoder, {}) if text_encoder is not None else {}
    if text_encoder is not None:
        _TOKEN_SOURCES.pop(text_encoder, None)
    if keep_embeddings:
        return
    with torch.no_grad():
        for token, row in backup.items():
            text_encoder.get_input_embeddings().weight[token] = row
