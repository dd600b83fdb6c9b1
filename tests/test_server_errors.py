"""The images API's errors: messages with a LoRA folder given by a relative path, `stream`, a port it cannot listen on,
an IPv6 address."""

import os

import httpx
import pytest

from egaku.server.app import LiveServer, ServeOptions, create_app, hide_paths


@pytest.fixture(scope="module")
def pipe():
    from egaku.models.loading import load_pipeline

    return load_pipeline("tiny", "cpu", "float32")


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_a_relative_lora_folder_named_like_a_field_leaves_messages_whole(pipe, tmp_path, monkeypatch):
    # `egaku serve --lora-dir loras` (docs/serve.md's own example): its name is also the 'loras' field's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    opts = ServeOptions(model=["tiny"], lora_dir="loras")
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        def post(body):
            return http.post("/v1/images/generations", json={"prompt": "a cat", "steps": 2, **body})

        error = error_of(post({"loras": {"name": "x"}}), 400)
        assert error["message"].startswith("'loras' must be a list"), error  # was: "'the LoRA folder' must be ..."
        error = error_of(post({"foo": 1}), 400)
        assert "guidance_scale, loras, model" in error["message"], error
        # the folder itself is still never named by the server's path
        error = error_of(post({"loras": [{"name": "nope"}]}), 404)
        assert "not found in the LoRA folder" in error["message"] and str(tmp_path) not in error["message"], error


def test_hide_paths_replaces_whole_paths_and_not_a_relative_folders_bare_name():
    relative = ServeOptions(model=["tiny"], lora_dir="./loras")
    whole = os.path.abspath("loras")
    assert hide_paths(f"LoRA 'x' not found in {whole}; available: loras_anime", relative) == \
        "LoRA 'x' not found in the LoRA folder; available: loras_anime"
    assert hide_paths(f"{whole}{os.sep}styles{os.sep}x.safetensors: not readable", relative) == \
        f"styles{os.sep}x.safetensors: not readable"
    said = "each entry of 'loras' must be {\"name\": str, \"weight\": number}"
    assert hide_paths(said, relative) == said


def test_stream_false_is_accepted_and_stream_true_is_a_400_that_says_it_is_not_done(pipe):
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        body = {"prompt": "a cat", "steps": 2, "response_format": "b64_json"}
        assert http.post("/v1/images/generations", json={**body, "stream": False}).status_code == 200
        error = error_of(http.post("/v1/images/generations", json={**body, "stream": True}), 400)
        assert error["param"] == "stream" and "not done by this server" in error["message"], error
        # multipart: the text "false" / "true"
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
        files = {"image": ("in.png", buffer.getvalue(), "image/png")}
        form = {"prompt": "a cat", "steps": "2", "response_format": "b64_json"}
        assert http.post("/v1/images/edits", files=files, data={**form, "stream": "false"}).status_code == 200
        error = error_of(http.post("/v1/images/edits", files=files, data={**form, "stream": "true"}), 400)
        assert error["param"] == "stream", error


