"""Tag captions ("1girl, red hair, smiling, outdoors"): the per-step variations kohya's trainers apply to them.

A caption is a list of tags separated by commas. ``--keep-tokens N`` holds the first N tags in place (the
trigger word and class, usually), the rest may be shuffled (``--shuffle-caption``) and each dropped with a
probability (``--caption-tag-dropout``), so that the LoRA does not tie the concept to one tag order or to
one tag that is always there. Semantics as kohya's ``process_caption``: shuffle, then drop, then join with
", ".
"""

from __future__ import annotations

import torch

TAG_SEPARATOR = ","


def split_tags(caption: str) -> list[str]:
    """The caption's tags, stripped; an empty caption has none."""
    return [tag.strip() for tag in caption.strip().split(TAG_SEPARATOR)] if caption.strip() else []


def vary_caption(caption: str, shuffle: bool, keep_tokens: int = 0, tag_dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> str:
    """One training step's version of ``caption``: the tags after the first ``keep_tokens`` shuffled (if
    ``shuffle``) and each dropped with probability ``tag_dropout``. Draws come from ``generator`` (the global
    torch RNG when None), so a seeded step varies its captions the same way on every run."""
    tags = split_tags(caption)
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle and len(flexible) > 1:
        flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
    if tag_dropout > 0 and flexible:
        kept = (torch.rand(len(flexible), generator=generator) >= tag_dropout).tolist()
        flexible = [tag for tag, keep in zip(flexible, kept) if keep]
    return ", ".join(fixed + flexible)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each tag occurs, lower-cased: the ``ss_tag_frequency`` A1111 shows for a kohya LoRA."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            if tag:
                counts[tag.lower()] = counts.get(tag.lower(), 0) + 1
    return counts
