"""The server and the LoRAs it cannot use: a variation or upscale of an image that records a LoRA the server cannot
apply is refused with a message naming it (was: the image was made without the LoRA, and nothing said so), and
GET /v1/egaku/options lists for each model only the LoRAs it can load, with why the others are left out (was: every
file of the folder, an SDXL LoRA beside an SD 1.x model's)."""

import base64
import io
import json
import shutil

import httpx
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from egaku.errors import EgakuError, NotFoundError
from egaku.server.app import LiveServer, ServeOptions, create_app

FAST = {"steps": 2}
INCOMPATIBLE = {  # file -> what GET /v1/egaku/options says of it, and generation's 400 says too
    "sdxl_style": "is a LoRA for SDXL",
    "other_base": "does not fit this model",
    "matches_nothing": "none of its LoRA keys match a layer of this model",
}


@pytest.fixture(scope="module")
def pipe():
    from egaku.models.loading import load_pipeline

    return load_pipeline("tiny", "cpu", "float32")


@pytest.fixture(scope="module")
def lora_dir(style_lora_dir, tmp_path_factory):
    """The tiny model's "style" LoRA, and beside it LoRAs no served model can load: kohya SDXL keys, the style LoRA
    with a layer of another base's size, keys that name no layer, and a file that is not safetensors."""
    folder = tmp_path_factory.mktemp("server-loras")
    shutil.copy(style_lora_dir / "style.safetensors", folder / "style.safetensors")
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)},
              folder / "sdxl_style.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    style = load_file(folder / "style.safetensors")
    down = next(key for key in sorted(style) if key.endswith("lora.down.weight"))
    style[down] = torch.zeros(style[down].shape[0], style[down].shape[1] + 16)  # a base with wider layers
    save_file(style, folder / "other_base.safetensors")
    save_file({"unet.no_such_block.proj.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.proj.lora_B.weight": torch.zeros(32, 4)}, folder / "matches_nothing.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def http(pipe, lora_dir):
    opts = ServeOptions(model=["tiny"], lora_dir=str(lora_dir), max_side=256)
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


def error_of(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and "Traceback" not in error["message"], error
    return error


def generated(http, **body) -> bytes:
    r = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "32x32", "seed": 1,
                                                  "response_format": "b64_json", **FAST, **body})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def recorded(png: bytes, **changes) -> bytes:
    """``png`` with the parameters its egaku chunk records changed, as an image made elsewhere would record them."""
    image = Image.open(io.BytesIO(png))
    params = {**json.loads(image.text["egaku"]), **changes}
    info = PngImagePlugin.PngInfo()
    info.add_text("egaku", json.dumps(params))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def from_image(http, png: bytes, endpoint: str = "variations", **fields) -> httpx.Response:
    data = {"response_format": "b64_json", **{k: str(v) for k, v in fields.items()}}
    return http.post(f"/v1/images/{endpoint}", files={"image": ("in.png", png, "image/png")},
                     data={"steps": "4", **data})


# -- variations and upscales of an image that records a LoRA the server cannot apply -------------------------------

def test_a_variation_of_an_image_made_with_a_lora_this_server_lacks_is_a_404_naming_it(http, lora_dir):
    source = generated(http, loras=[{"name": "style", "weight": 0.5}])
    entry = {"name": "elsewhere", "weight": 0.5, "hash": "0123456789ab", "from": "option"}
    made_elsewhere = recorded(source, lora_files=[entry], loras=[["elsewhere", 0.5]])
    for endpoint in ("variations", "upscale"):  # every path that reuses the image's settings
        error = error_of(from_image(http, made_elsewhere, endpoint), 404, "image")
        message = error["message"]
        assert message.startswith("the image was made with the LoRA 'elsewhere' (weight 0.5), which is not in this "
                                  "server's LoRA folder"), message
        assert "add it to that folder, or send 'loras' (the LoRAs to use instead, or [] for none) to go on without it" \
            in message, message
        assert "available: " in message and str(lora_dir) not in message, message  # what the folder has; no path
    # the request's own 'loras' replaces the image's: none, or others
    r = from_image(http, made_elsewhere, loras="[]")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["egaku"]["loras"] == []
    r = from_image(http, made_elsewhere, loras=json.dumps([{"name": "style", "weight": 0.25}]))
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["egaku"]["loras"] == [["style", 0.25]]


def test_a_prompt_tag_of_a_lora_this_server_lacks_is_a_404_until_the_request_gives_a_prompt(http, lora_dir):
    source = generated(http)
    tagged = recorded(source, prompt="a cat <lora:gone:0.8>, red")
    for endpoint in ("variations", "upscale"):
        error = error_of(from_image(http, tagged, endpoint), 404, "image")
        assert error["message"].startswith("the image's prompt uses the LoRA 'gone' (<lora:gone:0.8>), which is not in "
                                           "this server's LoRA folder"), error
        assert "send a 'prompt' (the image's without the tag, say) to go on without it" in error["message"], error
        assert str(lora_dir) not in error["message"]
    r = from_image(http, tagged, prompt="a cat, red")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] == "a cat, red"
    # a tag that names no LoRA (no name) is no LoRA left out: it goes, as a request's own would be refused for it
    r = from_image(http, recorded(source, prompt="a cat <lora::1>"))
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] == "a cat"


