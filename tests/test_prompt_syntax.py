"""A1111's prompt syntax: (word:1.3) / [word] emphasis, BREAK, and prompts longer than one 75-token chunk."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import egaku
from egaku.cli import main
from egaku.models.text import (BREAK, encode_captions, encode_prompt_pair, encode_prompts, parse_emphasis, prompt_chunks,
                               prompt_editing_note)

LONG = ", ".join(f"a red circle number {k}" for k in range(20))  # about 130 tokens


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize("text, pieces", [
    ("a (red:1.3) [cat]", [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 1 / 1.1)]),
    ("((big)) dog", [("big", 1.1 * 1.1), (" dog", 1.0)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5)]),
    (r"\(literal\) and \[x\]", [("(literal) and [x]", 1.0)]),
    ("open (bracket runs on", [("open ", 1.0), ("bracket runs on", 1.1)]),
    ("stray ) and ] stay", [("stray ) and ] stay", 1.0)]),
    ("time 10:30 (a:b)", [("time 10:30 ", 1.0), ("a:b", 1.1)]),
    ("(faint:.5)", [("faint", 0.5)]),
    ("sky BREAK sea", [("sky", 1.0), (BREAK, 1.0), ("sea", 1.0)]),
    ("a BREAKFAST", [("a BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_is_read_as_a1111_reads_it(text, pieces):
    got = parse_emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in pieces]
    assert [w for _, w in got] == pytest.approx([w for _, w in pieces])


def test_prompt_editing_gets_a_note_and_plain_brackets_do_not():
    assert "prompt editing" in prompt_editing_note("a [cat:dog:0.5] on grass")
    assert "prompt editing" in prompt_editing_note("[red|blue] ball")
    assert prompt_editing_note("a [faint] (strong:1.2) cat") is None
    assert prompt_editing_note(r"\[a:b\]") is None


def test_chunks_hold_75_tokens_end_at_a_near_comma_and_break_where_asked(pipe):
    tok = pipe.tokenizer
    chunks = prompt_chunks(tok, LONG)
    words = tok(LONG, add_special_tokens=False, verbose=False).input_ids
    assert len(words) > 75 and len(chunks) >= 2
    comma = tok(",", add_special_tokens=False).input_ids[0]
    content = []
    for ids, weights in chunks:
        assert len(ids) == len(weights) == 77 and ids[0] == tok.bos_token_id and weights == [1.0] * 77
        body = ids[1:ids.index(tok.eos_token_id)]
        content += body
    # every token kept, in order; the first chunk ends just after a comma rather than mid-phrase
    assert content == words
    first = chunks[0][0][1:chunks[0][0].index(tok.eos_token_id)]
    assert first[-1] == comma and 55 <= len(first) <= 75
    # BREAK: a chunk per part, even for short prompts
    broken = prompt_chunks(tok, "a red circle BREAK on black")
    assert len(broken) == 2
    assert tok.decode(broken[1][0], skip_special_tokens=True).strip() == "on black"
    # emphasis off: brackets and BREAK are words, all at weight 1
    plain = prompt_chunks(tok, "a (red:1.5) BREAK circle", emphasis=False)
    assert len(plain) == 1 and set(plain[0][1]) == {1.0}
    assert plain[0][0] == tok("a (red:1.5) BREAK circle", padding="max_length", max_length=77).input_ids


def test_one_plain_chunk_encodes_exactly_as_the_pipelines_do(pipe):
    for clip_skip in (1, 2):
        expected = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"], clip_skip)
        got, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a red circle", "", clip_skip)
        assert torch.equal(got, expected)
        assert torch.equal(negative, encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], clip_skip))
    # weight 1 in brackets is the plain prompt
    same, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a (red:1) circle", "")
    assert torch.equal(same, encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"]))


def test_a_weight_scales_its_tokens_away_from_the_empty_prompt(pipe):
    plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    weighted, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a (red:1.5) circle", "")
    red = 2  # <start> a red ...
    assert torch.allclose(weighted[0, red], empty[0, red] + 1.5 * (plain[0, red] - empty[0, red]), atol=1e-6)
    others = [k for k in range(77) if k != red]
    assert torch.equal(weighted[0, others], plain[0, others]) and not torch.allclose(weighted[0, red], plain[0, red])


def test_training_reads_captions_as_generation_reads_prompts(pipe):
    texts = ["a (red:1.5) circle", "a blue [square]", "a green star"]
    batch = encode_captions(pipe.tokenizer, pipe.text_encoder, texts)
    for k, text in enumerate(texts):
        alone, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, text, "")
        assert torch.allclose(batch[k], alone[0], atol=1e-6)
    assert torch.equal(batch[2], encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a green star"])[0])
    # a caption past one chunk is cut there, as encode_prompts cuts it
    assert encode_captions(pipe.tokenizer, pipe.text_encoder, [LONG]).shape == (1, 77, batch.shape[-1])
    # more chunks (kohya's max_token_length): the long caption whole, as generate reads it; the short one padded
    # with the empty prompt's chunks, so that the batch shares one length
    long_states, _ = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, LONG, "")
    n = long_states.shape[1] // 77
    assert n >= 2
    read = encode_captions(pipe.tokenizer, pipe.text_encoder, [LONG, "a (red:1.5) circle"], chunks=n + 1)
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[0]
    assert read.shape == (2, 77 * (n + 1), batch.shape[-1])
    assert torch.allclose(read[0, :77 * n], long_states[0], atol=1e-6) and torch.allclose(read[0, 77 * n:], empty, atol=1e-6)
    assert torch.allclose(read[1, :77], batch[0], atol=1e-6)
    assert all(torch.allclose(read[1, 77 * k:77 * (k + 1)], empty, atol=1e-6) for k in range(1, n + 1))
    # fewer chunks than the caption holds: its first ones
    assert torch.allclose(encode_captions(pipe.tokenizer, pipe.text_encoder, [LONG], chunks=2)[0],
                          long_states[0, :154], atol=1e-6)
    # without emphasis the brackets are words
    plain = encode_captions(pipe.tokenizer, pipe.text_encoder, ["a (red:1.5) circle"], emphasis=False)
    assert torch.equal(plain, encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a (red:1.5) circle"]))


def test_prompt_and_negative_get_the_same_number_of_chunks(pipe):
    prompt, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a cat", LONG)
    assert prompt.shape == negative.shape and prompt.shape[1] == 77 * len(prompt_chunks(pipe.tokenizer, LONG))
    # the prompt's extra chunk is the empty prompt's
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    assert torch.equal(prompt[:, 77:154], empty)


def px(result):
    return np.asarray(result.image, dtype=np.int16)


def test_generate_reads_past_75_tokens_and_weights(pipe, capsys):
    fast = dict(steps=2, seed=3)
    cut = pipe.tokenizer.decode(pipe.tokenizer(LONG, truncation=True, max_length=77).input_ids,
                                skip_special_tokens=True)
    long_image = egaku.generate(pipe, LONG, **fast)[0]
    assert not np.array_equal(px(long_image), px(egaku.generate(pipe, cut, **fast)[0]))  # the tail is read
    # a batch of long prompts, and a long negative prompt beside a short prompt
    batch = egaku.generate(pipe, LONG, num_images=2, batch_size=2, **fast)
    assert np.abs(px(batch[0]) - px(long_image)).max() <= 1  # batched convolutions: the last float bit may differ
    egaku.generate(pipe, "a cat", negative_prompt=LONG, **fast)
    plain = px(egaku.generate(pipe, "a red circle", **fast)[0])
    assert np.array_equal(plain, px(egaku.generate(pipe, "a (red:1) circle", **fast)[0]))
    weighted = egaku.generate(pipe, "a (red:1.8) circle", **fast)[0]
    assert not np.array_equal(plain, px(weighted)) and weighted.params["emphasis"] is True
    off = egaku.generate(pipe, "a (red:1.8) circle", emphasis=False, **fast)[0]
    assert not np.array_equal(px(off), px(weighted)) and off.params["emphasis"] is False
    egaku.generate(pipe, "a [cat:dog:0.5]", **fast)
    out = capsys.readouterr()
    assert "prompt editing" in out.out and "indexing errors" not in out.err


def test_no_emphasis_is_stored_and_read_back_by_from(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    args = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "--no-progress"]
    assert main(["generate", "a (red:1.8) circle", "--no-emphasis", "--out", str(out), *args]) == 0
    made = next(out.glob("*.png"))
    stored = json.loads(Image.open(made).text["egaku"])
    assert stored["emphasis"] is False
    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(next(again.glob("*.png")))))


def test_chunks_follow_a1111_at_a_comma_met_by_a_full_chunk_and_keep_embeddings_whole(pipe):
    tok = pipe.tokenizer
    word = tok("blue", add_special_tokens=False).input_ids
    assert len(word) == 1
    # 60 words, a comma, 14 words: the chunk is full when the second comma comes, which is only remembered (A1111)
    text = " ".join(["blue"] * 60) + ", " + " ".join(["blue"] * 14) + ", navy"
    lengths = [c[0].index(tok.eos_token_id) - 1 for c in prompt_chunks(tok, text)]
    navy = len(tok("navy", add_special_tokens=False).input_ids)
    assert lengths == [75, 1 + navy]
    # a token group that must stay whole (a multi-vector embedding's) starts the next chunk instead of splitting
    ids = tok(" ".join(["blue"] * 73) + " red", add_special_tokens=False).input_ids
    red = ids[-1]
    chunks = prompt_chunks(tok, " ".join(["blue"] * 73) + " red", keep_together={red: 3})
    assert [c[0].index(tok.eos_token_id) - 1 for c in chunks] == [73, 1]


def test_nested_emphasis_in_square_brackets_is_no_prompt_editing():
    assert prompt_editing_note("[(red:1.2)] circle") is None and prompt_editing_note("[(a) b:c]") is None
    assert prompt_editing_note("[(red:1.2)] [cat:dog:5]") is not None


def test_the_python_api_reads_prompt_parameters_whatever_the_call_form(pipe):
    from egaku.inference.prompts import upscale, variations

    base = egaku.generate(pipe, "a red circle", seed=5, steps=2)[0]
    for result in (egaku.generate(pipe, opts=egaku.GenerateOptions(prompt="a red circle --seed 5", steps=2))[0],
                   egaku.generate(pipe, "a red circle --seed 5", seed=None, steps=2)[0]):
        assert result.seed == 5 and result.image.tobytes() == base.image.tobytes()
    assert [r.seed for r in variations(pipe, base.image, "a red circle --seed 9", num_images=1, steps=2)] == [9]
    assert upscale(pipe, base.image, "a red circle --seed 9", steps=4).seed == 9
    # a default given in opts is no conflict; a value away from the default is
    assert egaku.generate(pipe,
                          opts=egaku.GenerateOptions(prompt="a red circle --steps 3", seed=1))[0].params["steps"] == 3
    with pytest.raises(egaku.EgakuError, match="given twice"):
        egaku.generate(pipe, opts=egaku.GenerateOptions(prompt="a red circle --steps 3", steps=4))


def test_from_names_what_it_cannot_make_as_it_was_made(tiny_model_dir, tmp_path, capsys):
    from PIL import PngImagePlugin

    out = tmp_path / "o"
    args = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "--no-progress"]
    assert main(["generate", "a (red) circle", "--out", str(out), *args]) == 0
    made = next(out.glob("*.png"))
    params = json.loads(Image.open(made).text["egaku"])
    # an image of an egaku from before the syntax was read: no "emphasis" in its chunk
    old = {k: v for k, v in params.items() if k != "emphasis"}
    info = PngImagePlugin.PngInfo()
    info.add_text("egaku", json.dumps(old))
    Image.open(made).save(tmp_path / "old.png", pnginfo=info)
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "old.png"), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "read brackets and BREAK as words; pass --no-emphasis" in capsys.readouterr().out
    assert main(["generate", "--from", str(made), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "--no-emphasis" not in capsys.readouterr().out
    # A1111's Emphasis: None is written and read back
    assert main(["generate", "a (red) circle", "--no-emphasis", "--out", str(tmp_path / "c"), *args]) == 0
    text = Image.open(next((tmp_path / "c").glob("*.png"))).text["parameters"]
    assert "Emphasis: None" in text
    from egaku.inference.metadata import parse_a1111

    assert parse_a1111(text)["emphasis"] is False and "emphasis" not in parse_a1111(text.replace("None", "Original"))
