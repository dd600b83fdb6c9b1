"""Prompt embeddings from a CLIP text encoder, read at A1111's and kohya's "clip skip".

Clip skip counts text-encoder layers from the end: 1 is the last layer (the usual embeddings), 2 the one
before it, which the NovelAI-derived anime models were trained with and expect. The earlier layer's output
goes through the final layer norm as the last layer's does. diffusers counts the layers skipped instead
(its ``clip_skip`` is ours minus one) and reaches the norm as ``text_model.final_layer_norm``, which
transformers 5's CLIPTextModel no longer has; so egaku computes these embeddings itself and hands them to
the pipelines as ``prompt_embeds``.
"""

from __future__ import annotations

import re

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


# --- A1111's prompt syntax: emphasis and prompts longer than the text encoder reads ----------------------------
#
# A1111 and ComfyUI read ``(word)`` as the word at weight 1.1, ``(word:1.3)`` at 1.3 and ``[word]`` at 1/1.1; brackets
# nest and multiply, ``\(`` is a literal bracket, and an unclosed bracket runs to the end of the prompt. How a weight
# acts on the text encoder's output is the emphasis mode (``EMPHASIS_MODES``):
# - comfy (egaku's default, ComfyUI's rule): each weighted token's state moves away from the empty prompt's state at
#   the same position by its weight; tokens at weight 1 are kept exactly;
# - original (A1111's default, its "Original"): every token's state is multiplied by its weight, then the whole
#   chunk is scaled so that its mean (over tokens and width) is the mean it had before. On text encoders whose
#   outputs are centred (the tiny test model's, whose final layer norm has no bias), that mean is near zero and the
#   scale can be large or negative;
# - no-norm (A1111's "No norm"): multiplied, not rescaled;
# - ignore (A1111's "Ignore"): brackets are read and their weights dropped;
# - none (A1111's "None", ``--no-emphasis``): brackets and BREAK are words.
# A prompt longer than 75 tokens is encoded in chunks of 75 (each with its own start and end token, 77 in all) whose
# embeddings are laid side by side, so the UNet's cross-attention reads all of them; a chunk ends at its last comma
# when one lies within its last 20 tokens, and ``BREAK`` ends a chunk where it stands.

EMPHASIS = 1.1
COMMA_BACKTRACK = 20
_ATTENTION = re.compile(r"\\([\\()\[\]])|(\()|(\[)|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"
                        r"|(\))|(\])|([^\\()\[\]:]+|[:\\])")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# [from:to:when] and [a|b]; a colon inside parentheses is a weight ("[(red:1.2)]" is emphasis only)
_PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]()]*(?<!\\)[:|][^\[\]()]*(?<!\\)\]")
BREAK = None  # the marker parse_emphasis puts where the prompt says BREAK

# egaku's emphasis modes -> the name A1111 writes in its text's "Emphasis" entry. A1111 has no "Comfy": it reads a
# name it does not know as its default, Original (modules/sd_emphasis.py, get_current_option)
EMPHASIS_MODES = {"comfy": "Comfy", "original": "Original", "no-norm": "No norm", "ignore": "Ignore", "none": "None"}
DEFAULT_EMPHASIS = "comfy"


def emphasis_mode(value: str | bool, param: str = "emphasis") -> str:
    """egaku's name of an emphasis mode, from egaku's name or A1111's ("No norm", any case, spaces, dashes or
    underscores between its words); True and False, the older on/off of emphasis, are the default and none."""
    if value is True or value is False:
        return DEFAULT_EMPHASIS if value else "none"
    if isinstance(value, str):
        name = re.sub(r"[\s_-]+", "-", value.strip().lower())
        if name in EMPHASIS_MODES:
            return name
    raise EgakuError(f"unknown emphasis mode {value!r}; choose from {', '.join(EMPHASIS_MODES)}", param=param)


def _reads_syntax(emphasis: str | bool) -> bool:
    """Whether ``emphasis`` (a mode, or the older on/off) reads brackets and BREAK (every mode but none does)."""
    return emphasis_mode(emphasis) != "none"


