from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.cli import main
from fp_ray.encode import encode_request
from fp_ray.extend import ClipError, context_frames
from fp_ray.generate import gather_context
from fp_ray.metadata import read_metadata
from fp_ray.packing import HISTORY_FRAMES
from fp_ray.render import render
from fp_ray.request import RequestError, make_request
from fp_ray.video import encode_frames, read_frames

NEW = dict(prompt="a quiet valley", steps=2, window=2, sampler="euler", seconds=0.8)  # 3 sections of 2 latent frames


@pytest.fixture(scope="module")
def clip(components, tmp_path_factory):
    """A 64x64 clip fp-ray rendered (25 frames): its packets join the new segments as they are."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    render(make_request(**NEW, width=64, height=64, schedule="forward"), path, components=components)
    return path


def foreign_clip(path, frames: np.ndarray, fps: int = 30, crf: int = 30):
    """A clip made with other encoder settings (another crf): it must be re-encoded to join."""
    encode_frames(frames, str(path), fps, crf)
    return path


def test_forward_extension_keeps_the_clip_and_continues_it(components, clip, tmp_path):
    events = []
    result = render(make_request(**NEW, schedule="forward", extend=str(clip)), tmp_path / "out.mp4", components=components,
                    progressive=tmp_path / "live.mp4", on_event=events.append)
    original, out = read_frames(clip), read_frames(result.path)
    # the events count the new frames: the clip's last frame is the new part's start
    new = len(out) - len(original)
    assert [e["frames"] for e in events if e["type"] == "plan"] == [new]
    assert sum(e["frames"] for e in events if e["type"] == "section_decoded") == new
    assert np.array_equal(read_frames(tmp_path / "live.mp4"), out)  # the progressive output starts with the clip too
    plan = result.plan
    assert out.shape == (len(original) + 4 * plan.num_sections * plan.window, 64, 64, 3) == (49, 64, 64, 3)
    assert result.frames == 49 and result.new_frames == new == 24  # the clip's frames are not new
    assert np.array_equal(out[: len(original)], original)  # packets copied: bit-exact
    record = read_metadata(result.path)
    assert record["images"]["extend"]["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert record["request"]["extend"] == str(clip.resolve())
    assert (record["request"]["width"], record["request"]["fps"]) == (64, 30)


def test_backward_extension_ends_on_the_clip(components, clip, tmp_path, monkeypatch):
    import fp_ray.encode

    encoded = []  # VAE encodes of single images: the start only (the clip's first frame needs its SigLIP embedding alone)
    monkeypatch.setattr(fp_ray.encode, "encode_latent", lambda *a, f=fp_ray.encode.encode_latent: encoded.append(1) or f(*a))
    request = make_request(**NEW, schedule="inverted", image=str(SAMPLE_IMAGE), extend=str(clip))
    result = render(request, tmp_path / "out.mp4", components=components, progressive=tmp_path / "live.mp4")
    assert len(encoded) == 1
    original, out = read_frames(clip), read_frames(result.path)
    assert np.array_equal(read_frames(tmp_path / "live.mp4"), out)
    assert out.shape[0] == len(original) + result.plan.pixel_frames == result.frames == 50
    assert result.new_frames == result.plan.pixel_frames
    assert np.array_equal(out[-len(original):], original)


def test_new_sections_read_the_clip_latents(components, clip):
    """Section 0's packed history is the clip's last latent frames (a clip of 25 frames: its 7
    latents, zeros before: the clip's own first latent stands where a render's start latent
    stands), and inverted's last section reads the clip's first frames as its future."""
    frames = read_frames(clip)
    encoded = encode_request(components, make_request(**NEW, schedule="forward", extend=str(clip)))
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1
    by_hand = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
    torch.testing.assert_close(encoded.cond.clip, by_hand)
    assert encoded.cond.clip.shape[2] == 7
    past = torch.cat([torch.zeros_like(by_hand[:, :, :1]).expand(-1, -1, HISTORY_FRAMES - 7, -1, -1), by_hand], dim=2)
    ctx = gather_context(encoded.plan.section(0), encoded.cond, {})
    torch.testing.assert_close(ctx.clean[:, :, 1:], past[:, :, -1:])
    torch.testing.assert_close(ctx.history_2x, past[:, :, -3:-1])
    torch.testing.assert_close(ctx.history_4x, past[:, :, :16])

    backward = encode_request(components, make_request(**NEW, schedule="inverted", image=str(SAMPLE_IMAGE), extend=str(clip)))
    last = backward.plan.sections[0]  # inverted generates the last section first
    future = gather_context(last, backward.cond, {})
    torch.testing.assert_close(future.clean[:, :, 1:], backward.cond.clip[:, :, :1])
    torch.testing.assert_close(future.history_2x, backward.cond.clip[:, :, 1:3])
    assert backward.cond.end_latent is None


def test_changing_the_clip_end_changes_the_new_part(components, clip, tmp_path):
    frames = read_frames(clip)
    changed = frames.copy()
    changed[-4:] = 255 - changed[-4:]  # the clip's last latent frame
    runs = []
    for name, pixels in (("a", frames), ("b", changed)):
        path = foreign_clip(tmp_path / f"{name}.mp4", pixels, crf=16)
        request = make_request(**NEW, schedule="forward", image=str(SAMPLE_IMAGE), extend=str(path))
        runs.append(render(request, tmp_path / f"{name}-out.mp4", components=components, keep_latents=True))
    a, b = (r.latents[:, :, 1:] for r in runs)  # the new sections (the start image is the same)
    assert not torch.allclose(a, b)
    assert runs[0].fingerprint != runs[1].fingerprint


def test_a_foreign_clip_is_re_encoded_and_a_short_one_padded(components, tmp_path):
    """A clip of other encoder settings, shorter than the 19-frame history (9 frames: 3
    latents), at 24 fps: the output takes its rate, re-encodes its frames (close, not equal)."""
    y, x = np.mgrid[0:48, 0:64]
    frames = np.stack([np.stack([x * 4, y * 5, (x + y + 8 * t) * 2], axis=-1) % 256 for t in range(9)]).astype(np.uint8)
    path = foreign_clip(tmp_path / "short.mp4", frames, fps=24, crf=30)
    result = render(make_request(**NEW, schedule="forward", extend=str(path)), tmp_path / "out.mp4", components=components)
    out, original = read_frames(result.path), read_frames(path)
    assert result.plan.num_sections == round(0.8 * 24 / 8)
    assert out.shape == (9 + 4 * result.plan.num_sections * 2, 48, 64, 3)
    assert np.abs(out[:9].astype(int) - original.astype(int)).mean() < 3
    assert read_metadata(result.path)["request"]["fps"] == 24
    assert context_frames(2) == HISTORY_FRAMES


def test_request_combinations_are_refused():
    with pytest.raises(RequestError, match="not both"):
        make_request(**NEW, schedule="inverted", image=str(SAMPLE_IMAGE), end_image=str(SAMPLE_IMAGE), extend="c.mp4")
    with pytest.raises(RequestError, match="bidirectional cannot extend"):
        make_request(**NEW, schedule="bidirectional", image=str(SAMPLE_IMAGE), extend="c.mp4")
    with pytest.raises(RequestError, match="needs an image to start from"):
        make_request(**NEW, schedule="inverted", extend="c.mp4")
    with pytest.raises(RequestError, match="give one of loop and extend"):
        make_request(**NEW, schedule="inverted", image=str(SAMPLE_IMAGE), extend="c.mp4", loop=True)
    with pytest.raises(RequestError, match="keyframes need the bidirectional schedule"):
        make_request(**NEW, schedule="forward", extend="c.mp4", keyframes="0.4s:k.png")


def raw_stream(path):
    """An H.264 elementary stream: frames, no container, no duration in any header."""
    import av

    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bad_clips(tmp_path, clip):
    """(file, flags, expected message) for each kind of clip that cannot be extended."""
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[:1200])
    odd = foreign_clip(tmp_path / "odd.mp4", np.zeros((5, 40, 64, 3), np.uint8))
    wide = foreign_clip(tmp_path / "wide.mp4", np.zeros((1, 32, 2064, 3), np.uint8))
    audio = tmp_path / "audio.m4a"
    import av

    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return [
        (tmp_path / "missing.mp4", [], "file not found"),
        (fifo(tmp_path / "pipe.mp4"), [], "is not a regular file"),  # was "file not found"
        (text, [], "is not a video"),
        (truncated, [], "not a video|corrupt|has no frames"),
        (audio, [], "has no video stream"),
        (SAMPLE_IMAGE, [], "is a still image, not a video"),
        (foreign_clip(tmp_path / "one.mp4", np.zeros((1, 64, 64, 3), np.uint8)), [], "is 1 frame; a clip to extend has at least 5"),
        (raw_stream(tmp_path / "raw.h264"), [], "does not say how long it is"),
        (odd, [], "multiple of 16"),
        (wide, [], "2064x32.*between 32 and 2048"),
        (clip, ["--size", "128x64"], "not the clip's 64x64"),
        (clip, ["--fps", "24"], "not the clip's 30 fps"),
    ]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_cli_refuses_bad_clips_in_one_line(clip, tmp_path, capsys):
    for path, flags, message in bad_clips(tmp_path, clip):
        out = tmp_path / "out.mp4"
        code = main(["render", "--schedule", "forward", "--steps", "1", "--extend", str(path), "--out", str(out), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2, (path, err)
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
        assert not out.exists()


def test_cli_extends_and_rerenders_from_the_record(clip, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    args = ["--schedule", "forward", "--steps", "2", "--window", "2", "--seconds", "0.8", "--sampler", "euler"]
    assert main(["render", *args, "--extend", str(clip), "--out", str(out)]) == 0
    again = tmp_path / "again.mp4"
    assert main(["render", "--from", str(out), "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    record = json.loads((tmp_path / "v.mp4.json").read_text())
    assert record["images"]["extend"]["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    capsys.readouterr()


def test_unreadable_clip_fails_before_anything_is_written(components, tmp_path):
    with pytest.raises(ClipError, match="file not found"):
        render(make_request(**NEW, schedule="forward", extend=str(tmp_path / "gone.mp4")), tmp_path / "o.mp4", components=components)
    assert not (tmp_path / "o.mp4").exists()


def test_manifest_extend_column(clip, tmp_path):
    """A manifest's `extend` is relative to the manifest, as images are; the row takes the
    clip's size and the clip's bytes are part of its fingerprint; a missing clip is that row's error."""
    import pickle
    import shutil

    from fp_ray.batch import check_manifest

    (tmp_path / "clips").mkdir()
    shutil.copy(clip, tmp_path / "clips" / "a.mp4")
    row = dict(prompt="a quiet valley", schedule="forward", seconds=0.8, window=2, steps=2)
    rows = [{"id": "ext", **row, "extend": "clips/a.mp4"}, {"id": "gone", **row, "extend": "clips/gone.mp4"}, {"id": "plain", **row}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked = {r["id"]: r for r in check_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), str(TINY_CHECKPOINT))}
    assert checked["gone"]["payload"] is None and "file not found" in checked["gone"]["record"]["error"]
    request = pickle.loads(checked["ext"]["payload"])
    assert request.extend == str(tmp_path / "clips" / "a.mp4") and (request.width, request.height, request.fps) == (64, 64, 30)
    assert checked["ext"]["record"]["fingerprint"] != checked["plain"]["record"]["fingerprint"]


