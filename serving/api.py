"""HTTP API of the render service (FastAPI; OpenAPI at /docs) and the web page at /.

Nothing here blocks the event loop: bodies are read with a cap while they stream in, image
URLs are fetched asynchronously (serving/fetch.py), images are decoded and records read on
threads. Every refusal is a 4xx with a short reason; a bad value is echoed as an excerpt."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import weakref
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from fp_ray.encode import ImageError, decode_image
from fp_ray.metadata import MetadataError, parse_metadata
from fp_ray.request import MAX_KEYFRAMES, RenderRequest, RequestError, excerpt, make_request, parse_keyframes, parse_size
from serving.fetch import FetchRefused, fetch_image_bytes
from serving.service import Busy, RenderService

STATIC = Path(__file__).parent / "static"
# image, end_image and extend come as uploads or URLs only: a request never names a server path
FIELDS = set(RenderRequest.model_fields) - {"image", "end_image", "extend", "model"}
MAX_DETAIL = 300  # characters of a reason; a bad value is shown as an excerpt
MAX_SIZE_TEXT = 32
FILE_METHODS = ["GET", "HEAD"]  # the videos answer HEAD too (curl -I, download managers; FastAPI adds it to no route)


_services: dict[str, RenderService] = {}  # the replica's RenderService (Serve copies the FastAPI app object)


def bind_service(svc: RenderService) -> None:
    _services["current"] = svc


def service(request: Request) -> RenderService:
    svc = _services["current"]
    svc.start()
    return svc


def authorize(request: Request) -> str | None:
    """The name of the caller's token (None when the service needs no token)."""
    tokens = service(request).tokens
    if not tokens:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":  # the scheme is case-insensitive (RFC 7235)
        for name, token in tokens.items():
            if secrets.compare_digest(given.strip().encode(), token.encode()):
                return name
    raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})


def busy(e: Busy) -> HTTPException:
    return HTTPException(429, str(e), {"Retry-After": str(e.retry_after)})


def gone() -> HTTPException:
    """The client went away mid-body: answered like any bad body (no one reads it), since an
    exception escaping the handler is logged with its traceback as a failed request."""
    return HTTPException(400, "the request body ended early: the client went away")


class BodyTooLarge(Exception):
    """The body went past the cap while it streamed in."""


def capped(request: Request, limit: int) -> Request:
    """The same request, whose body raises BodyTooLarge once more than `limit` bytes arrived:
    a chunked body is refused as it streams, not after it was buffered whole."""
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge()
        return message

    return Request(request.scope, receive)