def parse_emphasis(text: str) -> list[tuple[str | None, float]]:
    """``text`` as (piece, weight) in order, A1111's syntax read (see above); ``(BREAK, 1.0)`` marks a chunk break.
    ``"a (red:1.3) [cat]"`` -> ``[("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 1/1.1)]``."""
    pieces: list[list] = []
    round_open: list[int] = []  # where each open bracket's pieces start
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        escaped, open_round, open_square, weight, close_round, close_square, plain = m.groups()
        if escaped:
            pieces.append([escaped, 1.0])
        elif open_round:
            round_open.append(len(pieces))
        elif open_square:
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif close_round and round_open:
            multiply(round_open.pop(), EMPHASIS)
        elif close_square and square_open:
            multiply(square_open.pop(), 1 / EMPHASIS)
        else:  # plain text, or a closing bracket with nothing open: kept as text, as A1111 keeps it
            pieces.append([plain if plain is not None else m.group(0), 1.0])
    for start in round_open:
        multiply(start, EMPHASIS)
    for start in square_open:
        multiply(start, 1 / EMPHASIS)

    out: list[tuple[str | None, float]] = []
    for piece, weight in pieces:
        for k, part in enumerate(_BREAK.split(piece)):
            if k:
                out.append((BREAK, 1.0))
            if not part:
                continue
            if out and out[-1][0] is not BREAK and out[-1][1] == weight:
                out[-1] = (out[-1][0] + part, weight)
            else:
                out.append((part, weight))
    return out or [("", 1.0)]


def prompt_editing_note(text: str) -> str | None:
    """A note when ``text`` holds A1111's prompt editing ``[from:to:when]`` or alternation ``[a|b]``, which egaku
    does not do: it reads the brackets as de-emphasis and the rest as words."""
    found = _PROMPT_EDITING.search(text)
    if found is None:
        return None
    return (f"\"{found.group(0)}\" is A1111's prompt editing or alternation, which egaku does not do: it is read as "
            "words at weight 1/1.1 (escape the brackets as \\[ \\] to keep them as text)")


def prompt_chunks(tokenizer, text: str, emphasis: str | bool = True, keep_together: dict[int, int] | None = None
                  ) -> list[tuple[list[int], list[float]]]:
    """Token ids and per-token weights of ``text`` in chunks of the tokenizer's length (77 for CLIP), each with
    its start and end tokens and padded as the Stable Diffusion pipelines pad. ``emphasis``: a mode, or True (the
    default mode) and False (none); none reads brackets and BREAK as plain text (the chunks are made all the same),
    ignore reads them and gives every token weight 1. ``keep_together``: {first token: how many tokens from it}
    that must not be split between chunks (a multi-vector embedding's), which start a new chunk instead."""
    keep_together = keep_together or {}
    ignore = emphasis_mode(emphasis) == "ignore"
    size = tokenizer.model_max_length - 2
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def end_chunk() -> None:
        pad = size - len(ids)
        chunks.append(([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                       [1.0, *weights, 1.0] + [1.0] * pad))

    for piece, weight in (parse_emphasis(text) if _reads_syntax(emphasis) else [(text, 1.0)]):
        weight = 1.0 if ignore else weight
        if piece is BREAK:
            end_chunk()
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False).input_ids:
            # in A1111's order: a comma is only remembered; a full chunk met by any other token ends at its last
            # comma if that is near, carrying the rest over, else where it is full
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == size and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                carried_ids, carried_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                del ids[last_comma + 1:], weights[last_comma + 1:]
                end_chunk()
                ids, weights, last_comma = carried_ids, carried_weights, -1
            if len(ids) == size or (ids and len(ids) + keep_together.get(token, 1) > size):
                end_chunk()
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        end_chunk()
    return chunks


def needs_chunked_encoding(tokenizer, text: str, emphasis: str | bool = True) -> bool:
    """Whether the pipelines' own encoding would read ``text`` otherwise than ``encode_prompt_pair``: it holds
    A1111's syntax (even at weight 1, its brackets are not words) or is over one chunk. ``emphasis``: as for
    ``prompt_chunks``."""
    if _reads_syntax(emphasis) and parse_emphasis(text) != [(text, 1.0)]:
        return True
    return len(prompt_chunks(tokenizer, text, emphasis=False)) > 1


