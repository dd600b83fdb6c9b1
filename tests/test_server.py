"""The images API against a live server on 127.0.0.1 with the tiny pipeline: the official `openai`
client, every bad input, auth, the queue (429, cancellation), and 500s without tracebacks."""

import base64
import io
import json
import os
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from egaku.errors import EgakuError
from egaku.server.app import LiveServer, ServeOptions, create_app
from egaku.server.queue import ModelWorker

FAST = {"steps": 2}  # the tiny pipeline's images are noise anyway; 2 steps exercise every code path


@pytest.fixture(scope="module")
def pipe():
    from egaku.models.loading import load_pipeline

    return load_pipeline("tiny", "cpu", "float32")


@pytest.fixture(scope="module")
def lora_dir(style_lora_dir):
    return style_lora_dir


@pytest.fixture(scope="module")
def server(pipe, lora_dir):
    opts = ServeOptions(model=["tiny"], lora_dir=str(lora_dir), max_upload_mb=0.25, max_side=256,
                        max_upload_pixels=1024 * 1024)
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png(size=(64, 64), color=(200, 40, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(http) -> None:
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/images/generations", json={"prompt": "a cat", "response_format": "b64_json", **FAST})
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).size == (64, 64)


# -- the official client -----------------------------------------------------------------------------------

def test_openai_generate_b64(openai_client):
    result = openai_client.images.generate(prompt="a red circle", n=2, size="64x32", response_format="b64_json",
                                           extra_body={**FAST, "seed": 4})
    assert len(result.data) == 2
    assert [decode(d.b64_json).size for d in result.data] == [(64, 32), (64, 32)]
    assert result.data[0].revised_prompt == "a red circle"
    # the parameters that regenerate each image travel with it (extension field) and inside the PNG
    assert [d.model_extra["egaku"]["seed"] for d in result.data] == [4, 5]
    assert result.data[0].model_extra["egaku"]["guidance_scale"] == 7.5  # not given: the model's default
    assert json.loads(decode(result.data[1].b64_json).text["egaku"])["seed"] == 5


def test_openai_generate_url_is_served_and_expires(openai_client, http):
    result = openai_client.images.generate(prompt="a blue square", model="tiny", size="32x32", extra_body=FAST)
    url = result.data[0].url
    assert url.startswith(str(http.base_url).rstrip("/") + "/v1/files/")
    image = Image.open(io.BytesIO(httpx.get(url).content))
    assert image.size == (32, 32)
    assert_openai_error(http.get("/v1/files/not-a-token.png"), 404)


def test_openai_edit_and_inpaint(openai_client):
    image = ("in.png", png((64, 64)), "image/png")
    edited = openai_client.images.edit(image=image, prompt="a green tree", size="64x64",
                                       response_format="b64_json", extra_body=FAST)
    assert decode(edited.data[0].b64_json).size == (64, 64)
    # OpenAI masks: fully transparent pixels are the part to repaint
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    inpainted = openai_client.images.edit(image=image, mask=("mask.png", buffer.getvalue(), "image/png"),
                                          prompt="a star", n=2, response_format="b64_json", extra_body=FAST)
    assert [decode(d.b64_json).size for d in inpainted.data] == [(64, 64), (64, 64)]
    assert inpainted.data[0].model_extra["egaku"]["mask"] == "mask"


def test_openai_variation_reuses_the_stored_prompt_and_settings(openai_client):
    settings = {"negative_prompt": "blurry", "guidance_scale": 4.5, "sampler": "euler", "clip_skip": 2,
                "loras": [{"name": "style", "weight": 0.7}]}
    source = openai_client.images.generate(prompt="a yellow bird", size="48x64", response_format="b64_json",
                                           extra_body={**FAST, **settings})
    image = ("src.png", base64.b64decode(source.data[0].b64_json), "image/png")
    result = openai_client.images.create_variation(image=image, n=2, response_format="b64_json",
                                                   extra_body={"steps": 4})
    # no size: the image's 3:4 shape at the model's native pixel count (64x64 for tiny), as the CLI's img2img
    assert [decode(d.b64_json).size for d in result.data] == [(56, 72), (56, 72)]
    assert result.data[0].revised_prompt == "a yellow bird"
    used = result.data[0].model_extra["egaku"]
    assert used["strength"] == 0.6 and used["steps"] == 4
    assert (used["negative_prompt"], used["guidance_scale"], used["sampler"], used["clip_skip"]) == \
        ("blurry", 4.5, "euler", 2)
    assert used["loras"] == [["style", 0.7]]
    # what the request gives wins over what the image recorded; an empty list clears the LoRAs
    result = openai_client.images.create_variation(image=image, n=1, response_format="b64_json",
                                                   extra_body={**FAST, "guidance_scale": 6, "negative_prompt": "",
                                                               "loras": "[]"})
    used = result.data[0].model_extra["egaku"]
    assert (used["guidance_scale"], used["negative_prompt"], used["loras"], used["sampler"]) == (6.0, "", [], "euler")


def test_variation_settings_from_an_image_are_checked_like_request_fields(pipe, lora_dir):
    from egaku.server.requests import Limits, reused_settings

    limits = Limits(max_steps=50, lora_dir=str(lora_dir))
    stored = {"prompt": "a cat", "negative_prompt": 7, "steps": 9999, "guidance_scale": float("nan"),
              "sampler": "warp drive", "clip_skip": 2,
              "lora_files": [{"name": "style", "weight": 0.5, "hash": "000000000000", "from": "option"},
                             {"name": "elsewhere", "weight": 1.0, "from": "option"},
                             {"name": "style", "weight": 0.25, "from": "prompt"}]}
    # out of limits, wrong types, an unknown sampler, a LoRA that is another file or not here: left out (a dict
    # without egaku's version is read as A1111's text: its emphasis is A1111's default)
    assert reused_settings(stored, pipe, limits) == {"prompt": "a cat", "clip_skip": 2, "emphasis": "original"}
    stored["lora_files"][0]["hash"] = None
    assert reused_settings(stored, pipe, limits)["loras"] == [("style", 0.5)]
    # A1111's text chunk, read as generate --from reads it
    from egaku.inference.metadata import parse_a1111

    a1111 = parse_a1111("a dog\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 6, "
                        "Seed: 1, Size: 64x64")
    assert reused_settings(a1111, pipe, limits) == {"prompt": "a dog", "negative_prompt": "ugly", "steps": 20,
                                                    "guidance_scale": 6.0, "sampler": "dpmpp-2m-karras",
                                                    "emphasis": "original"}
    # what this server would refuse in the prompt is left out: LoRAs it lacks, parameters it does not know
    stored = {"prompt": "a cat <lora:someone_else:0.8>, <lora:style:0.5> <lora:style:x> --ar 2:3 --v 6"}
    assert reused_settings(stored, pipe, limits)["prompt"] == "a cat , <lora:style:0.5>"
    assert reused_settings({"prompt": "a cat <lora:style> --ar 2:3"}, pipe, Limits())["prompt"] == "a cat --ar 2:3"
    stored = {"prompt": "a cat <lyco:someone_else:0.8>, <lyco:style:0.5>"}  # A1111's alias, read the same
    assert reused_settings(stored, pipe, limits)["prompt"] == "a cat , <lyco:style:0.5>"
    # A1111's two weights are kept; a tag without a name (A1111 writes the prompt as typed) is left out, as the
    # request would be refused for it (was: kept, and the variation refused)
    stored = {"prompt": "a cat <lora::1>, <lora:>, <lora:style:0.8:0.5> <lora:style:0.8:x>"}
    assert reused_settings(stored, pipe, limits)["prompt"] == "a cat , , <lora:style:0.8:0.5>"


def test_a_stored_sampler_the_model_refuses_is_left_to_the_default_and_a_requested_one_is_a_400(pipe):
    """A variation or upscale of an image made with LMS on another model, on the built-in zero-terminal-SNR model
    (which refuses LMS, Heun and PLMS), runs with the default sampler, as any stored value the server cannot use
    does; a sampler the request itself names that the model refuses is a 400 when the request is read, before it
    is queued. (Was: both a 400 from the job, so the image could not be varied without naming a sampler.)"""
    from egaku.inference.generate import generate
    from egaku.inference.samplers import DEFAULT_SAMPLER, usable_samplers
    from egaku.models.loading import load_pipeline
    from egaku.server.app import png_bytes
    from egaku.server.requests import Limits, parse_image_request, reused_settings

    builtin = load_pipeline("builtin", "cpu", "float32")
    made = generate(pipe, "a red circle", sampler="lms", steps=2, seed=1, width=32, height=32)[0]
    assert made.params["sampler"] == "lms"
    image = Image.new("RGB", (32, 32))
    stored = {"prompt": "a red circle", "sampler": "LMS", "steps": 4}
    assert reused_settings(stored, pipe, Limits())["sampler"] == "lms"  # a model that takes it keeps it
    assert "sampler" not in reused_settings(stored, builtin, Limits())
    for kind in ("variation", "upscale"):
        req = parse_image_request(kind, {}, builtin, Limits(), form=True, image=image, stored=stored)
        assert req.options["sampler"] == DEFAULT_SAMPLER and req.options["steps"] == 4  # the rest is reused
        with pytest.raises(EgakuError, match="sampler 'lms' does not support this model's zero-terminal-SNR") as info:
            parse_image_request(kind, {"sampler": "lms"}, builtin, Limits(), form=True, image=image, stored=stored)
        assert info.value.param == "sampler"
        assert ", ".join(usable_samplers(dict(builtin.scheduler.config))) in str(info.value)
    with pytest.raises(EgakuError, match="'heun' does not support") as info:
        parse_image_request("generation", {"prompt": "a", "sampler": "Heun"}, builtin, Limits())
    assert info.value.param == "sampler"
    # through the API: the image made elsewhere is varied; naming LMS is a 400 that never reaches the queue
    upload = {"image": ("lms.png", png_bytes(made.image, made.params), "image/png")}
    with LiveServer(create_app({"builtin": builtin}, ServeOptions(model=["builtin"]), api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        r = client.post("/v1/images/variations", files=upload, data={"n": "1", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        used = r.json()["data"][0]["egaku"]
        assert (used["sampler"], used["steps"], used["prompt"]) == (DEFAULT_SAMPLER, 2, "a red circle")
        r = client.post("/v1/images/variations", files=upload, data={"sampler": "lms"})
        assert_openai_error(r, 400, "sampler")
        assert client.get("/health").json()["models"]["builtin"]["completed"] == 1  # only the first ran


def test_upscale_extension_doubles_the_size(http):
    r = http.post("/v1/images/upscale", files={"image": ("a.png", png((32, 48)), "image/png")},
                  data={"steps": "4", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]["b64_json"]).size == (64, 96)


def test_gpt_image_models_answer_with_b64_json_unless_asked_otherwise(openai_client):
    # OpenAI's gpt-image models always return b64_json, and client code for them reads only that
    result = openai_client.images.generate(model="gpt-image-1", prompt="a red circle", extra_body=FAST)
    assert result.data[0].url is None and decode(result.data[0].b64_json).size == (64, 64)
    asked = openai_client.images.generate(model="gpt-image-1", prompt="a red circle", response_format="url",
                                          extra_body=FAST)
    assert asked.data[0].url and asked.data[0].b64_json is None
    dalle = openai_client.images.generate(model="dall-e-3", prompt="a red circle", extra_body=FAST)
    assert dalle.data[0].url and dalle.data[0].b64_json is None


def test_models_and_health(openai_client, http):
    assert [m.id for m in openai_client.models.list().data] == ["tiny"]
    listed = http.get("/v1/models").json()["data"][0]
    assert openai_client.models.retrieve("tiny").id == "tiny"
    assert http.get("/v1/models/tiny").json() == listed
    assert assert_openai_error(http.get("/v1/models/dall-e-9"), 404, "model")["code"] == "model_not_found"
    assert http.get("/v1/models/dall-e-3").json()["id"] == "tiny"  # a name requests may use is served
    unknown = http.post("/v1/images/generations", json={"prompt": "a cat", "model": "dall-e-9", **FAST})
    assert assert_openai_error(unknown, 404, "model")["code"] == "model_not_found"  # as OpenAI names it
    assert_openai_error(http.get("/v1/models/org/some-model"), 404, "model")
    health = http.get("/health").json()
    assert health["models"]["tiny"]["max_waiting"] == 8 and health["auth"] is False


def test_midjourney_parameters_in_a_request(http):
    r = http.post("/v1/images/generations", json={"prompt": "a dog --ar 4:1 --seed 7 --no cat",
                                                  "response_format": "b64_json", **FAST})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert decode(item["b64_json"]).size == (128, 32)
    assert (item["revised_prompt"], item["egaku"]["seed"], item["egaku"]["negative_prompt"]) == ("a dog", 7, "cat")


def test_loras_by_field_and_by_prompt_tag(http):
    import numpy as np

    def image(body):
        r = http.post("/v1/images/generations", json={"prompt": "a cat", "seed": 3, "response_format": "b64_json",
                                                      **FAST, **body})
        assert r.status_code == 200, r.text
        item = r.json()["data"][0]
        return np.asarray(decode(item["b64_json"]).convert("RGB"), dtype=np.int16), item

    plain, _ = image({})
    by_field, item = image({"loras": [{"name": "style", "weight": 1.0}]})
    by_tag, tagged = image({"prompt": "a cat <lora:style:1>"})
    by_lyco, lyco = image({"prompt": "a cat <lyco:style:1>"})  # A1111's alias (was: words of the prompt)
    assert np.array_equal(by_tag, by_lyco) and lyco["revised_prompt"] == "a cat"
    assert np.abs(plain - by_field).mean() > 0.5  # the LoRA changes the picture
    assert np.array_equal(by_field, by_tag)  # the two spellings are the same request
    assert item["egaku"]["loras"] == [["style", 1.0]] and tagged["revised_prompt"] == "a cat"
    # A1111's text-encoder and UNet weights: the fixture's LoRA adapts the UNet only, which gets the second
    by_two, two = image({"prompt": "a cat <lora:style:0.3:1>"})
    assert np.array_equal(by_two, by_tag) and two["revised_prompt"] == "a cat"
    assert two["egaku"]["loras"] == [["style", {"text_encoder": 0.3, "unet": 1.0}]]
    # names and hashes reach the client, the server's file paths do not (in the response or the PNG)
    for record in (item["egaku"], json.loads(decode(item["b64_json"]).text["egaku"]), tagged["egaku"]):
        assert [f["name"] for f in record["lora_files"]] == ["style"] and len(record["lora_files"][0]["hash"]) == 12
        assert not {"model_source", "model_config", "lora_dir"} & set(record)
        assert "path" not in record["lora_files"][0]
    assert np.array_equal(image({})[0], plain)  # and it is gone again for the next request


def test_requests_qa_found_get_a_4xx_that_names_no_server_path(http, lora_dir):
    (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    try:
        cases = [
            ({"loras": [{"name": "nope"}]}, 404, "lora", "not found in the LoRA folder"),
            ({"prompt": "a <lora:nope:1>"}, 404, "lora", "not found in the LoRA folder"),
            ({"loras": [{"name": "broken"}]}, 400, "lora", "broken.safetensors: not a readable safetensors file"),
            ({"loras": [{"name": "x" * 300}]}, 400, "lora", "not a name a LoRA file can have"),
            ({"prompt": "a" + "<lora:style:0.1>" * 9}, 400, "lora", "9 LoRAs asked for"),
            ({"prompt": "a <lora::1>"}, 400, "prompt", "tag without a name"),
            ({"prompt": "a <lyco:nope:1>"}, 404, "lora", "not found in the LoRA folder"),  # A1111's alias
            ({"prompt": "a <lyco: :1>"}, 400, "prompt", "a <lyco:...> tag without a name; write <lyco:NAME:WEIGHT>"),
            ({"prompt": "a\ud800b"}, 400, "prompt", "not valid Unicode"),
            ({"negative_prompt": "\udfff"}, 400, "negative_prompt", "not valid Unicode"),
        ]
        for body, status, param, said in cases:
            r = http.post("/v1/images/generations", content=json.dumps({"prompt": "a cat", **FAST, **body}),
                          headers={"Content-Type": "application/json"})  # (json.dumps escapes the lone surrogates)
            error = assert_openai_error(r, status, param)
            assert said in error["message"] and str(lora_dir) not in error["message"], (body, error)
        # the connection is still good (a 500 would have closed it)
        assert http.get("/v1/models").status_code == 200
    finally:
        (lora_dir / "broken.safetensors").unlink()


def test_error_messages_name_whole_server_paths_only():
    from egaku.server.app import hide_paths

    relative = ServeOptions(model=["tiny"], lora_dir="./loras")  # (the server names it whole: create_app's Limits)
    assert hide_paths(f"LoRA 'x' not found in {os.path.abspath('loras')}; available: loras_anime", relative) == \
        "LoRA 'x' not found in the LoRA folder; available: loras_anime"
    here = ServeOptions(model=["tiny"], lora_dir=".")
    assert hide_paths("styles/x.safetensors: not readable", here) == "styles/x.safetensors: not readable"


def test_a_page_of_another_site_cannot_start_work(http, server):
    body = {"prompt": "a cat", **FAST}
    for content in ({"json": body}, {"content": json.dumps(body), "headers": {"Content-Type": "text/plain"}}):
        headers = {"Origin": "https://elsewhere.example", **content.pop("headers", {})}
        r = http.post("/v1/images/generations", headers=headers, **content)
        assert assert_openai_error(r, 403)["code"] == "cross_origin"
    # the server's own page sends its own origin; programs send none
    own = server.url.rstrip("/")
    assert http.post("/v1/images/generations", json=body, headers={"Origin": own}).status_code == 200
    assert http.get("/v1/models", headers={"Origin": "https://elsewhere.example"}).status_code == 200


def test_loras_in_sub_folders_are_listed_and_found_by_name_or_path_in_the_folder(http, lora_dir):
    import shutil

    import numpy as np

    def image(body):
        r = http.post("/v1/images/generations", json={"prompt": "a cat", "seed": 3, "response_format": "b64_json",
                                                      **FAST, **body})
        assert r.status_code == 200, r.text
        return np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), dtype=np.int16)

    sub = lora_dir / "styles"
    sub.mkdir()
    try:
        shutil.copy(lora_dir / "style.safetensors", sub / "deep.safetensors")  # the same LoRA under another name
        assert http.get("/v1/egaku/options").json()["loras"] == ["deep", "style"]
        by_style = image({"loras": [{"name": "style", "weight": 1.0}]})
        assert np.abs(image({}) - by_style).mean() > 0.5
        for body in ({"prompt": "a cat <lora:deep:1>"}, {"prompt": "a cat <lora:styles/deep:1>"},
                     {"loras": [{"name": "deep", "weight": 1.0}]}, {"loras": [{"name": "styles/deep"}]}):
            assert np.array_equal(image(body), by_style), body
        shutil.copy(lora_dir / "style.safetensors", sub / "style.safetensors")
        listed = http.get("/v1/egaku/options").json()["loras"]
        assert listed == ["./style", "deep", "styles/style"]
        r = http.post("/v1/images/generations", json={"prompt": "a cat <lora:style:1>"})
        assert "style.safetensors, styles/style.safetensors" in assert_openai_error(r, 400, "lora")["message"]
        assert np.array_equal(image({"prompt": "a cat <lora:./style:1>"}), by_style)
        for name in listed:  # every name the page lists works in 'loras', as the page sends them
            image({"loras": [{"name": name, "weight": 1.0}]})
        r = http.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "../style"}]})
        assert_openai_error(r, 400, "lora")
    finally:
        shutil.rmtree(sub)