def parse_json(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise HTTPException(400, "body is not valid JSON: nested too deeply") from None
    except UnicodeDecodeError:  # json.loads reads UTF-8/16/32 bytes only
        raise HTTPException(400, "body is not valid JSON: not UTF-8") from None
    if not isinstance(fields, dict):
        raise HTTPException(422, "body must be a JSON object")
    return fields


def check_image(data: bytes, what: str) -> None:
    """The same limits as the CLI and manifest rows (pixels from the header before any
    decoding, sides, a decodable image, EXIF orientation); run on a thread."""
    try:
        decode_image(data, what, "the upload")
    except ImageError as e:
        raise HTTPException(422, str(e)) from None


URL_DEADLINE_FACTOR = 3  # a request's URLs together get three times one URL's timeout
SECONDS = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*")
KEYFRAME_PART = re.compile(r"^keyframe_([0-9]+(?:\.[0-9]+)?)s?$")


async def fetched(url, svc: RenderService, what: str, check=check_image) -> bytes:
    """An http(s) URL's bytes, checked; 422 with the same reason for a refused URL or what it returned."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise HTTPException(422, f"{what}: must be an http(s) URL, got {excerpt(str(url), 44)}")
    try:
        data = await fetch_image_bytes(url, svc.fetch, what)
        await asyncio.to_thread(check, data, what)
        return data
    except (FetchRefused, HTTPException):  # what came back stays as unknown as a refused URL
        raise HTTPException(422, str(FetchRefused(what, ""))) from None


def keyframe_urls(fields: dict) -> list[tuple[float, object]]:
    """(time, URL) of each part of the `keyframes` field: 'TIME:URL; ...' or [{at, image_url}]."""
    given = fields.pop("keyframes", None) or []
    try:
        parsed = parse_keyframes(given) if isinstance(given, str) else \
            [x for g in given for x in (parse_keyframes(g) if isinstance(g, str) else [g])] if isinstance(given, list) else None
    except RequestError as e:
        raise HTTPException(422, str(e)) from None
    if parsed is None or not all(isinstance(k, dict) and set(k) <= {"at", "image", "image_url"} for k in parsed):
        raise HTTPException(422, "keyframes: expected 'TIME:URL; ...' or a list of {at, image_url}")
    out = []
    for k in parsed:
        at = k.get("at")
        if isinstance(at, bool) or not isinstance(at, (int, float, str)):
            raise HTTPException(422, f"keyframes: each needs a time in seconds, got {excerpt(k, 60)}")
        try:
            if isinstance(at, str) and not SECONDS.fullmatch(at):
                raise ValueError(at)
            out.append((float(at), k.get("image_url", k.get("image"))))
        except (ValueError, OverflowError):
            raise HTTPException(422, f"keyframes: a time is a number of seconds, got {excerpt(at, 30)}") from None
    return out


async def read_body(request: Request) -> tuple[RenderRequest, dict[str, bytes | None], list[bytes]]:
    """(request, {image, end_image, extend: bytes or None}, keyframe bytes) from a multipart
    form or a JSON body, the request checked before any URL is fetched. `extend` is a clip to
    extend (a file, or extend_url), checked where the service stores it; keyframes are the
    file parts named `keyframe_<seconds>s` and the `keyframes` field's TIME:URL parts (http/https
    only: a request never names a server path), their bytes in the request's (time) order."""
    svc = service(request)
    limit = svc.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and len(length) < 20 and int(length) > limit:
        raise HTTPException(413, f"request body is {int(length)} bytes; the limit is {limit}")
    kind = request.headers.get("content-type", "")
    images: dict[str, bytes | None] = {"image": None, "end_image": None, "extend": None}
    uploads: dict[float, bytes] = {}
    body = capped(request, limit)
    try:
        if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await body.form(max_files=3 + MAX_KEYFRAMES, max_fields=64)
            fields = {}
            for key, value in form.multi_items():
                if key in fields or (key in images and images[key] is not None):
                    raise HTTPException(422, f"{key if key.isidentifier() and len(key) <= 40 else excerpt(key, 40)}: given twice; give it once")
                if key in images and hasattr(value, "read"):
                    images[key] = await value.read()
                elif key.startswith("keyframe_") and hasattr(value, "read"):
                    if not (m := KEYFRAME_PART.match(key)):
                        raise HTTPException(422, f"{excerpt(key, 40)}: a keyframe file part is named keyframe_<seconds>s, e.g. keyframe_4.8s")
                    if float(m.group(1)) in uploads:
                        raise HTTPException(422, f"{excerpt(key, 40)}: a second keyframe at {float(m.group(1)):g}s")
                    uploads[float(m.group(1))] = await value.read()
                elif isinstance(value, str) and value != "":
                    fields[key] = value
        elif kind.startswith("application/json"):
            fields = await asyncio.to_thread(parse_json, await body.body())
        else:
            raise HTTPException(415, "send multipart/form-data (with an image file) or application/json (with image_url)")
    except BodyTooLarge:
        raise HTTPException(413, f"request body is over the limit of {limit} bytes") from None
    except ClientDisconnect:
        raise gone() from None
    urls = {key: fields.pop(f"{key}_url", None) for key in images}
    if both := [key for key in images if images[key] is not None and urls[key]]:
        raise HTTPException(422, f"{both[0]}: upload a file or give {both[0]}_url, not both")
    if images["image"] is None and not urls["image"] and images["extend"] is None and not urls["extend"]:
        raise HTTPException(422, "image: upload a file named 'image' or give image_url")  # extending forward, the clip's first frame can start
    keys = sorted([(at, data) for at, data in uploads.items()] + keyframe_urls(fields), key=lambda item: item[0])
    if len(keys) > MAX_KEYFRAMES:
        raise HTTPException(422, f"keyframes: at most {MAX_KEYFRAMES}")
    if keys:
        fields["keyframes"] = [{"at": at, "image": "upload"} for at, _ in keys]
    given = {key: images[key] is not None or bool(urls[key]) for key in images}
    checked = to_request(fields, given)  # refused here, before any download
    # All of a request's downloads share one byte budget (the upload cap) and one deadline, so
    # 67 URLs cannot hold the ingress 67 times as long, with 67 times the memory, as one.
    deadline = svc.config.url_timeout_s * URL_DEADLINE_FACTOR
    fetched_bytes = 0

    async def fetch(url, what: str, check=check_image) -> bytes:
        nonlocal fetched_bytes
        data = await fetched(url, svc, what, check)
        fetched_bytes += len(data)
        if fetched_bytes > limit:
            raise HTTPException(413, f"{what}: the images this request names are over the limit of {limit} bytes together")
        return data

    try:
        async with asyncio.timeout(deadline):
            for key in images:
                # a clip is checked where it is stored (serving/service.py), as a file PyAV can stream
                check = (lambda data, what: None) if key == "extend" else check_image
                if images[key] is None and urls[key]:
                    images[key] = await fetch(urls[key], f"{key}_url", check)
                elif images[key] is not None:
                    await asyncio.to_thread(check, images[key], key)
            key_bytes = []
            for at, source in keys:
                if isinstance(source, bytes):
                    await asyncio.to_thread(check_image, source, f"keyframe_{at:g}s")
                    key_bytes.append(source)
                else:
                    key_bytes.append(await fetch(source, f"keyframes[{at:g}s]"))
    except TimeoutError:
        raise HTTPException(422, f"the URLs this request names took over {deadline:g} s to fetch together") from None
    return checked, images, key_bytes


