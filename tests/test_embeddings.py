"""Textual-inversion embeddings from --embedding-dir, read as A1111 and diffusers read them (the tiny pipeline)."""

import base64
import io
import json

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

import egaku
from egaku.cli import main
from egaku.errors import EgakuError
from egaku.inference.embeddings import load_embeddings, unload_embeddings
from egaku.inference.metadata import a1111_parameters, parse_a1111, without_local_paths

FAST = dict(steps=2, seed=4)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def width(text_width):
    return text_width


@pytest.fixture(scope="module")
def folder(tmp_path_factory, width):
    root = tmp_path_factory.mktemp("embeddings")
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(3, width)}, root / "EasyNeg.safetensors")  # A1111's layout, 3 vectors
    (root / "styles").mkdir()
    save_file({"<glow>": torch.randn(1, width)}, root / "styles" / "glow.safetensors")  # diffusers' layout
    save_file({"emb_params": torch.randn(1, width)}, root / "bad-hands.safetensors")
    save_file({"emb_params": torch.randn(1, width)}, root / "bad.safetensors")
    save_file({"emb_params": torch.randn(2, width)}, root / "red.safetensors")  # a word the vocabulary has
    return root


def px(result):
    return np.asarray(result.image, dtype=np.int16)


def test_a_named_embedding_changes_the_image_and_leaves_the_pipeline_as_it_was(pipe, folder):
    vocabulary, table = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.clone()
    plain = egaku.generate(pipe, "a cat", negative_prompt="easyneg", **FAST)[0]
    used = egaku.generate(pipe, "a cat", negative_prompt="easyneg", embedding_dir=str(folder), **FAST)[0]
    assert not np.array_equal(px(plain), px(used))
    assert ([e["name"] for e in used.params["embeddings"]] == ["EasyNeg"]
            and len(used.params["embeddings"][0]["hash"]) == 12)
    assert len(pipe.tokenizer) == vocabulary and torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    assert np.array_equal(px(plain), px(egaku.generate(pipe, "a cat", negative_prompt="easyneg", **FAST)[0]))
    # a word of the vocabulary that names a file means the embedding, as in A1111
    assert not np.array_equal(px(egaku.generate(pipe, "a red cat", **FAST)[0]),
                              px(egaku.generate(pipe, "a red cat", embedding_dir=str(folder), **FAST)[0]))
    # weights apply to an embedding's tokens too
    weighted = egaku.generate(pipe, "a cat", negative_prompt="(easyneg:1.5)", embedding_dir=str(folder), **FAST)[0]
    assert not np.array_equal(px(weighted), px(used))


def test_names_match_whole_words_in_any_case_longest_first(pipe, folder):
    texts, used = load_embeddings(pipe, ["GLOW cats, bad-hands", "red, redder, EasyNeg"], folder)
    try:
        by_name = {u.name: u.tokens for u in used}
        assert set(by_name) == {"glow", "bad-hands", "red", "EasyNeg"}  # not "bad" (part of bad-hands), not "redder"
        assert len(by_name["EasyNeg"]) == 3 and len(by_name["red"]) == 2
        assert texts[0] == f"{by_name['glow'][0]} cats, {by_name['bad-hands'][0]}"
        assert texts[1] == f"{' '.join(by_name['red'])}, redder, {' '.join(by_name['EasyNeg'])}"
        ids = pipe.tokenizer(texts[1], add_special_tokens=False).input_ids
        assert all(pipe.tokenizer.convert_tokens_to_ids(t) in ids for t in by_name["EasyNeg"])
    finally:
        unload_embeddings(pipe, used)


def test_egaku_reads_an_embedding_as_diffusers_load_textual_inversion_does(pipe, folder, tiny_model_dir):
    ours = egaku.generate(pipe, "a glow cat", guidance_scale=1.0, embedding_dir=str(folder), **FAST)[0]
    reference = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    reference.load_textual_inversion(str(folder / "styles" / "glow.safetensors"), token="glow-style")
    theirs = egaku.generate(reference, "a glow-style cat", guidance_scale=1.0, **FAST)[0]
    assert np.abs(px(ours) - px(theirs)).max() <= 1


