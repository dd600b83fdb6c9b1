"""`egaku serve`: the OpenAI images API (generations, edits, variations) and a web page, over FastAPI.

Request flow: parse and validate (``requests.py``; every 4xx happens here, before queueing) -> submit
a job to the model's worker (``queue.py``; one thread per pipeline, bounded queue, 429 when full) ->
wait for it while watching for the client going away (which cancels the job and frees its place) ->
encode PNGs (with their generation parameters) as base64 or as short-lived URLs served from memory.

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a 500 says only
that something failed and where it is logged, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here
from starlette.formparsers import MultiPartParser

from ..config import option
from ..errors import EgakuError, first_line
from .queue import Job, ModelWorker, QueueFull
from .requests import ImageRequest, Limits, parse_image_request, pickle_embeddings

log = logging.getLogger("egaku.server")
PAGE_DIR = Path(__file__).parent / "page"
API_KEY_ENV = "EGAKU_API_KEY"  # one key, taken whole (a comma in it is part of it)
API_KEYS_ENV = "EGAKU_API_KEYS"  # several keys separated by commas (a new key beside the old while clients move over)
# Names existing OpenAI client code sends; they mean "the server's default model".
OPENAI_MODEL_ALIASES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ServeOptions:
    """Everything `egaku serve` takes."""

    model: list[str] = option(["builtin"], help="model to serve (builtin, tiny, a folder, a .safetensors file, "
                                                "a hub id); repeatable, the first is the default")
    lora_dir: str | None = option(None, help="folder of LoRAs that requests may name (<lora:name:w> or 'loras')")
    embedding_dir: str | None = option(None, help="folder of textual-inversion embeddings a prompt word may name "
                                       "(EasyNegative), as generate --embedding-dir")
    allow_pickle: bool = option(False, help="also load .ckpt/.pt/.bin models and --embedding-dir embeddings "
                                "(pickles, read with weights_only=True): only files you trust")
    host: str = option("127.0.0.1", help="address to bind; loopback by default")
    port: int = option(8000, help="TCP port")
    device: str = option("auto", help="auto, cpu, cuda or mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = option("auto", help="auto, float32, float16 or bfloat16",
                        choices=["auto", "float32", "float16", "bfloat16"])
    model_config: str | None = option(None, help="local diffusers folder describing single-file checkpoints")
    queue_size: int = option(8, help="requests that may wait per model; more get HTTP 429")
    max_n: int = option(10, help="most images per request")
    max_side: int = option(1024, help="largest width or height a request may ask for, in pixels")
    max_steps: int = option(150, help="most denoising steps a request may ask for")
    max_upload_mb: float = option(16.0, help="largest request body (uploads included), in MiB; more gets 413")
    max_upload_pixels: int = option(4096 * 4096, help="uploaded images with more pixels are refused as bombs")
    url_ttl: int = option(3600, help="seconds a response_format=url image stays downloadable")
    url_cache_mb: float = option(256.0, help="memory kept for url images; the oldest go first")
    log_level: str = option("info", help="uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, param=None, code=None):
    """``error_body`` as a JSON response with its status."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, type, param, code), status_code=status)


class UrlStore:
    """PNG bytes behind unguessable, expiring URLs; bounded in bytes (oldest evicted first)."""

    def __init__(self, ttl: float, max_bytes: int):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, *images: bytes) -> list[str]:
        """Tokens for ``images``, which stay until they expire even when together they are over the budget: the
        older images go first, and a response never hands out a URL that is already gone."""
        tokens = [secrets.token_urlsafe(24) for _ in images]
        now = time.monotonic()
        with self._lock:
            for token, data in zip(tokens, images):
                self._items[token] = (now + self.ttl, data)
                self._bytes += len(data)
            while len(self._items) > len(images) and (self._bytes > self.max_bytes
                                                       or next(iter(self._items.values()))[0] < now):
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return tokens

    def get(self, token: str) -> bytes | None:
        with self._lock:
            item = self._items.get(token)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (declared or streamed) before they are parsed.

    The rest of a refused body is read and dropped (never stored) before answering: a server that
    answers and closes while the client is still sending makes the client see a connection reset
    instead of the 413.
    """

    DRAIN_LIMIT = 256 * 2**20  # past this much unread body, just close the connection

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _drain(self, receive) -> None:
        drained = 0
        while drained < self.DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            drained += len(message.get("body", b""))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            body = json.dumps(error_body(f"request body of {int(declared):,} bytes is over this server's limit of "
                                         f"{self.max_bytes:,} bytes; send a smaller image", "invalid_request_error",
                                         None, "request_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body"):
                        await self._drain(receive)
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


class AnswerInternalErrors:
    """ASGI middleware: an exception that no handler answered (a bug, in a route or in a job) is logged with its
    traceback and answered as a 500 in OpenAI's shape that names no detail; the connection stays open.

    Not Starlette's ``exception_handler(Exception)``: that one answers, but then raises the exception again for
    the server to log, and uvicorn closes the connection of a request that raised, so a keep-alive client's next
    request on it fails.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:  # part of a response is out: only closing the connection can tell the client
                raise
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            await error_response(500, "internal server error; the details are in the server's log", "server_error",
                                 None, "internal_error")(scope, receive, send)


