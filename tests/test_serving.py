"""The real Serve app on the shared local Ray cluster, over HTTP: submit, poll, SSE, previews
before the final video, cancel, bad requests, restarts that keep records and resume work."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT

from images import png_header_only
from serving.app import build_app
from conftest import free_port

SMALL = {"prompt": "a lake at dawn", "size": "64x48", "steps": "4"}


# loopback is allowed for image_url so the tests' local servers can be fetched; short leases so
# a restarted ingress takes over its renders quickly
CONFIG = {"url_allow": "127.0.0.1/32", "url_timeout_s": 2, "lease_s": 3, "max_streams_per_render": 4, "heartbeat_s": 1}


def deploy(storage):
    serve.run(build_app({"model": str(TINY_CHECKPOINT), "storage": str(storage), **CONFIG}), name="fp-ray", route_prefix="/")


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(storage)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    yield client, storage
    client.close()
    serve.shutdown()


def submit(client, **fields):
    files = {"image": ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png")}
    r = client.post("/v1/renders", data={**SMALL, **fields}, files=files)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def events(client, rid):
    """Every SSE event of a render, in order, until it ends."""
    out = []
    with client.stream("GET", f"/v1/renders/{rid}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if out[-1]["type"] in ("finished", "failed", "cancelled"):
                    break
    return out


def event_ids(client, rid, last: str | None = None) -> list[int]:
    headers = {"Last-Event-ID": last} if last is not None else {}
    with client.stream("GET", f"/v1/renders/{rid}/events", headers=headers) as r:
        return [int(line[4:]) for line in r.iter_lines() if line.startswith("id: ")]


def wait_until(client, rid, states, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/renders/{rid}").json()
        if record["status"] in states:
            return record
        time.sleep(0.2)  # polling a status endpoint, as a client does
    raise AssertionError(f"{rid} still {record['status']}")


def test_render_flow_events_previews_and_final_video(app):
    client, _ = app
    rid = submit(client, seconds="4.8")  # 4 sections
    seen_preview_before_video = False
    with client.stream("GET", f"/v1/renders/{rid}/events") as r:
        kinds = []
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            kinds.append(event["type"])
            if event["type"] == "section_decoded" and not seen_preview_before_video:
                preview = client.get(f"/v1/renders/{rid}/sections/{event['position']}.mp4")
                assert preview.status_code == 200 and preview.content[4:8] == b"ftyp"
                seen_preview_before_video = client.get(f"/v1/renders/{rid}/video.mp4").status_code == 404
            if event["type"] == "finished":
                break
    assert seen_preview_before_video
    assert kinds[0] == "plan" and kinds[-1] == "finished"
    assert kinds.count("section_finished") == 4 and kinds.count("section_decoded") == 4 and kinds.count("step") == 16
    assert kinds.index("section_started") < kinds.index("step") < kinds.index("section_finished")
    record = wait_until(client, rid, {"finished"})
    assert record["sections_done"] == record["sections_total"] == 4 and "video" in record["links"]
    video = client.get(f"/v1/renders/{rid}/video.mp4")
    with av.open(io.BytesIO(video.content)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4 * 36 + 1
    assert rid in [r["id"] for r in client.get("/v1/renders").json()["renders"]]
    metrics = client.get("/metrics").text
    assert "fp_ray_renders_finished_total" in metrics and "fp_ray_section_seconds_count" in metrics
    assert metric(client, "fp_ray_steps_total") >= 16
    assert metric(client, "fp_ray_video_seconds_total") >= 145 / 30


def metric(client, name: str) -> float:
    """A sample's value from the Prometheus scrape of /metrics."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def steps_total(client) -> float:
    return metric(client, "fp_ray_steps_total")


