"""Segments: the video cut at fixed places, each made where its chunks are decoded, joined
without re-encoding; same frames as the reference's whole-video soft-append, same bytes in
any decode order, and a resumed render reuses what it finished."""

from __future__ import annotations

import asyncio
import hashlib
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from fp_ray.coordinator import render_context
from fp_ray.segments import finish_video
from fp_ray.decode import segment_frames, segment_pixels, soft_append, split_chunk
from fp_ray.encode import encode_request
from fp_ray.render import LocalPools, render
from fp_ray.request import make_request
from fp_ray.schedule import make_plan
from fp_ray.storage import SectionStore
from fp_ray.video import encode_segment, join_segments, read_frames

SMALL = dict(prompt="a quiet valley", width=64, height=48, steps=2)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("schedule", ["forward", "inverted", "bidirectional"])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_segments_are_the_whole_video_soft_append(schedule, sections):
    """Concatenated segments equal the reference's fold over whole chunks, bit for bit."""
    plan = make_plan(schedule, sections, 3, 2, 2, [(0.0, "x")], 1.0)
    g = torch.Generator().manual_seed(sections)
    chunks = []
    for s in plan.by_position():
        start, stop = s.decode_span
        chunks.append(torch.randn(1, 3, 4 * (stop - start - 1) + 1, 4, 4, generator=g))
    video = chunks[0]
    for chunk in chunks[1:]:  # the reference: history = soft_append(history, next, overlap), in time order
        video = soft_append(video, chunk, plan.overlap_frames)
    parts = [split_chunk(plan, k, c) for k, c in enumerate(chunks)]
    segments = [segment_pixels(plan, lead, parts[k - 1][1] if k else None) for k, (lead, _) in enumerate(parts)]
    assert [s.shape[2] for s in segments] == segment_frames(plan)
    assert sum(segment_frames(plan)) == plan.pixel_frames == video.shape[2]
    assert torch.equal(torch.cat(segments, dim=2), video)


def packets(data_or_path) -> list[bytes]:
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


def test_join_copies_packets_without_reencoding(tmp_path):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (n, 32, 48, 3), dtype=np.uint8) for n in (7, 5))
    sa, sb = encode_segment(a, 30, 16), encode_segment(b, 30, 16)
    path = join_segments([sa, sb], tmp_path / "v.mp4", 30)
    assert packets(path) == packets(sa) + packets(sb)  # the very bytes x264 wrote, in order
    head = path.read_bytes()[:4096]
    assert b"moov" in head and head.index(b"moov") < path.read_bytes().index(b"mdat")  # faststart
    with av.open(str(path)) as c:
        timestamps = sorted(p.pts * p.time_base for p in c.demux(video=0) if p.size)
    assert timestamps == [i / 30 for i in range(12)] or timestamps == [type(timestamps[0])(i, 30) for i in range(12)]
    assert read_frames(path).shape == (12, 32, 48, 3)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.frames == 12 and stream.duration * stream.time_base == Fraction(12, 30)


class Reordered(LocalPools):
    """Decoders that hold every decode until all have arrived, then run them last-first:
    every seam is made by a join of two kept halves."""

    def __init__(self, base: LocalPools, expected: int):
        super().__init__(base.encoder, base.generator, base.decoder)
        self.expected, self.arrived, self.order = expected, [], []
        self.all_in = asyncio.Event()

    async def segment(self, job):
        if job.latents is None:
            return await super().segment(job)
        self.arrived.append(job.position)
        if len(self.arrived) == self.expected:
            self.all_in.set()
        await self.all_in.wait()
        while self.arrived[-1] != job.position:  # last-first
            await asyncio.sleep(0)
        self.order.append(job.position)
        made = await super().segment(job)
        self.arrived.remove(job.position)
        return made


def test_same_bytes_whatever_the_decode_order(components, tmp_path):
    request = make_request(**SMALL, schedule="forward", seconds=4.8)
    local = render(request, tmp_path / "local.mp4", components=components, keep_latents=True)
    encoded = encode_request(components, request)
    ctx = render_context(encoded, "reordered", SectionStore(tmp_path / "store"))
    done = {p: local.latents[:, :, 1 + p * ctx.plan.window : 1 + (p + 1) * ctx.plan.window] for p in range(4)}
    pools = Reordered(LocalPools.from_components(components), expected=4)

    async def run():
        return await finish_video(ctx, await pools.share(ctx), pools, done, tmp_path / "reordered.mp4")

    where, _, frames = asyncio.run(run())
    assert frames == local.frames
    assert pools.order == [3, 2, 1, 0]
    assert sha(where) == sha(local.path)


class Counting(LocalPools):
    def __init__(self, base: LocalPools):
        super().__init__(base.encoder, base.generator, base.decoder)
        self.decodes, self.joins, self.sections = [], [], []

    async def generate(self, job):
        self.sections.append(job.position)
        async for event in super().generate(job):
            yield event

    async def segment(self, job):
        (self.joins if job.latents is None else self.decodes).append(job.position)
        return await super().segment(job)


