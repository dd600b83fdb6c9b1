"""Loading LoRA files into the tiny pipeline: files egaku does not load are named for what they are, one file
given twice is said, and several adapters load without peft's warning about several adapters."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from egaku.errors import EgakuError
from egaku.lora.apply import apply_loras, remove_loras
from egaku.lora.commands import describe_lora
from egaku.lora.formats import adaptable_modules, canonical_module


@pytest.fixture(scope="module")
def pipe():
    from egaku.models.tiny import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def layer(pipe) -> tuple[str, torch.nn.Linear]:
    """(kohya name, module) of one attention projection of the tiny UNet."""
    name, module = next((n, m) for n, m in adaptable_modules(pipe).items() if n.endswith("attn1.to_k"))
    return "lora_unet_" + name.split(".", 1)[1].replace(".", "_"), module


def kohya_lora(path, layer, seed=0):
    key, module = layer
    generator = torch.Generator().manual_seed(seed)
    save_file({f"{key}.lora_down.weight": torch.randn(4, module.in_features, generator=generator),
               f"{key}.lora_up.weight": torch.randn(module.out_features, 4, generator=generator),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    return path


LYCORIS = {
    "LoHa": lambda i, o: {"hada_w1_a": torch.randn(o, 4), "hada_w1_b": torch.randn(4, i),
                          "hada_w2_a": torch.randn(o, 4), "hada_w2_b": torch.randn(4, i), "alpha": torch.tensor(4.0)},
    "LoKr": lambda i, o: {"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(o // 2, i // 2),
                          "alpha": torch.tensor(4.0)},
}


@pytest.mark.parametrize("kind", sorted(LYCORIS))
def test_lycoris_loha_and_lokr_files_are_named_as_such(pipe, layer, tmp_path, kind):
    key, module = layer
    path = tmp_path / f"{kind}.safetensors"
    save_file({f"{key}.{part}": t for part, t in LYCORIS[kind](module.in_features, module.out_features).items()},
              str(path))
    expected = f"is a LyCORIS {kind} file: LyCORIS LoHa/LoKr files are not supported \\(only LoRA: lora_down/lora_up"
    with pytest.raises(EgakuError, match=expected) as err:
        apply_loras(pipe, [(path, 1.0)])
    assert err.value.param == "lora" and "match a layer" not in str(err.value)
    with pytest.raises(EgakuError, match=expected):  # egaku info
        describe_lora(path)
    # a file with LoRA layers and LoHa layers is refused too: loading only its LoRA half would be a different LoRA
    mixed = tmp_path / "mixed.safetensors"
    save_file({**load(kohya_lora(tmp_path / "plain.safetensors", layer)), **load(path)}, str(mixed))
    with pytest.raises(EgakuError, match=f"LyCORIS {kind} file"):
        apply_loras(pipe, [(mixed, 1.0)])
    assert not pipe.get_list_adapters().get("unet")
    # named by A1111's <lyco:...> tag (which egaku reads as <lora:...>), the file is refused the same way
    from egaku.inference.generate import generate

    with pytest.raises(EgakuError, match=expected):
        generate(pipe, f"a cat <lyco:{kind}:1>", lora_dir=str(tmp_path), steps=1, progress=False)
    assert not pipe.get_list_adapters().get("unet")


def load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_one_file_given_twice_is_applied_twice_and_said(pipe, layer, tmp_path, capsys):
    first = kohya_lora(tmp_path / "style.safetensors", layer)
    other = kohya_lora(tmp_path / "other.safetensors", layer, seed=1)
    link = tmp_path / "link.safetensors"
    link.symlink_to(first)
    capsys.readouterr()
    try:
        names = apply_loras(pipe, [(first, 0.5), (other, 1.0), (tmp_path / "." / "style.safetensors", 0.8)])
        assert len(names) == 3  # stacked, as A1111 stacks them
    finally:
        remove_loras(pipe)
    assert capsys.readouterr().out == "egaku: style is applied twice (weights add up: 0.5 + 0.8 = 1.3)\n"
    try:
        apply_loras(pipe, [(first, 1.0), (link, 1.0), (first, 1.0)])  # a link to the file is the same file
    finally:
        remove_loras(pipe)
    assert capsys.readouterr().out == "egaku: style is applied 3 times (weights add up: 1 + 1 + 1 = 3)\n"
    try:
        apply_loras(pipe, [(first, 1.0), (other, 1.0)])
    finally:
        remove_loras(pipe)
    assert capsys.readouterr().out == ""


def test_a_weight_per_component_scales_the_text_encoder_and_the_unet_apart(pipe, layer, tmp_path, capsys):
    """{"text_encoder": 0.8, "unet": 0.5} (a <lora:name:0.8:0.5> tag) gives the text encoder's output of weight 0.8
    and the UNet's of weight 0.5, through diffusers' set_adapters per component."""
    te_name, te_module = next((n, m) for n, m in adaptable_modules(pipe).items() if n.endswith("self_attn.q_proj"))
    te_key = "lora_te_text_model_" + te_name.split(".", 1)[1].replace(".", "_")  # (kohya names the CLIP text model)
    generator = torch.Generator().manual_seed(2)
    both = tmp_path / "both.safetensors"
    save_file({**load(kohya_lora(tmp_path / "unet.safetensors", layer)),
               f"{te_key}.lora_down.weight": torch.randn(4, te_module.in_features, generator=generator),
               f"{te_key}.lora_up.weight": torch.randn(te_module.out_features, 4, generator=generator),
               f"{te_key}.alpha": torch.tensor(4.0)}, str(both))
    ids = pipe.tokenizer(["a red star"], padding="max_length", return_tensors="pt").input_ids
    config = pipe.unet.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, ids.shape[1], config.cross_attention_dim, generator=generator)

    def outputs(weight):
        try:
            apply_loras(pipe, [(both, weight)])
            with torch.no_grad():
                return pipe.text_encoder(ids)[0], pipe.unet(latents, 10, context).sample
        finally:
            remove_loras(pipe)

    (te8, unet8), (te5, unet5) = outputs(0.8), outputs(0.5)
    te, unet = outputs({"text_encoder": 0.8, "unet": 0.5})
    assert not torch.allclose(te8, te5) and not torch.allclose(unet8, unet5)  # each part changes with its weight
    assert torch.allclose(te, te8, atol=1e-6) and torch.allclose(unet, unet5, atol=1e-6)
    te, unet = outputs({"unet": 0.5})  # a part left out is 1.0, as in set_adapters
    assert torch.allclose(te, outputs(1.0)[0], atol=1e-6) and torch.allclose(unet, unet5, atol=1e-6)
    # one file twice adds up each part's weights, and says so
    capsys.readouterr()
    try:
        apply_loras(pipe, [(both, {"text_encoder": 0.8, "unet": 0.5}), (both, 0.5)])
    finally:
        remove_loras(pipe)
    assert capsys.readouterr().out == \
        "egaku: both is applied twice (weights add up: text encoder 0.8 + 0.5 = 1.3, UNet 0.5 + 0.5 = 1)\n"
    with pytest.raises(EgakuError, match="a LoRA weight's parts are 'text_encoder' and 'unet'; got \\['te'\\]"):
        apply_loras(pipe, [(both, {"te": 0.8})])
    assert not pipe.get_list_adapters().get("unet")


def test_several_adapters_load_without_peft_warning_about_several_adapters(pipe, layer, tmp_path):
    files = [kohya_lora(tmp_path / "a.safetensors", layer), kohya_lora(tmp_path / "b.safetensors", layer, seed=1)]
    # one with a text-encoder layer too (diffusers layout), which egaku injects with peft itself
    name, module = next((n, m) for n, m in adaptable_modules(pipe).items() if n.endswith("self_attn.q_proj"))
    key = "text_encoder." + canonical_module("text_encoder", name.split(".", 1)[1])
    save_file({f"{key}.lora_A.weight": torch.randn(2, module.in_features),
               f"{key}.lora_B.weight": torch.randn(module.out_features, 2)}, str(tmp_path / "te.safetensors"))
    files += [tmp_path / "te.safetensors", tmp_path / "te.safetensors"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            apply_loras(pipe, [(f, 0.5) for f in files])
            assert {len(v) for v in pipe.get_list_adapters().values()} == {2}
        finally:
            remove_loras(pipe)
        warnings.warn("another warning still shows", UserWarning)
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "peft_config" in m]
    assert "another warning still shows" in shown


def hub_cache(monkeypatch, root, repo_id: str, files: dict) -> None:
    """A Hugging Face hub cache under ``root`` holding ``files`` (name -> source path) of ``repo_id`` at one
    commit, laid out as huggingface_hub lays out what it downloaded, which it then reads without a network."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything not in the cache must fail here, not go to the network