def test_cancel_stops_the_work(app):
    client, storage = app
    rid = submit(client, seconds="12", steps="30")  # 10 sections
    with client.stream("GET", f"/v1/renders/{rid}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "step":
                break
    r = client.delete(f"/v1/renders/{rid}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert events(client, rid)[-1]["type"] == "cancelled"
    before = steps_total(client)
    other = submit(client, seconds="1.2", steps="3")
    wait_until(client, other, {"finished"})
    # only the new render's 3 steps ran (plus at most the one step in flight at cancel time)
    assert steps_total(client) - before <= 4
    # the section in flight stopped on the generator replica: had it run on, it would have saved
    # its checkpoint (after cancel removed the render's work files) before the other render got the slot;
    # what stays is the cancelled owner token, so a section dispatched late does not start either
    left = sorted(p.name for p in (storage / "sections" / rid).rglob("*") if p.is_file())
    assert left == ["owner"], left
    assert client.get(f"/v1/renders/{rid}").json()["sections_done"] < 10
    gone = client.delete(f"/v1/renders/{rid}")  # an ended render: DELETE removes it
    assert gone.status_code == 200 and gone.json()["deleted"]
    assert client.get(f"/v1/renders/{rid}").status_code == 404
    assert not (storage / "sections" / rid).exists()


@pytest.mark.parametrize("data,files,status,reason", [
    ({**SMALL}, None, 422, "image: upload a file"),
    ({**SMALL, "size": "65x48"}, "png", 422, "multiple of 16"),
    ({**SMALL, "seconds": "-1"}, "png", 422, "seconds"),
    ({**SMALL, "schedule": "sideways"}, "png", 422, "schedule"),
    ({**SMALL, "colour": "red"}, "png", 422, "unknown fields ['colour']"),
    ({**SMALL}, "text", 422, "not an image"),
    ({**SMALL}, "huge", 422, "image: 'the upload' is too large (400,000,000 pixels"),
    ({**SMALL}, "tiny", 422, "each side at least 16"),
    ({**SMALL, "seconds": "0.1"}, "png", 422, "less than half a section"),
    ({**SMALL, "cfg": "0.5"}, "png", 422, "cfg: Input should be greater than or equal to 1"),
    ({**SMALL, "cfg": "2", "cfg_rescale": "3"}, "png", 422, "cfg_rescale: Input should be less than or equal to 1"),
    ({**SMALL, "negative_prompt": "blurry"}, "png", 422, "negative_prompt: needs cfg above 1"),
    ({**SMALL, "loras": "/etc/passwd:0.5"}, "png", 422, "unknown LoRA '/etc/passwd'; this server offers: none"),
    ({**SMALL, "loop": "true"}, "png+end", 422, "loop: the end image is the start image; drop end_image"),
    ({**SMALL, "loop": "true", "schedule": "forward"}, "png", 422, "loop: needs the inverted or bidirectional schedule"),
])
def test_bad_requests_get_4xx_with_a_reason(app, data, files, status, reason):
    client, _ = app
    upload = {"png": {"image": ("a.png", SAMPLE_IMAGE.read_bytes(), "image/png")},
              "text": {"image": ("a.png", b"hello", "image/png")},
              "huge": {"image": ("a.png", png_header_only(20000, 20000), "image/png")},
              "tiny": {"image": ("a.png", png_header_only(4, 400), "image/png")},
              "png+end": {"image": ("a.png", SAMPLE_IMAGE.read_bytes(), "image/png"),
                          "end_image": ("b.png", SAMPLE_IMAGE.read_bytes(), "image/png")}}.get(files)
    r = client.post("/v1/renders", data=data, files=upload)
    assert r.status_code == status and reason in r.json()["detail"], r.text


def test_real_guidance_fields_reach_the_generator(app, components, tmp_path):
    """cfg, negative_prompt and cfg_rescale as form fields: in the record, and the video is the
    one the same request renders locally."""
    from fp_ray.render import render
    from fp_ray.request import make_request

    client, _ = app
    guided = {"cfg": "2.5", "negative_prompt": "blurry, static", "cfg_rescale": "0.3"}
    rid = submit(client, seconds="1.2", seed="3", **guided)
    record = wait_until(client, rid, {"finished", "failed"})
    assert record["status"] == "finished", record["error"]
    assert {k: record["request"][k] for k in guided} == {"cfg": 2.5, "negative_prompt": "blurry, static", "cfg_rescale": 0.3}
    request = make_request(prompt=SMALL["prompt"], width=64, height=48, steps=4, seconds=1.2, seed=3, cfg=2.5,
                           negative_prompt="blurry, static", cfg_rescale=0.3)
    local = render(request, tmp_path / "local.mp4", components=components)
    assert client.get(f"/v1/renders/{rid}/video.mp4").content == local.path.read_bytes()


def video_frames(path) -> list[bytes]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24").tobytes() for frame in container.decode(video=0)]


def test_keyframes_as_uploads_render_as_locally_and_server_paths_are_refused(app, components, tmp_path):
    """A keyframe is a file part named keyframe_<seconds>s (or a TIME:URL in the keyframes
    field): stored with the render, recorded by hash, and the video is the local one."""
    from PIL import ImageOps

    from fp_ray.render import render
    from fp_ray.request import make_request

    client, _ = app
    key = tmp_path / "key.png"
    ImageOps.mirror(Image.open(SAMPLE_IMAGE)).save(key)
    files = [("image", ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png")), ("keyframe_1.3s", ("k.png", key.read_bytes(), "image/png"))]
    r = client.post("/v1/renders", data={**SMALL, "seconds": "3.6", "schedule": "bidirectional"}, files=files)
    assert r.status_code == 202, r.text
    record = wait_until(client, r.json()["id"], {"finished", "failed"})
    assert record["status"] == "finished", record["error"]
    assert [k["at"] for k in record["request"]["keyframes"]] == [1.3]
    request = make_request(prompt=SMALL["prompt"], width=64, height=48, steps=4, seconds=3.6, schedule="bidirectional",
                           keyframes=[{"at": 1.3, "image": str(key)}])
    local = render(request, tmp_path / "local.mp4", components=components)
    served = tmp_path / "served.mp4"
    served.write_bytes(client.get(f"/v1/renders/{record['id']}/video.mp4").content)
    assert video_frames(served) == video_frames(local.path)  # the records differ: the upload is known by hash only
    assert "input" not in json.dumps(client.get(f"/v1/renders/{record['id']}").json())  # no server paths
    settings = client.post("/v1/settings", content=served.read_bytes())  # the page can load it again
    assert settings.status_code == 200, settings.text
    assert "keyframes" not in settings.json()["fields"]
    assert settings.json()["images"]["keyframes"] == [{"at": 1.3, "sha256": hashlib.sha256(key.read_bytes()).hexdigest()}]
    for name in ("keyframe_4ss", "keyframe_-1s"):  # a part that names no time is refused, not dropped
        r = client.post("/v1/renders", data={**SMALL, "seconds": "3.6", "schedule": "bidirectional"},
                        files=[("image", ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png")), (name, ("k.png", key.read_bytes(), "image/png"))])
        assert r.status_code == 422 and "keyframe_<seconds>s" in r.json()["detail"], r.text
    start = ("image", ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png"))
    for given in ("1.2s:/etc/passwd", f"1.2s:file://{key}", "1.2s:s3://bucket/k.png"):
        r = client.post("/v1/renders", data={**SMALL, "seconds": "3.6", "schedule": "bidirectional", "keyframes": given}, files=[start])
        assert r.status_code == 422 and r.json()["detail"].startswith("keyframes[1.2s]: must be an http(s) URL"), r.text
    files = [start, ("keyframe_9s", ("k.png", key.read_bytes(), "image/png"))]
    r = client.post("/v1/renders", data={**SMALL, "seconds": "3.6", "schedule": "bidirectional"}, files=files)
    assert r.status_code == 422 and "snaps to section boundary" in r.json()["detail"]
    files = [files[0], ("keyframe_1.2s", ("k.png", b"not an image", "image/png"))]
    r = client.post("/v1/renders", data={**SMALL, "seconds": "3.6", "schedule": "bidirectional"}, files=files)
    assert r.status_code == 422 and "keyframe_1.2s" in r.json()["detail"]


def test_other_bad_requests(app):
    client, _ = app
    assert client.post("/v1/renders", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    r = client.post("/v1/renders", json={**SMALL, "image_url": "file:///etc/passwd"})
    assert r.status_code == 422 and "http(s) URL" in r.json()["detail"]
    big = client.post("/v1/renders", content=b"0" * (26 * 1024 * 1024), headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert client.get("/v1/renders/nope").status_code == 404
    assert client.get("/v1/renders/nope/video.mp4").status_code == 404
    assert client.get("/v1/renders/nope/progressive.mp4").status_code == 404
    assert client.get("/v1/renders/%2E%2E/progressive.mp4").status_code == 404  # never a file outside a render
    assert client.get(f"/v1/renders/{'a' * 300}/progressive.mp4").status_code == 404
    start = ("image", ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png"))
    bidirectional = {**SMALL, "seconds": "3.6", "schedule": "bidirectional"}
    for data, files, reason in [
        (SMALL, [start, start], "image: given twice"),
        ({**SMALL, "image_url": "https://example.com/a.png"}, [start], "image: upload a file or give image_url, not both"),
        (bidirectional, [start, ("keyframe_\u0663s", ("k.png", SAMPLE_IMAGE.read_bytes(), "image/png"))], "keyframe_<seconds>s"),
    ]:
        r = client.post("/v1/renders", data=data, files=files)
        assert r.status_code == 422 and reason in r.json()["detail"], r.text
    for at in (True, "1_0", int("1" + "0" * 400), "nan"):
        r = client.post("/v1/renders", json={**SMALL, "image_url": "https://example.com/a.png", "schedule": "bidirectional",
                                             "seconds": 3.6, "keyframes": [{"at": at, "image_url": "https://example.com/k.png"}]})
        assert r.status_code == 422 and r.json()["detail"].startswith("keyframes:"), (at, r.text)


def test_restart_keeps_records_and_resumes_unfinished_renders(app):
    client, storage = app
    finished = submit(client, seconds="1.2")
    wait_until(client, finished, {"finished"})
    video = client.get(f"/v1/renders/{finished}/video.mp4").content
    unfinished = submit(client, seconds="6", steps="20")  # 5 sections
    with client.stream("GET", f"/v1/renders/{unfinished}/events") as r:
        done = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "section_finished":
                done += 1
                if done == 2:
                    break
    serve.delete("fp-ray")  # the whole app goes away mid-render
    deploy(storage)
    # the new ingress resumes the render by itself: its video appears with no request made
    video_file = storage / "renders" / unfinished / "video.mp4"
    deadline = time.monotonic() + 120
    while not video_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert video_file.exists()
    assert client.get(f"/v1/renders/{finished}").json()["status"] == "finished"
    assert client.get(f"/v1/renders/{finished}/video.mp4").content == video
    record = wait_until(client, unfinished, {"finished"})
    assert record["sections_done"] == 5
    plans = [e for e in events(client, unfinished) if e["type"] == "plan"]
    assert len(plans) == 2 and len(plans[1]["reused"]) >= 2  # the resumed run reused the checkpoints
    ids = event_ids(client, unfinished)
    assert ids == sorted(set(ids))  # unique and increasing across the resume


def test_web_page_renders_and_plays_the_video_in_chromium(app):
    """Headless Debian Chromium, driven by Playwright: upload, watch previews, play."""
    from playwright.sync_api import sync_playwright

    client, _ = app
    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is needed (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        page.goto(str(client.base_url) + "/")
        page.set_input_files("#image", str(SAMPLE_IMAGE))
        page.fill("#prompt", "a quiet lake")
        page.fill("#seconds", "2.4")
        page.click("#submit")
        page.wait_for_selector("#sections video.preview", timeout=120_000)
        page.wait_for_function(
            "() => { const v = document.getElementById('video');"
            " return !document.getElementById('final').hidden && v.readyState >= 2 && v.currentTime > 0; }",
            timeout=120_000,
        )
        assert page.locator("#sections video.preview").count() == 2
        assert "finished" in page.text_content("#status")
        assert page.get_attribute("#download", "href").startswith("blob:")
        page.screenshot(path=str(Path(os.environ.get("FP_RAY_SCREENSHOTS", "/tmp")) / "fp-ray-web.png"))
        # a render cancelled elsewhere shows as cancelled; its guidance fields came from the form
        page.fill("#seconds", "30")
        page.fill("#cfg", "2.5")
        page.fill("#negative_prompt", "blurry")
        page.fill("#cfg_rescale", "0.3")
        # two keyframes: one time per image, or the page says so and sends nothing
        page.set_input_files("#keyframes", [str(SAMPLE_IMAGE), str(SAMPLE_IMAGE)])
        assert page.input_value("#schedule") == "bidirectional"
        page.fill("#keyframe_times", "12")
        page.click("#submit")
        page.wait_for_function("() => /2 images but 1 times/.test(document.getElementById('error').textContent)", timeout=10_000)
        page.fill("#keyframe_times", "12, 4.8")
        page.click("#submit")
        page.wait_for_function("() => /sections/.test(document.getElementById('status').textContent)", timeout=60_000)
        rid = page.text_content("#status").split()[1].rstrip(":")
        sent = client.get(f"/v1/renders/{rid}").json()["request"]
        assert (sent["cfg"], sent["negative_prompt"], sent["cfg_rescale"]) == (2.5, "blurry", 0.3)
        assert sent["schedule"] == "bidirectional" and [k["at"] for k in sent["keyframes"]] == [4.8, 12.0]
        assert client.delete(f"/v1/renders/{rid}").json()["status"] == "cancelled"
        page.wait_for_function("() => document.getElementById('status').textContent.endsWith(': cancelled')", timeout=30_000)
        assert page.text_content("#error") == ""
        browser.close()


def test_web_page_loads_settings_from_a_dropped_video(app):
    """Drop a finished video on the page: its settings fill the form, the page checks the
    picked image against the recorded hash, and rendering again gives the same video (a loop:
    its checkbox is ticked and sent again)."""
    from playwright.sync_api import sync_playwright

    client, _ = app
    rid = submit(client, seconds="1.2", seed="77", steps="3", loop="true")
    wait_until(client, rid, {"finished"})
    video = client.get(f"/v1/renders/{rid}/video.mp4").content
    make_file = """([b64, name, type]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, { type })); return dt; }"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(str(client.base_url) + "/")
        junk = page.evaluate_handle(make_file, [base64.b64encode(b"hello").decode(), "notes.txt", "text/plain"])
        page.dispatch_event("body", "drop", {"dataTransfer": junk})
        page.wait_for_function("() => document.getElementById('error').textContent.includes('neither an mp4 nor a JSON')")
        dropped = page.evaluate_handle(make_file, [base64.b64encode(video).decode(), "clip.mp4", "video/mp4"])
        page.dispatch_event("body", "drop", {"dataTransfer": dropped})
        page.wait_for_function("() => document.getElementById('loaded').textContent.startsWith('settings from clip.mp4')")
        assert (page.input_value("#seed"), page.input_value("#seconds"), page.input_value("#prompt")) == ("77", "1.2", SMALL["prompt"])
        assert page.get_attribute("input.loaded[name=steps]", "value") == "3" and page.is_checked("#loop")
        assert page.get_attribute("input.loaded[name=size]", "value") == "64x48"
        assert page.text_content("#recorded").startswith("pick the start image (sha256 ")
        page.set_input_files("#image", str(SAMPLE_IMAGE))
        page.wait_for_function("() => document.getElementById('recorded').textContent === 'start image matches'")
        page.click("#submit")
        page.wait_for_function("() => document.getElementById('status').textContent.endsWith(': finished')", timeout=120_000)
        again = page.text_content("#status").split()[1].rstrip(":")
        assert page.text_content("#error") == ""
        browser.close()
    assert again != rid and client.get(f"/v1/renders/{again}/video.mp4").content == video


def test_serve_config_matches_the_app():
    """serving/config.yaml parses as Ray's own Serve deploy schema and names this app's deployments."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import Decoder, Encoder, Generator, Ingress

    config = ServeDeploySchema.model_validate(yaml.safe_load((Path(__file__).parent.parent / "serving/config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "serving.app:build_app"
    names = {d.name for d in application.deployments}
    assert names == {d.name for d in (Ingress, Encoder, Generator, Decoder)}
    generator = next(d for d in application.deployments if d.name == "Generator")
    assert generator.max_ongoing_requests == 1 and generator.ray_actor_options.num_gpus == 1
    assert generator.autoscaling_config["min_replicas"] == 0  # scale to zero
    assert generator.autoscaling_config["downscale_delay_s"] >= 300


def test_bearer_token_is_required_when_configured(tmp_path, components):
    """The API layer alone (FastAPI test client) over in-process workers."""
    from fastapi.testclient import TestClient

    from fp_ray.render import LocalPools
    from serving.api import bind_service, make_api
    from serving.service import RenderService

    bind_service(RenderService(LocalPools.from_components(components), str(TINY_CHECKPOINT), str(tmp_path), auth_token="s3cret"))
    with TestClient(make_api()) as client:
        assert client.get("/v1/renders").status_code == 401
        assert client.get("/v1/renders", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/renders", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no token


@pytest.fixture()
def hostile_server():
    """A loopback server that accepts and never answers, and one that promises 1000 bytes and sends 10."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    short = socket.socket()
    short.bind(("127.0.0.1", 0))
    short.listen(16)

    def cut_short():
        while True:
            try:
                conn, _ = short.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n\x89PNG\r\n\x1a\n\x00\x00")
            conn.close()

    threading.Thread(target=cut_short, daemon=True).start()
    yield f"http://127.0.0.1:{silent.getsockname()[1]}/a.png", f"http://127.0.0.1:{short.getsockname()[1]}/a.png"
    silent.close()
    short.close()


def healthz_latencies(client, until) -> list[float]:
    out = []
    while not until():
        t = time.monotonic()
        assert client.get("/healthz", timeout=5).status_code == 200
        out.append(time.monotonic() - t)
    return out


def test_healthz_answers_while_a_url_hangs_and_while_a_render_finishes(app, hostile_server):
    client, _ = app
    silent, _ = hostile_server
    result = {}

    def post():
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            result["r"] = c.post("/v1/renders", json={**SMALL, "image_url": silent})

    poster = threading.Thread(target=post)
    poster.start()
    latencies = healthz_latencies(client, lambda: not poster.is_alive())
    poster.join()
    assert result["r"].status_code == 422 and result["r"].json()["detail"] == "image_url: could not fetch an image from that URL"
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies  # the fetch's 2 s deadline passed meanwhile
    rid = submit(client, seconds="2.4")
    latencies = healthz_latencies(client, lambda: client.get(f"/v1/renders/{rid}").json()["status"] == "finished")
    assert latencies and max(latencies) < 1.0, latencies


def test_image_urls_are_refused_uniformly(app, hostile_server):
    client, _ = app
    _, short = hostile_server
    port = client.base_url.port
    urls = [f"http://127.0.0.2:{port}/metrics", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png",
            f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port}/nothing-here", short]
    details = set()
    for url in urls:
        r = client.post("/v1/renders", json={**SMALL, "image_url": url})
        assert r.status_code == 422, (url, r.text)
        details.add(r.json()["detail"])
    assert details == {"image_url: could not fetch an image from that URL"}


@pytest.fixture
def slow_image_server():
    """A loopback server that answers every request with the sample image after 1.5 s."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = SAMPLE_IMAGE.read_bytes()

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(1.5)  # the slowness under test: a server that takes its time, within each URL's timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_urls_of_one_request_share_one_deadline(app, slow_image_server):
    """Each URL answers within its own timeout (2 s here), but five of them one after another
    take longer than the request's three timeouts together: refused, not held for 5 x 2 s."""
    client, _ = app
    keyframes = [{"at": 1.2 * (i + 1), "image_url": f"{slow_image_server}/k{i}.png"} for i in range(4)]
    r = client.post("/v1/renders", json={**SMALL, "image_url": f"{slow_image_server}/start.png", "schedule": "bidirectional",
                                         "seconds": 6.0, "keyframes": keyframes})
    assert r.status_code == 422 and "took over 6 s to fetch together" in r.json()["detail"], r.text


def test_a_request_that_will_be_refused_fetches_nothing(app, hostile_server):
    """Fields are checked before any URL is fetched: a bad request naming 64 keyframe URLs on a
    server that never answers is refused for its own fault, not after 65 downloads time out."""
    client, _ = app
    silent, _ = hostile_server
    keyframes = [{"at": 0.1 * (i + 1), "image_url": silent} for i in range(64)]
    r = client.post("/v1/renders", json={**SMALL, "steps": 1000, "image_url": silent, "schedule": "bidirectional",
                                         "seconds": 600, "keyframes": keyframes})
    assert r.status_code == 422 and r.json()["detail"].startswith("steps:"), r.text


def bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 30000x30000 pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_malformed_bodies_get_short_4xx(app):
    client, _ = app
    nested = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    r = client.post("/v1/renders", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = client.post("/v1/renders", data={**SMALL, "size": "6" * 5000 + "x48"},
                    files={"image": ("a.png", SAMPLE_IMAGE.read_bytes(), "image/png")})
    assert r.status_code == 422 and len(r.json()["detail"]) < 400
    r = client.post("/v1/renders", json={**SMALL, "steps": "9" * 5000, "image_url": "http://10.0.0.1/a.png"})
    assert r.status_code == 422
    r = client.post("/v1/renders", data={**SMALL, "steps": "9" * 5000}, files={"image": ("a.png", SAMPLE_IMAGE.read_bytes(), "image/png")})
    assert r.status_code == 422 and len(r.text) < 1000, r.text[:300]
    r = client.post("/v1/renders", data={**SMALL}, files={"image": ("a.png", bomb_png(), "image/png")})
    assert r.status_code == 422, r.text[:300]

    def chunks():  # no Content-Length: the cap must hold while the body streams in
        for _ in range(40):
            yield b"0" * (1024 * 1024)

    r = client.post("/v1/renders", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_event_streams_end_and_are_capped(app):
    client, storage = app
    done = submit(client)
    wait_until(client, done, {"finished"})
    ids = event_ids(client, done)
    assert ids == sorted(set(ids))
    past = event_ids(client, done, last=str(10**6))  # past the end: the terminal event again, then the end
    assert past == [ids[-1]]
    rid = submit(client, seconds="12", steps="30")
    streams = [client.stream("GET", f"/v1/renders/{rid}/events") for _ in range(4)]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        extra = client.get(f"/v1/renders/{rid}/events")
        assert extra.status_code == 429 and "Retry-After" in extra.headers
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    assert client.delete(f"/v1/renders/{rid}").json()["status"] == "cancelled"
    # a finished render keeps its video only, and DELETE removes that too
    assert not (storage / "renders" / done / "input").exists() and not (storage / "sections" / done).exists()
    assert (storage / "renders" / done / "video.mp4").exists()
    assert client.delete(f"/v1/renders/{done}").json()["deleted"]
    assert not (storage / "renders" / done).exists() and client.get(f"/v1/renders/{done}").status_code == 404
