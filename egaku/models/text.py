"""Prompt embeddings from a CLIP text encoder, read at A1111's and kohya's "clip skip".

Clip skip counts text-encoder layers from the end: 1 is the last layer (the usual embeddings), 2 the one
before it, which the NovelAI-derived anime models were trained with and expect. The earlier layer's output
goes through the final layer norm as the last layer's does. diffusers counts the layers skipped instead
(its ``clip_skip`` is ours minus one) and reaches the norm as ``text_model.final_layer_norm``, which
transformers 5's CLIPTextModel no longer has; so egaku computes these embeddings itself and hands them to
the pipelines as ``prompt_embeds``.
"""

from __future__ import annotations

import torch

from ..errors import EgakuError


def check_clip_skip(clip_skip: int, text_encoder, param: str = "clip_skip") -> None:
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise EgakuError(f"--clip-skip {clip_skip}: this model's text encoder has {layers} layers; give 1 to {layers} "
                         "(1 = the last layer, 2 = the one before it)", param=param)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """CLIP's last layer norm, in transformers 4's layout (``text_model.final_layer_norm``) or 5's (flat);
    ``text_encoder`` may be wrapped for distributed training (``.module``)."""
    model = getattr(text_encoder, "module", text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def encode_tokens(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """(batch, tokens, width) embeddings of ``input_ids`` at ``clip_skip``. The forward goes through a
    distributed wrapper when there is one, so that gradients of trained parts are synchronised."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1,
                   device: torch.device | None = None) -> torch.Tensor:
    """Embeddings of whole prompts as the Stable Diffusion pipelines make them: padded to the tokenizer's
    length and cut there. ``device``: where the ids go (default: the text encoder's)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encode_tokens(text_encoder, ids.to(device or text_encoder.device), clip_skip)