# -- bad input: a 4xx in OpenAI's shape, and the server keeps serving ----------------------------------------

BAD_JSON = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"n": 2}, 400, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "n": "2"}, 400, "n"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "size": "64x"}, 400, "size"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ({"prompt": "x", "size": "60x60"}, 400, "size"),
    ({"prompt": "x", "sampler": "warp-drive"}, 400, "sampler"),
    ({"prompt": "x", "steps": 100000}, 400, "steps"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": 2**32 - 1, "n": 2}, 400, "seed"),  # image 2 would need seed 2**32
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
    ({"prompt": "x", "clip_skip": 3}, 400, "clip_skip"),  # the tiny text encoder has 2 layers
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": "x", "colour": "red"}, 400, "colour"),
    ({"prompt": "x --v 6"}, 400, "prompt"),
    ({"prompt": "--seed 3"}, 400, "prompt"),
    ({"prompt": "x", "model": "dall-e-9"}, 404, "model"),
    ({"prompt": "x", "loras": [{"name": "nope", "weight": 0.5}]}, 404, "lora"),
    ({"prompt": "x <lora:nope:0.5>"}, 404, "lora"),
    ({"prompt": "x <lora:../../etc/passwd:1>"}, 400, "lora"),
    ({"prompt": "x", "loras": [{"name": "../secret", "weight": 1}]}, 400, "lora"),
    ({"prompt": "x", "loras": [{"name": "/etc/passwd"}]}, 400, "lora"),
    ({"prompt": "x <lora:/etc/passwd:1>"}, 400, "lora"),
    ({"prompt": "x <lora:sub/../../secret:1>"}, 400, "lora"),
    ({"prompt": "x <lora:..\\secret:1>"}, 400, "lora"),
    ({"prompt": "x <lora:nowhere/style:1>"}, 404, "lora"),
    ({"prompt": "x", "loras": "style"}, 400, "loras"),
]