def test_bad_embedding_files_are_one_line_errors_and_leave_nothing_behind(pipe, folder, tmp_path, width, capsys):
    vocabulary = len(pipe.tokenizer)
    save_file({"emb_params": torch.randn(1, width + 8)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.randn(1, width), "clip_g": torch.randn(1, 1280)}, tmp_path / "xl.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"string_to_param": {"*": torch.randn(2, width)}, "name": "old"}, tmp_path / "old.pt")
    (tmp_path / "twice").mkdir()
    save_file({"emb_params": torch.randn(1, width)}, tmp_path / "twice" / "xl.safetensors")
    cases = [("old", "is a pickle, read only with --allow-pickle"), ("broken", "not a readable safetensors file"),
             ("xl", "has 2 files")]
    for word, message in cases:
        with pytest.raises(EgakuError, match=message):
            egaku.generate(pipe, f"easyneg {word}", embedding_dir=str(tmp_path), **FAST)
        assert len(pipe.tokenizer) == vocabulary
    (tmp_path / "twice" / "xl.safetensors").unlink()
    # an embedding of another base model (another width, or SDXL's) is skipped, as A1111 skips it: its name stays a
    # word, so that one folder can serve several models
    plain = egaku.generate(pipe, "a wide xl cat", **FAST)[0]
    capsys.readouterr()
    [result] = egaku.generate(pipe, "a wide xl cat", embedding_dir=str(tmp_path), **FAST)
    said = capsys.readouterr().out
    assert "embedding wide.safetensors has vectors of width" in said and "'wide' is read as a word" in said
    assert "embedding xl.safetensors is an SDXL embedding" in said and "'xl' is read as a word" in said
    assert not result.params.get("embeddings") and (px(result) == px(plain)).all()
    assert len(pipe.tokenizer) == vocabulary
    with pytest.raises(EgakuError, match="is not a folder"):
        egaku.generate(pipe, "a cat", embedding_dir=str(tmp_path / "none"), **FAST)
    # A1111's .pt layout, with --allow-pickle (read with weights_only=True)
    [result] = egaku.generate(pipe, "old", embedding_dir=str(tmp_path), allow_pickle=True, **FAST)
    assert [e["name"] for e in result.params["embeddings"]] == ["old"] and len(pipe.tokenizer) == vocabulary
    # beside a safetensors file of its name, a pickle is the file it cannot read without --allow-pickle: the
    # safetensors one is used; with --allow-pickle both could be meant
    save_file({"emb_params": torch.randn(1, width)}, tmp_path / "old.safetensors")
    [result] = egaku.generate(pipe, "old", embedding_dir=str(tmp_path), **FAST)
    assert [Path(e["path"]).name for e in result.params["embeddings"]] == ["old.safetensors"]
    with pytest.raises(EgakuError, match="has 2 files"):
        egaku.generate(pipe, "old", embedding_dir=str(tmp_path), allow_pickle=True, **FAST)


def test_embeddings_are_recorded_as_a1111_records_them_and_from_reads_them_again(pipe, folder, tiny_model_dir,
                                                                                tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a glow cat", "--negative-prompt", "easyneg", "--embedding-dir", str(folder),
                 "--model", str(tiny_model_dir), "--steps", "2", "--seed", "2", "--out", str(out),
                 "--no-progress"]) == 0
    made = next(out.glob("*.png"))
    text = Image.open(made).text["parameters"]
    hashes = dict(item.split(": ")
                  for item in json.loads(text.split("TI hashes: ")[1].split(", Version")[0]).split(", "))
    assert set(hashes) == {"glow", "EasyNeg"} and all(len(h) == 12 for h in hashes.values())
    params = json.loads(Image.open(made).text["egaku"])
    assert ("path" not in str(without_local_paths(params)["embeddings"])
            and "embedding_dir" not in without_local_paths(params))
    assert dict(parse_a1111(text)["embedding_hashes"]) == hashes
    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(next(again.glob("*.png")))))
    # an A1111 image names its embeddings by hash only: a note says how to use them
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters({**params, "model_source": None}))
    Image.open(made).save(tmp_path / "a1111.png", pnginfo=info)
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "a1111.png"), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "from-a1111"), "--no-progress"]) == 0
    assert "its embeddings (EasyNeg, glow) are read only with --embedding-dir" in capsys.readouterr().out


