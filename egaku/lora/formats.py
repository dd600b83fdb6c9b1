"""LoRA file layouts: diffusers/PEFT keys <-> kohya (A1111, ComfyUI) keys, metadata, coverage check.

Two layouts exist in the wild for a Stable Diffusion 1.x LoRA:

- diffusers/PEFT (``pytorch_lora_weights.safetensors``): ``unet.<module>.lora_A.weight`` /
  ``.lora_B.weight`` (and ``text_encoder.<module>...``), rank and alpha in the ``lora_adapter_metadata``
  header that ``StableDiffusionPipeline.save_lora_weights`` writes;
- kohya (sd-scripts, read by A1111 and ComfyUI): ``lora_unet_<module with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` and ``lora_te_<module>...``, with ``ss_*`` training metadata.
  The delta is ``up @ down * alpha / rank`` in both.

kohya builds a name by replacing every ``.`` of the diffusers module path with ``_``; the mapping back is
ambiguous as text (``to_q`` vs ``to.q``) but exact against a model's own module list, which is how
``kohya_to_peft`` resolves it. ``check_coverage`` is the guard against files that load "successfully"
and change nothing (diffusers #9291): every LoRA module must exist in the model with matching shapes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import EgakuError
from ..models.loading import PICKLE_SUFFIXES

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def kohya_name(component: str, module: str) -> str:
    return KOHYA_PREFIXES[component] + module.replace(".", "_")


def canonical_module(component: str, module: str) -> str:
    """The name other tools use: CLIP's layers live under ``text_model.`` in every SD 1.x LoRA in the wild,
    while transformers 5 flattens ``CLIPTextModel`` so that the same layer is ``encoder.layers...``."""
    if component == "text_encoder" and not module.startswith("text_model."):
        return "text_model." + module
    return module


def is_kohya(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in state_dict)


def refuse_training_checkpoint(path: Path) -> None:
    """A train-lora checkpoint (a folder with state.pt, or a file in one) holds training state, not a LoRA file
    other tools read: say where the run's LoRA files are instead."""
    folder = path if path.is_dir() else path.parent
    if (folder / "state.pt").is_file():
        raise EgakuError(f"{path} is a train-lora checkpoint (training state, not a LoRA file); a run writes its "
                         "LoRA files into its --out folder when it ends, and with --save-every N every N steps "
                         f"into OUT/steps/; `egaku train-lora ... --resume {folder}` continues this one", param="lora")


def is_lora_key(key: str) -> bool:
    """Whether a tensor name is a LoRA layer's: kohya's ``lora_*`` modules, diffusers' ``lora_A``/``lora_B``, DoRA's
    ``dora_scale``."""
    return "lora" in key or "dora_scale" in key


def is_model_checkpoint(keys) -> bool:
    """Whether tensor names are a single-file Stable Diffusion checkpoint's (a model) and none a LoRA layer's."""
    from ..models.loading import SINGLE_FILE_PREFIXES

    keys = list(keys)
    return not any(is_lora_key(key) for key in keys) and any(
        key.startswith(prefix) for key in keys for prefix in SINGLE_FILE_PREFIXES.values())


def refuse_non_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A NaN or inf weight turns every pixel it reaches to NaN: saved, a black image that looks like a result."""
    broken = next((key for key, tensor in tensors.items()
                   if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise EgakuError(f"{path}: {broken} holds NaN or inf values, so the file is damaged (saved from a run that "
                         "diverged, or changed since); use an earlier save of it", param="lora")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the safetensors header metadata of one LoRA file."""
    path = Path(path)
    refuse_training_checkpoint(path)
    if path.suffix != ".safetensors":
        why = ("a pickle, which can run code when loaded: convert it to .safetensors" if path.suffix.lower() in
               PICKLE_SUFFIXES else f"not a LoRA file ({path.suffix or 'no extension'})")
        raise EgakuError(f"{path}: LoRA files are .safetensors; this is {why}", param="lora")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises several private error types for a corrupt header
        raise EgakuError(f"{path}: not a readable safetensors file ({exc})", param="lora") from None