@pytest.mark.parametrize("body, status, param", BAD_JSON, ids=[json.dumps(b)[:40] for b, _, _ in BAD_JSON])
def test_bad_generation_requests(http, body, status, param):
    assert_openai_error(http.post("/v1/images/generations", json=body), status, param)
    assert http.get("/health").json()["models"]["tiny"]["waiting"] == 0  # nothing was queued


@pytest.mark.parametrize("raw", [b"not json", b"{\"prompt\": ", b"[\"a list\"]", b"\xff\xfe",
                                 b"[" * 100000 + b"]" * 100000])  # nested past the parser's recursion limit
def test_a_body_that_is_not_a_json_object(http, raw):
    r = http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert assert_openai_error(r, 400)["code"] == "invalid_json"


def test_uploads_that_are_not_images(http):
    for data in (b"", b"hello, I am text", png()[:60]):
        r = http.post("/v1/images/variations", files={"image": ("x.png", data, "image/png")})
        assert_openai_error(r, 400, "image")
    assert_openai_error(http.post("/v1/images/edits", data={"prompt": "x"},
                                  files={"mask": ("m.png", png(), "image/png")}), 400, "image")
    assert_openai_error(http.post("/v1/images/variations", json={"image": "x"}), 400)
    mismatched = {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", png((32, 32)), "image/png")}
    assert_openai_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=mismatched), 400, "mask")
    assert_still_serving(http)