def test_hub_lora_ids_load_from_the_hub_cache(pipe, layer, tmp_path, monkeypatch):
    from egaku.errors import NotFoundError
    from egaku.lora.apply import resolve_lora

    local = kohya_lora(tmp_path / "star.safetensors", layer)
    other = kohya_lora(tmp_path / "other.safetensors", layer, seed=1)
    hub_cache(monkeypatch, tmp_path / "hub", "someone/star-lora", {"pytorch_lora_weights.safetensors": local})
    hub_cache(monkeypatch, tmp_path / "hub", "someone/one-file", {"star_v2.safetensors": local, "README.md": local})
    hub_cache(monkeypatch, tmp_path / "hub", "someone/two-files",
              {"star.safetensors": local, "other.safetensors": other, "old/star.safetensors": other})
    monkeypatch.chdir(tmp_path)  # hub ids are read as such only where no local path has that name

    found = resolve_lora("someone/star-lora", None)
    assert found.name == "pytorch_lora_weights.safetensors" and found.read_bytes() == local.read_bytes()
    assert resolve_lora("someone/one-file", None).name == "star_v2.safetensors"  # the only .safetensors file
    with pytest.raises(EgakuError, match=r"holds 2 .safetensors files \(other.safetensors, star.safetensors\); "
                                         r"say which: someone/two-files/other.safetensors"):
        resolve_lora("someone/two-files", None)
    assert resolve_lora("someone/two-files/old/star.safetensors", None).read_bytes() == other.read_bytes()
    with pytest.raises(NotFoundError, match="'someone/absent' is not a local file or folder, nor in the hub cache, "
                                            "and the hub cannot be reached"):
        resolve_lora("someone/absent", None)
    with pytest.raises(NotFoundError, match="nor in the hub cache"):
        resolve_lora("someone/star-lora/absent.safetensors", None)
    (tmp_path / "someone").mkdir()  # a local folder of that name wins, as with --model
    (tmp_path / "someone" / "star-lora.safetensors").write_bytes(other.read_bytes())
    local_file = tmp_path / "someone" / "star-lora.safetensors"
    assert resolve_lora("someone/star-lora.safetensors", None).resolve() == local_file
    with pytest.raises(NotFoundError, match="does not exist"):  # a relative path is never a hub id
        resolve_lora("./someone/star-lora", None)
    for missing in ("old/my--lora", "ab/c..d", "loras/x.safetensors"):  # no repository is named so: a missing path
        with pytest.raises(NotFoundError, match=f"LoRA '{missing}' does not exist"):
            resolve_lora(missing, None)

    # the hub file applies as the local one does
    images = []
    for path in (local, resolve_lora("someone/star-lora", None)):
        try:
            apply_loras(pipe, [(path, 1.0)])
            images.append(pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                               output_type="np").images)
        finally:
            remove_loras(pipe)
    assert (images[0] == images[1]).all()