def apply_weights(z: torch.Tensor, weights: torch.Tensor, empty_z: torch.Tensor) -> torch.Tensor:
    """``z`` (chunks, tokens, width) with each token's weight applied: moved away from ``empty_z``, the empty prompt's
    states at the same position, by its weight (see above); tokens at weight 1 are kept exactly."""
    weights = weights.to(z)[..., None]
    return torch.where(weights != 1, empty_z + (z - empty_z) * weights, z)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str = DEFAULT_EMPHASIS,
                   empty_z: torch.Tensor | None = None) -> torch.Tensor:
    """``z`` (chunks, tokens, width) with each token's weight applied by emphasis ``mode`` (see above); ``empty_z``,
    the empty prompt's states, is what comfy moves away from. original rescales each chunk on its own (A1111 scales
    a batch of chunks by the batch's mean, which is each chunk's where the batch is one prompt, as it is when A1111
    encodes a prompt once for all images). A chunk whose tokens are all at weight 1 is kept exactly in every mode."""
    if mode == "comfy":
        if empty_z is None:
            raise ValueError("the comfy emphasis needs the empty prompt's states (empty_z)")
        return apply_weights(z, weights, empty_z)
    if mode in ("ignore", "none"):  # (their chunks carry weight 1 only: prompt_chunks)
        return z
    if mode not in ("original", "no-norm"):
        raise ValueError(f"unknown emphasis mode {mode!r}")
    # in float32, whatever the encoder's dtype: a half-precision mean over 77 x 768 values loses digits
    weights = weights.to(z.device, torch.float32)[..., None]
    weighted = z.float() * weights
    if mode == "original":
        before = z.float().mean(dim=(1, 2), keepdim=True)
        after = weighted.mean(dim=(1, 2), keepdim=True)
        # (a mean of exactly 0 after weighting would divide by zero: that chunk is left unscaled)
        weighted = weighted * torch.where(after != 0, before / after, torch.ones_like(after))
    return weighted.to(z.dtype)


def encode_captions(tokenizer, text_encoder, captions: list[str], chunks: int = 1, emphasis: bool = True,
                    clip_skip: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """(batch, 77 * chunks, width): training's reading of captions, as generation reads a prompt (kohya's
    max_token_length and weighted captions). Each caption is its first ``chunks`` chunks of 75 tokens laid side by
    side, padded with the empty prompt's chunks so that a batch shares one length (kohya pads to
    max_token_length too); ``emphasis`` reads A1111's weights. One chunk without weights is ``encode_prompts``."""
    device = device or text_encoder.device
    empty = prompt_chunks(tokenizer, "", emphasis=False)[0]
    flat = [c for text in captions for c in (prompt_chunks(tokenizer, text, emphasis) + [empty] * chunks)[:chunks]]
    z = encode_tokens(text_encoder, torch.tensor([c[0] for c in flat], device=device), clip_skip)
    weights = torch.tensor([c[1] for c in flat])
    if (weights != 1).any():
        z = apply_weights(z, weights, encode_tokens(text_encoder, torch.tensor([empty[0]], device=device), clip_skip))
    return z.reshape(len(captions), chunks * z.shape[1], z.shape[-1])


def encode_prompt_pair(tokenizer, text_encoder, prompt: str, negative_prompt: str, clip_skip: int = 1,
                       emphasis: str | bool = True, device: torch.device | None = None,
                       keep_together: dict[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 77 * chunks, width) embeddings of a prompt and its negative prompt, read with A1111's syntax and their
    weights applied by the emphasis mode ``emphasis`` (True: the default, comfy; False: none). The one with fewer
    chunks gets empty ones, as A1111 adds them, since guidance needs both the same length. A prompt of one chunk
    without weights gives exactly what ``encode_prompts`` gives."""
    mode = emphasis_mode(emphasis)
    chunked = [prompt_chunks(tokenizer, t, mode, keep_together) for t in (prompt, negative_prompt)]
    count = max(len(c) for c in chunked)
    empty = prompt_chunks(tokenizer, "", emphasis=False)[0]
    chunked = [c + [empty] * (count - len(c)) for c in chunked]
    device = device or text_encoder.device
    weights = [torch.tensor([c[1] for c in chunks]) for chunks in chunked]
    empty_z = None
    if mode == "comfy" and any((w != 1).any() for w in weights):  # one encoding of the empty prompt serves both
        empty_z = encode_tokens(text_encoder, torch.tensor([empty[0]], device=device), clip_skip)
    out = []
    for chunks, w in zip(chunked, weights):
        z = encode_tokens(text_encoder, torch.tensor([c[0] for c in chunks], device=device), clip_skip)
        if (w != 1).any():
            z = apply_emphasis(z, w, mode, empty_z)
        out.append(z.reshape(1, -1, z.shape[-1]))
    return out[0], out[1]