def test_form_text_fields_must_be_utf8(http):
    image = {"image": ("a.png", png(), "image/png")}
    for field, value in (("prompt", b"a caf\xe9"), ("negative_prompt", b"\xff\xfe"), ("sampler", b"\xed\xa0\x80")):
        r = http.post("/v1/images/edits", files=image, data={"prompt": "a cat", "steps": "2", field: value})
        error = assert_openai_error(r, 400, field)
        assert f"field '{field}' must be UTF-8 text" in error["message"], error
    # (Latin-1 would have read b"a caf\xe9" as "a café"; the same text in UTF-8 is what the model gets)
    r = http.post("/v1/images/edits", files=image, data={"prompt": "a café ☕".encode(), "steps": "2",
                                                         "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["revised_prompt"] == "a café ☕"


def test_decompression_bomb_is_refused(http):
    bomb = png((2048, 2048), 0, mode="L")  # a few KB of PNG, 4 Mpixels decoded: over this server's 1 Mpixel limit
    assert len(bomb) < 64 * 1024
    error = assert_openai_error(http.post("/v1/images/variations", files={"image": ("b.png", bomb, "image/png")}),
                                400, "image")
    assert "bomb" in error["message"]
    assert_still_serving(http)


def test_upload_too_large_gets_413(http):
    big = bytes(300 * 1024)  # the test server takes 0.25 MiB
    r = http.post("/v1/images/variations", files={"image": ("big.png", big, "image/png")})
    assert_openai_error(r, 413)

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield bytes(10 * 1024)

    r = http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert_still_serving(http)


def test_unknown_route_and_method_keep_the_error_shape(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/images/generations"), 405)


CRASH_SITES = {  # where an unexpected exception is raised: what is broken, and the request that reaches it
    "in a job": ("egaku.inference.generate.generate", "POST", "/v1/images/generations"),
    "parsing a request": ("egaku.server.app.parse_image_request", "POST", "/v1/images/generations"),
    "in a GET route": ("egaku.server.app._lora_catalog", "GET", "/v1/egaku/options"),
}


@pytest.mark.parametrize("site", CRASH_SITES)
def test_a_crash_is_a_logged_500_without_traceback_on_a_connection_that_stays_open(server, monkeypatch, caplog,
                                                                                   site):
    target, method, path = CRASH_SITES[site]
    crash = RuntimeError("secret internal detail at /home/somebody/model.py line 3")

    def broken(*args, **kwargs):
        raise crash

    monkeypatch.setattr(target, broken)
    with httpx.Client(base_url=server.url, timeout=120) as client:  # one keep-alive connection
        r = client.request(method, path, json={"prompt": "x", **FAST} if method == "POST" else None)
        error = assert_openai_error(r, 500)
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
        monkeypatch.undo()
        after = client.get("/health")
        assert after.status_code == 200
        assert after.extensions["network_stream"] is r.extensions["network_stream"]  # answered on the same connection
    # the server's log has what the client does not: the exception, with its traceback
    logged = [record for record in caplog.records if record.name == "egaku.server" and record.exc_info]
    assert [record.exc_info[1] for record in logged] == [crash]
    assert path in logged[0].getMessage()


# -- auth ----------------------------------------------------------------------------------------------------

def test_api_key_is_required_when_set(pipe):
    from openai import AuthenticationError, OpenAI

    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key="s3cret-key")) as live:
        body = {"prompt": "x", "response_format": "b64_json", **FAST}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"},
                        {"Authorization": "Bearer s3cret-ke"}):
            r = httpx.post(live.url + "/v1/images/generations", json=body, headers=headers, timeout=60)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
            assert "s3cret" not in r.text
        wrong = OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(AuthenticationError):
            wrong.images.generate(prompt="x", extra_body=FAST)
        right = OpenAI(base_url=live.url + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert decode(right.images.generate(prompt="x", response_format="b64_json", extra_body=FAST)
                      .data[0].b64_json).size == (64, 64)
        assert httpx.get(live.url + "/health").status_code == 200  # health checks need no key


def test_api_key_comes_from_the_environment(pipe, monkeypatch):
    monkeypatch.delenv("EGAKU_API_KEYS", raising=False)
    monkeypatch.setenv("EGAKU_API_KEY", "from-env")
    app = create_app({"tiny": pipe}, ServeOptions(model=["tiny"]))
    with LiveServer(app) as live:
        assert httpx.get(live.url + "/v1/models").status_code == 401
        r = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_api_key_with_a_comma_is_one_key_taken_whole(pipe, monkeypatch):
    """$EGAKU_API_KEY is one key: a generated password with a comma in it is not split into shorter keys."""
    monkeypatch.delenv("EGAKU_API_KEYS", raising=False)
    monkeypatch.setenv("EGAKU_API_KEY", "  Xk3,9q!,zZ  ")  # spaces around it are not part of it
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]))) as live:
        for key, status in (("Xk3,9q!,zZ", 200), ("Xk3", 401), ("9q!", 401), ("zZ", 401), ("", 401),
                            ("  Xk3,9q!,zZ", 200)):  # (the header's own spaces are not part of the key either)
            r = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}".rstrip()})
            assert r.status_code == status, key
    # the argument too: a string is one key, a list several
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key="a,b")) as live:
        assert [httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                for key in ("a,b", "a", "b")] == [200, 401, 401]
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key=["one", "two,2"])) as live:
        assert [httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                for key in ("one", "two,2", "two", "one,two,2")] == [200, 200, 401, 401]
        assert httpx.get(live.url + "/health").json()["auth"] is True
    with pytest.raises(EgakuError, match="an API key in the list is empty"):
        create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key=["one", " "])