def png_bytes(image, params: dict[str, Any]) -> bytes:
    from PIL import PngImagePlugin

    from ..inference.metadata import a1111_parameters

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("egaku", json.dumps(params, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _embedding_widths(embedding_dir: str | None, allow_pickle: bool = False) -> dict[str, set[int | None]]:
    """The words that name an embedding of the server's folder (as a prompt may use them), each with the widths of
    its files' vectors (None for a file that cannot be read): without --allow-pickle, not those whose files are all
    pickles (.pt/.bin), which the server would refuse. Read once for all the served models (``_embedding_catalog``)."""
    if not embedding_dir or not Path(embedding_dir).is_dir():
        return {}
    from ..inference.embeddings import embedding_files

    files = embedding_files(embedding_dir, allow_pickle)  # the files generation reads them from
    refused = set() if allow_pickle else set(pickle_embeddings(embedding_dir, files))

    def width(path: Path) -> int | None:
        try:
            stat = path.stat()
        except OSError:  # removed since it was listed
            return None
        return _vector_width(str(path), stat.st_mtime_ns, stat.st_size, allow_pickle)

    return {paths[0].stem: {width(path) for path in paths} for name, paths in files.items() if name not in refused}


@functools.lru_cache(maxsize=4096)
def _vector_width(path: str, mtime_ns: int, size: int, allow_pickle: bool) -> int | None:
    """The width of an embedding file's vectors, read once per version of the file (its time and size are part of
    the key): every options request lists the folder, and a folder of hundreds of embeddings is not re-read each
    time."""
    from ..inference.embeddings import read_vectors

    try:
        return read_vectors(Path(path), allow_pickle).shape[1]
    except EgakuError:  # a broken file stays listed: a request that names it gets the 400 that says what is wrong
        return None


def _embedding_catalog(widths: dict[str, set[int | None]], pipe) -> list[str]:
    """The words of ``_embedding_widths`` that ``pipe`` can use: not those made for another base model (vectors of
    another width), which generation skips and reads as words."""
    from ..inference.embeddings import text_encoder_width

    width = text_encoder_width(pipe)
    return sorted(word for word, found in widths.items() if width in found or None in found)


def _lora_catalog(lora_dir: str | None) -> dict[str, Path]:
    """The LoRA names requests may give, each with its file: those in the folder and its sub-folders, as
    resolve_lora finds them (``lora_catalog``'s names, in its order)."""
    if not lora_dir or not Path(lora_dir).is_dir():
        return {}
    from ..errors import NotFoundError
    from ..lora.apply import lora_catalog, loras_under, resolve_lora

    root = Path(lora_dir)
    under = loras_under(root)
    files: dict[str, Path] = {}
    for name in lora_catalog(root):
        # a bare name is one file's (lora_catalog names each of the files that share a name by its path in the
        # folder, which resolve_lora finds without listing the folder again)
        try:
            files[name] = under[name][0][1] if "/" not in name else resolve_lora(name, str(root))
        except (KeyError, NotFoundError):  # removed since the folder was listed
            continue
    return files


def _lora_problem(path: Path, shown: str, modules: dict[str, Any]) -> str | None:
    """Why the LoRA file ``path`` (``shown``: its place in the LoRA folder) cannot be loaded into a model of
    ``modules`` (``adaptable_modules``), as generate's ``lora_layers`` would refuse it (``checked_lora_layers``: a
    model checkpoint, a LyCORIS or embedding file, one for another architecture or base, keys that match nothing),
    from the file's header, not its weights; None where the header shows nothing wrong."""
    from ..lora.apply import checked_lora_layers
    from ..lora.formats import read_lora_header

    try:
        state, metadata = read_lora_header(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several private error types for a corrupt header
        return f"{shown}: not a readable safetensors file ({first_line(exc, 200)})"
    try:
        checked_lora_layers(state, metadata, modules, shown, values=False)
    except EgakuError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - a header this check cannot read: offered, and a request gets loading's error
        log.debug("could not check the LoRA %s against the served models", shown, exc_info=True)
    return None


def _lora_listing(lora_dir: str | None, modules: dict[str, dict[str, Any]], checked: dict[tuple, str | None]
                  ) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The LoRA folder's names (``_lora_catalog``), and for each served model (``modules``: its
    ``adaptable_modules``) those it cannot load, each with why (``_lora_problem``). A file is checked once per
    model and version of the file (its time and size are part of ``checked``'s key): every options request lists
    the folder, and a folder of hundreds of LoRAs is not read again each time."""
    files = _lora_catalog(lora_dir)
    unusable: dict[str, dict[str, str]] = {model: {} for model in modules}
    for name, path in files.items():
        try:
            stat = path.stat()
        except OSError:  # removed since it was listed
            continue
        try:
            shown = path.relative_to(lora_dir).as_posix()
        except ValueError:
            shown = path.name
        for model, layers in modules.items():
            if not layers:  # a pipeline without the layers a LoRA adapts: nothing to check it against
                continue
            key = (model, str(path), stat.st_mtime_ns, stat.st_size)
            if key not in checked:
                if len(checked) > 4096:
                    checked.clear()
                checked[key] = _lora_problem(path, shown, layers)
            if checked[key] is not None:
                unusable[model][name] = checked[key]
    return list(files), unusable


def _run_request(pipe, req: ImageRequest):
    """The job body, on the model's worker thread: generate, then encode (off the event loop)."""
    from ..inference import generate as generate_module
    from ..inference import prompts

    def run(on_step):
        o = dict(req.options)
        if req.kind == "generation":
            results = generate_module.generate(pipe, on_step=on_step, **o)
        elif req.kind == "edit":  # img2img, or inpainting when a mask came with the image
            results = generate_module.generate(pipe, init_image=req.init_image, mask_image=req.mask,
                                               on_step=on_step, **o)
        elif req.kind == "variation":
            results = prompts.variations(pipe, req.init_image, o.pop("prompt"), o.pop("num_images"), o.pop("seed"),
                                         o.pop("strength"), on_step=on_step, **o)
        else:  # upscale
            for key in ("num_images", "width", "height", "aspect_ratio"):
                o.pop(key)
            results = [prompts.upscale(pipe, req.init_image, o.pop("prompt"), 2, o.pop("strength"), o.pop("seed"),
                                       on_step=on_step, **o)]
        from ..inference.metadata import without_local_paths

        public = [without_local_paths(r.params) for r in results]  # the server's paths stay on the server
        return [(png_bytes(r.image, params), params) for r, params in zip(results, public)]

    return run


async def _read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # (RecursionError: nested too deep)
        raise ApiError(400, "the request body is not valid JSON; send a JSON object such as "
                            '{"prompt": "a red circle"}', code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}",
                       code="invalid_json")
    return body


class Utf8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser (as ``request.form()`` runs it), except that a text field must be UTF-8, as the
    OpenAI API's text is, whatever charset the body declares: Starlette decodes one that is not as Latin-1, which
    would hand the model a garbled prompt. The check is made here, where the field's bytes still are."""

    def on_part_end(self) -> None:
        part = self._current_part  # (the part just read; Starlette's parser keeps no other record of its bytes)
        if part.file is not None:
            return super().on_part_end()
        try:
            text = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"field {part.field_name!r} must be UTF-8 text; the bytes sent are not valid UTF-8",
                           param=part.field_name, code="invalid_value") from None
        self.items.append((part.field_name, text))


async def _read_form(request: Request) -> tuple[dict, dict[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, f"this endpoint takes multipart/form-data (as the OpenAI API), not "
                            f"{content_type or 'an empty content type'!r}", code="invalid_content_type")
    try:
        async with aclosing(request.stream()) as stream:
            form = await Utf8MultiPartParser(request.headers, stream, max_files=4, max_fields=64).parse()
    except (BodyTooLarge, ApiError):
        raise
    except Exception as exc:  # noqa: BLE001 - malformed multipart: python-multipart's messages vary
        raise ApiError(400, f"could not parse the multipart body ({exc})", code="invalid_multipart") from None
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        key = "image" if key == "image[]" else key
        if key in fields or key in files:
            raise ApiError(400, f"field {key!r} is given more than once; send one", param=key)
        if hasattr(value, "read"):
            files[key] = await value.read()
        else:
            fields[key] = value
    for key in set(fields) & {"image", "mask"}:
        raise ApiError(400, f"{key!r} must be an uploaded file, not a text field", param=key)
    return fields, files


def _open_upload(files: dict[str, bytes], key: str, max_pixels: int):
    from ..data.images import ImageError, open_image

    if key not in files:
        return None
    try:
        return open_image(files[key], max_pixels=max_pixels)
    except ImageError as exc:
        raise ApiError(400, f"'{key}': {str(exc).removeprefix('upload: ')}", param=key,
                       code="invalid_image") from None


def _open_mask(files: dict[str, bytes], max_pixels: int):
    """OpenAI masks: fully transparent pixels are the area to edit. Without alpha: white = edit."""
    from PIL import Image

    if _open_upload(files, "mask", max_pixels) is None:  # validates it (format, bombs) like any upload
        return None
    from ..inference.generate import repaint_mask

    with Image.open(io.BytesIO(files["mask"])) as raw:
        return repaint_mask(raw)


def _stored_params(files: dict[str, bytes]) -> dict:
    """The parameters an uploaded image was made with (egaku's or A1111's PNG text chunk, A1111's EXIF comment of
    a JPEG or WebP), so that variations and upscales of it keep its prompt and settings; {} for an image without
    them."""
    from PIL import Image

    from ..inference.metadata import image_text, params_from_text

    try:
        with Image.open(io.BytesIO(files["image"])) as raw:
            text = image_text(raw)
        return params_from_text(text) or {}
    except Exception:  # noqa: BLE001 - metadata is a convenience; a foreign image just has none
        return {}


def api_keys_from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys /v1 requests may send: ``$EGAKU_API_KEY`` (one key, taken whole: a comma is part of it; spaces
    around it are not) and ``$EGAKU_API_KEYS`` (several separated by commas, to rotate keys), every one of both.

    Neither set: no key (auth off). A variable that is set but holds no key (empty, spaces, only commas) is an
    error, never a quiet "auth off".
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    one = environ.get(API_KEY_ENV)
    if one is not None:
        if not one.strip():
            raise EgakuError(f"${API_KEY_ENV} is set but holds no key; set it to the key clients must send, or unset "
                             "it to serve without a key", param="api_key")
        keys.append(one.strip())
    several = environ.get(API_KEYS_ENV)
    if several is not None:
        listed = [key.strip() for key in several.split(",") if key.strip()]
        if not listed:
            raise EgakuError(f"${API_KEYS_ENV} is set but holds no key; set it to the keys clients may send, "
                             "separated by commas, or unset it", param="api_key")
        keys += listed
    return list(dict.fromkeys(keys))  # a key in both counts once


def _given_keys(api_key: str | Sequence[str] | None) -> list[str]:
    """create_app's ``api_key``: None reads the environment; a string is one key, taken whole ('' is no key: auth
    off); a list holds several, none of them empty."""
    if api_key is None:
        return api_keys_from_environment()
    if isinstance(api_key, str):
        return [api_key.strip()] if api_key.strip() else []
    keys = [key.strip() for key in api_key]
    if not all(keys):
        raise EgakuError("an API key in the list is empty; give only keys clients must send", param="api_key")
    return list(dict.fromkeys(keys))


def _authorizer(keys: list[str]):
    """The /v1 routes' dependency: with keys, each request must send ``Authorization: Bearer KEY`` with one of
    them."""
    encoded = [key.encode() for key in keys]

    async def authorize(request: Request) -> None:
        # a page of another site may POST a form or text/plain here without asking first (no CORS preflight):
        # a browser says whose page it is in Origin, and only this server's own page may start work
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD") and urlparse(origin).netloc != request.headers.get("host"):
            raise ApiError(403, f"requests from another site's page ({origin}) are refused; call the API from a "
                                "program, or from this server's own page", code="cross_origin")
        if not encoded:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # hmac.compare_digest: the time taken does not depend on how much of a key was right; every key is compared
        # (no early exit at the first match, so the time does not tell which key matched)
        matches = [hmac.compare_digest(given.strip().encode(), key) for key in encoded]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with a key the server "
                                f"was started with (${API_KEY_ENV} or ${API_KEYS_ENV})", code="invalid_api_key")

    return authorize


def hide_paths(message: str, opts: ServeOptions) -> str:
    """An error names a file by its place in the server's LoRA or embedding folder, never by the server's own
    paths: 'LoRA 'x' not found in the LoRA folder', 'styles/broken.safetensors: not a readable ...'."""
    for folder, label in ((opts.lora_dir, "the LoRA folder"), (opts.embedding_dir, "the embedding folder")):
        if not folder:
            continue
        forms = {str(folder).rstrip(os.sep), str(Path(folder)), os.path.abspath(folder), os.path.realpath(folder)}
        for form in sorted(forms - {"", ".", os.sep}, key=len, reverse=True):  # the longest first
            # whole paths only: the folder's name inside a word ("loras" in "loras_anime") is left alone
            whole = rf"(?<![\w.-]){re.escape(form)}"
            message = re.sub(whole + re.escape(os.sep), "", message)
            if os.sep in form:  # a bare relative name ("loras") is also a word of messages: 'loras' must be a list
                message = re.sub(whole + r"(?![\w.-])", label, message)
    return message


def _add_error_handlers(app, opts: ServeOptions) -> None:
    """Every error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a 500 names no detail."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        response = error_response(exc.status, str(exc), exc.type, exc.param, exc.code)
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(EgakuError)
    async def _egaku_error(_request, exc: EgakuError):
        code = "not_found" if exc.status == 404 else "invalid_value"
        return error_response(exc.status, hide_paths(str(exc), opts), "invalid_request_error", exc.param, code)

    @app.exception_handler(QueueFull)
    async def _queue_full(_request, exc: QueueFull):
        response = error_response(429, f"the queue of model {exc} is full ({opts.queue_size} waiting); retry shortly",
                                  "rate_limit_error", None, "queue_full")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, _exc):
        return error_response(413, f"request body is over this server's limit of {int(opts.max_upload_mb * 2**20):,} "
                                   "bytes; send a smaller image", "invalid_request_error", None, "request_too_large")

    @app.exception_handler(ClientGone)
    async def _client_gone(_request, _exc):
        return Response(status_code=499)  # nobody reads it; the job was cancelled

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None,
                              "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', 'bad input')}", "invalid_request_error", param)

    app.add_middleware(AnswerInternalErrors)  # the rest: a logged 500


def create_app(pipelines: dict[str, Any], opts: ServeOptions | None = None,
               api_key: str | Sequence[str] | None = None):
    """The FastAPI app serving ``pipelines`` (name -> loaded pipeline; the first is the default).

    ``api_key`` is one key (a string, taken whole) or a list of keys; with any, /v1 requests need
    ``Authorization: Bearer KEY`` with one of them. ``""`` or ``[]``: no key. None (the default): the keys of
    ``$EGAKU_API_KEY`` and ``$EGAKU_API_KEYS`` (see ``api_keys_from_environment``).
    """
    from fastapi import APIRouter, Depends, FastAPI
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles

    opts = opts or ServeOptions()
    if not pipelines:
        raise EgakuError("no model to serve")
    keys = _given_keys(api_key)
    # the folders whole, so that a message naming one names it whole, which hide_paths takes out
    limits = Limits(max_n=opts.max_n, max_side=opts.max_side, max_steps=opts.max_steps,
                    lora_dir=opts.lora_dir and os.path.abspath(opts.lora_dir),
                    embedding_dir=opts.embedding_dir and os.path.abspath(opts.embedding_dir),
                    allow_pickle=opts.allow_pickle)
    workers = {name: ModelWorker(name, opts.queue_size) for name in pipelines}
    default_model = next(iter(pipelines))
    aliases = {alias: default_model for alias in OPENAI_MODEL_ALIASES}
    for name, pipe in pipelines.items():
        info = getattr(pipe, "egaku_info", None)
        if info is not None and info.name not in pipelines:
            aliases[info.name] = name
        if info is not None and info.kind == "builtin":
            aliases["builtin"] = name
    urls = UrlStore(opts.url_ttl, int(opts.url_cache_mb * 2**20))
    # the layers of each model that a LoRA must fit (GET /v1/egaku/options lists only the LoRAs that do), read here,
    # before any job wraps them in a LoRA's layers
    if opts.lora_dir:
        from ..lora.formats import adaptable_modules

        lora_modules = {name: adaptable_modules(pipe) for name, pipe in pipelines.items()}
    else:
        lora_modules = {}
    lora_checked: dict[tuple, str | None] = {}  # (model, file, its time and size) -> why it cannot be loaded
    jobs: OrderedDict[str, tuple[str, Job]] = OrderedDict()  # recent jobs, for progress polling
    created = int(time.time())

    def shutdown() -> None:
        for worker in workers.values():
            worker.close()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        shutdown()

    # no /docs: Swagger UI loads its scripts from a CDN, which a machine serving models offline cannot reach
    app = FastAPI(title="egaku", summary="OpenAI-compatible images API", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.workers = workers
    app.state.pipelines = pipelines
    app.state.shutdown = shutdown

    _add_error_handlers(app, opts)
    api = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(keys))])

    # -- helpers -------------------------------------------------------------------------------------
    def pick_model(name: str | None) -> str:
        if name is None or name == "":
            return default_model
        if name in workers:
            return name
        if name in aliases:
            return aliases[name]
        raise ApiError(404, f"model {name!r} is not served here; available: {', '.join(workers)}", param="model",
                       code="model_not_found")  # OpenAI's code for it

    async def run(request: Request, model: str, req: ImageRequest) -> dict:
        worker = workers[model]
        job_id = request.headers.get("x-egaku-job", "").strip() or None  # an empty header is no header
        if job_id is not None and not _JOB_ID.match(job_id):
            raise ApiError(400, "X-Egaku-Job must be 1-64 letters, digits, '-' or '_'", param="X-Egaku-Job",
                           code="invalid_value")
        if job_id in jobs and not jobs[job_id][1].finished.is_set():  # its progress would replace the other's
            raise ApiError(409, f"job {job_id!r} is still running; give each request its own X-Egaku-Job id",
                           param="X-Egaku-Job", code="job_running")
        job = worker.submit(_run_request(app.state.pipelines[model], req), job_id)
        jobs[job.id] = (model, job)
        while len(jobs) > 256:
            jobs.popitem(last=False)
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        job.add_done_callback(lambda: loop.call_soon_threadsafe(
            lambda: finished.done() or finished.set_result(None)))

        async def client_left() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({finished, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not job.finished.is_set():
                worker.cancel(job)  # the client left (or the server is stopping): free the place
        if not finished.done() or job.state == "cancelled":
            raise ClientGone()
        if job.error is not None:
            raise job.error  # EgakuError -> its 4xx; anything else -> a logged 500 (AnswerInternalErrors)
        data = []
        tokens = urls.put(*(png for png, _ in job.result)) if req.response_format != "b64_json" else []
        for k, (png, params) in enumerate(job.result):
            item: dict[str, Any] = {"revised_prompt": req.revised_prompt}
            if req.response_format == "b64_json":
                item["b64_json"] = base64.b64encode(png).decode()
            else:
                item["url"] = str(request.base_url) + f"v1/files/{tokens[k]}.png"
            item["egaku"] = params
            data.append(item)
        first = job.result[0][1]
        return {"created": int(time.time()), "data": data, "output_format": "png",
                "size": f"{first['width']}x{first['height']}"}

    # -- endpoints -----------------------------------------------------------------------------------
    @api.post("/images/generations")
    async def generations(request: Request):
        body = await _read_json(request)
        model = pick_model(body.get("model") if isinstance(body.get("model"), str) else None)
        req = parse_image_request("generation", body, pipelines[model], limits)
        return await run(request, model, req)

    async def image_endpoint(request: Request, kind: str):
        fields, files = await _read_form(request)
        model = pick_model(fields.get("model"))
        if kind == "edit" and "image" not in files:
            raise ApiError(400, "an 'image' file is required", param="image")
        # decoding uploads is CPU work: off the event loop, so other requests keep being answered
        image = await asyncio.to_thread(_open_upload, files, "image", opts.max_upload_pixels)
        mask = await asyncio.to_thread(_open_mask, files, opts.max_upload_pixels) if kind == "edit" else None
        if "mask" in files and kind != "edit":
            raise ApiError(400, "'mask' is only taken by /v1/images/edits", param="mask")
        req = parse_image_request(kind, fields, pipelines[model], limits, form=True, image=image, mask=mask,
                                  stored=_stored_params(files) if image is not None else None)
        if mask is not None and mask.size != image.size:
            raise ApiError(400, f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                f"{image.size[0]}x{image.size[1]}; they must match", param="mask", code="invalid_value")
        return await run(request, model, req)

    @api.post("/images/edits")
    async def edits(request: Request):
        return await image_endpoint(request, "edit")

    @api.post("/images/variations")
    async def variations(request: Request):
        return await image_endpoint(request, "variation")

    @api.post("/images/upscale")
    async def upscale(request: Request):
        """egaku extension: 2x resize + low-strength img2img ("hires fix"), multipart like variations."""
        return await image_endpoint(request, "upscale")

    def model_entry(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "egaku"}

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [model_entry(name) for name in workers]}

    @api.get("/models/{model_id:path}")  # (a path: a model named after its hub id has a slash in it)
    async def retrieve_model(model_id: str):
        model_id = aliases.get(model_id, model_id)  # the names requests may use ("dall-e-3", "builtin")
        if model_id not in workers:
            raise ApiError(404, f"model {model_id!r} is not served here; available: {', '.join(workers)}",
                           param="model", code="model_not_found")
        return model_entry(model_id)

    @api.get("/egaku/options")
    async def server_options():
        """What the web page offers: samplers, LoRAs, sizes, limits and the defaults within them."""
        from ..inference.generate import native_size
        from ..inference.generate import size_multiple
        from ..inference.samplers import DEFAULT_SAMPLER, usable_samplers
        from ..models.loading import recommended_guidance
        from .requests import default_steps

        def model_options(name: str, pipe, embeddings: dict[str, set[int | None]]) -> dict:
            # only what this model takes: generation refuses the other samplers, and skips the other embeddings
            # default_guidance: what an empty guidance field means, which the page sends for one emptied since a
            # Generate (left out, a variation would reuse its image's)
            return {"id": name, "native_size": native_size(pipe), "multiple": size_multiple(pipe),
                    "default_guidance": recommended_guidance(pipe),
                    "samplers": usable_samplers(dict(pipe.scheduler.config)),
                    "embeddings": _embedding_catalog(embeddings, pipe)}

        # (off the event loop: each embedding file is read, once for all the models, to learn its width; each LoRA's
        # header, once per model, to learn whether it fits)
        embeddings = await asyncio.to_thread(_embedding_widths, opts.embedding_dir, opts.allow_pickle)
        models = [model_options(name, pipe, embeddings) for name, pipe in pipelines.items()]
        loras, unusable = await asyncio.to_thread(_lora_listing, opts.lora_dir, lora_modules, lora_checked)
        unusable = {name: {lora: hide_paths(why, opts) for lora, why in unusable.get(name, {}).items()}
                    for name in pipelines}
        # each model's LoRAs: those it can load (generation refuses the others: another architecture or base)
        model_loras = {name: [lora for lora in loras if lora not in unusable[name]] for name in pipelines}
        return {
            "models": models,
            # the default model's, for clients that read one list
            "samplers": models[0]["samplers"], "embeddings": models[0]["embeddings"],
            "default_sampler": DEFAULT_SAMPLER, "loras": model_loras[default_model],
            "model_loras": model_loras,  # model -> the LoRAs it can load
            "unusable_loras": unusable,  # model -> {LoRA: why it cannot be loaded}, those left out of its list
            "max_n": opts.max_n, "max_side": opts.max_side, "max_steps": opts.max_steps,
            "default_steps": default_steps(limits),  # what a request without 'steps' gets
        }

    @api.get("/egaku/jobs/{job_id}")
    async def job_progress(job_id: str):
        if job_id not in jobs:
            raise ApiError(404, f"no recent job {job_id!r}", param="job_id", code="not_found")
        model, job = jobs[job_id]
        return {"id": job_id, "model": model, "state": job.state, "step": job.step, "total": job.total,
                "position": workers[model].position(job)}

    app.include_router(api)

    @app.api_route("/v1/files/{name}", methods=["GET", "HEAD"])
    async def file(name: str):
        # capability URLs: the unguessable token is the permission, so <img src> works without a header
        data = urls.get(name.removesuffix(".png"))
        if data is None:
            raise ApiError(404, "this image URL has expired or never existed; generate it again",
                           code="not_found")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "models": {name: w.stats() for name, w in workers.items()},
                "auth": bool(keys)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE_DIR / "index.html")

    app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")
    app.add_middleware(BodyLimit, max_bytes=int(opts.max_upload_mb * 2**20))
    return app


def load_pipelines(opts: ServeOptions) -> dict[str, Any]:
    from ..models.loading import load_pipeline

    pipelines: dict[str, Any] = {}
    for spec in opts.model:
        pipe = load_pipeline(spec, opts.device, opts.dtype, opts.model_config, allow_pickle=opts.allow_pickle)
        name = pipe.egaku_info.name
        if name in pipelines:
            raise EgakuError(f"model {spec!r} is given twice", param="model")
        pipelines[name] = pipe
    return pipelines


class LiveServer:
    """uvicorn in a background thread on an already-bound socket (tests, benchmarks): no port races."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        # an IPv6 address ("::1") needs an IPv6 socket, as _check_address binds it
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{_host_port(host, self.port)}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def _host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets ([::1]:8000), else its colons would run into the
    port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_address(host: str, port: int) -> None:
    """That uvicorn will be able to listen on ``host:port``, checked by binding it (as uvicorn binds it) and letting
    go: a port out of range, in use or not allowed, or an address this machine lacks, is one line that says so."""
    if not 1 <= port <= 65535:  # 0 would listen on a port chosen at random, which the start-up line cannot name
        raise EgakuError(f"--port {port} is not a TCP port; give one in 1..65535", param="port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise EgakuError(f"cannot listen on {_host_port(host, port)} ({exc.strerror or exc}); give another --port, "
                         "or a --host of this machine", param="port") from None


def serve_command(opts: ServeOptions) -> None:
    import ipaddress

    import uvicorn

    if opts.queue_size < 1 or opts.max_n < 1 or opts.max_side < 8 or opts.max_steps < 1:
        raise EgakuError("--queue-size, --max-n and --max-steps must be at least 1 and --max-side at least 8")
    for flag, folder in (("--lora-dir", opts.lora_dir), ("--embedding-dir", opts.embedding_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise EgakuError(f"{flag} {folder!r} is not a folder", param=flag[2:].replace("-", "_"))
    keys = api_keys_from_environment()  # a variable set to no key is an error here, before any model loads
    _check_address(opts.host, opts.port)  # a port in use, too, is an error before the models load
    try:
        loopback = ipaddress.ip_address(opts.host).is_loopback
    except ValueError:
        loopback = opts.host == "localhost"
    if not loopback and not keys:
        print(f"egaku: warning: serving on {opts.host} without an API key (${API_KEY_ENV} or ${API_KEYS_ENV} "
              "unset): anyone who can reach it can use it")
    if opts.embedding_dir and not opts.allow_pickle:
        refused = sorted(paths[0].relative_to(opts.embedding_dir).as_posix()
                         for paths in pickle_embeddings(opts.embedding_dir).values())
        if refused:
            shown = ", ".join(refused[:5]) + (f", ... ({len(refused) - 5} more)" if len(refused) > 5 else "")
            print(f"egaku: note: {len(refused)} pickle embedding{'s' if len(refused) != 1 else ''} in --embedding-dir "
                  f"left out ({shown}): requests cannot use them and the page does not offer them; --allow-pickle "
                  "would load them (read with weights_only=True; only files you trust)")
    pipelines = load_pipelines(opts)
    app = create_app(pipelines, opts, keys)
    auth = f"auth on ({len(keys)} key{'s' if len(keys) != 1 else ''})" if keys else "auth off"
    print(f"egaku: serving {', '.join(pipelines)} at http://{_host_port(opts.host, opts.port)}/ (API at /v1, {auth})")
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level)


__all__ = ["ServeOptions", "create_app", "serve_command", "LiveServer", "load_pipelines", "png_bytes"]
