"""Build a CLIP BPE tokenizer from a corpus of captions, with no download.

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words, each word mapped to
printable unicode through ``bytes_to_unicode`` and ended with ``</w>``, then merged pair by pair in
merge-rank order. We give it every single byte symbol (so any text tokenizes) plus, for each word of
the corpus (most frequent first), the merges that BPE needs to make that word one token: the word is
run through the merges so far, in rank order as the tokenizer will, and while it is still in pieces the
leftmost of its remaining pairs is joined by a new merge, ranked below all others. Building
each word left to right instead is not enough: a word's later pair can already be an earlier word's
merge of higher rank, and BPE then splits the word where the chain expected to join it.
The result is a standard ``CLIPTokenizer`` that saves with ``save_pretrained`` and loads anywhere.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# CLIP's own pre-tokenisation pattern, simplified to ASCII classes (our corpora are English captions).
_WORD_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def build_clip_tokenizer(texts: Iterable[str], max_words: int = 4096, model_max_length: int = 77,
                         merge_order: str = "rank") -> CLIPTokenizer:
    """``merge_order="left_to_right"`` rebuilds tokenizers made by earlier egaku versions (the built-in
    model's among them): each word's merges chained left to right, which BPE can split (module docstring)."""
    if merge_order not in ("rank", "left_to_right"):
        raise ValueError(f"merge_order must be 'rank' or 'left_to_right', not {merge_order!r}")
    byte_map = bytes_to_unicode()
    symbols = list(byte_map.values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)

    counts = Counter(w for t in texts for w in _WORD_RE.findall(t.lower().strip()))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word, _ in counts.most_common(max_words):
        if word in SPECIAL_TOKENS:
            continue
        parts = [byte_map[b] for b in word.encode("utf-8")]
        if len(parts) < 2:
            continue
        parts[-1] += "</w>"
        if merge_order == "left_to_right":
            for i in range(1, len(parts)):
                pair = ("".join(parts[:i]), parts[i])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            continue
        parts = _apply_merges(parts, ranks)
        while len(parts) > 1:
            # join the leftmost pair: a new merge ranks below every existing one, so BPE reaches it last
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = _apply_merges(parts, ranks)
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,  # required: without it the first call overflows
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[1],
        unk_token=SPECIAL_TOKENS[1],
    )


def _apply_merges(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """What CLIP's BPE does to one word: join the best-ranked adjacent pair until none is a merge."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), -1), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [(r, i) for r, i in pairs if r >= 0]
        if not known:
            break
        _, first = min(known)
        pair = (parts[first], parts[first + 1])
        joined, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                joined.append(parts[i] + parts[i + 1])
                i += 2
            else:
                joined.append(parts[i])
                i += 1
        parts = joined
    return parts