def test_several_api_keys_in_egaku_api_keys_are_each_accepted_beside_egaku_api_key(pipe, monkeypatch):
    """$EGAKU_API_KEYS: keys separated by commas, to rotate keys; spaces around a key and empty entries do not
    count; with $EGAKU_API_KEY set as well, its key is accepted too."""
    from egaku.server.app import api_keys_from_environment

    monkeypatch.delenv("EGAKU_API_KEY", raising=False)
    monkeypatch.setenv("EGAKU_API_KEYS", " old-key, new-key ,")
    assert api_keys_from_environment() == ["old-key", "new-key"]
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]))) as live:
        for key, status in (("old-key", 200), ("new-key", 200), ("old-key, new-key", 401), ("x", 401),
                            ("old-keynew-key", 401), ("", 401)):
            r = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}".rstrip()})
            assert r.status_code == status, key
        assert httpx.get(live.url + "/v1/models").status_code == 401
    monkeypatch.setenv("EGAKU_API_KEY", "single,with-comma")
    assert api_keys_from_environment() == ["single,with-comma", "old-key", "new-key"]
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]))) as live:
        for key, status in (("single,with-comma", 200), ("single", 401), ("old-key", 200), ("new-key", 200)):
            r = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, key
    monkeypatch.setenv("EGAKU_API_KEY", "old-key")  # a key in both counts once
    assert api_keys_from_environment() == ["old-key", "new-key"]


@pytest.mark.parametrize("variable, value", [("EGAKU_API_KEY", ""), ("EGAKU_API_KEY", "  "),
                                             ("EGAKU_API_KEYS", ","), ("EGAKU_API_KEYS", " , "),
                                             ("EGAKU_API_KEYS", "")])
def test_an_api_key_variable_set_to_no_key_is_an_error_not_auth_off(pipe, monkeypatch, variable, value):
    from egaku.server.app import serve_command

    monkeypatch.delenv("EGAKU_API_KEY", raising=False)
    monkeypatch.setenv("EGAKU_API_KEYS", "a-real-key")  # the other variable holding a key does not excuse it
    monkeypatch.setenv(variable, value)
    with pytest.raises(EgakuError, match=rf"\${variable} is set but holds no key"):
        serve_command(ServeOptions(model=["tiny"]))
    with pytest.raises(EgakuError, match=rf"\${variable} is set but holds no key"):
        create_app({"tiny": pipe}, ServeOptions(model=["tiny"]))


def test_serve_says_whether_auth_is_on_and_warns_off_loopback_only_without_keys(pipe, monkeypatch, capsys):
    import uvicorn

    from egaku.server import app as app_module

    monkeypatch.setattr(app_module, "load_pipelines", lambda opts: {"tiny": pipe})
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs["host"]))
    for env, host, said in (({}, "127.0.0.1", "auth off"), ({}, "0.0.0.0", "auth off"),
                            ({"EGAKU_API_KEY": "a,b"}, "0.0.0.0", "auth on (1 key)"),
                            ({"EGAKU_API_KEYS": "a,b"}, "0.0.0.0", "auth on (2 keys)"),
                            ({"EGAKU_API_KEY": "k1", "EGAKU_API_KEYS": "c, d ,k1"}, "0.0.0.0", "auth on (3 keys)")):
        for variable in ("EGAKU_API_KEY", "EGAKU_API_KEYS"):
            monkeypatch.delenv(variable, raising=False)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        app_module.serve_command(ServeOptions(model=["tiny"], host=host))
        out = capsys.readouterr().out
        assert f"(API at /v1, {said})" in out, out
        warned = "warning: serving on 0.0.0.0 without an API key ($EGAKU_API_KEY or $EGAKU_API_KEYS unset)" in out
        assert warned == (host != "127.0.0.1" and not env), out
    assert len(served) == 5


