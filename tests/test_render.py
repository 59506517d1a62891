from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fp_ray.encode import encode_request
from fp_ray.generate import noise_stream, section_steps
from fp_ray.render import render
from fp_ray.request import make_request
from fp_ray.video import read_frames

SMALL = dict(prompt="a quiet valley", width=64, height=48, steps=2)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_request_same_bytes(components, tmp_path):
    request = make_request(**SMALL, seconds=2.4)
    a = render(request, tmp_path / "a.mp4", components=components)
    b = render(request, tmp_path / "b.mp4", components=components)
    assert sha(a.path) == sha(b.path)
    frames = read_frames(a.path)
    assert frames.shape == (a.plan.pixel_frames, 48, 64, 3) == (73, 48, 64, 3)
    other = render(make_request(**{**SMALL, "seed": 1}, seconds=2.4), tmp_path / "c.mp4", components=components)
    assert sha(other.path) != sha(a.path)


def test_a_video_to_a_uri_is_streamed_there_with_its_record(components, tmp_path, monkeypatch):
    """An output URI gets the same bytes as a local output, copied in blocks (never passed
    whole through memory), and its sidecar record after it; an older record goes first."""
    import fp_ray.segments
    from fp_ray.metadata import sidecar_location

    request = make_request(**SMALL, seconds=2.4)
    local = render(request, tmp_path / "local.mp4", components=components)
    target = tmp_path / "bucket" / "v.mp4"
    target.parent.mkdir()
    Path(sidecar_location(target)).write_text("{}")  # another render's record
    whole = []
    monkeypatch.setattr(fp_ray.segments, "write_bytes", lambda where, data, f=fp_ray.segments.write_bytes: whole.append(where) or f(where, data))
    result = render(request, target.as_uri(), components=components)
    assert result.path is None and result.frames == local.frames == 73
    assert target.read_bytes() == local.path.read_bytes()
    assert whole == [sidecar_location(target.as_uri())]  # the video itself went through upload()
    assert Path(sidecar_location(target)).read_text() == Path(sidecar_location(local.path)).read_text()


def test_unipc_default_sampler_is_finite(components, tmp_path):
    result = render(make_request(**{**SMALL, "steps": 4}, seconds=1.2), tmp_path / "v.mp4", components=components, keep_latents=True)
    assert torch.isfinite(result.latents).all()
    assert read_frames(result.path).std() > 10


def test_bidirectional_any_valid_order_gives_the_same_latents(components, tmp_path, video_frames, as_segments):
    """Sections read only their dependencies and their own noise draw, so running a wave's
    fills in another order (as parallel actors would) changes nothing."""
    request = make_request(**SMALL, schedule="bidirectional", seconds=6.0, sampler="euler")
    encoded = encode_request(components, request)
    plan, cond = encoded.plan, encoded.cond
    assert plan.num_sections == 5

    def run(order_within_wave):
        done = {}
        noise = noise_stream(plan, cond, request.seed)
        for wave in plan.waves():
            for section in order_within_wave(wave):
                steps = section_steps(components, plan, section, cond, done, noise.draw(section.order),
                                      sampler="euler", steps=2, guidance=10.0)
                done[section.position] = list(steps)[-1][2]
        return done

    forward = run(lambda w: w)
    backward = run(lambda w: list(reversed(w)))
    assert any(len(w) > 1 for w in plan.waves())
    for p in range(plan.num_sections):
        assert torch.equal(forward[p], backward[p])

    local = render(request, tmp_path / "v.mp4", components=components, keep_latents=True)
    assert torch.equal(local.latents[:, :, 1:], torch.cat([forward[p] for p in range(plan.num_sections)], dim=2))
    frames = video_frames(plan, cond, forward)
    assert frames.shape[0] == plan.pixel_frames
    assert np.array_equal(read_frames(local.path), as_segments(plan, frames))  # the mp4 holds them, segment by segment


def test_previews_written_per_section(components, tmp_path):
    request = make_request(**SMALL, seconds=3.6)
    result = render(request, tmp_path / "v.mp4", components=components, preview_dir=tmp_path / "prev")
    previews = sorted((tmp_path / "prev").glob("section_*.mp4"))
    assert len(previews) == result.plan.num_sections == 3
    lengths = [len(read_frames(p)) for p in previews]
    # the video's segments: chunk 0 up to its seam, then each seam with what follows it
    assert lengths == [40, 36, 33] and sum(lengths) == result.frames == result.new_frames


def test_section_prompts_are_encoded_separately(components):
    request = make_request(**{**SMALL, "prompt": "0s: a calm lake; 2s: a storm over the lake"}, seconds=3.6)
    cond = encode_request(components, request).cond
    assert set(cond.text) == {"a calm lake", "a storm over the lake"}
    assert not torch.equal(cond.text["a calm lake"].embeds, cond.text["a storm over the lake"].embeds)


def test_events_report_every_section_and_step(components, tmp_path):
    events = []
    render(make_request(**SMALL, seconds=2.4), tmp_path / "v.mp4", components=components, on_event=events.append)
    kinds = [e["type"] for e in events]
    assert kinds.count("section_finished") == 2 and kinds.count("step") == 4 and kinds[-1] == "finished"
    assert kinds.count("section_decoded") == 2 and kinds.index("writing") > kinds.index("section_decoded")
    timings = events[-1]["timings"]
    parts = sum(timings[k] for k in ("encode", "generate", "decode", "write"))
    assert parts == pytest.approx(timings["total"], rel=1e-6)


def test_noise_stream_is_order_free():
    from fp_ray.sampling import NoiseStream

    draws = [((1, 16, 1, 4, 4), torch.float32)]
    sequential = NoiseStream(5, draws, (1, 16, 3, 4, 4))
    in_order = [sequential.draw(k) for k in range(4)]
    shuffled = NoiseStream(5, draws, (1, 16, 3, 4, 4))
    for k in (3, 0, 2, 1):
        assert torch.equal(shuffled.draw(k), in_order[k])
    # section k's noise from the state at its start: one draw, the same tensor
    states = NoiseStream(5, draws, (1, 16, 3, 4, 4)).section_states(4)
    for k in (2, 0, 3):
        assert torch.equal(shuffled.draw_at(states[k]), in_order[k])
    # one generator drawing image latents then sections, as the reference does
    g = torch.Generator().manual_seed(5)
    torch.randn((1, 16, 1, 4, 4), generator=g)
    reference = [torch.randn((1, 16, 3, 4, 4), generator=g) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(in_order, reference))


def test_local_pools_serve_one_event_loop_after_another():
    """A batch stage keeps its pools and runs each row in a new event loop: a turn that had a
    waiter in one row's loop must not fail the next row."""
    import asyncio

    from fp_ray.render import LocalPools

    class Decoder:
        def segment(self, job):
            return [job]

    pools = LocalPools(decoder=Decoder())

    async def row():  # two decodes at once: the second waits for its turn
        return await asyncio.gather(pools.segment(1), pools.segment(2))

    assert asyncio.run(row()) == [[1], [2]]
    assert asyncio.run(row()) == [[1], [2]]
