"""The video side of a render: each chunk decoded once its latents exist, each segment made
where both its chunks' halves meet, previews and the progressive prefix published as
segments appear, and the mp4 written as the segments joined in time order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch

from .decode import next_chunk, previous_chunk
from .extend import ClipJoin, new_segment_frames
from .metadata import TAG, sidecar_location
from .storage import SectionStore, atomic_file, delete, is_uri, temporary_folder, upload, write_bytes
from .video import FRAGMENTED, SegmentJoiner, frame_count, write_joined
from .workers import RenderContext, SegmentAction, SegmentJob, Shared

if TYPE_CHECKING:
    from .coordinator import Pools

OnEvent = Callable[[dict], None]
# Chunk decodes sent to the decoders at once, each with its sections' latents (3.7 MB a section
# at 640x640): enough to keep a pool of decoders busy, few enough to bound memory.
DECODES_IN_FLIGHT = 16


class SegmentsMissing(RuntimeError):
    """The decode tasks ended without making every segment, or a made one is gone or corrupt
    (a bug, or a store that lost files: a rerun makes them again)."""


class WriteStopped(RuntimeError):
    """The render was stopped while its mp4 (or an extended clip for it) was being written:
    nothing was put in place."""


class Segments:
    """The video side of a render: decodes each chunk once its latents exist, has the
    segment on each seam made by whichever task sees both halves, publishes previews and the
    progressive prefix, and joins the segments when all exist. Segment k's frames depend on
    chunks k-1 and k only (in a loop segment 0 on the last chunk and chunk 0), so boundaries
    and bytes do not depend on decode order."""

    def __init__(self, ctx: RenderContext, shared: Shared, pools: "Pools", emit: OnEvent,
                 preview_dir: str | Path | None = None, progressive: str | Path | None = None):
        self.ctx, self.shared, self.pools, self.emit = ctx, shared, pools, emit
        self.store = SectionStore(ctx.store)
        self.n = ctx.plan.num_sections
        self.frames = new_segment_frames(ctx.plan, ctx.cond)  # the new part's (an extended clip's are its own)
        self.preview_dir = Path(preview_dir) if preview_dir is not None else None
        self.made = {k for k in range(self.n) if self._has(k, "segment")}
        self.reused = sorted(self.made)
        # chunks whose halves are all made or kept: a resumed render does not decode them again
        self.decoded = {k for k in range(self.n) if not self._needs_decode(k)}
        self.submitted = set(self.decoded)
        self.joining: set[int] = set()
        self.tasks: list[asyncio.Task] = []
        self._slots = asyncio.Semaphore(DECODES_IN_FLIGHT)
        self.first_decode: float | None = None
        self.last_made = time.perf_counter()
        self.prefix = 0  # segments [0, prefix) are in the progressive output
        self._progressive_path = Path(progressive) if progressive is not None else None
        self._progressive: SegmentJoiner | None = None
        self.frames_written: int | None = None  # the mp4's frames, once written (an extension's clip too)
        self._stop_writing = threading.Event()  # set by a stop: the threads that write end at their next step
        # an extended clip's own frames, prepared once (its re-encode stops with the render too)
        self._clip = ClipJoin(ctx.request, ctx.clip_sha256, self._check_stop)

    def _has(self, k: int, kind: str) -> bool:
        return self.store.has(self.ctx.request_id, self.ctx.fingerprint, k, kind)

    def _needs_decode(self, k: int) -> bool:
        plan = self.ctx.plan
        left = k not in self.made and (previous_chunk(plan, k) is None or not self._has(k, "lead"))
        following = next_chunk(plan, k)
        right = following is not None and following not in self.made and not self._has(k, "tail")
        return left or right

    def start(self) -> None:
        """Publish what a resumed render already has, and join seams both of whose chunks are done."""
        for k in sorted(self.made):
            self._published(k, 0.0)
        for k in range(self.n):
            self._join_if_ready(k)

    def latents_ready(self, done: Mapping[int, torch.Tensor]) -> None:
        """Called after every finished section: decode what can be decoded now. A decode that
        failed fails the render here, at the next section, not after every section has
        spent its GPU time."""
        self.raise_failed()
        for s in self.ctx.plan.sections:
            k = s.position
            if k not in self.submitted and all(p in done for p in s.decode_needs):
                self.submitted.add(k)
                self._spawn(self._decode(k, s.decode_needs, done))

    def will_read(self, position: int) -> bool:
        """Whether a chunk not yet submitted decodes section `position`'s latents."""
        near = [position - 1, position, position + 1]
        if self.ctx.plan.loop:  # the last chunk reads section 0
            near = [k % self.n for k in near]
        return any(0 <= k < self.n and k not in self.submitted and position in self.ctx.plan.section(k).decode_needs
                   for k in near)

    def _spawn(self, coro) -> None:
        self.tasks.append(asyncio.create_task(coro))

    def _action(self, segment: int | None, neighbour: int | None, decoding: int) -> SegmentAction:
        """What chunk `decoding` does with its half of `segment`, whose other half is chunk
        `neighbour`'s (None: there is none)."""
        if segment is None or segment in self.made:
            return SegmentAction.SKIP
        ready = neighbour is None or neighbour == decoding or neighbour in self.decoded
        return SegmentAction.MAKE if ready else SegmentAction.KEEP

    async def _decode(self, k: int, needs: tuple[int, ...], done: Mapping[int, torch.Tensor]) -> None:
        plan, following = self.ctx.plan, next_chunk(self.ctx.plan, k)
        # The latents are read when the decode gets its slot, not when it is queued: a tail of
        # many queued chunks (the batch's decode stage, slow decoders) holds a few in memory.
        async with self._slots:
            left = self._action(k, previous_chunk(plan, k), k)
            # a one-chunk loop's tail starts its own segment, which its left half makes
            right = SegmentAction.SKIP if following == k else self._action(following, following, k)
            await self._run(SegmentJob(self.shared, k, {p: done[p] for p in needs}, left=left, right=right))
        self.decoded.add(k)
        self._join_if_ready(k)
        if following is not None:
            self._join_if_ready(following)

    def _join_if_ready(self, k: int) -> None:
        previous = previous_chunk(self.ctx.plan, k)
        if previous is not None and k not in self.made and k not in self.joining and {previous, k} <= self.decoded:
            self.joining.add(k)
            self._spawn(self._run(SegmentJob(self.shared, k, None)))

    async def _run(self, job: SegmentJob) -> None:
        t = time.perf_counter()
        self.first_decode = self.first_decode or t
        made = await self.pools.segment(job)
        for k in made:
            await self._segment_made(k, time.perf_counter() - t)

    async def _segment_made(self, k: int, seconds: float) -> None:
        self.made.add(k)
        self.last_made = time.perf_counter()
        if self.preview_dir is not None:
            data = await asyncio.to_thread(self._segment, k)
            await asyncio.to_thread(write_bytes, self.preview_dir / f"section_{k:03d}.mp4", data)
        self._published(k, seconds)
        while self._progressive_path is not None and self.prefix in self.made and self.prefix < self.n:
            await asyncio.to_thread(self._append_progressive, self.prefix)
            self.prefix += 1
            self.emit({"type": "prefix", "segments": self.prefix, "frames": sum(self.frames[: self.prefix])})

    def _published(self, k: int, seconds: float) -> None:
        self.emit({"type": "section_decoded", "position": k, "frames": self.frames[k], "seconds": seconds,
                   "segments": len(self.made), "total": self.n})

    def _segment(self, k: int) -> bytes:
        data = self.store.load_segment(self.ctx.request_id, self.ctx.fingerprint, k)
        if data is None:
            where = self.store.location(self.ctx.request_id, self.ctx.fingerprint, k, "segment")
            raise SegmentsMissing(f"render {self.ctx.request_id}: segment {k} is missing or corrupt in the store "
                                  f"({where}); run again to make it again")
        return data

    def _append_progressive(self, k: int) -> None:
        if self._progressive is None:
            self._progressive_path.parent.mkdir(parents=True, exist_ok=True)
            self._progressive = SegmentJoiner(str(self._progressive_path), self.ctx.request.fps, FRAGMENTED, self._tags())
        for part in self._clip.parts([self._segment(k)], start=k == 0, end=k == self.n - 1):
            self._progressive.append(part)  # an extended clip's own frames too, where they touch
        if k == self.n - 1:
            self._progressive.close()

    def raise_failed(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def wait(self) -> None:
        """Until every segment is made (the last tasks spawn joins as they end)."""
        while True:
            for task in self.tasks:
                if task.done():
                    task.result()  # a failed decode fails the render
            if len(self.made) == self.n:
                return
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                missing = sorted(set(range(self.n)) - self.made)
                raise SegmentsMissing(f"render {self.ctx.request_id}: segments {missing} were never made")
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    def cancel(self) -> None:
        self._stop_writing.set()  # a progressive output's thread (preparing the clip) ends too
        for task in self.tasks:
            task.cancel()
        if self._progressive is not None and self.prefix < self.n:
            self._progressive.close()  # what was published stays playable
        self._clip.close()

    def segments(self) -> Iterator[bytes]:
        """The segments' bytes in time order, one at a time."""
        for k in range(self.n):
            self._check_stop()
            yield self._segment(k)

    def _check_stop(self) -> None:
        if self._stop_writing.is_set():
            raise WriteStopped(f"render {self.ctx.request_id}: stopped while its video was joined")

    async def write_in_thread(self, out: str | Path) -> str:
        """`write` in a worker thread that stops with the render: a cancelled await (a stop
        signal, Ctrl-C, a cancelled request) would otherwise leave the thread joining on and
        putting a whole video in place after the render reported itself stopped. Stopped, the
        thread ends at the next segment, its temporary files removed, an older video kept."""
        try:
            return await asyncio.to_thread(self.write, out)
        except BaseException:
            self._stop_writing.set()
            raise

    def _tags(self) -> dict[str, str]:
        return {TAG: self.ctx.metadata} if self.ctx.metadata else {}

    def write(self, out: str | Path) -> str:
        """Join the segments into `out` (a path or a pyarrow.fs URI): packets copied, no
        re-encode; the render record goes in its tags and, once the mp4 is in place, in the
        sidecar `{out}.json` (each written whole or not at all)."""
        fps = self.ctx.request.fps
        parts = self._clip.parts(self.segments())  # an extended clip's own frames, before or after
        try:
            if not is_uri(out):
                self._write_local(parts, Path(out))
                return str(out)
            with temporary_folder("out") as tmp:
                local = tmp / "video.mp4"  # a folder of this render's own: no rename needed
                write_joined(parts, str(local), fps, self._tags())
                self.frames_written = frame_count(local)
                self._check_stop()
                # an older record goes first: a failed upload never leaves a video beside another render's record
                delete(sidecar_location(out))
                upload(local, str(out))
        finally:
            self._clip.close()
        if self.ctx.metadata:
            write_bytes(sidecar_location(out), self.ctx.metadata.encode())
        return str(out)

    def _write_local(self, parts: Iterator[bytes | str], out: Path) -> None:
        """The mp4 and its sidecar are both written before either is renamed into place, and an
        older sidecar goes first: a full disk or a kill never pairs a video with another
        render's record (at worst a new or old video is left without its sidecar)."""
        sidecar = Path(sidecar_location(out))
        with contextlib.ExitStack() as stack:  # on leaving: the video renamed, then the record
            record = stack.enter_context(atomic_file(sidecar)) if self.ctx.metadata else None
            video = stack.enter_context(atomic_file(out))
            if record is not None:
                Path(record).write_text(self.ctx.metadata)
            write_joined(parts, video, self.ctx.request.fps, self._tags())
            self.frames_written = frame_count(video)
            self._check_stop()  # the last moment before the renames
            sidecar.unlink(missing_ok=True)


async def finish_video(ctx: RenderContext, shared: Shared, pools: "Pools", done: Mapping[int, torch.Tensor],
                       out: str | Path, emit: OnEvent = lambda event: None) -> tuple[str, dict[str, float], int]:
    """The coordinator's tail for sections generated elsewhere (the batch's stages): make
    every segment and write the mp4. Returns (where, timings, frames written)."""
    segments = await asyncio.to_thread(Segments, ctx, shared, pools, emit)  # reads and checks the stored segments
    t = time.perf_counter()
    try:
        segments.start()
        segments.latents_ready(done)
        await segments.wait()
    except BaseException:
        segments.cancel()
        raise
    t_write = time.perf_counter()
    where = await segments.write_in_thread(out)
    return where, {"decode": t_write - t, "write": time.perf_counter() - t_write}, segments.frames_written