def test_allow_pickle_serves_a_ckpt_model_and_pt_embeddings_that_are_refused_without_it(pipe, tmp_path):
    import torch

    from egaku.models.single_file import pipeline_to_original
    from egaku.server.app import load_pipelines

    model_dir = tmp_path / "config"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_original(pipe)}, ckpt)
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.save({"string_to_param": {"*": torch.randn(2, width)}, "name": "old"}, embeddings / "old.pt")
    common = dict(model=[str(ckpt)], model_config=str(model_dir), embedding_dir=str(embeddings), device="cpu",
                  dtype="float32")
    with pytest.raises(EgakuError, match="--allow-pickle"):
        load_pipelines(ServeOptions(**common))
    opts = ServeOptions(**common, allow_pickle=True)
    served = load_pipelines(opts)
    with LiveServer(create_app(served, opts, api_key="")) as live:
        body = {"prompt": "a cat old", "response_format": "b64_json", "seed": 1, **FAST}
        r = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(live.url + "/v1/egaku/options").json()["embeddings"] == ["old"]


def test_without_allow_pickle_pickle_embeddings_are_neither_offered_nor_loaded(pipe, tmp_path, monkeypatch, capsys):
    """The page offers only what the server loads, and the 400 for a pickle embedding says that the server was
    started without --allow-pickle (the operator's choice), not that the client should pass it."""
    import torch
    from safetensors.torch import save_file

    from egaku.server import app as app_module

    embeddings = tmp_path / "embeddings"
    (embeddings / "styles").mkdir(parents=True)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.save({"string_to_param": {"*": torch.randn(2, width)}, "name": "old"}, embeddings / "old.pt")
    torch.save({"<older>": torch.randn(1, width)}, embeddings / "styles" / "Older.bin")
    save_file({"emb_params": torch.randn(1, width)}, embeddings / "glow.safetensors")
    refusing = ServeOptions(model=["tiny"], embedding_dir=str(embeddings))
    with LiveServer(create_app({"tiny": pipe}, refusing, api_key="")) as live:
        assert httpx.get(live.url + "/v1/egaku/options").json()["embeddings"] == ["glow"]
        for field, text in (("prompt", "a cat, old"), ("negative_prompt", "ugly, OLDER")):
            body = {"prompt": "a glow cat", "response_format": "b64_json", "seed": 1, **FAST, field: text}
            r = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
            error = assert_openai_error(r, 400)
            assert error["param"] == field
            assert "this server was started without --allow-pickle" in error["message"]
            assert "operator" in error["message"] and "read only with" not in error["message"]
            assert str(tmp_path) not in error["message"]
        assert "(styles/Older.bin)" in error["message"]
        # the other embeddings, and words that merely contain a pickle's name, still work
        body = {"prompt": "a glow cat, golden", "negative_prompt": "bold", "response_format": "b64_json", **FAST}
        r = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [e["name"] for e in r.json()["data"][0]["egaku"]["embeddings"]] == ["glow"]
        # a name with a safetensors file beside its pickle is offered, and served from the safetensors file
        save_file({"emb_params": torch.randn(1, width)}, embeddings / "old.safetensors")
        assert httpx.get(live.url + "/v1/egaku/options").json()["embeddings"] == ["glow", "old"]
        body = {"prompt": "a cat, old", "response_format": "b64_json", **FAST}
        r = httpx.post(live.url + "/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (embeddings / "old.safetensors").unlink()
        # an edit is checked the same way
        r = httpx.post(live.url + "/v1/images/edits", files={"image": ("i.png", png((64, 64)), "image/png")},
                       data={"prompt": "old", "steps": "2", "response_format": "b64_json"}, timeout=60)
        assert "started without --allow-pickle" in assert_openai_error(r, 400)["message"]
    # at start-up: how many are left out, and what would load them
    monkeypatch.setattr(app_module, "load_pipelines", lambda opts: {"tiny": pipe})
    monkeypatch.setattr(__import__("uvicorn"), "run", lambda app, **kwargs: None)
    monkeypatch.delenv("EGAKU_API_KEY", raising=False)
    monkeypatch.delenv("EGAKU_API_KEYS", raising=False)
    app_module.serve_command(refusing)
    out = capsys.readouterr().out
    assert "2 pickle embeddings in --embedding-dir left out (old.pt, styles/Older.bin)" in out
    assert "--allow-pickle would load them" in out
    app_module.serve_command(ServeOptions(model=["tiny"], embedding_dir=str(embeddings), allow_pickle=True))
    assert "pickle embedding" not in capsys.readouterr().out


# -- the queue -----------------------------------------------------------------------------------------------

def wait_until(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def blocker(release: threading.Event):
    def run(on_step):
        release.wait(60)
        return []
    return run


@pytest.fixture
def small_queue(pipe):
    """A server whose model may have one request waiting, with its worker held busy until released."""
    app = create_app({"tiny": pipe}, ServeOptions(model=["tiny"], queue_size=1), api_key="")
    worker = app.state.workers["tiny"]
    release = threading.Event()
    with LiveServer(app) as live:
        busy = worker.submit(blocker(release))
        wait_until(lambda: worker.running is busy, "the worker to start the blocking job")
        yield live, worker, release
        release.set()


def test_queue_full_gives_429_and_recovers(small_queue):
    live, worker, release = small_queue
    waiting = worker.submit(blocker(release))  # takes the one waiting place
    r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "x", **FAST}, timeout=60)
    error = assert_openai_error(r, 429)
    assert error["code"] == "queue_full" and r.headers["retry-after"] == "1"
    release.set()
    wait_until(lambda: waiting.finished.is_set(), "the queue to drain")
    r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "x", **FAST}, timeout=60)
    assert r.status_code == 200


def test_a_job_id_still_in_use_is_a_409(small_queue):
    live, worker, release = small_queue
    results = {}
    first = threading.Thread(target=lambda: results.update(r=httpx.post(
        live.url + "/v1/images/generations", json={"prompt": "x", **FAST}, headers={"X-Egaku-Job": "same"},
        timeout=60)))
    first.start()
    wait_until(lambda: worker.stats()["waiting"] == 1, "the first request to be queued")
    r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "y", **FAST}, headers={"X-Egaku-Job": "same"},
                   timeout=60)
    assert "still running" in assert_openai_error(r, 409, "X-Egaku-Job")["message"]
    release.set()
    first.join(60)
    assert results["r"].status_code == 200
    # once it is done, the id may be used again (its progress is replaced by the new job's)
    r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "y", **FAST}, headers={"X-Egaku-Job": "same"},
                   timeout=60)
    assert r.status_code == 200


