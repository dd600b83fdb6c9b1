"""Write a diffusers Stable Diffusion pipeline as one original-layout checkpoint (A1111/ComfyUI style).

The inverse of diffusers' single-file loader: UNet keys become ``model.diffusion_model.*``
(``input_blocks``/``middle_block``/``output_blocks``), VAE keys ``first_stage_model.*`` (``down.i.block.j``,
attention as 1x1 convolutions) and the CLIP text encoder ``cond_stage_model.transformer.*``. Block indices
are derived from the model's own config (layers per block, number of blocks), so it works for SD 1.x
shapes and for the small models egaku trains; ``StableDiffusionPipeline.from_single_file(file,
config=folder)`` reads the result back to identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ..errors import EgakuError
from ..training.runtime import atomic_save_file

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet_rename(rest: str) -> str:
    for hf, sd in _RESNET:
        if rest.startswith(hf + "."):
            return sd + rest[len(hf):]
    return rest


def unet_to_original(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    per_block = config.layers_per_block
    n_blocks = len(config.block_out_channels)
    has_up_attn = ["CrossAttn" in t for t in config.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for hf, ldm in _UNET_TOP.items():
            if key.startswith(hf + "."):
                new = ldm + key[len(hf):]
        if new is None and parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (per_block + 1) + j}.0.{_resnet_rename(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (per_block + 1) + j}.1.{rest}"
            elif kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.k.0.op.*
                new = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op.{'.'.join(parts[5:])}"
        elif new is None and parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{i * (per_block + 1) + j}.0.{_resnet_rename(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (per_block + 1) + j}.1.{rest}"
            elif kind == "upsamplers":
                new = f"output_blocks.{i * (per_block + 1) + per_block}.{2 if has_up_attn[i] else 1}.{rest}"
        elif new is None and parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_resnet_rename(rest)}"
        if new is None:
            raise ValueError(f"UNet key {key!r} has no original-layout equivalent (blocks: {n_blocks})")
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n_blocks = len(config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            level = i if parts[1] == "down_blocks" else n_blocks - 1 - i
            name = "down" if parts[1] == "down_blocks" else "up"
            if kind == "resnets":
                new = f"{parts[0]}.{name}.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = (f"{parts[0]}.{name}.{level}."
                       f"{'downsample' if name == 'down' else 'upsample'}.{'.'.join(parts[5:])}")
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                rest = ".".join(parts[4:])
                for hf, ldm in _VAE_ATTN.items():
                    if rest.startswith(hf + "."):
                        rest = ldm + rest[len(hf):]
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    state = {}
    state.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` prefix); the original layout has it
        if not key.startswith("text_model."):
            key = "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# safetensors metadata key holding the model's sampling defaults (egaku_defaults.json) as JSON
DEFAULTS_METADATA_KEY = "egaku_defaults"


def single_file_defaults(path: str | Path) -> dict:
    """The sampling defaults ``save_single_file`` recorded in a file's metadata (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get(DEFAULTS_METADATA_KEY)
        defaults = json.loads(text) if text else {}
    except (OSError, ValueError):  # a file written elsewhere: no defaults of ours
        return {}
    guidance = defaults.get("guidance_scale") if isinstance(defaults, dict) else None
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0:
        return {}
    return {"guidance_scale": float(guidance)}


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None, defaults: dict | None = None) -> Path:
    """Write ``pipe`` as one original-layout file; ``defaults`` (``model_defaults``) go into its metadata, so a
    conversion back to a folder can write them as egaku_defaults.json again."""
    extra = pipe.unet.config.get("addition_embed_type")
    if extra:
        raise EgakuError(f"this UNet adds an extra embedding to its timestep embedding (addition_embed_type="
                         f"{extra!r}, e.g. the pooled caption of --unet-pooled-text), which the original Stable "
                         "Diffusion single-file layout has no place for; write a diffusers folder instead (an "
                         "--out that does not end in .safetensors)", param="out")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = pipeline_to_original(pipe)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # a multi-GB write that is cut short must not leave a truncated checkpoint under the final name
    metadata = {"format": "pt", "converted_by": "egaku"}
    if defaults:
        metadata[DEFAULTS_METADATA_KEY] = json.dumps(defaults, sort_keys=True)
    return atomic_save_file(state, path, metadata=metadata)