def test_resumed_render_neither_regenerates_nor_redecodes(components, tmp_path):
    from fp_ray.coordinator import run_render

    request = make_request(**SMALL, seconds=3.6)  # inverted, 3 sections
    store = SectionStore(tmp_path / "store")

    def run(out):
        pools = Counting(LocalPools.from_components(components))
        result = asyncio.run(run_render(request, pools, out=tmp_path / out, store=store, request_id="again"))
        return result, pools

    first, pools = run("a.mp4")
    assert sorted(pools.decodes) == [0, 1, 2] and pools.sections == [2, 1, 0]
    again, pools = run("b.mp4")
    assert (pools.sections, pools.decodes, pools.joins) == ([], [], [])
    assert again.segments_reused == [0, 1, 2] and sha(again.path) == sha(first.path)
    # a lost middle segment needs only the two chunks of its seam
    (tmp_path / "store" / "again" / first.fingerprint[:16] / "segment_001.mp4").unlink()
    third, pools = run("c.mp4")
    assert pools.sections == [] and sorted(pools.decodes) == [0, 1]
    assert sha(third.path) == sha(first.path)


class HoldLast(LocalPools):
    """Generates the last section only once the start of the video has been published."""

    def __init__(self, base: LocalPools, last: int):
        super().__init__(base.encoder, base.generator, base.decoder)
        self.last, self.published = last, asyncio.Event()

    async def generate(self, job):
        if job.position == self.last:
            await self.published.wait()
        async for event in super().generate(job):
            yield event


def test_progressive_output_grows_with_the_finished_prefix(components, tmp_path):
    from fp_ray.coordinator import run_render

    request = make_request(**SMALL, schedule="forward", seconds=3.6)
    pools = HoldLast(LocalPools.from_components(components), last=2)
    events = []

    def on_event(e):
        events.append(e)
        if e["type"] == "prefix":
            assert (tmp_path / "live.mp4").stat().st_size > 0
            pools.published.set()

    result = asyncio.run(run_render(request, pools, out=tmp_path / "v.mp4", on_event=on_event,
                                    progressive=tmp_path / "live.mp4"))
    assert [e["segments"] for e in events if e["type"] == "prefix"] == [1, 2, 3]
    assert packets(tmp_path / "live.mp4") == packets(result.path)  # the same packets, fragmented


def test_coordinator_keeps_only_the_latents_pending_work_reads(components, tmp_path):
    """Forward: a section is read by the next two sections' context and two chunk decodes;
    after that only the store has it. The render still gets every latent back on request."""
    from fp_ray.coordinator import SectionLatents

    held = []
    original = SectionLatents.release

    def spy(self, position):
        original(self, position)
        held.append(len(self.in_memory()))

    SectionLatents.release = spy
    try:
        request = make_request(**SMALL, schedule="forward", seconds=9.6)  # 8 sections
        result = render(request, tmp_path / "v.mp4", components=components, keep_latents=True)
    finally:
        SectionLatents.release = original
    assert result.plan.num_sections == 8 and len(held) >= 6
    assert max(held) <= 4  # a few sections in memory, whatever the length
    assert result.latents.shape[2] == 1 + 8 * result.plan.window


class FailingDecoder(Counting):
    async def segment(self, job):
        self.decodes.append(job.position)
        raise OSError(f"decoder storage full at chunk {job.position}")


def test_a_failed_decode_stops_the_render_at_the_next_section(components, tmp_path):
    """Forward, 4 sections: chunk 0 is decoded once section 0 exists; its failure must stop
    the render before the remaining sections spend their GPU time."""
    from fp_ray.coordinator import run_render

    request = make_request(**SMALL, schedule="forward", seconds=4.8)
    pools = FailingDecoder(LocalPools.from_components(components))
    with pytest.raises(OSError, match="storage full at chunk 0"):
        asyncio.run(run_render(request, pools, out=tmp_path / "v.mp4"))
    assert len(pools.sections) < 4, pools.sections
    assert not (tmp_path / "v.mp4").exists()


class Queueing:
    """A decoder pool that only counts: how many decode jobs (each carrying its latents) are
    out at once, and how many sections were read from the store before the first one ran."""

    def __init__(self, loads: list):
        self.loads, self.out, self.peak, self.loads_at_first = loads, 0, 0, None

    async def segment(self, job):
        if job.latents is None:  # a seam joined from stored halves
            return []
        self.loads_at_first = len(self.loads) if self.loads_at_first is None else self.loads_at_first
        self.out += 1
        self.peak = max(self.peak, self.out)
        await asyncio.sleep(0)  # let every queued decode try to start
        self.out -= 1
        return [job.position]