def test_a_client_that_leaves_frees_its_place(small_queue):
    live, worker, release = small_queue
    body = json.dumps({"prompt": "x", **FAST}).encode()
    request = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request)
        wait_until(lambda: worker.stats()["waiting"] == 1, "the request to be queued")
    # the socket is closed: the server notices, cancels the job, and the place is free again
    wait_until(lambda: worker.stats()["waiting"] == 0, "the cancelled request to leave the queue")
    results = {}
    thread = threading.Thread(target=lambda: results.update(r=httpx.post(
        live.url + "/v1/images/generations", json={"prompt": "x", "response_format": "b64_json", **FAST},
        timeout=120)))
    thread.start()
    wait_until(lambda: worker.stats()["waiting"] == 1, "the next request to take the freed place")
    release.set()
    thread.join(120)
    assert results["r"].status_code == 200


def test_a_running_job_stops_at_its_next_step_when_cancelled():
    worker = ModelWorker("test", max_waiting=2)
    steps = []

    def run(on_step):
        for i in range(10_000):
            steps.append(i)
            on_step(i + 1, 10_000)
            time.sleep(0.001)
        return "finished"

    job = worker.submit(run)
    wait_until(lambda: len(steps) > 3, "the job to start")
    worker.cancel(job)
    assert job.finished.wait(30) and job.state == "cancelled" and job.result is None
    assert len(steps) < 10_000
    after = worker.submit(lambda on_step: "next")
    assert after.finished.wait(30) and after.result == "next"
    worker.close()


def test_progress_of_a_job_can_be_polled(http):
    r = http.post("/v1/images/generations", json={"prompt": "x", **FAST}, headers={"X-Egaku-Job": "my-job-1"})
    assert r.status_code == 200
    progress = http.get("/v1/egaku/jobs/my-job-1").json()
    assert progress["state"] == "done" and progress["step"] == progress["total"] == 2
    bad = assert_openai_error(http.post("/v1/images/generations", json={"prompt": "x"},
                                        headers={"X-Egaku-Job": "../bad id"}), 400)
    assert bad["code"] == "invalid_value"
    # an empty header is no header
    assert http.post("/v1/images/generations", json={"prompt": "x", **FAST}, headers={"X-Egaku-Job": ""}).status_code \
        == 200
    # HEAD, as link checkers and proxies send it
    assert http.head("/health").status_code == 200
    url = http.post("/v1/images/generations", json={"prompt": "x", **FAST}).json()["data"][0]["url"]
    head = http.head(url)
    assert head.status_code == 200 and head.headers["content-type"] == "image/png"


def test_web_page_and_options_are_served(http):
    page = http.get("/")
    assert page.status_code == 200 and "<textarea id=\"prompt\"" in page.text
    assert http.get("/page/app.js").status_code == 200
    options = http.get("/v1/egaku/options").json()
    assert options["models"][0] == {"id": "tiny", "native_size": 64, "multiple": 8, "samplers": options["samplers"],
                                    "embeddings": [], "default_guidance": 7.5}
    assert "euler-a" in options["samplers"] and options["loras"] == ["style"]
    assert options["default_steps"] == 20  # under the limit: the CLI's default


