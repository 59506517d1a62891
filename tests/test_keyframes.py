"""Keyframes: images at times, snapped to section boundaries, planned first by the
bidirectional schedule, read as clean context and SigLIP conditioning by their neighbours."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle

import pytest
import torch
from PIL import Image, ImageOps

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT, cli
from fp_ray.encode import encode_latent, encode_request, encode_siglip, image_tensor, request_fingerprint, read_request_images
from fp_ray.generate import gather_context, section_image_embeds
from fp_ray.render import render
from fp_ray.request import RequestError, make_request
from fp_ray.schedule import make_plan

SMALL = dict(prompt="a quiet valley", width=64, height=48, steps=2, window=3, schedule="bidirectional")


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two keyframe images unlike the start image (mirrored and inverted)."""
    folder = tmp_path_factory.mktemp("keys")
    sample = Image.open(SAMPLE_IMAGE).convert("RGB")
    ImageOps.mirror(sample).save(folder / "mirror.png")
    ImageOps.invert(sample).save(folder / "invert.png")
    return folder


def plan_of(n: int, keyframes: tuple[int, ...], end: bool = False):
    return make_plan("bidirectional", n, 3, 6, 8, [(0.0, "p")], 0.4, has_end_image=end, keyframes=keyframes)


@pytest.mark.parametrize("n", range(2, 12))
def test_every_keyframe_set_plans_spans_that_read_only_their_own_anchors(n):
    for k in range(0, min(n - 1, 3) + 1):
        for cuts in itertools.combinations(range(1, n), k):
            keyframes = tuple(reversed(cuts))  # the request's order need not be time order
            plan = plan_of(n, keyframes)
            assert sorted(s.position for s in plan.sections) == list(range(n))
            bounds = sorted(keyframes)
            spans = list(zip([0] + bounds, bounds + [n]))
            # wave 0: the last section of every span, at once
            assert sorted(s.position for s in plan.waves()[0]) == [hi - 1 for _, hi in spans]
            done: set[int] = set()
            for wave in plan.waves():
                assert all(set(s.depends_on) <= done for s in wave)
                done |= {s.position for s in wave}
            for s in plan.sections:
                lo, hi = next((lo, hi) for lo, hi in spans if lo <= s.position < hi)
                left, right = s.anchors
                assert (None if lo == 0 else bounds[bounds.index(lo)]) == (None if left is None else keyframes[left])
                assert (None if hi == n else hi) == (None if right is None else keyframes[right])
                assert all(lo <= p < hi for p in s.depends_on)  # nothing crosses a keyframe
                assert s.history_starts_with_end == (s.position == hi - 1 and right is not None)
                assert s.prefix is None or s.prefix < s.position
                if s.position == lo:
                    assert s.prefix is None  # the first section of a span starts from its left anchor


def test_no_keyframes_plans_as_before_and_bad_boundaries_are_refused():
    assert plan_of(6, ()).sections == make_plan("bidirectional", 6, 3, 6, 8, [(0.0, "p")], 0.4).sections
    for bad in [(0,), (6,), (2, 2)]:
        with pytest.raises(ValueError, match="distinct and inside"):
            plan_of(6, bad)
    with pytest.raises(ValueError, match="bidirectional"):
        make_plan("inverted", 6, 3, 6, 8, [(0.0, "p")], 0.4, keyframes=(2,))


def test_times_snap_to_the_nearest_boundary(keys):
    # window 3 at 30 fps: sections of 0.4 s; 2 s is 5 sections, boundaries 0.4 .. 1.6 s
    request = make_request(**SMALL, seconds=2.0, keyframes=f"0.5s:{keys}/mirror.png; 1.39:{keys}/invert.png")
    assert request.keyframe_boundaries == (1, 3)
    assert make_request(**SMALL, seconds=2.0, keyframes=[{"at": 0.6, "image": "x.png"}]).keyframe_boundaries == (2,)  # half up