def to_request(fields: dict, given: dict[str, bool]) -> RenderRequest:
    """The request of a submission's fields; `given`: which of image, end_image, extend it has."""
    unknown = set(fields) - FIELDS - {"size"}
    if unknown:
        shown = sorted(excerpt(str(k), 24) for k in unknown)[:5]
        raise HTTPException(422, f"unknown fields [{', '.join(shown)}]; known: {sorted(FIELDS | {'size'})}")
    try:
        if "size" in fields:
            size = str(fields.pop("size"))
            if len(size) > MAX_SIZE_TEXT:
                raise RequestError(f"size: expected WIDTHxHEIGHT such as 640x480, got {excerpt(str(size), 24)}")
            fields["width"], fields["height"] = parse_size(size)
        # a placeholder path: the service stores the uploads and points the request at them
        placeholders = {key: "upload" if there else None for key, there in given.items()}
        return make_request(**fields, **placeholders)
    except (RequestError, ValueError, TypeError) as e:  # ValueError: e.g. an int of 5000 digits
        raise HTTPException(422, str(e)) from None


async def read_upload(request: Request, limit: int) -> bytes:
    """One file: the body itself, or the first file of a multipart form; 413 past `limit`."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and len(length) < 20 and int(length) > limit:
        raise HTTPException(413, f"request body is {int(length)} bytes; the limit is {limit}")
    body = capped(request, limit)
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await body.form(max_files=1, max_fields=4)
            upload = next((v for _, v in form.multi_items() if hasattr(v, "read")), None)
            if upload is None:
                raise HTTPException(422, "upload the video (or its .mp4.json) as a file")
            return await upload.read()
        return await body.body()
    except BodyTooLarge:
        raise HTTPException(413, f"request body is over the limit of {limit} bytes") from None
    except ClientDisconnect:
        raise gone() from None


def form_fields(record: dict) -> dict:
    """A render record's request as the fields POST /v1/renders takes (size as WxH); checked
    as a request, so a hand-edited record cannot hand the page values it would refuse."""
    # keyframes' images, like the start image's, are the user's to give again (a Serve-made
    # record knows them by hash only)
    fields = {k: v for k, v in record["request"].items() if k in FIELDS - {"keyframes"} and v is not None}
    try:
        request = make_request(**fields, image="upload")
    except (ValueError, TypeError) as e:  # RequestError is a ValueError
        raise HTTPException(422, f"the render record holds a bad request: {e}") from None
    fields.pop("loras", None)
    if request.loras:  # as the form's text field takes them
        fields["loras"] = ", ".join(f"{c.name}:{c.weight:g}" for c in request.loras)
    width, height = record["request"].get("width"), record["request"].get("height")
    if width is not None and height is not None:
        fields["size"] = f"{width}x{height}"
    return fields


async def record_or_404(request: Request, rid: str) -> dict:
    svc = service(request)
    record = await svc.db(svc.records.get, rid) if len(rid) <= 64 else None
    if record is None:
        raise HTTPException(404, f"no render {excerpt(str(rid), 44)}")
    return record


def sse(seq: int, event: dict) -> str:
    return f"id: {seq}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


def public(record: dict, base: str) -> dict:
    """A record as the API shows it: no server paths, no owner."""
    request = {k: v for k, v in record["request"].items() if k not in ("image", "end_image", "extend", "model")}
    if request.get("keyframes"):  # their images are uploads this server stored: times only
        request["keyframes"] = [{"at": k["at"]} for k in request["keyframes"]]
    rid = record["id"]
    links = {"self": f"{base}/v1/renders/{rid}", "events": f"{base}/v1/renders/{rid}/events"}
    if record["status"] == "finished":
        links["video"] = f"{base}/v1/renders/{rid}/video.mp4"
    return {
        "id": rid, "status": record["status"], "sections_done": record["sections_done"],
        "sections_total": record["sections_total"], "eta_s": record["eta_s"], "error": record["error"],
        "frames": record["frames"], "created": record["created"], "updated": record["updated"],
        "request": request, "links": links,
    }


def make_api() -> FastAPI:
    api = FastAPI(title="fp-ray", description="Long FramePack videos on Ray: submit, watch, download.", version="0.1.0")

    @api.exception_handler(HTTPException)
    async def short_reasons(request: Request, exc: HTTPException):
        if isinstance(exc.detail, str) and len(exc.detail) > MAX_DETAIL:
            exc = HTTPException(exc.status_code, exc.detail[:MAX_DETAIL] + "...", exc.headers)
        return await http_exception_handler(request, exc)

    @api.exception_handler(RequestValidationError)
    async def short_validation_reasons(request: Request, exc: RequestValidationError):
        """A bad query or path parameter (?limit=, a section number) as one short reason; FastAPI's
        own answer echoes the whole value (a 30 KB URL came back whole)."""
        err = exc.errors()[0]
        return JSONResponse({"detail": f"{err['loc'][-1]}: {err['msg']} (got {excerpt(err.get('input'), 44)})"}, status_code=422)

    def base(request: Request) -> str:
        return service(request).config.public_url.rstrip("/")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    @api.get("/healthz")
    async def healthz(request: Request):
        return {"ok": True, "live_renders": len(service(request).live)}

    @api.get("/metrics", include_in_schema=False)
    async def metrics(request: Request):
        return Response(generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/renders", status_code=202)
    async def submit(request: Request):
        """Multipart: `image` (file), optional `end_image` (file), optional `extend` (a video file
        to extend: forward continues it, and then `image` may be left out; inverted leads into it),
        and the request fields
        (prompt, seconds, schedule, sampler, steps, guidance, seed, size, resolution, window,
        fps, crf, cache_threshold, cache_method, cfg, negative_prompt, cfg_rescale, loras: "name:weight, ..." of the
        names GET /v1/loras lists). JSON: the same fields with `image_url` (http/https; also
        `end_image_url`, `extend_url`); loras also as
        [{name, weight}]."""
        client = authorize(request)
        svc = service(request)
        render_request, images, key_bytes = await read_body(request)
        try:
            rid = await svc.submit(render_request, (images["image"], images["end_image"], *key_bytes), client, clip=images["extend"])
        except RequestError as e:  # a LoRA the server does not offer, a clip it cannot extend
            raise HTTPException(422, str(e)) from None
        except Busy as e:
            svc.metrics.rejected.labels("renders").inc()
            raise busy(e) from None
        body = public(await record_or_404(request, rid), base(request))
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})

    @api.get("/v1/loras")
    async def loras(request: Request):
        """The LoRA names a request may give (the server's registry)."""
        authorize(request)
        return {"loras": service(request).loras.names}

    @api.post("/v1/settings")
    async def settings(request: Request):
        """The settings a video fp-ray made was rendered with, to render it again: the mp4 (or
        its `.mp4.json` sidecar; for a large mp4 its first few MB, where the record sits) as
        the body or as a multipart file. Returns `fields` (as POST /v1/renders takes them),
        the images' sha256 (the images are not in the video) and the fp-ray version."""
        authorize(request)
        data = await read_upload(request, service(request).max_upload_bytes)
        try:
            record = await asyncio.to_thread(parse_metadata, data, "the upload")
        except MetadataError as e:
            raise HTTPException(422, str(e)) from None
        images = {k: v.get("sha256") if isinstance(v, dict) else None for k, v in record["images"].items() if k in ("image", "end_image", "extend")}
        given, hashes = record["request"].get("keyframes"), record["images"].get("keyframes")
        keyframes = zip(given, hashes) if isinstance(given, list) and isinstance(hashes, list) else ()  # a hand-edited record's may be anything
        if keys := [{"at": k.get("at"), "sha256": h.get("sha256")} for k, h in keyframes if isinstance(k, dict) and isinstance(h, dict)]:
            images["keyframes"] = keys  # to pick again, as the start image is
        return {"fields": form_fields(record), "images": images, "fp_ray_version": record.get("fp_ray_version")}

    @api.get("/v1/renders")
    async def list_renders(request: Request, limit: int = 100):
        authorize(request)
        svc = service(request)
        return {"renders": [public(r, base(request)) for r in await svc.db(svc.records.list, min(max(limit, 1), 1000))]}

    @api.get("/v1/renders/{rid}")
    async def get_render(request: Request, rid: str):
        authorize(request)
        return public(await record_or_404(request, rid), base(request))

    @api.get("/v1/renders/{rid}/events")
    async def events(request: Request, rid: str):
        """Server-Sent Events: plan, section_started, step, section_finished, section_decoded,
        then finished, failed or cancelled, and the stream ends. Comments (`: heartbeat`) keep
        idle streams alive. Reconnect with Last-Event-ID to resume."""
        authorize(request)
        await record_or_404(request, rid)
        svc = service(request)
        last = request.headers.get("last-event-id", "").strip()
        after = int(last) if last.isdigit() and len(last) < 19 else -1
        try:
            release = svc.open_stream(rid)
        except Busy as e:
            svc.metrics.rejected.labels("streams").inc()
            raise busy(e) from None

        async def stream():
            try:
                async for item in svc.events(rid, after):
                    yield ": heartbeat\n\n" if item is None else sse(*item)
            finally:
                release()

        body = stream()
        weakref.finalize(body, release)  # a client gone before the stream started still frees its slot
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.api_route("/v1/renders/{rid}/sections/{position}.mp4", methods=FILE_METHODS)
    async def section_preview(request: Request, rid: str, position: int):
        authorize(request)
        await record_or_404(request, rid)
        path = service(request).preview_path(rid, position)
        if not 0 <= position < 100_000 or not path.is_file():
            raise HTTPException(404, f"section {position} of {rid} is not decoded yet")
        return FileResponse(path, media_type="video/mp4")

    @api.api_route("/v1/renders/{rid}/progressive.mp4", methods=FILE_METHODS)
    async def progressive(request: Request, rid: str):
        """The finished time-ordered prefix as a fragmented mp4 (forward and bidirectional
        schedules finish the start early); it grows while the render runs."""
        authorize(request)
        await record_or_404(request, rid)
        path = service(request).progressive_path(rid)
        if not path.is_file():
            raise HTTPException(404, f"render {rid} has no finished prefix yet")
        return FileResponse(path, media_type="video/mp4")

    @api.api_route("/v1/renders/{rid}/video.mp4", methods=FILE_METHODS)
    async def video(request: Request, rid: str):
        authorize(request)
        record = await record_or_404(request, rid)
        path = service(request).video_path(rid)
        if record["status"] != "finished" or not path.is_file():
            raise HTTPException(404, f"render {rid} is {record['status']}; the video exists once it is finished")
        return FileResponse(path, media_type="video/mp4", filename=f"{rid}.mp4")

    @api.delete("/v1/renders/{rid}")
    async def cancel_or_delete(request: Request, rid: str):
        """A queued or running render is cancelled (and its record kept); an ended one is
        deleted with its files."""
        authorize(request)
        record = await record_or_404(request, rid)
        svc = service(request)
        if await svc.cancel(rid):
            return public(await record_or_404(request, rid), base(request))
        if await svc.delete(rid):
            return {"id": rid, "status": record["status"], "deleted": True}
        raise HTTPException(409, f"render {rid} changed state; retry")

    return api
