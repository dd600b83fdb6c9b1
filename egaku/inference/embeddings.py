"""Textual-inversion embeddings from a folder, as A1111 and ComfyUI use them (``EasyNegative`` in a negative prompt).

A word of the prompt or negative prompt that names a file in ``--embedding-dir`` (its name without the extension,
in any letter case, searched in sub-folders too as A1111 searches) stands for that file's vectors. Each used file is
added to the tokenizer through diffusers' ``load_textual_inversion`` under a token of egaku's own (so a name that is
also a word of the vocabulary still means the embedding), the word is replaced by the file's tokens, one per vector,
and everything is taken out again after the call. Files are A1111's (``emb_params``, or ``string_to_param`` in its
older .pt files) or diffusers' (one tensor under its word); .pt/.bin files are pickles, read only with
``--allow-pickle`` and then with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EgakuError
from ..paths import file_sha256

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin")


@dataclass
class UsedEmbedding:
    name: str
    path: Path
    tokens: list[str]  # the tokens its vectors were added under, in order

    def record(self) -> dict[str, str]:
        return {"name": self.name, "path": os.path.abspath(self.path), "hash": embedding_short_hash(self.path)}


def embedding_files(folder: str | Path, allow_pickle: bool = True) -> dict[str, list[Path]]:
    """Embedding files under ``folder`` by lower-cased name; a name may have several files (an error when used).
    Without ``allow_pickle`` a name's pickle files are left out where it has a safetensors file too: that one is
    the only file it can be read from."""
    root = Path(folder)
    if not root.is_dir():
        raise EgakuError(f"--embedding-dir {str(folder)!r} is not a folder", param="embedding_dir")
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES and path.is_file():
            found.setdefault(path.stem.lower(), []).append(path)
    if not allow_pickle:
        for name, paths in found.items():
            safe = [p for p in paths if p.suffix.lower() in SAFE_SUFFIXES]
            found[name] = safe or paths
    return found


def _word_pattern(name: str) -> re.Pattern:
    # a whole word, and not a LoRA tag's name (<lora:name:w> or its alias <lyco:name:w>, which a negative prompt
    # keeps as words)
    from ..lora.apply import TAG_KINDS

    not_tag = "".join(rf"(?<!<{kind}:)" for kind in TAG_KINDS)
    return re.compile(rf"(?<![\w-]){not_tag}{re.escape(name)}(?![\w-])", re.IGNORECASE)


def names_in(texts: list[str], files: dict[str, list[Path]]) -> list[str]:
    """The embedding names ``texts`` use, longest first (so "bad-hands-5" is found before "bad")."""
    return [name for name in sorted(files, key=len, reverse=True) if any(_word_pattern(name).search(t) for t in texts)]


class ForAnotherModel(EgakuError):
    """An embedding made for another base model: skipped, as A1111 skips it, so that one embedding folder can serve
    several models."""


def read_vectors(path: Path, allow_pickle: bool = False, shown: str | None = None) -> torch.Tensor:
    """(vectors, width) of one embedding file; errors name it as ``shown`` (its path in the embedding folder, so
    that a server's answers do not show its file system)."""
    shown = shown or str(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise EgakuError(f"embedding {shown} is a pickle, read only with --allow-pickle (tensors only, with "
                             "weights_only=True, by egaku generate); or convert it to .safetensors",
                             param="embedding_dir")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a pickle that is not plain tensors, or not a pickle at all
            raise EgakuError(f"embedding {shown} cannot be read with weights_only=True ({exc})",
                             param="embedding_dir") from None
    else:
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several private error types
            raise EgakuError(f"embedding {shown} is not a readable safetensors file ({exc})",
                             param="embedding_dir") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111's .pt layout
        data = data["string_to_param"]
    if isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and len(data) == 1:
        vectors = next(iter(data.values()))
    elif isinstance(data, torch.Tensor):
        vectors = data
    elif isinstance(data, dict) and "clip_l" in data:
        raise ForAnotherModel(f"embedding {shown} is an SDXL embedding (clip_l/clip_g): egaku's pipelines are SD "
                              "1.x/2.x", param="embedding_dir")
    else:
        keys = sorted(data)[:4] if isinstance(data, dict) else type(data).__name__
        raise EgakuError(f"embedding {shown} is not a textual-inversion file: expected emb_params, string_to_param "
                         f"or one tensor, found {keys}", param="embedding_dir")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise EgakuError(f"embedding {shown} does not hold a (vectors, width) tensor", param="embedding_dir")
    vectors = (vectors if vectors.ndim == 2 else vectors[None]).float()
    if vectors.shape[0] == 0 or not torch.isfinite(vectors).all():
        raise EgakuError(f"embedding {shown} holds {'no vectors' if vectors.shape[0] == 0 else 'NaN or inf values'}; "
                         "it cannot be used (retrain or re-export it)", param="embedding_dir")
    return vectors


def text_encoder_width(pipe) -> int:
    """The width of the vectors ``pipe``'s text encoder takes: an embedding's must be the same."""
    return pipe.text_encoder.get_input_embeddings().weight.shape[1]


def read_vectors_for(path: Path, width: int, allow_pickle: bool = False, shown: str | None = None) -> torch.Tensor:
    """``read_vectors`` for a text encoder that takes vectors of ``width``; ForAnotherModel where the file's are
    of another width (it was made for another base model)."""
    shown = shown or str(path)
    vectors = read_vectors(path, allow_pickle, shown)
    if vectors.shape[1] != width:
        raise ForAnotherModel(f"embedding {shown} has vectors of width {vectors.shape[1]}, but this model's text "
                              f"encoder takes {width}: it was made for another base model")
    return vectors


def embedding_short_hash(path: Path) -> str:
    """A1111's "TI hashes" value: the first 12 hex digits of the file's sha256."""
    return file_sha256(path)[:12]


def load_embeddings(pipe, texts: list[str], folder: str | Path, allow_pickle: bool = False
                    ) -> tuple[list[str], list[UsedEmbedding]]:
    """Add the embeddings ``texts`` name to ``pipe``; returns the texts with each name replaced by its tokens, and
    what was added (give it to ``unload_embeddings``). A name that is also a word a LoRA applied to ``pipe`` was
    trained with (its train_tokens) is an EgakuError: the file's embedding would silently replace the LoRA's."""
    from ..lora.apply import lora_trained_words

    folder = Path(folder)
    lora_words = {word.lower(): (word, source) for word, source in lora_trained_words(pipe).items()}
    files = embedding_files(folder, allow_pickle)
    used: list[UsedEmbedding] = []
    width = text_encoder_width(pipe)
    try:
        for k, name in enumerate(names_in(texts, files)):
            shown = [p.relative_to(folder).as_posix() for p in files[name]]
            if len(files[name]) > 1:
                raise EgakuError(f"the embedding name {name!r} has {len(files[name])} files in the embedding folder: "
                                 f"{', '.join(shown)}; keep one", param="embedding_dir")
            path = files[name][0]
            try:
                vectors = read_vectors_for(path, width, allow_pickle, shown[0])
            except ForAnotherModel as exc:  # the word stays a word, as in A1111 (which lists such files as skipped)
                print(f"egaku: note: {exc}; {name!r} is read as a word")
                continue
            if name in lora_words:  # (the tokenizer reads words in lower case, as names here are matched)
                word, source = lora_words[name]
                raise EgakuError(f"the word {word!r} has two embeddings: the LoRA {source} was trained with it, and "
                                 f"the embedding folder holds {shown[0]}; only one can be used: rename or remove "
                                 f"{shown[0]}, or do not use that LoRA and the embedding folder together",
                                 param="embedding_dir")
            token = f"<egaku-embedding-{k}>"
            pipe.load_textual_inversion({token: vectors.to(pipe.text_encoder.dtype)}, token=token)
            tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]  # diffusers' names for the rest
            used.append(UsedEmbedding(path.stem, path, tokens))
            texts = [_word_pattern(name).sub(" ".join(tokens), t) for t in texts]
    except BaseException:
        unload_embeddings(pipe, used)
        raise
    return texts, used


def unload_embeddings(pipe, used: list[UsedEmbedding]) -> None:
    tokens = [t for u in used for t in u.tokens]
    if tokens:
        pipe.unload_textual_inversion(tokens)


__all__ = ["load_embeddings", "unload_embeddings", "embedding_files", "read_vectors", "read_vectors_for",
           "text_encoder_width", "embedding_short_hash", "UsedEmbedding"]