@pytest.mark.parametrize("fields,message", [
    (dict(keyframes="1.8s:x.png"), r"1.8s snaps to section boundary 5 \(2s\), which is not inside the video \(5 sections of 0.4s; the boundaries are 0.4s to 1.6s"),
    (dict(keyframes="0.1s:x.png"), "boundary 0"),
    (dict(keyframes="0s:x.png"), "greater than 0"),
    (dict(keyframes="0.4s:x.png; 0.5s:y.png"), "0.4s and 0.5s both snap to section boundary 1"),
    (dict(keyframes="0.4s:x.png", schedule="inverted"), "keyframes need the bidirectional schedule"),
    (dict(keyframes="pose.png"), "expected TIME:IMAGE"),
    (dict(keyframes="0.4s:x.png", seconds=0.4), "a one-section video has none"),
])
def test_bad_keyframes_are_clear_errors(fields, message):
    with pytest.raises(RequestError, match=message):
        make_request(**{**SMALL, "seconds": 2.0, **fields})


def test_keyframe_latents_and_embeddings_reach_their_neighbours(components, keys):
    request = make_request(**SMALL, seconds=2.0, keyframes=f"1.2s:{keys}/invert.png; 0.4s:{keys}/mirror.png")
    encoded = encode_request(components, request)
    cond, plan = encoded.cond, encoded.plan
    # the keyframe latents are the request's next posterior draws after the start image's
    generator = torch.Generator("cpu").manual_seed(request.seed)
    pixels = [image_tensor(Image.open(p).convert("RGB"), 64, 48) for p in (SAMPLE_IMAGE, keys / "invert.png", keys / "mirror.png")]
    latents = [encode_latent(components, px, generator) for px in pixels]
    assert torch.equal(cond.start_latent, latents[0])
    assert torch.equal(cond.keyframe_latents[0], latents[1]) and torch.equal(cond.keyframe_latents[1], latents[2])
    embeds = [encode_siglip(components, px) for px in pixels]
    done = {p: torch.randn(1, 16, 3, 6, 8) for p in range(plan.num_sections)}
    # boundaries: mirror at 1, invert at 3 -> spans [0], [1, 2], [3, 4]
    s0, s2, s3 = plan.section(0), plan.section(2), plan.section(3)
    assert s0.history_starts_with_end and torch.equal(gather_context(s0, cond, done).clean[:, :, 1:2], latents[2])
    assert torch.allclose(section_image_embeds(s0, cond), (embeds[0] + embeds[2]) / 2)
    assert torch.equal(gather_context(s3, cond, done).clean[:, :, :1], latents[1])  # starts at the keyframe
    assert torch.allclose(section_image_embeds(s3, cond), embeds[1])  # the last span: no end image
    ctx2 = gather_context(s2, cond, done)
    assert s2.history_starts_with_end and torch.equal(ctx2.clean[:, :, 1:2], latents[1])
    assert torch.allclose(section_image_embeds(s2, cond), (embeds[2] + embeds[1]) / 2)


def test_fingerprint_follows_keyframe_bytes_and_times(keys, tmp_path):
    base = make_request(**SMALL, seconds=2.0, keyframes=f"0.4s:{keys}/mirror.png")
    moved = base.model_copy(update={"keyframes": (base.keyframes[0].model_copy(update={"at": 0.8}),)})
    copy = tmp_path / "same.png"
    copy.write_bytes((keys / "mirror.png").read_bytes())
    renamed = base.model_copy(update={"keyframes": (base.keyframes[0].model_copy(update={"image": str(copy)}),)})
    other = base.model_copy(update={"keyframes": (base.keyframes[0].model_copy(update={"image": str(keys / "invert.png")}),)})
    fp = lambda r: request_fingerprint(r, read_request_images(r))
    assert fp(base) == fp(renamed)
    assert len({fp(base), fp(moved), fp(other), fp(make_request(**SMALL, seconds=2.0))}) == 4


def test_cli_renders_keyframes_and_renders_them_again_from_the_video(keys, tmp_path, capsys):
    out = tmp_path / "k.mp4"
    args = ["render", "--prompt", "a quiet valley", "--size", "64x48", "--steps", "2", "--window", "3", "--seconds", "2",
            "--schedule", "bidirectional", "--keyframe", f"0.5s:{keys}/mirror.png", "--keyframe", f"1.2:{keys}/invert.png"]
    assert cli.main(args + ["--out", str(out)]) == 0
    assert "keyframe 0.5s snaps to section boundary 1, at 0.4s" in capsys.readouterr().err
    record = json.loads((tmp_path / "k.mp4.json").read_text())
    assert [k["at"] for k in record["request"]["keyframes"]] == [0.5, 1.2] and len(record["images"]["keyframes"]) == 2
    assert cli.main(["render", "--from", str(out), "--out", str(tmp_path / "again.mp4")]) == 0
    assert sha(tmp_path / "again.mp4") == sha(out)
    # the keyframes change the video; without them it is another
    plain = render(make_request(**SMALL, seconds=2.0), tmp_path / "plain.mp4")
    assert sha(plain.path) != sha(out) and plain.frames == record_frames(out)


