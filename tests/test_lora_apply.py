"""Prompt LoRA tags, LoRA name resolution and key layouts (no model needed)."""

from __future__ import annotations

import re

import pytest
import torch

from egaku.errors import EgakuError, NotFoundError
from egaku.lora.apply import parse_lora_arg, parse_prompt_loras, resolve_lora
from egaku.lora.formats import bake_alpha, check_coverage, kohya_to_peft, peft_pairs, peft_to_kohya


def test_prompt_tags_are_removed_with_their_weights():
    clean, loras = parse_prompt_loras("a red star, <lora:star:0.8> on the sea <lora:style>")
    assert clean == "a red star, on the sea"
    assert loras == [("star", 0.8), ("style", 1.0)]
    assert parse_prompt_loras("no tags here") == ("no tags here", [])
    assert parse_prompt_loras("<lora:a:-0.5>, a cat") == ("a cat", [("a", -0.5)])
    with pytest.raises(EgakuError, match="not a number"):
        parse_prompt_loras("<lora:star:strong>")
    for weight in ("inf", "nan", "-inf"):  # a black image otherwise
        with pytest.raises(EgakuError, match="finite number"):
            parse_prompt_loras(f"a cat <lora:star:{weight}>")


def test_lyco_tags_are_read_as_lora_tags_as_a1111_reads_them():
    """A1111 1.5+ reads <lyco:name:w> (the LyCORIS extension's tag, in many shared prompts) as <lora:name:w>. (Was:
    left in the prompt as words, silently.)"""
    from egaku.inference.embeddings import names_in
    from egaku.lora.apply import has_prompt_loras

    assert parse_prompt_loras("a red star, <lyco:star:0.6> on the sea <lora:style>") == \
        ("a red star, on the sea", [("star", 0.6), ("style", 1.0)])
    assert parse_prompt_loras("<lyco:ink>, a cat") == ("a cat", [("ink", 1.0)])
    with pytest.raises(EgakuError, match="not a number"):
        parse_prompt_loras("<lyco:star:strong>")
    assert has_prompt_loras("a cat <lyco:ink:1>") and has_prompt_loras("<lora:ink>")
    assert not has_prompt_loras("a cat, lyco: lora") and parse_prompt_loras("<lycoris:ink>") == ("<lycoris:ink>", [])
    # a tag's name is not an embedding's word (a negative prompt keeps its tags as words)
    assert names_in(["a cat <lyco:bad:1>", "<lora:bad>"], {"bad": []}) == []
    assert names_in(["a cat, bad"], {"bad": []}) == ["bad"]


def test_a_tag_weighs_the_text_encoder_and_the_unet_apart_as_a1111_reads_it():
    """A1111's Lora extension reads <lora:name:te:unet:dyn> and te=/unet=/dyn= (a named value wins; the UNet's
    defaults to the text encoder's; dyn, a DyLoRA rank, does nothing to a LoRA). (Was: "weight '0.8:0.5' is not a
    number".) One weight, or two equal ones, is a number as before."""
    both = {"text_encoder": 0.8, "unet": 0.5}
    for tag in ("<lora:star:0.8:0.5>", "<lyco:star:0.8:0.5>", "<lora:star:te=0.8:unet=0.5>",
                "<lora:star:unet=0.5:te=0.8>", "<lora:star:0.8:unet=0.5>", "<lora:star: 0.8 : 0.5 >",
                "<lora:star:0.8:0.5:16>", "<lora:star:0.8:0.5:dyn=16>", "<lora:star:1:0.5:te=0.8>"):
        assert parse_prompt_loras(f"a red star, {tag} on the sea") == ("a red star, on the sea", [("star", both)]), tag
    assert parse_prompt_loras("<lora:star:unet=0.5>")[1] == [("star", {"text_encoder": 1.0, "unet": 0.5})]
    assert parse_prompt_loras("<lora:star::0.5>")[1] == [("star", {"text_encoder": 1.0, "unet": 0.5})]
    assert parse_prompt_loras("<lora:star:te=0.6>")[1] == [("star", 0.6)]  # the UNet's is the text encoder's
    assert parse_prompt_loras("<lora:star:0.7:0.7> <lora:ink:0.3:>")[1] == [("star", 0.7), ("ink", 0.3)]
    for tag, said in (("<lora:star:0.8:strong>", "UNet weight 'strong' is not a number"),
                      ("<lora:star:te=high:unet=0.5>", "text-encoder weight 'high' is not a number"),
                      ("<lora:star:0.8:inf>", "finite number"),
                      ("<lora:star:0.8:0.5:1.5>", "dyn '1.5' is not a whole number"),
                      ("<lora:star:0.8:0.5:16:2>", "has 4 values after the name; it takes a weight"),
                      ("<lora:star:lbw=MIDD>", "unknown value 'lbw=MIDD'; a LoRA tag takes te=, unet= and dyn="),
                      ("<lora:star:TE=0.8>", "unknown value 'TE=0.8'")):  # A1111's keys are lower case
        with pytest.raises(EgakuError, match=re.escape(said)) as err:
            parse_prompt_loras(f"a cat {tag}")
        assert err.value.param == "prompt"