# ---- DoRA with a text encoder: what train-lora --dora --train-text-encoder writes ---------------------------

def _dora_model(model_dir):
    """The tiny pipeline with DoRA adapters on the UNet's and text encoder's attention, as train-lora adds them,
    moved away from their start (B != 0, magnitudes off the base's norms) as training moves them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, use_dora=True, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, use_dora=True, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.normal_(0, 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    return pipe


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder output of a prompt, UNet output on fixed inputs) of a pipeline."""
    ids = pipe.tokenizer(["a photo of red star"], padding="max_length", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=generator)
    states = torch.randn(1, ids.shape[1], pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(latents, 10, states).sample


def _save_as_train_lora(pipe, folder):
    """What train-lora's save_lora hands diffusers (text-encoder keys under text_model.): the file as diffusers'
    save_lora_weights writes it, before finish_diffusers_file."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers={canonical_module("text_encoder", k): v
                                  for k, v in get_peft_model_state_dict(pipe.text_encoder).items()},
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_a_dora_file_with_a_text_encoder_loads_in_plain_diffusers_as_in_egaku(tiny_model_dir, tmp_path):
    """transformers drops a text encoder's bare ``lora_magnitude_vector`` keys: the file egaku writes names them
    ``lora_magnitude_vector.weight``, so plain diffusers' load_lora_weights and egaku's apply_loras both give the
    trained model's text encoder and UNet; a file written before (bare keys) still loads in egaku."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from egaku.lora.formats import finish_diffusers_file, steps_metadata

    trained = _dora_model(tiny_model_dir)
    trained_text, trained_unet = _outputs(trained)
    old_file = _save_as_train_lora(trained, tmp_path / "old")
    new_file = _save_as_train_lora(trained, tmp_path / "new")
    finish_diffusers_file(new_file, **steps_metadata(2, 4))

    old, new = load_file(old_file), load_file(new_file)
    assert len(old) == len(new)
    magnitudes = [k for k in new if "lora_magnitude_vector" in k]
    assert {k.split(".")[0] for k in magnitudes} == {"unet", "text_encoder"}
    for key in magnitudes:  # the UNet's keep peft's spelling, which diffusers' UNet path loads
        assert key.endswith(".weight") == key.startswith("text_encoder."), key
        assert torch.equal(new[key], old[key.removesuffix(".weight")])
    with safe_open(str(new_file), framework="pt") as fh, safe_open(str(old_file), framework="pt") as before:
        header = fh.metadata()
        assert header["lora_adapter_metadata"] == before.metadata()["lora_adapter_metadata"]
    assert (header["ss_steps"], header["ss_max_train_steps"]) == ("2", "4")

    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    base_text, base_unet = _outputs(base)
    assert (trained_text - base_text).abs().max() > 0.1 and (trained_unet - base_unet).abs().max() > 0.01
    base.load_lora_weights(str(tmp_path / "new"))  # plain diffusers, as any diffusers user loads the folder
    diffusers_text, diffusers_unet = _outputs(base)
    torch.testing.assert_close(diffusers_text, trained_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusers_unet, trained_unet, atol=1e-5, rtol=1e-5)
    for file in (new_file, old_file):
        ours = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                       requires_safety_checker=False)
        apply_loras(ours, [(file, 1.0)])
        ours_text, ours_unet = _outputs(ours)
        torch.testing.assert_close(ours_text, trained_text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_unet, trained_unet, atol=1e-5, rtol=1e-5)
        assert describe_lora(file)["adapter"] == "DoRA"