def test_the_server_reads_embeddings_from_its_folder(pipe, folder):
    import httpx

    from egaku.server.app import LiveServer, ServeOptions, create_app

    opts = ServeOptions(model=["tiny"], embedding_dir=str(folder))
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, httpx.Client(base_url=live.url,
                                                                                        timeout=120) as http:
        r = http.post("/v1/images/generations", json={"prompt": "a cat", "negative_prompt": "easyneg", "steps": 2,
                                                      "seed": 4, "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        stored = json.loads(image.text["egaku"])
        assert [e["name"] for e in stored["embeddings"]] == ["EasyNeg"] and "path" not in stored["embeddings"][0]
        assert http.get("/v1/egaku/options").json()["embeddings"] == ["EasyNeg", "bad", "bad-hands", "glow", "red"]
    with pytest.raises(EgakuError, match="--embedding-dir .* is not a folder"):
        from egaku.server.app import serve_command

        serve_command(ServeOptions(model=["tiny"], embedding_dir=str(folder / "none")))


def test_embedding_edge_cases_qa_found(pipe, folder, tmp_path, width, capsys):
    # no vectors, or NaN: one line, naming the file by its place in the folder (a server's answers show no paths)
    save_file({"emb_params": torch.randn(0, width)}, tmp_path / "empty.safetensors")
    save_file({"emb_params": torch.full((1, width), float("nan"))}, tmp_path / "nan.safetensors")
    for word, message in (("empty", "embedding empty.safetensors holds no vectors"),
                          ("nan", "embedding nan.safetensors holds NaN or inf values")):
        with pytest.raises(EgakuError, match=message):
            egaku.generate(pipe, word, embedding_dir=str(tmp_path), **FAST)
    # a LoRA tag's name in the negative prompt is not an embedding's word, and the tag gets a note
    [result] = egaku.generate(pipe, "a cat", negative_prompt="<lora:glow:1> ugly", embedding_dir=str(folder), **FAST)
    assert "embeddings" not in result.params and "tags are applied from the prompt only" in capsys.readouterr().out
    # a changed embedding is named by --from
    made = tmp_path / "o"
    copy = tmp_path / "emb"
    copy.mkdir()
    save_file({"emb_params": torch.randn(1, width)}, copy / "glow.safetensors")
    assert main(["generate", "a glow cat", "--embedding-dir", str(copy), "--model", "tiny", "--steps", "2",
                 "--out", str(made), "--no-progress"]) == 0
    save_file({"emb_params": torch.randn(1, width)}, copy / "glow.safetensors")
    capsys.readouterr()
    assert main(["generate", "--from", str(next(made.glob("*.png"))), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert "the embedding glow" in capsys.readouterr().out


def test_a_multi_vector_embedding_is_not_split_between_chunks(pipe, folder):
    from egaku.models.text import prompt_chunks

    texts, used = load_embeddings(pipe, [" ".join(["cat"] * 73) + " easyneg"], folder)
    try:
        tokens = [pipe.tokenizer.convert_tokens_to_ids(t) for t in used[0].tokens]
        chunks = prompt_chunks(pipe.tokenizer, texts[0], keep_together={tokens[0]: 3})
        assert len(chunks) == 2 and chunks[1][0][1:4] == tokens
    finally:
        unload_embeddings(pipe, used)