def record_frames(path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("extra,message", [
    (["--keyframe", "0.4s:missing.png"], "keyframes[0.4s]: file not found: 'missing.png'"),
    (["--keyframe", "3s:x.png"], "snaps to section boundary"),
    (["--keyframe", "0.4s:x.png", "--schedule", "inverted"], "keyframes need the bidirectional schedule"),
])
def test_cli_keyframe_errors_are_one_line(tmp_path, capsys, extra, message):
    args = ["render", "--seconds", "2", "--window", "3", "--schedule", "bidirectional", "--out", str(tmp_path / "v.mp4")] + extra
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "v.mp4").exists()


def test_manifest_keyframes_resolve_against_the_manifest(keys, tmp_path):
    from fp_ray.batch import check_manifest

    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "pose.png").write_bytes((keys / "mirror.png").read_bytes())
    row = dict(prompt="a valley", seconds=2.0, size="64x48", steps=2, window=3, schedule="bidirectional")
    rows = [{"id": "text", **row, "keyframes": "0.4s:k/pose.png"}, {"id": "list", **row, "keyframes": [{"at": 0.4, "image": "k/pose.png"}]},
            {"id": "gone", **row, "keyframes": "0.4s:k/gone.png"}, {"id": "late", **row, "keyframes": "9s:k/pose.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked = {r["id"]: r for r in check_manifest(str(manifest), str(tmp_path / "out"), str(TINY_CHECKPOINT))}
    assert "file not found" in checked["gone"]["record"]["error"] and checked["gone"]["payload"] is None
    assert "snaps to section boundary" in checked["late"]["record"]["error"]
    request = pickle.loads(checked["text"]["payload"])
    assert request.keyframes[0].image == str(tmp_path / "k" / "pose.png")
    assert checked["text"]["record"]["fingerprint"] == checked["list"]["record"]["fingerprint"]


def test_a_loop_with_keyframes_ends_its_last_span_on_the_start_image(components, keys, tmp_path):
    request = make_request(**SMALL, seconds=1.2, loop=True, keyframes=f"0.4s:{keys}/mirror.png")
    encoded = encode_request(components, request)
    cond, last = encoded.cond, encoded.plan.section(2)
    assert last.anchors == (0, None) and last.history_starts_with_end
    done = {p: torch.randn(1, 16, 3, 6, 8) for p in range(3)}
    assert torch.equal(gather_context(last, cond, done).clean[:, :, 1:2], cond.start_latent)
    assert torch.allclose(section_image_embeds(last, cond), (cond.keyframe_embeds[0] + cond.start_embeds) / 2)
    assert cond.image_draws == 2  # the start image, the keyframe: a loop's end is no draw of its own
    video = render(request, tmp_path / "loop.mp4", components=components)
    assert video.frames == encoded.plan.pixel_frames


def test_image_inputs_that_never_end_or_are_folders_are_refused_unread(tmp_path, capsys):
    """A device, a folder or a file over the byte cap given as an image is one line, exit 2,
    without reading it (a keyframe at /dev/zero once filled the memory)."""
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(300 * 2**20)  # sparse: 300 MB of zeros on no disk
    common = ["render", "--seconds", "2", "--window", "3", "--schedule", "bidirectional", "--out", str(tmp_path / "v.mp4")]
    for extra, message in [(["--keyframe", "0.4s:/dev/zero"], "keyframes[0.4s]: cannot read '/dev/zero': not a regular file"),
                           (["--keyframe", f"0.4s:{tmp_path}"], "is a folder, not an image"),
                           (["--image", str(big), "--prompt", "p"], "is over 256 MB, too large for an image")]:
        assert cli.main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "v.mp4").exists()
