"""Checks on what a <lora:...> tag names: a name that misses a LoRA only by letter case, a tag that gives one of its
weights twice, and a LoRA's trained word that --embedding-dir also has an embedding of."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import egaku
from egaku.errors import EgakuError, NotFoundError
from egaku.lora.apply import lora_trained_words, parse_prompt_loras, resolve_lora, resolve_lora_option


# 1. a name that differs from a LoRA's only in letter case

def test_a_name_that_differs_only_in_letter_case_names_the_file_and_how_to_write_it(tmp_path):
    """`<lora:Upper>` with upper.safetensors in the folder said "not found; available: upper", which does not say
    that the case is what is wrong. It is not taken in its place (a case-sensitive file system would not find
    it)."""
    (tmp_path / "upper.safetensors").write_bytes(b"x")
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "deep.safetensors").write_bytes(b"x")
    (tmp_path / "Runs" / "Mine").mkdir(parents=True)
    (tmp_path / "Runs" / "Mine" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    root = re.escape(str(tmp_path))
    for name, file, write in (("Upper", "upper.safetensors", "'upper'"), ("UPPER", "upper.safetensors", "'upper'"),
                              ("Deep", "styles/deep.safetensors", "'deep'"),
                              ("mine", "Runs/Mine/pytorch_lora_weights.safetensors", "'Mine'"),
                              ("Styles/Deep", "styles/deep.safetensors", "'styles/deep'"),
                              ("styles/DEEP.safetensors", "styles/deep.safetensors", "'styles/deep'"),
                              ("./Upper", "upper.safetensors", "'./upper'")):
        with pytest.raises(NotFoundError, match=rf"^LoRA {re.escape(repr(name))} not found in {root}; "
                                                rf"{re.escape(file)} there differs from it only in letter case: "
                                                rf"write {re.escape(write)} \(LoRA names are matched in their exact "
                                                r"case\)$") as err:
            resolve_lora(name, str(tmp_path))
        assert err.value.param == "lora" and err.value.status == 404
    # --lora NAME --lora-dir DIR looks names up the same way
    with pytest.raises(NotFoundError, match="upper.safetensors there differs from it only in letter case"):
        resolve_lora_option("Upper", str(tmp_path))
    # the names as written are found, and a name no file has in any case still lists what there is
    assert resolve_lora("upper", str(tmp_path)) == tmp_path / "upper.safetensors"
    assert resolve_lora("deep", str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    assert resolve_lora("styles/deep", str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    assert resolve_lora("Mine", str(tmp_path)) == tmp_path / "Runs" / "Mine" / "pytorch_lora_weights.safetensors"
    with pytest.raises(NotFoundError, match=r"^LoRA 'lower' not found in .*; available: Mine, deep, upper$"):
        resolve_lora("lower", str(tmp_path))


def test_several_files_that_differ_only_in_letter_case_are_all_named(tmp_path):
    """Two files of the name in other cases, and a name two files share in another case: each is named by what
    finds it and it alone."""
    for file in ("ink.safetensors", "INK.safetensors", "deep.safetensors", "styles/deep.safetensors"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"x")
    with pytest.raises(NotFoundError, match=r"; INK.safetensors, ink.safetensors there differ from it only in letter "
                                            r"case: write 'INK' or 'ink' \("):
        resolve_lora("Ink", str(tmp_path))
    with pytest.raises(NotFoundError, match=r"; deep.safetensors, styles/deep.safetensors there differ from it only "
                                            r"in letter case: write './deep' or 'styles/deep' \("):
        resolve_lora("DEEP", str(tmp_path))
    assert resolve_lora("INK", str(tmp_path)) == tmp_path / "INK.safetensors"
    assert resolve_lora("ink", str(tmp_path)) == tmp_path / "ink.safetensors"


def test_a_prompt_tag_in_another_letter_case_is_refused_by_generate(tiny_pipe, style_lora_dir):
    with pytest.raises(NotFoundError, match=r"LoRA 'Style' not found in .*; style.safetensors there differs from it "
                                            r"only in letter case: write 'style'"):
        egaku.generate(tiny_pipe, "a red star <lora:Style:0.5>", steps=1, lora_dir=str(style_lora_dir))
    image = egaku.generate(tiny_pipe, "a red star <lora:style:0.5>", steps=1, lora_dir=str(style_lora_dir))[0]
    assert image.params["loras"] == [("style", 0.5)]


# 2. a tag that gives one of its weights twice

@pytest.mark.parametrize("tag, said", [
    ("<lora:x:te=1:te=2>", "prompt tag '<lora:x:te=1:te=2>' gives te= twice (te=1, then te=2); keep the one you mean"),
    ("<lora:x:unet=0.5:unet=1>", "prompt tag '<lora:x:unet=0.5:unet=1>' gives unet= twice (unet=0.5, then unet=1); "
                                 "keep the one you mean"),
    ("<lyco:x:te=0.8: te = 0.8:unet=1>", "gives te= twice (te=0.8, then te=0.8)"),  # the same value, still twice
    ("<lora:x:0.5:0.5:dyn=4:dyn=8>", "gives dyn= twice (dyn=4, then dyn=8)"),
    ("<lora:x:unet=:unet=0.5>", "gives unet= twice (unet=, then unet=0.5)"),
])
def test_a_tag_that_gives_a_key_twice_is_refused_naming_the_tag_and_the_key(tag, said):
    """(Was: the last one was taken, as A1111 takes it, and the other dropped without a word.)"""
    with pytest.raises(EgakuError, match=re.escape(said)) as err:
        parse_prompt_loras(f"a cat {tag}, on the sea")
    assert err.value.param == "prompt"


def test_each_key_once_is_read_as_before():
    both = {"text_encoder": 0.8, "unet": 0.5}
    assert parse_prompt_loras("a cat <lora:x:te=0.8:unet=0.5:dyn=4>") == ("a cat", [("x", both)])
    assert parse_prompt_loras("<lora:x:0.8:te=0.8:unet=0.5>")[1] == [("x", both)]  # a named one and a positional one
    # the same key in two tags is two tags
    assert parse_prompt_loras("<lora:x:te=0.8> <lora:y:te=0.3>")[1] == [("x", 0.8), ("y", 0.3)]


# 3. a LoRA's trained word that the embedding folder also has an embedding of

@pytest.fixture(scope="module")
def word_lora_dir(tmp_path_factory, style_lora_dir, text_width):
    """A LoRA folder holding a train-lora run ("starrun") that trained the word "star" beside its LoRA."""
    root = tmp_path_factory.mktemp("word-loras")
    run = root / "starrun"
    (run / "embeddings").mkdir(parents=True)
    shutil.copy(style_lora_dir / "style.safetensors", run / "pytorch_lora_weights.safetensors")
    (run / "training_config.json").write_text(json.dumps({"train_tokens": ["star"]}))
    torch.manual_seed(1)
    save_file({"emb_params": torch.randn(1, text_width)}, run / "embeddings" / "star.safetensors")
    return root


def _embedding_folder(root, text_width, *names):
    root.mkdir()
    torch.manual_seed(2)
    for name in names:
        save_file({"emb_params": torch.randn(1, text_width)}, root / f"{name}.safetensors")
    return root


def test_a_loras_word_with_an_embedding_of_it_in_the_embedding_folder_is_refused(tiny_pipe, word_lora_dir, text_width,
                                                                                  tmp_path):
    """(Was: the embedding folder's file replaced the LoRA's trained word in the prompt without a word.)"""
    embeddings = _embedding_folder(tmp_path / "embeddings", text_width, "Star", "glow")
    table = tiny_pipe.text_encoder.get_input_embeddings().weight.clone()
    vocabulary = len(tiny_pipe.tokenizer)
    lora = word_lora_dir / "starrun" / "pytorch_lora_weights.safetensors"
    for prompt, negative in (("a red star <lora:starrun>", ""), ("a STAR <lora:starrun:0.5>", ""),
                             ("a cat <lora:starrun>", "star, glow")):
        with pytest.raises(EgakuError, match=rf"^the word 'star' has two embeddings: the LoRA {re.escape(str(lora))} "
                                             r"was trained with it, and the embedding folder holds Star.safetensors; "
                                             r"only one can be used: rename or remove Star.safetensors, or do not use "
                                             r"that LoRA and the embedding folder together$") as err:
            egaku.generate(tiny_pipe, prompt, negative_prompt=negative, steps=1, lora_dir=str(word_lora_dir),
                           embedding_dir=str(embeddings))
        assert err.value.param == "embedding_dir"
        # nothing is left behind: no adapter, no added token, the base token table, no trained word on record
        assert lora_trained_words(tiny_pipe) == {} and len(tiny_pipe.tokenizer) == vocabulary
        assert torch.equal(tiny_pipe.text_encoder.get_input_embeddings().weight, table)
        assert not any(getattr(tiny_pipe, "get_list_adapters", lambda: {})().values())


def test_a_loras_word_and_the_embedding_folder_work_together_where_they_do_not_share_a_word(tiny_pipe, word_lora_dir,
                                                                                              text_width, tmp_path):
    embeddings = _embedding_folder(tmp_path / "embeddings", text_width, "Star", "glow")
    # the LoRA's word with an embedding folder that has no file of it
    image = egaku.generate(tiny_pipe, "a red star, glow <lora:starrun>", steps=1, lora_dir=str(word_lora_dir),
                           embedding_dir=str(_embedding_folder(tmp_path / "others", text_width, "glow")), seed=3)[0]
    assert [e["name"] for e in image.params["embeddings"]] == ["glow"]
    # a folder that has a file of the word, with the LoRA, where the prompts do not use the word
    image = egaku.generate(tiny_pipe, "a red cat, glow <lora:starrun>", steps=1, lora_dir=str(word_lora_dir),
                           embedding_dir=str(embeddings), seed=3)[0]
    assert [e["name"] for e in image.params["embeddings"]] == ["glow"]
    # the same folder's "Star" without the LoRA: the folder's embedding, as before
    image = egaku.generate(tiny_pipe, "a red star", steps=1, embedding_dir=str(embeddings), seed=3)[0]
    assert [e["name"] for e in image.params["embeddings"]] == ["Star"]
    # the LoRA's word with the LoRA alone
    assert egaku.generate(tiny_pipe, "a red star <lora:starrun>", steps=1, lora_dir=str(word_lora_dir))[0]
    assert lora_trained_words(tiny_pipe) == {}


def test_the_loras_trained_words_are_on_record_while_it_is_applied(tiny_pipe, word_lora_dir):
    from egaku.lora.apply import apply_loras, remove_loras

    lora = word_lora_dir / "starrun" / "pytorch_lora_weights.safetensors"
    assert lora_trained_words(tiny_pipe) == {}
    try:
        apply_loras(tiny_pipe, [(lora, 1.0)])
        assert lora_trained_words(tiny_pipe) == {"star": str(lora)}
    finally:
        remove_loras(tiny_pipe)
    assert lora_trained_words(tiny_pipe) == {}
