"""A prompt tag's LoRA is recorded by the name it was looked up by: a name in a sub-folder keeps its folder, so that
the recorded tags and loras find the same file again where another file shares its base name."""

from __future__ import annotations

import shutil

import egaku


def test_a_tags_lora_is_recorded_by_the_name_it_was_found_by(tmp_path, style_lora_dir, tiny_model_dir):
    loras = tmp_path / "loras"
    for folder in ("styles", "other"):
        (loras / folder).mkdir(parents=True)
        shutil.copy(style_lora_dir / "style.safetensors", loras / folder / "ink.safetensors")
    pipe = egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")
    image = egaku.generate(pipe, "a red star <lora:styles/ink:0.7>", steps=1, lora_dir=str(loras))[0]
    assert image.params["loras"] == [("styles/ink", 0.7)]
    assert [f["name"] for f in image.params["lora_files"]] == ["styles/ink"]
    assert str(image.params["lora_files"][0]["path"]).endswith("styles/ink.safetensors")