@pytest.mark.parametrize("port_in_use, bad_port", [(True, None), (False, 70000), (False, 0)])
def test_serve_refuses_a_port_it_cannot_listen_on_in_one_line_before_loading_models(port_in_use, bad_port,
                                                                                   monkeypatch):
    import socket

    from egaku.errors import EgakuError
    from egaku.server import app

    monkeypatch.delenv("EGAKU_API_KEY", raising=False)
    monkeypatch.delenv("EGAKU_API_KEYS", raising=False)
    monkeypatch.setattr(app, "load_pipelines", lambda opts: pytest.fail("the models loaded first"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # 70000 was an OverflowError traceback; 0, a port chosen at random that the start-up line named as 0
        port = taken.getsockname()[1] if port_in_use else bad_port
        with pytest.raises(EgakuError, match="cannot listen on 127.0.0.1" if port_in_use else "is not a TCP port"):
            app.serve_command(ServeOptions(model=["tiny"], port=port))


def test_a_bad_lora_weight_names_the_entry_it_is_in(pipe, tmp_path):
    """(Was: param 'weight', which does not say which of several LoRAs, nor that it is in 'loras'.)"""
    (tmp_path / "loras").mkdir()
    opts = ServeOptions(model=["tiny"], lora_dir=str(tmp_path / "loras"))
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        for loras, param, said in (
                ([{"name": "a", "weight": 0.5}, {"name": "b", "weight": 20}], "loras[1].weight",
                 "'loras[1].weight' must be between -10.0 and 10.0, got 20"),
                ([{"name": "a", "weight": "high"}], "loras[0].weight", "'loras[0].weight' must be a finite number"),
                ([{"name": "a"}, {"name": "b"}, "c"], "loras[2]", "loras[2] is 'c'")):
            error = error_of(http.post("/v1/images/generations", json={"prompt": "a cat", "loras": loras}), 400)
            assert error["param"] == param and said in error["message"], error
        # multipart (edits, variations): 'loras' is JSON text, named the same way
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, format="PNG")
        r = http.post("/v1/images/variations", files={"image": ("in.png", buffer.getvalue(), "image/png")},
                      data={"loras": '[{"name": "a", "weight": 1}, {"name": "b", "weight": null}, '
                                     '{"name": "c", "weight": true}]'})
        assert error_of(r, 400)["param"] == "loras[2].weight"


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
def test_the_start_up_line_writes_an_ipv6_host_in_brackets(pipe, monkeypatch, capsys, host):
    import socket

    import uvicorn

    from egaku.server import app

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    except OSError:
        pytest.skip(f"this machine has no {host}")
    monkeypatch.delenv("EGAKU_API_KEY", raising=False)
    monkeypatch.delenv("EGAKU_API_KEYS", raising=False)
    monkeypatch.setattr(app, "load_pipelines", lambda opts: {"tiny": pipe})
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    app.serve_command(ServeOptions(model=["tiny"], host=host, port=port))
    url = f"http://[::1]:{port}/" if host == "::1" else f"http://127.0.0.1:{port}/"  # (was: http://::1:8766/)
    assert f"serving tiny at {url} (API at /v1" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
def test_a_live_server_on_an_ipv6_host_answers_at_its_url_in_brackets(pipe, host):
    """LiveServer (tests, benchmarks) listens on an IPv6 host and writes its URL as the start-up line does. (Was: an
    IPv4 socket, which cannot bind ::1, and http://::1:PORT.)"""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((host, 0))
    except OSError:
        pytest.skip(f"this machine has no {host}")
    with LiveServer(create_app({"tiny": pipe}, ServeOptions(model=["tiny"]), api_key=""), host=host) as live:
        assert live.url == (f"http://[::1]:{live.port}" if host == "::1" else f"http://127.0.0.1:{live.port}")
        assert httpx.get(live.url + "/health", timeout=30).json()["status"] == "ok"


def test_a_prompt_tags_lora_weight_has_the_limit_of_the_loras_field(pipe, style_lora_dir):
    """(Was: <lora:style:1000> in the prompt gave a 200 and a black image, where 'loras' refuses weight 1000.)"""
    opts = ServeOptions(model=["tiny"], lora_dir=str(style_lora_dir))
    with LiveServer(create_app({"tiny": pipe}, opts, api_key="")) as live, \
            httpx.Client(base_url=live.url, timeout=120) as http:
        def post(prompt):
            return http.post("/v1/images/generations", json={"prompt": prompt, "steps": 1, "size": "64x64"})

        for tag, said in (("<lora:style:1000>", "got 1000"), ("<lora:style:-11>", "got -11"),
                          ("<lora:style:1:1000>", "got 1000")):
            error = error_of(post(f"a cat {tag}"), 400)
            assert error["param"] == "prompt", error
            assert error["message"] == f"the weight of the prompt's tag {tag} must be between -10.0 and 10.0, " \
                                       f"{said}", error
        assert post("a cat <lora:style:0.8>").status_code == 200
    # an uploaded image's prompt with such a tag is reused without it, as a variation takes over what it can
    from egaku.server.requests import Limits, reused_settings

    limits = Limits(max_steps=50, lora_dir=str(style_lora_dir))
    assert reused_settings({"prompt": "a cat <lora:style:1000> <lora:style:0.8>"}, pipe, limits)["prompt"] == \
        "a cat <lora:style:0.8>"