@pytest.mark.parametrize("prompt, kind", [("a cat <lora::1>", "lora"), ("<lora:>, a cat", "lora"),
                                          ("a cat <lyco: :0.5>", "lyco")])
def test_a_tag_without_a_name_is_refused(prompt, kind):
    """(Was: left in the prompt as words, without a message, by generate; the server refused it with a check of its
    own, which now is this one.)"""
    with pytest.raises(EgakuError, match=re.escape(f"<{kind}:...> tag without a name; write <{kind}:NAME:WEIGHT>")) \
            as err:
        parse_prompt_loras(prompt)
    assert err.value.param == "prompt"


def test_tags_are_matched_in_lower_case_as_a1111_matches_them():
    """A1111 looks extra networks up by the tag's kind as written (modules/extra_networks.py): <LORA:x> names none."""
    assert parse_prompt_loras("a cat <LORA:star:1> <Lyco:ink>") == ("a cat <LORA:star:1> <Lyco:ink>", [])


def test_resolve_bare_names_in_the_lora_folder(tmp_path):
    (tmp_path / "star.safetensors").write_bytes(b"x")
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert resolve_lora("star", str(tmp_path)) == tmp_path / "star.safetensors"
    assert resolve_lora("style", str(tmp_path)) == tmp_path / "style" / "pytorch_lora_weights.safetensors"
    with pytest.raises(NotFoundError, match="available: star, style") as err:
        resolve_lora("moon", str(tmp_path))
    assert err.value.param == "lora" and err.value.status == 404
    (tmp_path / "half_copied").mkdir()  # a folder of that name without a LoRA file: the error says so
    (tmp_path / "half_copied" / "training_config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="the folder 'half_copied' in .* holds no pytorch_lora_weights"
                                            ".*available: star, style") as err:
        resolve_lora("half_copied", str(tmp_path))
    assert err.value.status == 404


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "..", "a/../../b", "styles/..", "~/x", "..\\secret",
                                  "\\etc\\passwd"])