def test_a_lora_of_that_name_but_another_file_is_a_400_that_says_how_to_use_the_servers(http):
    source = generated(http, loras=[{"name": "style", "weight": 0.5}])
    params = json.loads(Image.open(io.BytesIO(source)).text["egaku"])
    [entry] = params["lora_files"]
    changed = recorded(source, lora_files=[{**entry, "hash": "000000000000"}])
    error = error_of(from_image(http, changed), 400, "image")
    assert error["message"] == (
        f"the image was made with the LoRA 'style' (weight 0.5), whose file had the hash 000000000000; the file of "
        f"that name in this server's LoRA folder is another one (hash {entry['hash']}), so the image would not be "
        "made again as it was: send 'loras' to choose ([{\"name\": \"style\", \"weight\": 0.5}] uses the folder's "
        "file, [] none)")
    assert error["code"] == "invalid_value"
    r = from_image(http, changed, loras=json.dumps([{"name": "style", "weight": 0.5}]))
    assert r.status_code == 200 and r.json()["data"][0]["egaku"]["loras"] == [["style", 0.5]]


def test_a_lora_the_server_has_is_still_reused_by_field_and_by_tag(http):
    import numpy as np

    by_field = generated(http, loras=[{"name": "style", "weight": 0.7}])
    r = from_image(http, by_field, seed=5)
    assert r.status_code == 200, r.text
    used = r.json()["data"][0]["egaku"]
    assert used["loras"] == [["style", 0.7]] and [f["name"] for f in used["lora_files"]] == ["style"]
    without = from_image(http, by_field, seed=5, loras="[]")
    assert without.status_code == 200, without.text

    def pixels(response):
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    assert np.abs(pixels(r) - pixels(without)).mean() > 0.5  # the LoRA is applied, not only recorded
    by_tag = generated(http, prompt="a cat <lora:style:0.6>")
    for endpoint in ("variations", "upscale"):
        r = from_image(http, by_tag, endpoint)
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["egaku"]["loras"] == [["style", 0.6]]


def test_a_server_without_a_lora_folder_refuses_an_image_made_with_a_lora(http, pipe):
    source = generated(http, prompt="a cat <lora:style:1>", loras=[{"name": "style", "weight": 0.5}])
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as bare:
        error = error_of(from_image(bare, source), 404, "image")
        assert error["message"].startswith("the image's prompt uses the LoRA 'style' (<lora:style:1>), and this server "
                                           "has no LoRA folder to find it in (its operator can give one: egaku serve "
                                           "--lora-dir DIR)"), error
        error = error_of(from_image(bare, source, prompt="a cat"), 404, "image")  # the option's LoRA, next
        assert error["message"].startswith("the image was made with the LoRA 'style' (weight 0.5), and this server has "
                                           "no LoRA folder"), error
        r = from_image(bare, source, prompt="a cat", loras="[]")
        assert r.status_code == 200 and r.json()["data"][0]["egaku"]["loras"] == []


def test_a_recorded_name_that_fits_two_files_names_them(pipe, lora_dir):
    from egaku.server.requests import Limits, parse_image_request, reused_settings, unusable_stored_loras

    limits = Limits(lora_dir=str(lora_dir))
    stored = {"prompt": "a cat", "lora_files": [{"name": "style", "weight": 1.0, "from": "option"}]}
    image = Image.new("RGB", (32, 32))
    (lora_dir / "sub").mkdir()
    try:
        shutil.copy(lora_dir / "style.safetensors", lora_dir / "sub" / "style.safetensors")
        unusable = unusable_stored_loras(stored, pipe, limits)
        assert set(unusable) == {"loras"} and unusable["loras"].status == 400
        assert "fits 2 files" in str(unusable["loras"]) and "./style or sub/style" in str(unusable["loras"])
        assert "loras" not in reused_settings(stored, pipe, limits)  # (what is reused is unchanged)
        with pytest.raises(EgakuError, match="the image was made with the LoRA 'style'") as info:
            parse_image_request("variation", {}, pipe, limits, form=True, image=image, stored=stored)
        assert info.value.param == "image"
        req = parse_image_request("variation", {"loras": '[{"name": "./style"}]'}, pipe, limits, form=True,
                                  image=image, stored=stored)
        assert req.options["lora"] == [f"{lora_dir / 'style.safetensors'}:1.0"]
    finally:
        shutil.rmtree(lora_dir / "sub")
    # a generation's request never reads an image's settings
    assert unusable_stored_loras(None, pipe, limits) == {}
    with pytest.raises(NotFoundError):
        parse_image_request("upscale", {}, pipe, Limits(), form=True, image=image, stored=stored)


