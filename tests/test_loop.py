"""Loops: the start image is also the end, the last chunk decodes across the wrap and its
tail crossfades into the first frames, so the video plays seamlessly when repeated."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from fp_ray.cli import main
from fp_ray.coordinator import render_context, run_render
from fp_ray.decode import decode_chunk, segment_frames, segment_pixels, soft_append, split_chunk, to_frames
from fp_ray.encode import encode_request
from fp_ray.generate import gather_context, noise_stream
from fp_ray.render import LocalPools, render
from fp_ray.request import RequestError, make_request
from fp_ray.schedule import make_plan
from fp_ray.storage import SectionStore
from fp_ray.video import read_frames

# window 2 at 30 fps: a section is 8 frames (0.27 s)
LOOP = dict(prompt="a quiet valley", width=64, height=64, steps=2, window=2, loop=True)


def fold_and_rotate(chunks: list[torch.Tensor], overlap: int) -> torch.Tensor:
    """The reference soft-append over the chunks in time order, then its last `overlap`
    frames (which continue past the end, into the start) crossfaded into its first."""
    video = chunks[0]
    for chunk in chunks[1:]:
        video = soft_append(video, chunk, overlap)
    return soft_append(video[:, :, -overlap:], video[:, :, :-overlap], overlap)


@pytest.mark.parametrize("schedule", ["inverted", "bidirectional"])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_loop_segments_are_the_folded_cycle(schedule, sections):
    plan = make_plan(schedule, sections, 3, 2, 2, [(0.0, "x")], 1.0, loop=True)
    g = torch.Generator().manual_seed(sections)
    chunks = []
    for s in plan.by_position():
        start, stop = s.decode_span
        chunks.append(torch.randn(1, 3, 4 * (stop - start - 1) + 1, 4, 4, generator=g))
    parts = [split_chunk(plan, k, c) for k, c in enumerate(chunks)]
    assert all(tail is not None for _, tail in parts)  # every chunk, the last too, has a tail
    segments = [segment_pixels(plan, lead, parts[k - 1][1]) for k, (lead, _) in enumerate(parts)]  # k = 0: the last tail
    video = fold_and_rotate(chunks, plan.overlap_frames)
    assert [s.shape[2] for s in segments] == segment_frames(plan)
    # one period of the cycle [start latent, N windows], each latent frame 4 pixel frames
    assert sum(segment_frames(plan)) == plan.pixel_frames == video.shape[2] == 4 * (1 + sections * 3)
    assert torch.equal(torch.cat(segments, dim=2), video)


def test_loop_plan_wraps_and_reads_the_start_as_the_end():
    plan = make_plan("inverted", 3, 2, 2, 2, [(0.0, "x")], 1.0, loop=True)
    last = plan.section(2)
    assert plan.sections[0] is last and last.history_starts_with_end  # generated first, the start latent as its future
    assert (last.decode_span, last.decode_needs) == ((5, 9), (2, 0))  # past the 7 frames of the video: wraps
    assert make_plan("inverted", 1, 2, 2, 2, [(0.0, "x")], 1.0, loop=True).sections[0].decode_span == (0, 5)
    plain = make_plan("inverted", 3, 2, 2, 2, [(0.0, "x")], 1.0)
    assert [s.decode_span for s in plain.by_position()][:2] == [s.decode_span for s in plan.by_position()][:2]
    with pytest.raises(ValueError, match="loop"):
        make_plan("forward", 3, 2, 2, 2, [(0.0, "x")], 1.0, loop=True)


@pytest.mark.parametrize("fields,message", [
    (dict(end_image="end.png"), "loop: the end image is the start image; drop end_image"),
    (dict(schedule="forward"), "loop: needs the inverted or bidirectional schedule"),
])
def test_loop_refuses_an_end_image_and_the_forward_schedule(fields, message):
    with pytest.raises(RequestError, match=message):
        make_request(**LOOP, seconds=1.0, **fields)


@pytest.mark.parametrize("args,message", [
    (["--loop", "--end-image", "{image}"], "loop: the end image is the start image; drop end_image"),
    (["--loop", "--schedule", "forward"], "loop: needs the inverted or bidirectional schedule"),
])
def test_loop_errors_on_the_command_line(tmp_path, capsys, args, message):
    from fp_ray import SAMPLE_IMAGE

    out = tmp_path / "v.mp4"
    argv = ["render", "--size", "64x64", "--steps", "2", "--out", str(out), *[a.format(image=SAMPLE_IMAGE) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error:") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_loop_end_is_the_start_latent_and_the_noise_stream_is_unchanged(components):
    request = make_request(**LOOP, seconds=0.8)
    looped = encode_request(components, request)
    plain = encode_request(components, request.model_copy(update={"loop": False}))
    assert looped.plan.loop and looped.plan.num_sections == 3
    assert looped.cond.end_latent is looped.cond.start_latent and looped.cond.cpu().end_latent is looped.cond.cpu().start_latent
    assert torch.equal(looped.cond.start_latent, plain.cond.start_latent)
    assert torch.equal(looped.cond.image_embeds, plain.cond.image_embeds)
    # one image draw (the start's), as encode took: section noise as in the request without a loop
    looped_noise, plain_noise = (noise_stream(e.plan, e.cond, request.seed) for e in (looped, plain))
    assert torch.equal(looped_noise.draw(2), plain_noise.draw(2))
    assert looped.fingerprint != plain.fingerprint
    # the last section (generated first) reads the start latent as the first frame of its future
    clean = gather_context(looped.plan.section(2), looped.cond, {}).clean
    assert torch.equal(clean[:, :, 1:2], looped.cond.start_latent)
    assert not gather_context(plain.plan.section(2), plain.cond, {}).clean[:, :, 1:].any()


def cyclic_frames(components, plan, latents: torch.Tensor) -> np.ndarray:
    """The loop computed whole, outside the pipeline: the latent cycle unrolled by one window,
    each section's chunk decoded (own window + the next one), folded, its seam rotated."""
    w = plan.window
    unrolled = torch.cat([latents, latents[:, :, :w]], dim=2)  # ..., section N-1, start, section 0[:w-1]
    spans = [(0, 1 + 2 * w)] + [(1 + k * w, 1 + (k + 2) * w) for k in range(1, plan.num_sections)]
    chunks = [decode_chunk(components.vae, unrolled[:, :, a:b]) for a, b in spans]
    return to_frames(fold_and_rotate(chunks, plan.overlap_frames))