def test_names_that_leave_the_lora_folder_are_refused(tmp_path, name):
    (tmp_path.parent / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(EgakuError, match="points outside the LoRA folder") as err:
        resolve_lora(name, str(tmp_path / "loras"))
    assert err.value.param == "lora" and not isinstance(err.value, NotFoundError)


def test_names_are_found_in_sub_folders_as_a1111_finds_them(tmp_path):
    from egaku.lora.apply import lora_catalog

    for file in ("star.safetensors", "styles/deep.safetensors", "styles/ink/ink.safetensors",
                 "people/run/pytorch_lora_weights.safetensors", "people/run/embeddings/word.safetensors",
                 "people/run/steps/run-step000002/pytorch_lora_weights.safetensors", ".hidden/secret.safetensors"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"x")
    (tmp_path / "people" / "run" / "training_config.json").write_text("{}")
    assert resolve_lora("deep", str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    assert resolve_lora("deep.safetensors", str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    # a path inside the folder, either separator
    for name in ("styles/deep", "styles\\deep", "./styles/deep.safetensors"):
        assert resolve_lora(name, str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    assert resolve_lora("ink", str(tmp_path)) == tmp_path / "styles" / "ink" / "ink.safetensors"
    # a train-lora run is one LoRA named after its folder: its embeddings and steps are not LoRAs of their own
    assert resolve_lora("run", str(tmp_path)) == tmp_path / "people" / "run" / "pytorch_lora_weights.safetensors"
    assert resolve_lora("people/run", str(tmp_path)) == tmp_path / "people" / "run" / "pytorch_lora_weights.safetensors"
    assert lora_catalog(tmp_path) == ["deep", "ink", "run", "star"]
    with pytest.raises(NotFoundError, match=r"not found in .*; available: deep, ink, run, star$"):
        resolve_lora("word", str(tmp_path))
    with pytest.raises(NotFoundError, match="available: deep, ink, run, star$"):
        resolve_lora("people/deep", str(tmp_path))
    # a linked folder is followed
    (tmp_path / "linked").symlink_to(tmp_path / "styles" / "ink")
    (tmp_path.parent / "elsewhere").mkdir()
    (tmp_path.parent / "elsewhere" / "far.safetensors").write_bytes(b"x")
    (tmp_path / "shared").symlink_to(tmp_path.parent / "elsewhere")
    assert resolve_lora("far", str(tmp_path)) == tmp_path / "shared" / "far.safetensors"
    assert lora_catalog(tmp_path) == ["deep", "far", "ink", "run", "star"]


def test_a_name_two_files_share_is_an_error_naming_both(tmp_path):
    from egaku.lora.apply import lora_catalog

    for file in ("deep.safetensors", "styles/deep.safetensors", "a/run/pytorch_lora_weights.safetensors",
                 "b/run.safetensors"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"x")
    with pytest.raises(EgakuError, match=r"^LoRA name 'deep' fits 2 files in .* \(deep.safetensors, "
                                         r"styles/deep.safetensors\); give the one you mean by its path in the "
                                         r"folder: ./deep or styles/deep$") as err:
        resolve_lora("deep", str(tmp_path))
    assert err.value.param == "lora" and not isinstance(err.value, NotFoundError)
    with pytest.raises(EgakuError, match=r"\(a/run/pytorch_lora_weights.safetensors, b/run.safetensors\)"):
        resolve_lora("run", str(tmp_path))
    # each path named there takes to its own file
    assert resolve_lora("./deep", str(tmp_path)) == tmp_path / "deep.safetensors"
    assert resolve_lora("styles/deep", str(tmp_path)) == tmp_path / "styles" / "deep.safetensors"
    assert resolve_lora("a/run", str(tmp_path)) == tmp_path / "a" / "run" / "pytorch_lora_weights.safetensors"
    assert lora_catalog(tmp_path) == ["./deep", "a/run", "b/run", "styles/deep"]
    # a run folder beside a file of its name: the run is named by its file
    (tmp_path / "a" / "run.safetensors").write_bytes(b"x")
    with pytest.raises(EgakuError, match="a/run or a/run/pytorch_lora_weights or b/run$"):
        resolve_lora("run", str(tmp_path))
    assert resolve_lora("a/run/pytorch_lora_weights", str(tmp_path)) == \
        tmp_path / "a" / "run" / "pytorch_lora_weights.safetensors"
    # a link to a LoRA, of its own name, is that LoRA, not a second one; under another name, it is found by that
    (tmp_path / "star.safetensors").write_bytes(b"x")
    (tmp_path / "styles" / "star.safetensors").symlink_to(tmp_path / "star.safetensors")
    (tmp_path / "styles" / "also.safetensors").symlink_to(tmp_path / "star.safetensors")
    assert resolve_lora("star", str(tmp_path)) == tmp_path / "star.safetensors"
    assert resolve_lora("also", str(tmp_path)) == tmp_path / "styles" / "also.safetensors"


def test_paths_without_a_lora_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert resolve_lora(str(tmp_path / "run"), None) == tmp_path / "run" / "pytorch_lora_weights.safetensors"
    with pytest.raises(NotFoundError):
        resolve_lora(str(tmp_path / "missing.safetensors"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="has no pytorch_lora_weights"):
        resolve_lora(str(tmp_path / "empty"), None)
    # a --format kohya run's folder holds only the kohya file named after it
    (tmp_path / "kohya_run").mkdir()
    (tmp_path / "kohya_run" / "kohya_run.safetensors").write_bytes(b"x")
    assert resolve_lora(str(tmp_path / "kohya_run"), None) == tmp_path / "kohya_run" / "kohya_run.safetensors"
    assert resolve_lora("kohya_run", str(tmp_path)) == tmp_path / "kohya_run" / "kohya_run.safetensors"


def test_lora_argument_scale(tmp_path, monkeypatch):
    assert parse_lora_arg("loras/star:0.7") == ("loras/star", 0.7)
    assert parse_lora_arg("loras/star") == ("loras/star", 1.0)
    assert parse_lora_arg("C:\\loras\\star") == ("C:\\loras\\star", 1.0)
    # a LoRA that exists with a bad scale after it is a typo, named as one (not "does not exist")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out1").mkdir()
    for text, bad in (("out1:abc", "'abc'"), ("out1:", "''")):
        with pytest.raises(EgakuError, match=f"scale after ':' must be a number .*got {bad}") as err:
            parse_lora_arg(text)
        assert not isinstance(err.value, NotFoundError)
    (tmp_path / "odd:name").mkdir()  # a name with a colon in it is still a name
    assert parse_lora_arg("odd:name") == ("odd:name", 1.0)
    (tmp_path / "run:2").mkdir()  # even where what follows the colon reads as a scale, when the path is there
    assert parse_lora_arg("run:2") == ("run:2", 1.0)
    assert parse_lora_arg("run:2:0.5") == ("run:2", 0.5)


def test_a_bare_lora_option_name_is_looked_up_in_the_lora_folder_first(tmp_path, monkeypatch):
    from egaku.lora.apply import resolve_lora_option

    monkeypatch.chdir(tmp_path)
    for folder in ("star", "loras/star"):  # the working directory holds a LoRA of the same name
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    in_folder = tmp_path / "loras" / "star" / "pytorch_lora_weights.safetensors"
    assert resolve_lora_option("star", "loras").resolve() == in_folder  # as a <lora:star> tag finds it
    assert resolve_lora_option("star", None).resolve() == tmp_path / "star" / "pytorch_lora_weights.safetensors"
    assert resolve_lora_option("./star", "loras").resolve() == tmp_path / "star" / "pytorch_lora_weights.safetensors"


def test_a_corrupt_lora_file_is_a_clear_error_not_a_traceback(tmp_path):
    from egaku.lora.apply import trained_clip_skip
    from egaku.lora.formats import read_lora_file

    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"hello world not safetensors")
    assert trained_clip_skip(garbage) is None  # generate's clip-skip note says nothing; loading refuses it
    with pytest.raises(EgakuError, match="not a readable safetensors file"):
        read_lora_file(garbage)
    for name, why in (("image.png", r"this is not a LoRA file \(\.png\)"), ("old.ckpt", "this is a pickle")):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(EgakuError, match=why):
            read_lora_file(tmp_path / name)


def test_the_lora_dir_hint_is_only_given_where_there_is_such_an_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFoundError, match="--lora-dir"):
        resolve_lora("nope", None)
    with pytest.raises(NotFoundError) as err:
        resolve_lora("nope", None, names_option="")
    assert "--lora-dir" not in str(err.value)


def test_kohya_round_trip_is_exact_against_module_names():
    down, up = torch.randn(4, 32), torch.randn(64, 4)
    pairs = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": {"down": down, "up": up},
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": {"down": down, "up": up}}
    kohya = peft_to_kohya(pairs, {k: 2.0 for k in pairs})
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    modules = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"],
               "text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj"]}
    back, alphas, unmatched = kohya_to_peft(kohya, modules)
    assert unmatched == [] and set(back) == set(pairs) and set(alphas.values()) == {2.0}
    baked = bake_alpha(back, alphas)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"
    assert torch.allclose(baked[key], up * 0.5)  # alpha/rank folded in


def test_old_diffusers_spellings_are_understood():
    sd = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.zeros(1),
          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.zeros(1),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": torch.zeros(1),
          "something.else": torch.zeros(1)}
    pairs, unknown = peft_pairs(sd)
    assert set(pairs) == {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                          "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                          "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"}
    assert unknown == ["something.else"]


def test_coverage_refuses_partial_matches_and_half_pairs():
    modules = {"unet.a": torch.nn.Linear(8, 16)}
    good = {"down": torch.zeros(2, 8), "up": torch.zeros(16, 2)}
    check_coverage({"unet.a": good}, modules, "f")
    with pytest.raises(EgakuError, match="1 LoRA layers match nothing"):
        check_coverage({"unet.a": good, "unet.b": good}, modules, "f")
    with pytest.raises(EgakuError, match="only its down half"):
        check_coverage({"unet.a": {"down": good["down"]}}, modules, "f")


def _diffusers_lora(prefix: str = "unet.") -> dict[str, torch.Tensor]:
    module = f"{prefix}down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{module}.lora_A.weight": torch.randn(4, 32), f"{module}.lora_B.weight": torch.randn(32, 4)}


