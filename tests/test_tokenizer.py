"""The CLIP tokenizer built from captions: every word of the corpus is one token, for CLIPTokenizer itself."""

from transformers import CLIPTokenizer

from egaku.data import shapes
from egaku.models.tokenizer import build_clip_tokenizer


def _words(texts):
    return sorted({w for t in texts for w in t.lower().split()})


def test_every_word_of_the_shapes_world_is_one_token(tmp_path):
    captions = shapes.vocabulary_captions()
    tokenizer = build_clip_tokenizer(captions)
    # "triangle", "bottom" and "black" share pairs with earlier, more frequent words ("at", "the", "a",
    # "on"...): merges built left to right per word split them, BPE's rank order must be simulated
    split = [w for w in _words(captions) if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for caption in captions[::97]:
        assert reloaded(caption).input_ids == tokenizer(caption).input_ids


def test_any_text_tokenizes_and_unknown_words_fall_back_to_bytes():
    texts = ["the quick brown fox jumps over the lazy dog", "lazier laziest dogs", "a photo of sks dog"]
    tokenizer = build_clip_tokenizer(texts, model_max_length=16)
    for word in _words(texts):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(ids) > 1 and tokenizer.decode(ids) == "zebra"
    assert len(tokenizer("a photo", padding="max_length").input_ids) == 16


def test_the_earlier_left_to_right_builder_still_reproduces_the_shipped_tokenizer():
    """configs/ldm-builtin.toml asks for it, so that its documented command rebuilds the shipped model."""
    from egaku.models.loading import BUILTIN_DIR

    shipped = CLIPTokenizer.from_pretrained(BUILTIN_DIR / "tokenizer")
    rebuilt = build_clip_tokenizer(shapes.vocabulary_captions(), merge_order="left_to_right")
    assert rebuilt.get_vocab() == shipped.get_vocab()
    caption = "a small purple triangle at the bottom left on a black background"
    assert rebuilt(caption).input_ids == shipped(caption).input_ids
    assert len(rebuilt("triangle", add_special_tokens=False).input_ids) > 1  # the split it is kept for