def mean_step(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("schedule,seconds", [("inverted", 0.27), ("inverted", 0.8), ("bidirectional", 1.3)])  # 1, 3, 5 sections
def test_loop_video_is_the_cycle(components, tmp_path, as_segments, schedule, seconds):
    request = make_request(**LOOP, schedule=schedule, seconds=seconds)
    result = render(request, tmp_path / "loop.mp4", components=components, keep_latents=True)
    plan = result.plan
    expected = cyclic_frames(components, plan, result.latents)
    video = read_frames(result.path)
    assert video.shape[0] == expected.shape[0] == plan.pixel_frames == sum(segment_frames(plan)) == 4 * (1 + plan.num_sections * 2)
    assert np.array_equal(video, as_segments(plan, expected))  # the mp4 holds exactly these frames, segment by segment



def test_loop_last_frame_runs_into_the_first(components, tmp_path):
    """Played on repeat, last -> first is a step like the others (two neighbouring frames of the
    last chunk's decode); without the wrap it is a jump. (With one section the tiny model's
    clip is too short to tell: its 4 frames per latent frame differ as much as its ends.)"""
    request = make_request(**LOOP, seconds=0.8)
    frames = [read_frames(render(request.model_copy(update={"loop": loop}), tmp_path / f"{loop}.mp4", components=components).path)
              for loop in (True, False)]
    looped, plain = frames
    steps = [mean_step(looped[i], looped[i + 1]) for i in range(len(looped) - 1)]
    seam, jump = mean_step(looped[-1], looped[0]), mean_step(plain[-1], plain[0])
    assert seam <= np.median(steps) * 1.5 and seam < jump / 3, (seam, jump, np.median(steps))


class Killed(RuntimeError):
    pass


class Crash(LocalPools):
    """Fails the render when section `position` starts."""

    def __init__(self, base: LocalPools, position: int):
        super().__init__(base.encoder, base.generator, base.decoder)
        self.position = position

    async def generate(self, job):
        if job.position == self.position:
            raise Killed(f"killed before section {job.position}")
        async for event in super().generate(job):
            yield event


def test_resumed_loop_render_is_byte_identical(components, tmp_path):
    request = make_request(**LOOP, seconds=0.8)  # inverted: sections 2, 1, 0; the seam needs 2 and 0
    whole = render(request, tmp_path / "whole.mp4", components=components)
    store = SectionStore(tmp_path / "store")

    def run(out, pools=None):
        pools = pools or LocalPools.from_components(components)
        return asyncio.run(run_render(request, pools, out=tmp_path / out, store=store, request_id="looped"))

    with pytest.raises(Killed):
        run("a.mp4", Crash(LocalPools.from_components(components), position=0))
    resumed = run("b.mp4")
    assert resumed.reused == [1, 2] and resumed.generated == [0]
    assert resumed.path.read_bytes() == whole.path.read_bytes()
    # the seam segment alone lost: only the two chunks it spans decode again
    (tmp_path / "store" / "looped" / resumed.fingerprint[:16] / "segment_000.mp4").unlink()
    again = run("c.mp4")
    assert again.segments_reused == [1, 2] and again.path.read_bytes() == whole.path.read_bytes()


def test_render_from_a_loop_video_renders_the_loop_again(tmp_path):
    out, again = tmp_path / "loop.mp4", tmp_path / "again.mp4"
    assert main(["render", "--loop", "--size", "64x64", "--steps", "2", "--window", "2", "--seconds", "0.5", "--out", str(out)]) == 0
    assert main(["render", "--from", str(out), "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert read_frames(again).shape[0] == 4 * (1 + 2 * 2)  # 2 sections, looped
    assert main(["render", "--from", str(out), "--no-loop", "--out", str(tmp_path / "plain.mp4")]) == 0
    assert read_frames(tmp_path / "plain.mp4").shape[0] == 4 * 2 * 2 + 1


def test_manifest_loop_column_and_a_bad_row(tmp_path):
    import pickle

    from fp_ray import TINY_CHECKPOINT
    from fp_ray.batch import check_manifest

    (tmp_path / "m.csv").write_text("id,prompt,loop,schedule\na,x,true,\nb,x,false,\nc,x,true,forward\n")
    checked = {r["id"]: r for r in check_manifest(str(tmp_path / "m.csv"), str(tmp_path / "out"), str(TINY_CHECKPOINT))}
    assert [pickle.loads(checked[k]["payload"]).loop for k in "ab"] == [True, False]
    assert checked["c"]["payload"] is None and "loop: needs the inverted or bidirectional schedule" in checked["c"]["record"]["error"]


def test_progressive_loop_output_is_the_video(components, tmp_path):
    """The seam segment opens the video and is made last (it needs section 0, generated last):
    the progressive output publishes everything then, the same packets as the mp4."""
    from test_segments import packets

    events = []
    result = render(make_request(**LOOP, seconds=0.8), tmp_path / "v.mp4", components=components,
                    progressive=tmp_path / "live.mp4", on_event=events.append)
    assert [e["segments"] for e in events if e["type"] == "prefix"] == [1, 2, 3]
    assert packets(tmp_path / "live.mp4") == packets(result.path)


def test_loop_bytes_do_not_depend_on_decode_order(components, tmp_path):
    """Every chunk decoded last-first: each seam, the wrap's too, is a join of two kept halves."""
    from fp_ray.segments import finish_video
    from test_segments import Reordered

    request = make_request(**LOOP, seconds=0.8)
    local = render(request, tmp_path / "local.mp4", components=components, keep_latents=True)
    ctx = render_context(encode_request(components, request), "reordered", SectionStore(tmp_path / "store"))
    w = ctx.plan.window
    done = {p: local.latents[:, :, 1 + p * w : 1 + (p + 1) * w] for p in range(3)}
    pools = Reordered(LocalPools.from_components(components), expected=3)

    async def run():
        return await finish_video(ctx, await pools.share(ctx), pools, done, tmp_path / "reordered.mp4")

    where, _, _ = asyncio.run(run())
    assert pools.order == [0, 1, 2]  # arrived in generation order, 2, 1, 0: run last-first
    assert open(where, "rb").read() == local.path.read_bytes()