def test_a_long_tail_of_decodes_reads_latents_only_when_each_runs(components, tmp_path, monkeypatch):
    """The batch's decode stage gets a whole video's sections at once, all in the store: none is
    read up front, and at most DECODES_IN_FLIGHT chunks hold their latents at any time."""
    from fp_ray.coordinator import SectionLatents
    from fp_ray.segments import DECODES_IN_FLIGHT, Segments
    from fp_ray.workers import Shared

    request = make_request(**SMALL, schedule="inverted", seconds=44.0)
    ctx = render_context(encode_request(components, request), "long-tail", SectionStore(tmp_path / "store"))
    n = ctx.plan.num_sections
    store = SectionStore(ctx.store)
    shape = (1, 16, ctx.plan.window, ctx.plan.latent_height, ctx.plan.latent_width)
    for p in range(n):
        store.save(ctx.request_id, ctx.fingerprint, p, torch.randn(shape))
    loads = []
    original = SectionStore.load
    monkeypatch.setattr(SectionStore, "load", lambda self, *a, **k: loads.append(a) or original(self, *a, **k))
    done = SectionLatents.stored(ctx, range(n), check=False)
    assert len(done) == n and done.in_memory() == [] and loads == []
    pools = Queueing(loads)

    async def run():
        segments = Segments(ctx, Shared(ctx.key, ctx), pools, emit=lambda event: None)
        segments.latents_ready(done)
        await segments.wait()
        return segments

    segments = asyncio.run(run())
    assert n > 2 * DECODES_IN_FLIGHT and len(segments.made) == n
    assert pools.peak == DECODES_IN_FLIGHT
    assert pools.loads_at_first <= 2 * DECODES_IN_FLIGHT  # a chunk reads at most two sections
    assert len(loads) < 2 * n  # each section read for the chunks that decode it, not kept


def test_damaged_checkpoints_are_made_again_never_trusted(components, tmp_path):
    """A garbled section, a truncated segment and a zeroed seam half in the store: the rerun
    makes each again and writes the very same video."""
    from fp_ray.coordinator import run_render

    request = make_request(**SMALL, seconds=3.6)  # inverted, 3 sections
    store = SectionStore(tmp_path / "store")
    first = asyncio.run(run_render(request, LocalPools.from_components(components), out=tmp_path / "a.mp4",
                                   store=store, request_id="damaged"))
    folder = tmp_path / "store" / "damaged" / first.fingerprint[:16]
    section = bytearray((folder / "section_001.safetensors").read_bytes())
    section[-8:] = bytes(8)  # latents' last bytes: still a valid safetensors file
    (folder / "section_001.safetensors").write_bytes(bytes(section))
    for k in (0, 1):
        (folder / f"segment_{k:03d}.mp4").unlink()  # segments 0, 1 need sections 0, 1 again
    segment = (folder / "segment_002.mp4").read_bytes()
    (folder / "segment_002.mp4").write_bytes(segment[: len(segment) // 2])
    (folder / "lead_001.safetensors").write_bytes(bytes(100))  # a seam half a killed run left, damaged
    pools = Counting(LocalPools.from_components(components))
    again = asyncio.run(run_render(request, pools, out=tmp_path / "b.mp4", store=store, request_id="damaged"))
    assert again.reused == [0, 2] and pools.sections == [1] and again.segments_reused == []
    assert sha(again.path) == sha(first.path)


def test_a_seam_another_run_of_the_same_render_made_counts_as_made(components, tmp_path):
    """Two runs of one render (same store and id) at once: the one that makes a segment first
    takes both halves of its seam; the other, finding its neighbour's half gone, finds the
    segment made instead of failing."""
    from fp_ray.workers import DecoderWorker, SegmentJob, Shared

    request = make_request(**SMALL, seconds=2.4)  # 2 sections
    store = SectionStore(tmp_path / "store")
    first = render(request, tmp_path / "a.mp4", components=components, store=store, request_id="twice")
    ctx = render_context(encode_request(components, request), "twice", store)
    store.save("twice", ctx.fingerprint, 1, torch.zeros(1, 3, 4, 48, 64), "lead")  # this run's half; the other's tail is gone
    decoder = DecoderWorker(components=components)
    assert decoder.segment(SegmentJob(Shared(ctx.key, ctx), 1, None)) == [1]
    (tmp_path / "store" / "twice" / first.fingerprint[:16] / "segment_001.mp4").unlink()  # not made after all: an error
    with pytest.raises(FileNotFoundError, match="seam half is missing"):
        decoder.segment(SegmentJob(Shared(ctx.key, ctx), 1, None))


def test_a_resumed_render_reads_its_checkpoints_off_the_event_loop(components, tmp_path, monkeypatch):
    """Resuming reads and checks every stored section and segment (at 546 sections, gigabytes
    from a shared store): none of it runs on the event loop, which in Serve also keeps the
    leases of the replica's other renders and answers their requests."""
    request = make_request(**SMALL, seconds=2.4)  # 2 sections
    store = SectionStore(tmp_path / "store")
    first = render(request, tmp_path / "a.mp4", components=components, store=store, request_id="resumed")
    on_loop, original = [], SectionStore.has

    def has(self, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(args)
        except RuntimeError:  # a worker thread: no loop runs here
            pass
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SectionStore, "has", has)
    again = render(request, tmp_path / "b.mp4", components=components, store=store, request_id="resumed")
    assert again.reused == [0, 1] and again.segments_reused == [0, 1] and on_loop == []
    assert sha(again.path) == sha(first.path)
