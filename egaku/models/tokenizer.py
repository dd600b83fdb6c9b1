"""Build a CLIP BPE tokenizer from a corpus of captions, with no download.

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words, each word mapped to
printable unicode through ``bytes_to_unicode`` and ended with ``</w>``, then merged pair by pair in
merge-rank order. We give it every single byte symbol (so any text tokenizes) plus, for each word of
the corpus, the chain of merges that builds it left to right, so frequent words become one token.
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


def build_clip_tokenizer(texts: Iterable[str], max_words: int = 4096, model_max_length: int = 77) -> CLIPTokenizer:
    byte_map = bytes_to_unicode()
    symbols = list(byte_map.values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)

    counts = Counter(w for t in texts for w in _WORD_RE.findall(t.lower().strip()))
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word, _ in counts.most_common(max_words):
        if word in SPECIAL_TOKENS:
            continue
        chars = [byte_map[b] for b in word.encode("utf-8")]
        if len(chars) < 2:
            continue
        chars[-1] += "</w>"
        left = chars[0]
        for right in chars[1:]:
            pair = (left, right)
            left = left + right
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
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
