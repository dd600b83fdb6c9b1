"""LoRA names looked up in a --lora-dir that is not there."""

from __future__ import annotations

import pytest

from egaku.errors import NotFoundError
from egaku.lora.apply import resolve_lora


def test_a_lora_folder_that_does_not_exist_is_named_as_such_not_as_one_without_loras(tmp_path):
    """`--lora-dir lroas` (a typo) said "not found in lroas (the folder has no LoRAs)", as if the folder were
    there and empty."""
    with pytest.raises(NotFoundError, match=r"LoRA 'mine': the LoRA folder .*lroas does not exist; give the folder "
                                            r"that holds your LoRAs \(--lora-dir\)"):
        resolve_lora("mine", str(tmp_path / "lroas"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotFoundError, match=r"the LoRA folder .*notes.txt is a file"):
        resolve_lora("mine", str(tmp_path / "notes.txt"))
    # an existing folder without LoRAs still says so
    (tmp_path / "loras").mkdir()
    with pytest.raises(NotFoundError, match=r"not found in .*loras \(the folder has no LoRAs\)$"):
        resolve_lora("mine", str(tmp_path / "loras"))


def test_an_embedding_given_as_a_lora_is_named_as_one_with_where_it_goes(tmp_path):
    """A1111 users keep embeddings and LoRAs side by side; `--lora EasyNegative.safetensors` said "none of its LoRA
    keys match a layer of this model (first key: emb_params)" and `info` guessed "a whole model checkpoint?"."""
    import torch
    from safetensors.torch import save_file

    from egaku.errors import EgakuError
    from egaku.lora.apply import lora_layers
    from egaku.lora.commands import describe_lora

    for name, tensors in (("EasyNegative", {"emb_params": torch.zeros(2, 32)}),
                          ("sdxl_word", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        for read in (lambda p: lora_layers(p, {}), describe_lora):
            with pytest.raises(EgakuError, match=rf"{name}.safetensors is a textual-inversion embedding, not a LoRA: "
                                                 rf"put it in a folder, give that folder as --embedding-dir and write "
                                                 rf"its name \({name}\) in the prompt"):
                read(tmp_path / f"{name}.safetensors")


def test_a_bad_scale_after_a_name_from_the_lora_folder_is_named_as_a_bad_scale(tmp_path):
    """`--lora mine:O.8 --lora-dir loras` said "LoRA 'mine:O.8' not found in loras; available: mine"."""
    from egaku.errors import EgakuError
    from egaku.lora.apply import parse_lora_arg, resolve_lora_option

    (tmp_path / "mine.safetensors").write_bytes(b"x")
    name, scale = parse_lora_arg("mine:O.8")
    assert (name, scale) == ("mine:O.8", 1.0)  # not a number: read as a name, as a name with a colon may be
    with pytest.raises(EgakuError, match=r"--lora 'mine:O.8': the scale after ':' must be a number \(as in "
                                         r"mine:0.8\), got 'O.8'"):
        resolve_lora_option(name, str(tmp_path))
    assert resolve_lora_option("mine", str(tmp_path)) == tmp_path / "mine.safetensors"
    with pytest.raises(NotFoundError, match="'other:O.8' not found in .*; available: mine$"):
        resolve_lora_option("other:O.8", str(tmp_path))