def test_info_refuses_lora_keys_of_no_known_layout(tmp_path):
    from safetensors.torch import save_file

    from egaku.lora.commands import describe_lora

    # a diffusers LoRA with its unet. prefix stripped: generate and merge-lora match none of its layers
    save_file(_diffusers_lora(prefix=""), str(tmp_path / "noprefix.safetensors"))
    with pytest.raises(EgakuError, match="noprefix.safetensors matches no known LoRA layout"):
        describe_lora(tmp_path / "noprefix.safetensors")
    save_file(_diffusers_lora(), str(tmp_path / "prefixed.safetensors"))
    assert describe_lora(tmp_path / "prefixed.safetensors")["unet_layers"] == 1
    # a diffusers-layout LoRA of a Flux/SD3 transformer is named as one, as generate names it
    module = "transformer.single_transformer_blocks.0.attn.to_q"
    save_file({f"{module}.lora_A.weight": torch.randn(4, 32), f"{module}.lora_B.weight": torch.randn(32, 4)},
              str(tmp_path / "flux.safetensors"))
    assert "Flux" in describe_lora(tmp_path / "flux.safetensors")["other_architecture"]


def test_info_reports_the_steps_a_save_every_lora_was_trained_for(tmp_path):
    import json

    from safetensors.torch import save_file

    from egaku.lora.commands import describe_lora, format_lora_description
    from egaku.lora.formats import kohya_metadata

    # train-lora --max-steps 4 --save-every 2 writes OUT/steps/NAME-step000002/ in both layouts
    folder = tmp_path / "steps" / "run-step000002"
    folder.mkdir(parents=True)
    (folder / "training_config.json").write_text(json.dumps({"max_steps": 4, "learning_rate": 1e-4}))
    pairs, _ = peft_pairs(_diffusers_lora())
    save_file(peft_to_kohya(pairs, dict.fromkeys(pairs, 4.0)), str(folder / "run-step000002.safetensors"),
              metadata=kohya_metadata(ss_steps=2, ss_max_train_steps=4))
    kohya = describe_lora(folder / "run-step000002.safetensors")["training"]
    assert (kohya["steps"], kohya["planned steps"]) == (2, 4)
    save_file(_diffusers_lora(), str(folder / "pytorch_lora_weights.safetensors"))
    diffusers = describe_lora(folder / "pytorch_lora_weights.safetensors")
    assert (diffusers["training"]["steps"], diffusers["training"]["planned steps"]) == (2, 4)
    assert "steps 2, " in format_lora_description(diffusers)
    # a finished run's file shows the one number
    (folder / "run-step000002.safetensors").unlink()
    save_file(_diffusers_lora(), str(tmp_path / "pytorch_lora_weights.safetensors"))
    (tmp_path / "training_config.json").write_text(json.dumps({"max_steps": 4}))
    assert describe_lora(tmp_path / "pytorch_lora_weights.safetensors")["training"] == {"steps": 4}