def test_options_list_for_each_model_only_the_samplers_and_embeddings_it_takes(pipe, tmp_path):
    """The page's lists: a sampler the model refuses (the built-in model's zero-terminal-SNR schedule refuses PLMS,
    Heun, LMS) and an embedding made for another text-encoder width (which generation skips, reading its name as a
    word) are not offered for that model. (Was: every sampler and embedding for every model.)"""
    import torch
    from safetensors.torch import save_file

    from egaku.inference.samplers import SAMPLERS
    from egaku.models.loading import load_pipeline

    builtin = load_pipeline("builtin", "cpu", "float32")
    narrow, wide = (model.text_encoder.get_input_embeddings().weight.shape[1] for model in (pipe, builtin))
    assert narrow < wide
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    save_file({"emb_params": torch.randn(1, narrow)}, embeddings / "narrow.safetensors")
    save_file({"emb_params": torch.randn(1, wide)}, embeddings / "Wide.safetensors")
    opts = ServeOptions(model=["tiny", "builtin"], embedding_dir=str(embeddings))
    with LiveServer(create_app({"tiny": pipe, "builtin": builtin}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        options = client.get("/v1/egaku/options").json()
        models = {m["id"]: m for m in options["models"]}
        assert models["tiny"]["samplers"] == list(SAMPLERS)  # an ordinary noise schedule takes every one
        assert {"pndm", "heun", "lms"}.isdisjoint(models["builtin"]["samplers"])
        assert options["default_sampler"] in models["builtin"]["samplers"]
        assert (models["tiny"]["embeddings"], models["builtin"]["embeddings"]) == (["narrow"], ["Wide"])
        # what the page sends for a guidance field emptied since a Generate: each model's own default
        assert (models["tiny"]["default_guidance"], models["builtin"]["default_guidance"]) == (7.5, 3.0)
        # the top-level lists, for clients that read one, are the default (first) model's
        assert (options["samplers"], options["embeddings"]) == (list(SAMPLERS), ["narrow"])
        # what is listed is what generation takes: every sampler listed works, every other is refused
        for sampler in SAMPLERS:
            r = client.post("/v1/images/generations", json={"prompt": "a wide cat", "model": "builtin", "steps": 1,
                                                            "sampler": sampler, "size": "32x32",
                                                            "response_format": "b64_json"})
            if sampler in models["builtin"]["samplers"]:
                assert r.status_code == 200, (sampler, r.text)
                assert [e["name"] for e in r.json()["data"][0]["egaku"]["embeddings"]] == ["Wide"]
            else:
                assert_openai_error(r, 400, "sampler")


def test_requests_without_steps_get_the_default_capped_at_the_limit(pipe):
    """OpenAI's API has no 'steps': its clients must not be refused for a default they never sent."""
    opts = ServeOptions(model=["tiny"], max_steps=2)
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        assert client.get("/v1/egaku/options").json()["default_steps"] == 2
        r = client.post("/v1/images/generations", json={"prompt": "a", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["egaku"]["steps"] == 2
        r = client.post("/v1/images/variations", files={"image": ("a.png", png((64, 64)), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["egaku"]["steps"] == 2
        r = client.post("/v1/images/generations", json={"prompt": "a --steps 1"})  # not a clash with the default
        assert r.status_code == 200 and r.json()["data"][0]["egaku"]["steps"] == 1, r.text
        # asking for more than the limit, as a field or in the prompt, is still refused with the reason
        for body in ({"prompt": "a", "steps": 3}, {"prompt": "a --steps 3"}):
            error = assert_openai_error(client.post("/v1/images/generations", json=body), 400, "steps")
            assert "3" in error["message"] and "20" not in error["message"]  # the value asked for, not a default


def test_a_step_limit_too_low_for_the_strength_says_which_strength_works(pipe):
    """img2img runs int(steps x strength) steps: at --max-steps 1 a variation's default 0.6 runs none, and no step
    count the server allows helps, so the error asks for the strength that does (1 step at strength 1 runs)."""
    from egaku.server.requests import Limits, parse_image_request

    opts = ServeOptions(model=["tiny"], max_steps=1)
    image = {"image": ("a.png", png((32, 32)), "image/png")}
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        for endpoint in ("variations", "upscale"):
            error = assert_openai_error(client.post(f"/v1/images/{endpoint}", files=image), 400, "strength")
            assert "over this server's limit of 1; give a 'strength' of at least 1.0" in error["message"], error
        r = client.post("/v1/images/variations", files=image, data={"strength": "1", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        used = r.json()["data"][0]["egaku"]
        assert (used["steps"], used["strength"]) == (1, 1.0)
    # the strength asked for is the lowest that works at the limit: an upscale's 0.3 needs 4 steps, 0.34 runs 3 x 0.34
    upscale = Image.new("RGB", (32, 32))
    with pytest.raises(EgakuError, match="'strength' of at least 0.34, or start the server with --max-steps 4"):
        parse_image_request("upscale", {}, pipe, Limits(max_steps=3), form=True, image=upscale)
    assert parse_image_request("upscale", {"strength": "0.34"}, pipe, Limits(max_steps=3), form=True,
                               image=upscale).options["steps"] == 3
    # within the limit, more steps is still the advice
    with pytest.raises(EgakuError, match="use at least 4 steps") as info:
        parse_image_request("upscale", {"steps": "3"}, pipe, Limits(max_steps=10), form=True, image=upscale)
    assert info.value.param == "steps"


def test_edits_and_variations_without_size_keep_the_shape_at_the_native_pixel_count(pipe, http):
    from egaku.inference.generate import generate
    from egaku.server.requests import Limits, parse_image_request

    wide = Image.new("RGB", (1000, 500), (30, 90, 200))

    def size(image, kind="variation", limits=Limits(), **fields):
        req = parse_image_request(kind, {"prompt": "x", **fields}, pipe, limits, form=True, image=image)
        return req.options["width"], req.options["height"]

    # as `egaku generate --init-image` sizes it: W:H at the model's native 64x64 pixels, not the upload's size
    cli = generate(pipe, "x", init_image=wide, steps=2, seed=0)[0].image.size
    assert size(wide) == size(wide, "edit") == cli == (88, 48)
    assert size(Image.new("RGB", (4000, 4000))) == (64, 64)
    assert size(wide, limits=Limits(max_side=48)) == (48, 24)  # still within --max-side, shape kept
    assert size(wide, size="32x32") == (32, 32)  # a size given wins
    with pytest.raises(EgakuError) as info:  # too thin for the model at its native size: say so
        size(Image.new("RGB", (4000, 8)))
    assert info.value.param == "size"
    # steps given, even at the default value, and steps in the prompt are one value twice
    from egaku.server.requests import parse_image_request as parse

    with pytest.raises(EgakuError, match="the number of steps is given twice: 20 as an option and 5 in the prompt"):
        parse("generation", {"prompt": "a --steps 5", "steps": 20}, pipe, Limits(), form=False)
    # but the steps an uploaded image was made with are no request field: the prompt's --steps replaces them
    varied = parse("variation", {"prompt": "a cat --steps 5"}, pipe, Limits(), form=True, image=wide,
                   stored={"prompt": "a cat", "steps": 20})
    assert varied.options["steps"] == 5
    # through the API: the response's size and the image's
    r = http.post("/v1/images/edits", files={"image": ("w.png", png((1000, 500)), "image/png")},
                  data={"prompt": "a", "steps": "2", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "88x48" and decode(r.json()["data"][0]["b64_json"]).size == (88, 48)


# -- the command ---------------------------------------------------------------------------------------------

def test_egaku_serve_command_serves_on_loopback(tmp_path):
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("EGAKU_API_KEY", "EGAKU_API_KEYS")}
    proc = subprocess.Popen([sys.executable, "-m", "egaku", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port), "--log-level", "warning"], env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, "egaku serve to answer", seconds=180)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(30)
    assert "serving tiny at http://127.0.0.1:" in proc.stdout.read()


def test_egaku_serve_refuses_bad_options(capsys):
    from egaku.cli import main

    assert main(["serve", "--model", "tiny", "--lora-dir", "/no/such/folder"]) == 2
    assert "--lora-dir '/no/such/folder' is not a folder" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--queue-size", "0"]) == 2


def test_url_images_expire_and_memory_is_bounded():
    from egaku.server.app import UrlStore

    store = UrlStore(ttl=3600, max_bytes=250)
    [first] = store.put(b"a" * 100)
    [second] = store.put(b"b" * 100)
    assert store.get(first) == b"a" * 100 and len(first) >= 32
    [third] = store.put(b"c" * 100)  # 300 bytes > 250: the oldest goes
    assert store.get(first) is None and store.get(second) and store.get(third)
    # one response's images stay together, even over the budget: the URLs it hands out are never already gone
    batch = store.put(b"d" * 100, b"e" * 100, b"f" * 100)
    assert all(store.get(token) for token in batch) and store.get(second) is None and store.get(third) is None
    expired = UrlStore(ttl=-1, max_bytes=1000)
    assert expired.get(expired.put(b"x")[0]) is None


def test_the_options_listing_reads_each_embedding_file_once_until_it_changes(tmp_path, monkeypatch):
    """Every options request lists the embedding folder with each file's width; a file is read again only when its
    time or size changes, so a width that changed (a file for another base model written over it) is seen."""
    import torch
    from safetensors.torch import save_file

    from egaku.inference import embeddings as embeddings_module
    from egaku.server import app as app_module

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(1, 32)}, folder / "glow.safetensors")
    save_file({"emb_params": torch.randn(2, 32)}, folder / "dusk.safetensors")
    reads = []
    real_read = embeddings_module.read_vectors
    monkeypatch.setattr(embeddings_module, "read_vectors", lambda path, *a: reads.append(path.name) or real_read(path, *a))
    app_module._vector_width.cache_clear()
    assert app_module._embedding_widths(str(folder)) == {"glow": {32}, "dusk": {32}}
    assert app_module._embedding_widths(str(folder)) == {"glow": {32}, "dusk": {32}}
    assert sorted(reads) == ["dusk.safetensors", "glow.safetensors"]
    save_file({"emb_params": torch.randn(1, 48)}, folder / "glow.safetensors")
    os.utime(folder / "glow.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert app_module._embedding_widths(str(folder)) == {"glow": {48}, "dusk": {32}}
    assert sorted(reads) == ["dusk.safetensors", "glow.safetensors", "glow.safetensors"]
