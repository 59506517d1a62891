"""HTTP API of the render service (FastAPI; OpenAPI at /docs) and the web page at /."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fp_ray.encode import ImageError, decode_image, read_image_bytes
from fp_ray.request import RenderRequest, RequestError, make_request, parse_size
from serving.service import public, sse

STATIC = Path(__file__).parent / "static"
MAX_PIXELS = 4096 * 4096
FIELDS = set(RenderRequest.model_fields) - {"image", "end_image", "model"}
URL_SCHEMES = ("http://", "https://")  # never local paths: users must not read the server's files


_services: dict[str, object] = {}  # the replica's RenderService (Serve copies the FastAPI app object)


def bind_service(svc) -> None:
    _services["current"] = svc


def service(request: Request):
    svc = _services["current"]
    svc.resume_unfinished()
    return svc


def authorize(request: Request) -> None:
    token = service(request).auth_token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"})


def check_image(data: bytes, what: str) -> bytes:
    if not data:
        raise HTTPException(422, f"{what}: the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise HTTPException(422, f"{what}: {im.width}x{im.height} is over the {MAX_PIXELS} pixel limit")
        decode_image(data, what, "the upload")
    except ImageError as e:
        raise HTTPException(422, str(e)) from None
    except Image.UnidentifiedImageError:
        raise HTTPException(422, f"{what}: the upload is not an image (PNG, JPEG, WebP, ...)") from None
    return data


async def read_body(request: Request) -> tuple[dict, bytes | None, bytes | None]:
    """(fields, image bytes, end image bytes) from a multipart form or a JSON body."""
    limit = service(request).max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body is {int(length)} bytes; the limit is {limit}")
    kind = request.headers.get("content-type", "")
    images: dict[str, bytes | None] = {"image": None, "end_image": None}
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        fields = {}
        for key, value in form.multi_items():
            if key in images and hasattr(value, "read"):
                images[key] = await value.read()
                if len(images[key]) > limit:
                    raise HTTPException(413, f"{key}: the upload is over {limit} bytes")
            elif value != "":
                fields[key] = value
    elif kind.startswith("application/json"):
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"request body is over {limit} bytes")
        try:
            fields = json.loads(body)
        except json.JSONDecodeError as e:
            raise HTTPException(400, f"body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise HTTPException(422, "body must be a JSON object")
    else:
        raise HTTPException(415, "send multipart/form-data (with an image file) or application/json (with image_url)")
    for key in ("image", "end_image"):
        url = fields.pop(f"{key}_url", None)
        if images[key] is None and url:
            if not str(url).startswith(URL_SCHEMES):
                raise HTTPException(422, f"{key}_url: must be an http(s) URL, got {str(url)[:100]!r}")
            try:
                images[key] = read_image_bytes(str(url), key)
            except ImageError as e:
                raise HTTPException(422, str(e)) from None
        if images[key] is not None:
            check_image(images[key], key)
    if images["image"] is None:
        raise HTTPException(422, "image: upload a file named 'image' or give image_url")
    return fields, images["image"], images["end_image"]


def to_request(fields: dict, end_image: bytes | None) -> RenderRequest:
    unknown = set(fields) - FIELDS - {"size"}
    if unknown:
        raise HTTPException(422, f"unknown fields {sorted(unknown)}; known: {sorted(FIELDS | {'size'})}")
    try:
        if "size" in fields:
            fields["width"], fields["height"] = parse_size(str(fields.pop("size")))
        # a placeholder path: the service stores the uploads and points the request at them
        placeholders = {"image": "upload", "end_image": "upload" if end_image is not None else None}
        return make_request(**fields, **placeholders)
    except RequestError as e:
        raise HTTPException(422, str(e)) from None


def record_or_404(request: Request, rid: str) -> dict:
    record = service(request).records.get(rid)
    if record is None:
        raise HTTPException(404, f"no render {rid!r}")
    return record


def make_api() -> FastAPI:
    api = FastAPI(title="fp-ray", description="Long FramePack videos on Ray: submit, watch, download.", version="0.1.0")

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
        """Multipart: `image` (file), optional `end_image` (file), and the request fields
        (prompt, seconds, schedule, sampler, steps, guidance, seed, size, resolution, window,
        fps, crf). JSON: the same fields with `image_url` (http/https)."""
        authorize(request)
        fields, image, end_image = await read_body(request)
        render_request = to_request(fields, end_image)
        rid = service(request).submit(render_request, image, end_image)
        body = public(service(request).records.get(rid), str(request.base_url).rstrip("/"))
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})

    @api.get("/v1/renders")
    async def list_renders(request: Request, limit: int = 100):
        authorize(request)
        base = str(request.base_url).rstrip("/")
        return {"renders": [public(r, base) for r in service(request).records.list(min(max(limit, 1), 1000))]}

    @api.get("/v1/renders/{rid}")
    async def get_render(request: Request, rid: str):
        authorize(request)
        return public(record_or_404(request, rid), str(request.base_url).rstrip("/"))

    @api.get("/v1/renders/{rid}/events")
    async def events(request: Request, rid: str):
        """Server-Sent Events: plan, section_started, step, section_finished, section_decoded,
        then finished, failed or cancelled. Reconnect with Last-Event-ID to resume."""
        authorize(request)
        record_or_404(request, rid)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0

        async def stream():
            async for seq, event in service(request).events(rid, start):
                yield sse(seq, event)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.get("/v1/renders/{rid}/sections/{position}.mp4")
    async def section_preview(request: Request, rid: str, position: int):
        authorize(request)
        record_or_404(request, rid)
        path = service(request).preview_path(rid, position)
        if not path.is_file():
            raise HTTPException(404, f"section {position} of {rid} is not decoded yet")
        return FileResponse(path, media_type="video/mp4")

    @api.get("/v1/renders/{rid}/progressive.mp4")
    async def progressive(request: Request, rid: str):
        """The finished time-ordered prefix as a fragmented mp4 (forward and bidirectional
        schedules finish the start early); it grows while the render runs."""
        authorize(request)
        record_or_404(request, rid)
        path = service(request).progressive_path(rid)
        if not path.is_file():
            raise HTTPException(404, f"render {rid} has no finished prefix yet")
        return FileResponse(path, media_type="video/mp4")

    @api.get("/v1/renders/{rid}/video.mp4")
    async def video(request: Request, rid: str):
        authorize(request)
        record = record_or_404(request, rid)
        path = service(request).video_path(rid)
        if record["status"] != "finished" or not path.is_file():
            raise HTTPException(404, f"render {rid} is {record['status']}; the video exists once it is finished")
        return FileResponse(path, media_type="video/mp4", filename=f"{rid}.mp4")

    @api.delete("/v1/renders/{rid}")
    async def cancel(request: Request, rid: str):
        authorize(request)
        record = record_or_404(request, rid)
        if not await service(request).cancel(rid):
            raise HTTPException(409, f"render {rid} is {record['status']}; only queued or running renders can be cancelled")
        return public(record_or_404(request, rid), str(request.base_url).rstrip("/"))

    return api