def test_info_reads_the_step_from_a_diffusers_files_own_header(tmp_path):
    """train-lora records the step in the diffusers file's header too (finish_diffusers_file with steps_metadata, as
    in the kohya file): info shows it wherever the file is, before the --save-every folder's name."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from egaku.lora.commands import describe_lora
    from egaku.lora.formats import finish_diffusers_file, kohya_metadata, steps_metadata

    assert steps_metadata(2, 4) == {"ss_steps": 2, "ss_max_train_steps": 4}
    assert steps_metadata(0, 4) == {"ss_steps": 4, "ss_max_train_steps": 4}  # step 0: the run's end
    assert kohya_metadata(**steps_metadata(2, 4))["ss_steps"] == "2"  # one source for both layouts
    # a --save-every file taken out of its steps/NAME-step000002 folder, beside its run's training_config.json
    (tmp_path / "training_config.json").write_text(json.dumps({"max_steps": 4, "learning_rate": 1e-4}))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = _diffusers_lora()
    save_file(lora, str(path), metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    assert describe_lora(path)["training"]["steps"] == 4  # written before: the config's planned total
    finish_diffusers_file(path, **steps_metadata(2, 4))
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "lora_adapter_metadata": "{}", "ss_steps": "2",
                                 "ss_max_train_steps": "4"}
        assert {k: fh.get_tensor(k) for k in fh.keys()}.keys() == lora.keys()
    training = describe_lora(path)["training"]
    assert (training["steps"], training["planned steps"]) == (2, 4)
    # the header wins over a folder name that says another step
    folder = tmp_path / "steps" / "run-step000003"
    folder.mkdir(parents=True)
    (folder / "training_config.json").write_text(json.dumps({"max_steps": 4}))
    path.rename(folder / path.name)
    training = describe_lora(folder / path.name)["training"]
    assert (training["steps"], training["planned steps"]) == (2, 4)
    # a finished run's file: the one number
    finish_diffusers_file(folder / path.name, **steps_metadata(4, 4))
    assert describe_lora(folder / path.name)["training"] == {"steps": 4}


def test_info_gives_the_numbers_of_a_header_as_numbers(tmp_path, capsys):
    """A safetensors header holds strings; `egaku info --json` gives its numbers as numbers, the type the same field
    has when it comes from a training_config.json, and other strings as they are."""
    import json

    from safetensors.torch import save_file

    from egaku.cli import main
    from egaku.lora.commands import describe_lora
    from egaku.lora.formats import kohya_metadata

    pairs, _ = peft_pairs(_diffusers_lora())
    kohya = peft_to_kohya(pairs, dict.fromkeys(pairs, 4.0))
    header = dict(ss_steps=3, ss_learning_rate="1e-4", ss_min_snr_gamma="5.0", ss_seed="-1", ss_clip_skip="None",
                  ss_resolution="(512, 512)", ss_sd_model_name="1234", ss_num_train_images="0.00")
    save_file(kohya, str(tmp_path / "header.safetensors"), metadata=kohya_metadata(**header))
    training = describe_lora(tmp_path / "header.safetensors")["training"]
    assert training == {"base model": "1234", "steps": 3, "learning rate": 1e-4, "resolution": 512,
                        "min-SNR gamma": 5.0, "seed": -1}
    assert type(training["steps"]) is int and type(training["min-SNR gamma"]) is float
    # the same fields from a folder's training_config.json: the same types
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "training_config.json").write_text(json.dumps({"max_steps": 3, "learning_rate": 1e-4, "seed": 7,
                                                             "resolution": 512}))
    save_file(kohya, str(folder / "run.safetensors"))
    from_config = describe_lora(folder / "run.safetensors")["training"]
    assert {k: type(v) for k, v in from_config.items()} == {k: type(training[k]) for k in from_config}
    assert main(["info", str(tmp_path / "header.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["learning rate"] == 1e-4
    assert main(["info", str(tmp_path / "header.safetensors")]) == 0
    assert ("  trained: base model 1234, steps 3, learning rate 0.0001, resolution 512, min-SNR gamma 5.0, "
            "seed -1\n") in capsys.readouterr().out


def test_the_weights_file_of_a_model_is_the_one_diffusers_loads(tmp_path):
    """merge-lora's dtypes and the model hash read the file load_pipeline loads: the plain weights where a folder
    holds .fp16. variants beside them, the variant only where the UNet has no plain weights (and a component
    without one then its plain file), the first shard of sharded weights; a single file's keys of each model."""
    import hashlib
    import json

    from safetensors.torch import save_file

    from egaku.models.loading import ModelInfo, component_weights_file, stored_weights_dtype

    def write(path, dtype):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(2, dtype=dtype)}, str(path))
        return path

    folder = tmp_path / "sd15"
    unet = write(folder / "unet" / "diffusion_pytorch_model.safetensors", torch.float32)
    unet16 = write(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors", torch.float16)
    text = write(folder / "text_encoder" / "model.safetensors", torch.float32)
    write(folder / "text_encoder" / "model.fp16.safetensors", torch.float16)
    vae = write(folder / "vae" / "diffusion_pytorch_model.safetensors", torch.float32)
    info = ModelInfo("sd15", "folder", folder)
    assert [component_weights_file(folder, c) for c in ("unet", "text_encoder", "vae")] == [unet, text, vae]
    assert {c: stored_weights_dtype(info, c) for c in ("unet", "text_encoder", "vae")} == dict.fromkeys(
        ("unet", "text_encoder", "vae"), torch.float32)
    assert stored_weights_dtype(info) == torch.float32  # the UNet's, as before
    assert info.hash == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    # a download limited to *.fp16.safetensors: the variant, and the plain file of a component without one
    unet.unlink()
    assert component_weights_file(folder, "unet") == unet16
    assert component_weights_file(folder, "text_encoder") == folder / "text_encoder" / "model.fp16.safetensors"
    assert component_weights_file(folder, "vae") == vae
    assert ModelInfo("sd15", "folder", folder).hash == hashlib.sha256(unet16.read_bytes()).hexdigest()[:10]
    assert stored_weights_dtype(info, "unet") == torch.float16 and stored_weights_dtype(info, "vae") == torch.float32
    # sharded weights: the first shard of the index
    sharded = tmp_path / "sharded" / "unet"
    first = write(sharded / "diffusion_pytorch_model-00001-of-00002.safetensors", torch.bfloat16)
    write(sharded / "diffusion_pytorch_model-00002-of-00002.safetensors", torch.float32)
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    assert component_weights_file(sharded.parent, "unet") == first
    assert stored_weights_dtype(ModelInfo("s", "folder", sharded.parent)) == torch.bfloat16
    assert component_weights_file(sharded.parent, "vae") is None
    assert stored_weights_dtype(ModelInfo("s", "folder", sharded.parent), "vae") is None
    # a single file: each model's own keys
    single = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.transformer.w": torch.zeros(2, dtype=torch.float32),
               "first_stage_model.decoder.w": torch.zeros(2, dtype=torch.bfloat16),
               "model.diffusion_model.input_blocks.w": torch.zeros(2, dtype=torch.float16)}, str(single))
    one = ModelInfo("model", "single-file", single)
    assert [stored_weights_dtype(one, c) for c in ("unet", "text_encoder", "vae")] == [
        torch.float16, torch.float32, torch.bfloat16]
    assert stored_weights_dtype(ModelInfo("tiny", "tiny", None), "vae") is None