# LyCORIS's LoHa (Hadamard product) and LoKr (Kronecker product) layers, by the last part of their keys: they
# are not a down/up pair, so they cannot be read as LoRA layers
_LYCORIS_KEYS = {"LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
                 "LoKr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}}


def lycoris_kinds(keys) -> list[str]:
    """Which of LyCORIS's LoHa and LoKr layer types a file's keys hold ([] for a LoRA file)."""
    last_parts = {key.rpartition(".")[2] for key in keys}
    return [kind for kind, names in _LYCORIS_KEYS.items() if last_parts & names]


def refuse_lycoris(keys, source: str) -> None:
    """A LoHa or LoKr file is named as one, rather than reported as keys that match no layer."""
    kinds = lycoris_kinds(keys)
    if kinds:
        raise EgakuError(f"{source} is a LyCORIS {'/'.join(kinds)} file: LyCORIS LoHa/LoKr files are not supported "
                         "(only LoRA: lora_down/lora_up or diffusers/PEFT keys)", param="lora")


# a textual-inversion embedding: A1111's (and train-lora's OUT/embeddings/) emb_params, SDXL's clip_l/clip_g
_EMBEDDING_KEYS = ({"emb_params"}, {"clip_l", "clip_g"}, {"clip_l"}, {"string_to_param"})


def refuse_embedding(keys, source: str) -> None:
    """An embedding given where a LoRA goes (A1111 users keep both in models/) is named as one, with where it goes,
    rather than reported as keys that match no layer or as a model checkpoint."""
    if set(keys) in _EMBEDDING_KEYS or any(k.startswith("string_to_param.") for k in keys):
        raise EgakuError(f"{source} is a textual-inversion embedding, not a LoRA: put it in a folder, give that folder "
                         f"as --embedding-dir and write its name ({Path(source).stem}) in the prompt", param="lora")


# ---- diffusers/PEFT layout -------------------------------------------------------------------------

# Older diffusers spellings of the same modules, seen in files written by diffusers < 0.22.
_OLD_SUFFIXES = [
    (re.compile(r"\.processor\.to_(q|k|v)_lora\.(down|up)\.weight$"), lambda m: (f".to_{m[1]}", m[2])),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), lambda m: (".to_out.0", m[1])),
    (re.compile(r"\.to_(q|k|v)_lora\.(down|up)\.weight$"), lambda m: (f".{m[1]}_proj", m[2])),
    (re.compile(r"\.to_out_lora\.(down|up)\.weight$"), lambda m: (".out_proj", m[1])),
    (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), lambda m: ("", m[1])),
    (re.compile(r"\.lora\.(down|up)\.weight$"), lambda m: ("", m[1])),
    (re.compile(r"\.lora_([AB])\.weight$"), lambda m: ("", "down" if m[1] == "A" else "up")),
    # DoRA's per-output-channel magnitude: peft writes it without ".weight"; egaku writes a text encoder's with it
    # (see diffusers_file_key), and wrote it without before
    (re.compile(r"\.lora_magnitude_vector(\.weight)?$"), lambda m: ("", "magnitude")),
]