def test_serve_extends_an_uploaded_clip_and_refuses_paths(components, clip, tmp_path):
    """On the service a clip comes as an upload (or extend_url), like an image: a path in the
    fields is refused, a clip it cannot use is a 422 that names no server path, and a forward
    extension needs no start image."""
    from fastapi.testclient import TestClient

    from fp_ray.render import LocalPools
    from serving.api import bind_service, make_api
    from serving.service import RenderService
    from test_serving import metric

    bind_service(RenderService(LocalPools.from_components(components), str(TINY_CHECKPOINT), str(tmp_path / "srv")))
    fields = {"prompt": "a lake", "schedule": "forward", "steps": "2", "window": "2", "seconds": "0.8", "sampler": "euler"}
    upload = {"extend": ("clip.mp4", clip.read_bytes(), "video/mp4")}
    with TestClient(make_api()) as client:
        r = client.post("/v1/renders", data={**fields, "extend": str(clip)}, files={"image": ("s.png", SAMPLE_IMAGE.read_bytes())})
        assert r.status_code == 422 and "unknown fields ['extend']" in r.json()["detail"]
        r = client.post("/v1/renders", data=fields, files={"extend": ("clip.mp4", b"not a video", "video/mp4")})
        assert r.status_code == 422 and "the upload" in r.json()["detail"] and str(tmp_path) not in r.json()["detail"]
        r = client.post("/v1/renders", data={**fields, "schedule": "inverted"}, files=upload)
        assert r.status_code == 422 and "needs an image" in r.json()["detail"]
        r = client.post("/v1/renders", data=fields, files=upload)
        assert r.status_code == 202, r.text
        rid = r.json()["id"]
        deadline = time.monotonic() + 120
        while (record := client.get(f"/v1/renders/{rid}").json())["status"] not in ("finished", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling a status endpoint, as a client does
        assert record["status"] == "finished", record
        assert "extend" not in record["request"] and record["request"]["width"] == 64
        video = client.get(f"/v1/renders/{rid}/video.mp4").content
        assert metric(client, "fp_ray_video_seconds_total") == 24 / 30  # generated seconds: not the clip's
    (tmp_path / "out.mp4").write_bytes(video)
    original = read_frames(clip)
    out = read_frames(tmp_path / "out.mp4")
    assert len(out) == len(original) + 24 and np.array_equal(out[: len(original)], original)
    assert read_metadata(tmp_path / "out.mp4")["request"]["extend"] is None  # an upload: known by its hash


def test_extension_on_ray_actors_is_byte_identical_to_local(ray_cluster, components, clip, tmp_path):
    import asyncio

    from fp_ray.actors import PoolConfig, RayPools
    from fp_ray.coordinator import run_render

    request = make_request(**NEW, schedule="forward", extend=str(clip))
    pools = RayPools(str(TINY_CHECKPOINT), PoolConfig(generators=1, decoders=1))
    try:
        pools.wait_ready()
        distributed = asyncio.run(run_render(request, pools, out=tmp_path / "ray.mp4"))
        # a clip whose header reads but whose frames do not: the encoder actor's own error, one line
        data = bytearray(clip.read_bytes())
        at = data.find(b"mdat") + 8 + (len(data) - data.find(b"mdat")) // 3
        data[at : at + 2000] = b"\xff" * 2000
        (tmp_path / "corrupt.mp4").write_bytes(bytes(data))
        with pytest.raises(ClipError) as caught:
            asyncio.run(run_render(make_request(**NEW, schedule="forward", extend=str(tmp_path / "corrupt.mp4")), pools,
                                   out=tmp_path / "bad.mp4"))
        assert type(caught.value) is ClipError and "\n" not in str(caught.value) and "is corrupt" in str(caught.value)
    finally:
        pools.shutdown()
    local = render(request, tmp_path / "local.mp4", components=components)
    assert distributed.path.read_bytes() == local.path.read_bytes()
    assert len(read_frames(distributed.path)) == len(read_frames(clip)) + 24


def test_the_end_of_a_long_clip_is_read_without_decoding_it_all(tmp_path, monkeypatch):
    """A forward extension reads a long clip's last frames after a seek: the same frames as a
    decode from the start (and its first frame), with far fewer frames decoded."""
    import av

    from fp_ray import extend

    y, x = np.mgrid[0:32, 0:32]
    frames = np.stack([np.stack([x * 8, y * 8, np.full_like(x, t)], axis=-1) % 256 for t in range(1200)]).astype(np.uint8)
    path = foreign_clip(tmp_path / "long.mp4", frames, fps=30, crf=16)  # 40 s, keyframes every 250 frames
    decoded = []
    to_ndarray = av.VideoFrame.to_ndarray
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", lambda self, **kw: decoded.append(1) or to_ndarray(self, **kw))
    first, tail = extend.read_context(path, "clip", True, context_frames(2))
    assert len(decoded) < 400
    monkeypatch.undo()
    whole = read_frames(path)
    assert np.array_equal(first, whole[0]) and np.array_equal(tail, whole[-77:])
    first, head = extend.read_context(path, "clip", False, context_frames(2))
    assert np.array_equal(head, whole[:77])


def test_a_clip_start_and_the_sample_image_start_are_other_renders(clip):
    """Forward without an image starts from the clip's first frame: not the render that names
    the sample image, though the sample's bytes stand in for the missing image."""
    from fp_ray.encode import read_request_images, request_fingerprint
    from fp_ray.storage import file_sha256

    own = make_request(**NEW, schedule="forward", extend=str(clip))
    sample = make_request(**NEW, schedule="forward", extend=str(clip), image=str(SAMPLE_IMAGE))
    fp = lambda r: request_fingerprint(r, read_request_images(r), clip_sha256=file_sha256(clip))
    assert fp(own) != fp(sample)


def test_a_clip_that_changes_while_it_renders_fails_the_render(components, clip, tmp_path):
    """The mp4 joins the very clip that was encoded: one replaced mid-render is an error, and
    no video is written."""
    from fp_ray.extend import ClipError

    mine = tmp_path / "mine.mp4"
    mine.write_bytes(clip.read_bytes())

    def replace_clip(event):
        if event["type"] == "section_finished":
            mine.write_bytes(clip.read_bytes() + b"\0")  # other bytes, the same frames

    with pytest.raises(ClipError, match="changed while it rendered"):
        render(make_request(**NEW, schedule="forward", extend=str(mine)), tmp_path / "out.mp4", components=components,
               on_event=replace_clip)
    assert not (tmp_path / "out.mp4").exists()


def test_a_url_clip_is_downloaded_once_per_render(clip, tmp_path, capsys):
    """The command's check of the request, the encoder and the output read one download of a
    clip at a URL (each fetched it again), and the video is the local clip's render."""
    import http.server
    import threading

    gets = []

    class Clip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            data = clip.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Clip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["render", "--schedule", "forward", "--steps", "2", "--window", "2", "--seconds", "0.8", "--sampler", "euler"]
    try:
        url = f"http://127.0.0.1:{server.server_port}/clip.mp4"
        assert main([*args, "--extend", url, "--out", str(tmp_path / "url.mp4")]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert gets == ["/clip.mp4"]
    assert main([*args, "--extend", str(clip), "--out", str(tmp_path / "path.mp4")]) == 0
    assert np.array_equal(read_frames(tmp_path / "url.mp4"), read_frames(tmp_path / "path.mp4"))
    capsys.readouterr()


@pytest.mark.parametrize("progressive", [False, True])
def test_a_stop_while_a_foreign_clip_is_re_encoded_ends_the_re_encode(tmp_path, capsys, monkeypatch, progressive):
    """SIGTERM while the output re-encodes a clip it cannot copy (up to an hour of frames), in
    the final join's thread or the progressive output's: the re-encode ends at its next frame,
    where it used to go through the whole clip before the command could say stopped."""
    import os
    import signal

    from fp_ray import extend
    from fp_ray.segments import Segments

    y, x = np.mgrid[0:64, 0:64]
    frames = np.stack([np.stack([x * 4, y * 5, (x + y + 8 * t) * 2], axis=-1) % 256 for t in range(30)]).astype(np.uint8)
    path = foreign_clip(tmp_path / "foreign.mp4", frames)
    made, read, reached = [], [], []
    monkeypatch.setattr(Segments, "__init__", lambda self, *a, f=Segments.__init__, **k: made.append(self) or f(self, *a, **k))

    def stop_at_the_first_frame(clip, *args, original=extend.clip_frames):
        for frame in original(clip, *args):
            if not read:
                os.kill(os.getpid(), signal.SIGTERM)  # from the re-encoding thread, as in the join's test
                reached.append(made[-1]._stop_writing.wait(10))
            read.append(1)
            yield frame

    monkeypatch.setattr(extend, "clip_frames", stop_at_the_first_frame)
    out = tmp_path / "out.mp4"
    args = ["render", "--schedule", "forward", "--steps", "1", "--window", "2", "--seconds", "0.8", "--sampler", "euler",
            "--extend", str(path), "--out", str(out)]
    if progressive:
        args += ["--progressive", str(tmp_path / "live.mp4")]
    capsys.readouterr()
    assert main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert "stopped by SIGTERM" in err[-1] and "Traceback" not in "".join(err), err[-5:]
    assert reached == [True] and len(read) == 1, (reached, len(read))
    assert not out.exists()