# -- GET /v1/egaku/options: only the LoRAs each model can load ------------------------------------------------------

def test_options_list_only_the_loras_the_model_can_load_and_say_why_not_the_others(http, lora_dir):
    options = http.get("/v1/egaku/options").json()
    assert options["loras"] == ["style"]  # (was: every file of the folder)
    assert options["model_loras"] == {"tiny": ["style"]}
    unusable = options["unusable_loras"]["tiny"]
    assert set(unusable) == {*INCOMPATIBLE, "broken"}
    for name, said in INCOMPATIBLE.items():
        assert unusable[name].startswith(f"{name}.safetensors") and said in unusable[name], unusable[name]
    assert unusable["broken"].startswith("broken.safetensors: not a readable safetensors file"), unusable["broken"]
    assert not any(str(lora_dir) in why for why in unusable.values())
    assert options["models"][0]["id"] == "tiny" and "loras" not in options["models"][0]  # (its fields as they were)
    # what is left out is what generation refuses, for the reason given; what is listed loads
    for name, said in {**INCOMPATIBLE, "broken": "not a readable safetensors file"}.items():
        r = http.post("/v1/images/generations", json={"prompt": "a cat", "loras": [{"name": name}], **FAST})
        assert said in error_of(r, 400, "lora")["message"], name
    generated(http, loras=[{"name": "style", "weight": 1.0}])


def test_options_check_each_lora_once_from_its_header_without_reading_its_weights(pipe, lora_dir, monkeypatch):
    import egaku.lora.formats
    import egaku.server.app as app_module
    import safetensors.torch

    def no_weights(*args, **kwargs):
        raise AssertionError("the options request read a LoRA's weights")

    checked = []
    real = app_module._lora_problem

    def counted(path, shown, modules):
        checked.append(shown)
        return real(path, shown, modules)

    monkeypatch.setattr(app_module, "_lora_problem", counted)
    opts = ServeOptions(model=["tiny"], lora_dir=str(lora_dir))
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        with monkeypatch.context() as reading:
            for module in (safetensors.torch, egaku.lora.formats):
                reading.setattr(module, "load_file", no_weights)
            first = client.get("/v1/egaku/options")
            assert first.status_code == 200, first.text
        assert first.json()["loras"] == ["style"]  # (read, a LoRA's weights would have failed it)
        assert sorted(checked) == sorted(f"{name}.safetensors" for name in [*INCOMPATIBLE, "broken", "style"])
        checked.clear()
        assert client.get("/v1/egaku/options").json() == first.json()
        assert checked == []  # the same files: nothing read again
        try:  # a file written again is checked again: now a LoRA that fits
            shutil.copy(lora_dir / "style.safetensors", lora_dir / "matches_nothing.safetensors")
            options = client.get("/v1/egaku/options").json()
            assert checked == ["matches_nothing.safetensors"]
            assert options["loras"] == ["matches_nothing", "style"]
            assert "matches_nothing" not in options["unusable_loras"]["tiny"]
        finally:
            save_file({"unet.no_such_block.proj.lora_A.weight": torch.zeros(4, 32),
                       "unet.no_such_block.proj.lora_B.weight": torch.zeros(32, 4)},
                      lora_dir / "matches_nothing.safetensors")


def test_options_list_each_models_own_loras(pipe, lora_dir):
    """The built-in model is another base than the tiny one (other layers): the tiny model's LoRA is offered for the
    tiny model only, and the top-level list is the default model's, as "samplers" and "embeddings" are."""
    from egaku.models.loading import load_pipeline

    builtin = load_pipeline("builtin", "cpu", "float32")
    opts = ServeOptions(model=["builtin", "tiny"], lora_dir=str(lora_dir))
    with LiveServer(create_app({"builtin": builtin, "tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        options = client.get("/v1/egaku/options").json()
        assert options["model_loras"] == {"builtin": [], "tiny": ["style"]}
        assert options["loras"] == []
        why = options["unusable_loras"]["builtin"]["style"]
        assert why.startswith("style.safetensors: 16 LoRA layers match nothing in this model") and \
            why.endswith("it was trained on a different base model"), why
        assert set(options["unusable_loras"]["builtin"]) == {*INCOMPATIBLE, "broken", "style"}
        r = client.post("/v1/images/generations", json={"prompt": "a cat", "model": "builtin", "size": "32x32",
                                                         "loras": [{"name": "style"}], **FAST})
        assert "it was trained on a different base model" in error_of(r, 400, "lora")["message"]


def test_options_without_a_lora_folder_list_none(pipe):
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        options = client.get("/v1/egaku/options").json()
        assert (options["loras"], options["model_loras"], options["unusable_loras"]) == ([], {"tiny": []}, {"tiny": {}})