def peft_pairs(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a diffusers-layout state dict into ``{"unet.<module>": {"down": A, "up": B}}`` (and
    ``"magnitude"`` for a DoRA layer).

    Returns (pairs, keys that are not LoRA weights of a known spelling).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        for pattern, repl in _OLD_SUFFIXES:
            m = pattern.search(key)
            if m:
                suffix, which = repl(m)
                module = key[: m.start()] + suffix
                pairs.setdefault(module, {})[which] = tensor
                break
        else:
            unknown.append(key)
    return pairs, unknown


def adapter_alphas(metadata: dict[str, str], component: str) -> tuple[float | None, dict[str, float]]:
    """(default alpha, per-module alpha pattern) for one component from diffusers' adapter metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    meta = json.loads(raw)
    return meta.get(f"{component}.lora_alpha"), dict(meta.get(f"{component}.alpha_pattern") or {})


# ---- kohya layout -----------------------------------------------------------------------------------

def peft_to_kohya(pairs: dict[str, dict[str, torch.Tensor]], alpha_for: dict[str, float]) -> dict[str, torch.Tensor]:
    """kohya tensors from ``peft_pairs`` output; ``alpha_for`` maps each ``component.module`` to its alpha."""
    out: dict[str, torch.Tensor] = {}
    for full, pair in sorted(pairs.items()):
        if "magnitude" in pair:
            raise EgakuError(f"cannot export {full!r} to kohya: it is a DoRA layer, which egaku writes in the "
                             "diffusers layout only")
        component, module = full.split(".", 1)
        if component not in KOHYA_PREFIXES:
            raise EgakuError(f"cannot export {full!r} to kohya: only unet and text_encoder LoRAs have a kohya name")
        name = kohya_name(component, canonical_module(component, module))
        out[f"{name}.lora_down.weight"] = pair["down"].detach().float().contiguous()
        out[f"{name}.lora_up.weight"] = pair["up"].detach().float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha_for[full]))
    return out


def kohya_to_peft(state_dict: dict[str, torch.Tensor], module_names: dict[str, list[str]]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float], list[str]]:
    """Resolve kohya keys against the model's own module names.

    ``module_names`` maps a component (``unet``, ``text_encoder``) to its module paths. Returns
    (``{"unet.<module>": {"down", "up"}}``, ``{"unet.<module>": alpha}``, kohya names that match nothing).
    """
    lookup = {kohya_name(c, canonical_module(c, m)): f"{c}.{m}" for c, names in module_names.items() for m in names}
    lookup.update({n.replace("lora_te_", "lora_te1_", 1): full
                   for n, full in lookup.items() if n.startswith("lora_te_")})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        name, _, kind = key.partition(".")
        if name not in lookup:
            if name not in unmatched:
                unmatched.append(name)
            continue
        full = lookup[name]
        if kind == "lora_down.weight":
            pairs.setdefault(full, {})["down"] = tensor
        elif kind == "lora_up.weight":
            pairs.setdefault(full, {})["up"] = tensor
        elif kind == "alpha":
            alphas[full] = float(tensor.item())
        elif kind == "dora_scale":
            raise EgakuError(f"{name} is a DoRA layer in the kohya/LyCORIS layout (dora_scale), which egaku does not "
                             "load; DoRA LoRAs in the diffusers layout (lora_magnitude_vector) load", param="lora")
        elif name not in unmatched:  # hada_*, lokr_*: other adapter types
            unmatched.append(f"{name}.{kind}")
    for full, pair in pairs.items():
        alphas.setdefault(full, float(pair["down"].shape[0]))  # kohya: a missing alpha means alpha = rank
    return pairs, alphas, unmatched


def bake_alpha(pairs: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """PEFT-keyed state dict whose alpha equals its rank: ``up`` is pre-scaled by alpha / rank.

    Loading it needs no alpha metadata (diffusers assumes alpha = rank), and the delta is unchanged.
    """
    out = {}
    for full, pair in pairs.items():
        rank = pair["down"].shape[0]
        out[f"{full}.lora_A.weight"] = pair["down"].float()
        out[f"{full}.lora_B.weight"] = pair["up"].float() * (alphas[full] / rank)
        if "magnitude" in pair:  # DoRA rescales W + scale * BA to this norm: folding the scale into B keeps it
            out[f"{full}.lora_magnitude_vector"] = pair["magnitude"].float()
    return out


# ---- coverage ----------------------------------------------------------------------------------------

# key names only other architectures' LoRAs have (kohya's SDXL keys name the original UNet's blocks; diffusers' its
# second text encoder; Flux and SD3 adapt a transformer), for saying which base a file that fits nothing is for
_OTHER_ARCHITECTURES = (
    ("SDXL", ("lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block",
              "text_encoder_2.", "te2.")),
    ("Flux or SD3 (a transformer model)", ("lora_unet_double_blocks", "lora_unet_single_blocks", "transformer.",
                                          "lora_transformer_")),
)


def other_architecture(names, metadata: dict | None = None) -> str | None:
    """The architecture a LoRA's key ``names`` (or its kohya/modelspec header) say it was trained for, where that is
    not Stable Diffusion 1.x/2.x; None where nothing says so."""
    declared = " ".join(str((metadata or {}).get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture"))
    for label, prefixes in _OTHER_ARCHITECTURES:
        if any(str(n).startswith(prefixes) for n in names) or (label == "SDXL" and "xl" in declared.lower()):
            return label
    return None


def check_coverage(pairs: dict[str, dict[str, torch.Tensor]], modules: dict[str, torch.nn.Module],
                   source: str, unmatched: list[str] = ()) -> None:
    """Refuse a LoRA that would change nothing or that was trained on another base model.

    ``modules`` maps ``component.module`` names to the model's modules. Every LoRA pair must name an
    existing Linear/Conv2d, have both halves, and fit its input and output sizes.
    """
    missing = list(unmatched) + [m for m in pairs if m not in modules]
    other = other_architecture(missing)
    if other and missing:  # not "a different base model": one egaku cannot load at all
        raise EgakuError(f"{source} is a LoRA for {other} (keys such as {missing[0]}); egaku's pipelines are Stable "
                         "Diffusion 1.x/2.x, so it can be used with neither this model nor another egaku loads",
                         param="lora")
    if not any(m in modules for m in pairs):
        example = f" (first key: {missing[0]})" if missing else ""
        raise EgakuError(f"{source}: none of its LoRA keys match a layer of this model{example}; "
                         "it is not a Stable Diffusion 1.x LoRA in diffusers or kohya layout, or it is for "
                         "another architecture", param="lora")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EgakuError(f"{source}: {len(missing)} LoRA layers match nothing in this model ({shown}); "
                         "it was trained on a different base model", param="lora")
    for name, pair in pairs.items():
        if "down" not in pair or "up" not in pair:
            raise EgakuError(f"{source}: layer {name} has only its {'/'.join(pair)} half; the file is incomplete",
                             param="lora")
        module, down, up = modules[name], pair["down"], pair["up"]
        if isinstance(module, torch.nn.Linear):
            expect_in, expect_out, kind = module.in_features, module.out_features, "features"
        elif isinstance(module, torch.nn.Conv2d):
            expect_in, expect_out, kind = module.in_channels, module.out_channels, "channels"
        else:
            raise EgakuError(f"{source}: layer {name} is a {type(module).__name__}, which LoRA cannot adapt",
                             param="lora")
        got_in, got_out = down.shape[1], up.shape[0]
        if "magnitude" in pair and pair["magnitude"].numel() != got_out:
            raise EgakuError(f"{source}: layer {name}'s DoRA magnitude has {pair['magnitude'].numel()} values for "
                             f"{got_out} outputs; the file is damaged", param="lora")
        if up.shape[1] != down.shape[0]:  # not a base's mismatch: the pair does not fit together
            raise EgakuError(f"{source}: layer {name}'s down matrix has rank {down.shape[0]} and its up matrix "
                             f"{up.shape[1]}; the two halves of a LoRA layer share one rank, so the file is damaged",
                             param="lora")
        if (got_in, got_out) != (expect_in, expect_out):
            raise EgakuError(f"{source}: layer {name} does not fit this model: the LoRA maps {got_in} -> {got_out} "
                             f"{kind}, the model's layer {expect_in} -> {expect_out}; the LoRA was trained on a "
                             "different base model", param="lora")


def adaptable_modules(pipe) -> dict[str, torch.nn.Module]:
    """``component.module`` -> Linear/Conv2d base layer for the UNet and text encoder of ``pipe``.

    A module already wrapped by peft is reported under its own name with its base layer, so a second
    LoRA is checked against the same shapes as the first. Text-encoder layers are named as in the model
    (see ``canonical_module`` for the name files use).
    """
    found: dict[str, torch.nn.Module] = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if ".lora_" in f".{name}" or ".base_layer" in f".{name}":
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                found[f"{component}.{name}"] = base
    return found


def model_module_name(full: str, modules: dict[str, torch.nn.Module]) -> str:
    """Map a file's ``text_encoder.text_model.X`` to the model's ``text_encoder.X`` when the model is flat."""
    if full in modules or not full.startswith("text_encoder.text_model."):
        return full
    flat = "text_encoder." + full[len("text_encoder.text_model."):]
    return flat if flat in modules else full


def header_entries(**values) -> dict[str, str]:
    """Safetensors header entries as kohya spells them: ``ss_``-prefixed (unless ``modelspec.``), every value a
    string (dicts and lists as JSON)."""
    return {key if key.startswith(("ss_", "modelspec.")) else f"ss_{key}":
            json.dumps(value) if isinstance(value, (dict, list)) else str(value) for key, value in values.items()}


def kohya_metadata(unet_config=None, prediction_type: str | None = None, **values) -> dict[str, str]:
    """``ss_*`` header entries of a LoRA trained on a UNet of ``unet_config`` (None: SD 1.x) whose scheduler predicts
    ``prediction_type`` (diffusers' name: epsilon or v_prediction; None: not known); kohya writes every value as a
    string, and A1111 reads ss_network_* from it. The SAI model spec entries (``modelspec.*``) are kohya's
    (``library/sai_model_spec.py``): an SD 1.x/2.x LoRA's implementation is "diffusers"."""
    return {"ss_network_module": "networks.lora", **base_model_metadata(unet_config, prediction_type),
            "modelspec.implementation": "diffusers", "modelspec.sai_model_spec": "1.0.0", **header_entries(**values)}


def base_model_metadata(unet_config, prediction_type: str | None = None) -> dict[str, str]:
    """The header entries naming the base a kohya-layout LoRA was trained on, as kohya spells them
    (``library/sai_model_spec.py`` ``determine_architecture``): ``ss_base_model_version``, ``ss_v2`` and
    ``modelspec.architecture``, and with ``prediction_type`` (the base scheduler's: epsilon or v_prediction)
    ``modelspec.prediction_type`` ("epsilon" or "v"). A1111 sorts LoRAs by them (``network.py``
    ``NetworkOnDisk.detect_version``: ``ss_v2`` "True" is SD2, any other header SD1) and, by default, lists only those
    of the loaded checkpoint's version, so a 2.x LoRA labelled 1.x would be hidden with the model it fits. A 2.x UNet
    attends to OpenCLIP ViT-H's 1024-wide states (1.x: CLIP ViT-L's 768). kohya names a 2.x base by its
    prediction type (``--v_parameterization``: stable-diffusion-v2-768-v, else -v2-512); where that is not known,
    the 768-v models are taken to be the 2.x ones of 96-latent (768 px) native size."""
    config = dict(unet_config or {})
    known = {} if prediction_type is None else {
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon"}
    if config.get("cross_attention_dim") != 1024:
        return {"ss_base_model_version": "sd_v1", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-v1/lora", **known}
    v_model = ((config.get("sample_size") or 0) >= 96 if prediction_type is None else
               prediction_type == "v_prediction")
    arch = "stable-diffusion-v2-768-v" if v_model else "stable-diffusion-v2-512"
    return {"ss_base_model_version": "sd_v2", "ss_v2": "True", "modelspec.architecture": f"{arch}/lora", **known}


def steps_metadata(step: int, planned: int) -> dict[str, int]:
    """The header entries that say how far a LoRA was trained, in both layouts' files: ``ss_steps``, the steps its
    weights were trained for (a --save-every file's step; ``step`` 0: the run's end), and ``ss_max_train_steps``,
    the run's plan (more than ``ss_steps`` for a --save-every file). ``egaku info`` shows both."""
    return {"ss_steps": step or planned, "ss_max_train_steps": planned}


# ---- writing the diffusers layout ------------------------------------------------------------------

# peft's state dict names a DoRA magnitude ``<module>.lora_magnitude_vector``. diffusers loads a text encoder's
# adapter through transformers, which (transformers 5) places each key on the parameter of that name with the
# adapter's name put in before ``.weight`` (``lora_magnitude_vector.<adapter>.weight``): a bare
# ``lora_magnitude_vector`` matches nothing and is dropped, leaving the text encoder's magnitudes at the base's norms.
# ``...lora_magnitude_vector.weight`` loads there, and in peft's own set_peft_model_state_dict (transformers 4's
# path) and ``peft_pairs`` too. diffusers' UNet path loads peft's spelling, which UNet keys keep.
_MAGNITUDE = ".lora_magnitude_vector"


def diffusers_file_key(key: str) -> str:
    """The key a tensor of a diffusers-layout file should have for plain diffusers to load it: a text-encoder
    DoRA magnitude gets ``.weight``; every other key stays as it is."""
    if key.startswith("text_encoder.") and key.endswith(_MAGNITUDE):
        return key + ".weight"
    return key


def finish_diffusers_file(path: str | Path, **values) -> Path:
    """Rewrite, atomically, a LoRA file that diffusers' ``save_lora_weights`` wrote: its keys as
    ``diffusers_file_key`` names them, and ``values`` (such as ``steps_metadata``) added to its header, spelled as
    ``header_entries`` spells them, beside the ``lora_adapter_metadata`` diffusers reads."""
    from ..training.runtime import atomic_save_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {diffusers_file_key(key): fh.get_tensor(key) for key in fh.keys()}
    return atomic_save_file(tensors, path, metadata={**metadata, **header_entries(**values)})


# ---- token embeddings (pivotal tuning) --------------------------------------------------------------

# Beside the LoRA: OUT/embeddings/<word>.safetensors, one file per word, in A1111's SD 1.x embedding layout
# ({"emb_params": (vectors, dim)}), which A1111 and ComfyUI read from their embeddings folder and
# diffusers' load_textual_inversion reads too. The word is the file name, as those tools expect.
EMBEDDINGS_DIR = "embeddings"


def single_token_ids(tokenizer, words: list[str], what: str = "--train-tokens", unique: bool = True) -> list[int]:
    """The token id of each word; a word the tokenizer splits (or an empty one) is an EgakuError, and so is a
    word listed twice when ``unique``."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids if word.strip() else []
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise EgakuError(f"{what}: {word!r} is {len(pieces)} tokens for this model's tokenizer ({shown}); "
                             "give words it keeps whole (one token each), for example a rare single word")
        ids.append(pieces[0])
    if unique and len(set(ids)) != len(ids):
        raise EgakuError(f"{what} {words}: a word is listed twice")
    return ids


def save_embedding(path: Path, vectors: torch.Tensor) -> Path:
    """Write one embedding file atomically (vectors: (n, dim))."""
    from ..training.runtime import atomic_save_file

    return atomic_save_file({"emb_params": vectors.detach().float().cpu().contiguous()}, path,
                            metadata={"format": "pt", "name": path.stem})


# ---- token embeddings bundled in a LoRA file (A1111 1.7+) ------------------------------------------------

# A1111's Lora extension (``extensions-builtin/Lora/networks.py`` ``load_network``) reads the tensors of a LoRA file
# whose key's first part is ``bundle_emb`` as textual-inversion embeddings that come with the LoRA:
# ``bundle_emb.NAME.string_to_param.*`` (its own embedding layout), or ``bundle_emb.NAME.PART`` for any other
# single tensor (OneTrainer's ``emb_params``; SDXL's ``clip_l`` and ``clip_g`` pair), NAME being the prompt word.
# train-lora's kohya file carries its --train-tokens words that way, so that the one file brings them into A1111.
BUNDLE_PREFIX = "bundle_emb."


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX)


def bundled_words(keys) -> list[str]:
    """The words a LoRA file's keys bundle embeddings of (names only: nothing read)."""
    return sorted({key[len(BUNDLE_PREFIX):].partition(".")[0] for key in keys if is_bundle_key(key)})


def bundle_tensors(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained words' embeddings (word -> (vectors, width)) under A1111's bundle keys, in fp32 as the separate
    embedding files hold them (a word is a key's second part, so it must hold no ".")."""
    out = {}
    for word, vectors in embeddings.items():
        if "." in word or not word:
            raise EgakuError(f"cannot bundle the embedding of {word!r} in a LoRA file: A1111 reads the word from the "
                             "key bundle_emb.WORD.string_to_param.*, which a word with '.' would break")
        out[f"{BUNDLE_PREFIX}{word}.string_to_param.*"] = (vectors if vectors.ndim == 2 else vectors[None]
                                                            ).detach().float().cpu().contiguous()
    return out


def bundled_embeddings(state_dict: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """(vectors, width) of each embedding bundled in a LoRA file's tensors, by word, read as A1111 reads them: a
    ``string_to_param`` tensor, else the word's only tensor. An SDXL pair (``clip_l``/``clip_g``), several other
    tensors, a tensor that is no (vectors, width) table and NaN/inf values are an EgakuError."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if is_bundle_key(key):
            word, _, part = key[len(BUNDLE_PREFIX):].partition(".")
            parts.setdefault(word, {})[part] = tensor
    found = {}
    for word, tensors in parts.items():
        params = [t for part, t in tensors.items() if part.split(".")[0] == "string_to_param"]
        if params:
            vectors = params[-1]  # (A1111 keeps one: the last)
        elif {"clip_l", "clip_g"} <= set(tensors):
            raise EgakuError(f"{source}: the embedding of {word!r} bundled in it is an SDXL embedding (clip_l/clip_g): "
                             "egaku's pipelines are Stable Diffusion 1.x/2.x", param="lora")
        elif len(tensors) == 1:
            vectors = next(iter(tensors.values()))
        else:
            raise EgakuError(f"{source}: the embedding of {word!r} bundled in it holds {len(tensors)} tensors "
                             f"({', '.join(sorted(tensors))}); A1111 and egaku read one (string_to_param.*)",
                             param="lora")
        if vectors.ndim not in (1, 2) or vectors.shape[0] == 0:
            raise EgakuError(f"{source}: the embedding of {word!r} bundled in it is not a (vectors, width) table "
                             f"(shape {tuple(vectors.shape)})", param="lora")
        vectors = (vectors if vectors.ndim == 2 else vectors[None]).float()
        if not torch.isfinite(vectors).all():
            raise EgakuError(f"{source}: the embedding of {word!r} bundled in it holds NaN or inf values, so the file "
                             "is damaged", param="lora")
        found[word] = vectors
    return found


def read_bundled_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """``bundled_embeddings`` of a LoRA file, reading only its bundle tensors; {} for a file safetensors cannot
    open (reading the LoRA says what is wrong with it)."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys() if is_bundle_key(key)}
    except Exception:  # noqa: BLE001 - safetensors raises several private error types for a corrupt header
        return {}
    return bundled_embeddings(tensors, path)


def read_lora_header(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors as their names and shapes only (meta tensors, which hold no data; an ``.alpha``, one
    number, as a real one, which kohya_to_peft reads) and its header metadata: what ``checked_lora_layers`` checks
    a file by, read from its safetensors header without reading its weights (the server's LoRA list, train-lora's
    --init-lora before the images are read)."""
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        state = {}
        for key in fh.keys():
            shape = fh.get_slice(key).get_shape()
            alpha = key.endswith(".alpha") and math.prod(shape) == 1
            state[key] = torch.ones(shape) if alpha else torch.empty(shape, device="meta")
    return state, metadata


def read_embedding(path: Path) -> torch.Tensor:
    """(n, dim) vectors of an embedding file: A1111's ``emb_params`` or a single-tensor file."""
    tensors, _ = read_lora_file(path)
    refuse_non_finite(tensors, path)
    if "emb_params" in tensors:
        vectors = tensors["emb_params"]
    elif len(tensors) == 1:
        vectors = next(iter(tensors.values()))
    else:
        raise EgakuError(f"{path}: not an embedding file (expected the key emb_params, found {sorted(tensors)[:4]})",
                         param="lora")
    return vectors if vectors.ndim == 2 else vectors[None]
