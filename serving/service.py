"""The online render service: records (fp_ray.records), artifacts in the storage folder, one
coordinator task per render this replica owns, live progress events for Server-Sent Events,
admission limits, retention, Prometheus metrics. Knows nothing of HTTP (serving/api.py) or of
Serve (serving/app.py).

Ownership: a replica claims a render in the database with a lease it renews, and writes a
fresh owner token next to the render's checkpoints. The generator replica stops a section as
soon as that token changes (a cancel, or another replica taking over an orphan), so a section
never runs twice at once and a cancelled one writes no checkpoint.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from fp_ray.coordinator import Pools, RenderFailed, WorkerLost, run_render
from fp_ray.encode import ImageError
from fp_ray.extend import ClipError, checked_request
from fp_ray.lora import LoraRegistry
from fp_ray.records import TERMINAL, UNFINISHED, RenderRecords
from fp_ray.request import RenderRequest, RequestError
from fp_ray.storage import SectionStore, join, read_bytes, write_bytes
from fp_ray.workers import SectionOutOfMemory
from serving.fetch import FetchPolicy
from serving.metrics import Metrics
from serving.retention import Retention

log = logging.getLogger(__name__)
CANCELLED_TOKEN = "cancelled"


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and timings of one ingress replica (serving/config.yaml `args`)."""

    max_upload_mb: float = 25.0
    max_queued: int = 200  # unfinished renders in the whole service: 429 past it
    max_per_client: int = 50  # unfinished renders per named token
    retry_after_s: int = 30
    max_streams: int = 800  # SSE streams on this replica (below the ingress's max_ongoing_requests)
    max_streams_per_render: int = 20
    heartbeat_s: float = 15.0
    lease_s: float = 30.0  # an orphan's render is taken over this long after its owner died
    retention_days: float | None = 30.0
    retention_gb: float | None = None
    public_url: str = ""  # links in responses: relative unless set (never the client's Host header)
    url_timeout_s: float = 10.0  # image_url: the whole fetch, redirects included
    url_allow: tuple[str, ...] = ()  # image_url: non-public networks this deployment trusts (CIDR)


class Busy(RuntimeError):
    """The service is at an admission limit; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class InputsGone(RuntimeError):
    """A render's stored input images vanished before it could (re)start."""


def owner_location(store: SectionStore, rid: str) -> str:
    """Where the owner token of a render lives: beside its checkpoints, which every generator reads."""
    return join(store.root, rid, "owner")


def read_owner(location: str) -> str | None:
    try:
        return read_bytes(location).decode()
    except FileNotFoundError:
        return None


# A quoted absolute path (whole, or cut short by `excerpt`): on Serve every file a request
# names is one this server stored (clients give uploads and URLs, never paths)
STORED_INPUT = re.compile(r"'/[^']*'")


def user_error(error: BaseException) -> str:
    """What failed, in terms a user can act on; the details (pids, addresses, actor ids) go to the
    log, and a stored input's server path reads as "the upload"."""
    if isinstance(error, (ImageError, RequestError, InputsGone, SectionOutOfMemory)):
        return STORED_INPUT.sub("the upload", str(error))[:300]
    if isinstance(error, (RenderFailed, WorkerLost)):
        return "workers were lost while rendering and the retries ran out; submit the render again"
    return "internal error while rendering; the server log has the details under this render's id"


class Render:
    """A render this replica runs: its task and this run's events (listeners wait on `wake`)."""

    def __init__(self, rid: str, steps: int, owner: str, next_seq: int):
        self.id, self.steps, self.owner = rid, steps, owner
        self.sections_done = 0
        self.first_seq = self.next_seq = next_seq
        self.events: list[tuple[int, dict]] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.cancelled_by_user = False
        self.running = False  # the record says running
        self.last_eta_write = 0.0


class RenderService:
    def __init__(self, pools: Pools, model: str, storage: str, database: str | None = None,
                 auth_token: str | None = None, config: ServiceConfig = ServiceConfig(),
                 tokens: dict[str, str] | None = None, loras: LoraRegistry | None = None):
        self.pools, self.model, self.config = pools, model, config
        self.loras = loras or LoraRegistry({})  # the LoRAs a request may name: none unless configured
        self.storage = Path(storage)
        self.records = RenderRecords(database or self.storage / "renders.db")
        self.store = SectionStore(self.storage / "sections")
        # named tokens: the name goes to the logs, the metrics and the per-client limit
        self.tokens = dict(tokens or {})
        if auth_token:
            self.tokens.setdefault("default", auth_token)
        self.max_upload_bytes = int(config.max_upload_mb * 1024 * 1024)
        self.fetch = FetchPolicy(max_bytes=self.max_upload_bytes, timeout_s=config.url_timeout_s,
                                 allow=FetchPolicy.parse_allow(list(config.url_allow)))
        self.metrics = Metrics()
        self.retention = Retention(self, config.retention_days, config.retention_gb)
        self.replica = uuid.uuid4().hex[:8]
        self.live: dict[str, Render] = {}
        self.streams: dict[str, int] = {}
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")  # FIFO: writes keep their order
        self._pending: set[asyncio.Task] = set()
        # Admission counts unfinished records, so a render counts only once recorded: submissions
        # are admitted one at a time, or concurrent ones all pass the count before any is recorded.
        self._admission = asyncio.Lock()
        self._maintainer: asyncio.Task | None = None
        self.stopping = False  # the replica shuts down: what fails now is no render's own failure

    # ---- artifacts: every path comes from the server-made id, never from user strings ----

    def folder(self, rid: str) -> Path:
        return self.storage / "renders" / rid

    def video_path(self, rid: str) -> Path:
        return self.folder(rid) / "video.mp4"

    def progressive_path(self, rid: str) -> Path:
        """Fragmented mp4 of the render's finished time-ordered prefix, growing as it renders."""
        return self.folder(rid) / "progressive.mp4"

    def preview_path(self, rid: str, position: int) -> Path:
        return self.folder(rid) / "previews" / f"section_{position:03d}.mp4"

    def image_path(self, rid: str, name: str) -> Path:
        return self.folder(rid) / "input" / name

    # ---- records, off the event loop ------------------------------------------------------

    async def db(self, fn: Callable, *args, **kwargs):
        """Run a records call on the records thread (SQLite on NFS can take a while)."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))

    def db_later(self, fn: Callable, *args, **kwargs) -> None:
        task = asyncio.get_running_loop().create_task(self.db(fn, *args, **kwargs))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Once per replica (needs the running loop): keep leases, take over orphans, retention."""
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        """The replica shuts down (a redeploy, `serve shutdown`, a stopped server): its renders
        stop where they are, unfinished and with their checkpoints, and are let go, so a
        restarted or another replica takes them over at once. Left running, they failed as
        the replica's threads went away, and their checkpoints were dropped."""
        self.stopping = True
        if self._maintainer is not None:
            self._maintainer.cancel()
        renders = list(self.live.values())
        for render in renders:
            if render.task is not None:
                render.task.cancel()
        await asyncio.gather(*(r.task for r in renders if r.task is not None), return_exceptions=True)
        for render in renders:
            await self.db(self.records.update, render.id, render.owner, owner=None)
        # the events and records queued for the database (db_later) land before the replica goes
        await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _maintain(self) -> None:
        next_sweep = 0.0
        while True:
            try:
                await self.keep_leases()
                await self.take_orphans()
                if time.monotonic() >= next_sweep:
                    await self.retention.sweep()
                    next_sweep = time.monotonic() + 300
            except Exception:  # a bad round must not stop the next one
                log.exception("render service maintenance failed")
            await asyncio.sleep(self.config.lease_s / 3)

    async def keep_leases(self) -> None:
        renders = list(self.live.values())
        held = await self.db(self.records.renew, [r.owner for r in renders], self.config.lease_s)
        for render in renders:
            if render.owner not in held:
                log.warning("render %s is no longer owned by replica %s; stopping its run", render.id, self.replica)
                if render.task is not None:
                    render.task.cancel()

    async def take_orphans(self) -> None:
        """Start every unfinished render nobody holds (left by a replica that died)."""
        for record in await self.db(self.records.orphans):
            rid = record["id"]
            owner = f"{self.replica}-{uuid.uuid4().hex[:8]}"
            if rid not in self.live and await self.db(self.records.claim, rid, owner, self.config.lease_s):
                log.info("replica %s takes over render %s", self.replica, rid)
                await self._start(rid, RenderRequest(**record["request"]), owner)

    async def submit(self, request: RenderRequest, images: tuple[bytes | None, ...], client: str | None = None,
                     clip: bytes | None = None) -> str:
        """Admit, store the inputs, record the render and start it; returns its id at once.
        `images`: the start image's bytes, the end image's, then each keyframe's (None: not given).
        LoraError: a LoRA this service does not offer; ClipError: a clip to extend it cannot use
        (`clip`: its bytes; the start image may then be None, extending forward from the clip's first frame)."""
        self.loras.check(request.loras)
        async with self._admission:
            rid, request = await self._admit(request, images, client, clip)
        owner = f"{self.replica}-{uuid.uuid4().hex[:8]}"
        await self.db(self.records.claim, rid, owner, self.config.lease_s)
        self.metrics.submitted.labels(client or "").inc()
        await self._start(rid, request, owner)
        return rid

    async def _admit(self, request: RenderRequest, images: tuple[bytes | None, ...], client: str | None,
                     clip: bytes | None) -> tuple[str, RenderRequest]:
        """Busy past a cap; else the inputs stored and the render recorded: (its id, its request)."""
        cap = self.config
        if await self.db(self.records.count_unfinished) >= cap.max_queued:
            raise Busy(f"{cap.max_queued} renders are queued or running; retry later", cap.retry_after_s)
        if client is not None and await self.db(self.records.count_unfinished, client) >= cap.max_per_client:
            raise Busy(f"token {client!r} has {cap.max_per_client} renders queued or running; retry later", cap.retry_after_s)
        rid = uuid.uuid4().hex[:16]
        fields = {"image": str(self.image_path(rid, "start")) if images[0] is not None else None, "model": self.model,
                  "keyframes": tuple(k.model_copy(update={"image": str(self.image_path(rid, f"keyframe_{i}"))})
                                     for i, k in enumerate(request.keyframes))}
        if images[1] is not None:
            fields["end_image"] = str(self.image_path(rid, "end"))
        if clip is not None:  # the clip's path is the server's own, never one a user gave
            fields["extend"] = str(self.image_path(rid, "clip.mp4"))
        await asyncio.to_thread(self._store_inputs, rid, images, clip)
        request = request.model_copy(update=fields)
        if clip is not None:
            try:  # the clip's size and fps become the request's
                request = (await asyncio.to_thread(checked_request, request))[0]
            except Exception as e:  # nothing of a refused render stays behind
                await asyncio.to_thread(shutil.rmtree, self.folder(rid), True)
                if isinstance(e, ClipError):
                    raise ClipError(user_error(e)) from None  # no server paths
                raise
        await self.db(self.records.create, rid, request.model_dump(), client)
        return rid, request

    def _store_inputs(self, rid: str, images: tuple[bytes | None, ...], clip: bytes | None = None) -> None:
        self.image_path(rid, "start").parent.mkdir(parents=True, exist_ok=True)
        for name, data in [*zip(self._input_names(len(images) - 2), images), ("clip.mp4", clip)]:
            if data is not None:
                self.image_path(rid, name).write_bytes(data)

    @staticmethod
    def _input_names(keyframes: int) -> list[str]:
        return ["start", "end"] + [f"keyframe_{i}" for i in range(keyframes)]

    async def _start(self, rid: str, request: RenderRequest, owner: str) -> None:
        # the new owner's token stops any section an earlier owner still has in flight
        await asyncio.to_thread(write_bytes, owner_location(self.store, rid), owner.encode())
        render = self.live[rid] = Render(rid, request.steps, owner, await self.db(self.records.last_seq, rid) + 1)
        self.metrics.queue_depth.inc()
        render.task = asyncio.get_running_loop().create_task(self._run(render, request))

    def _read_inputs(self, rid: str, request: RenderRequest) -> tuple[bytes | None, ...] | None:
        if request.extend is not None and not Path(request.extend).is_file():
            raise InputsGone(f"render {rid}: its clip to extend is gone from storage; delete it and submit again")
        if request.image is None:  # extending forward from the clip's first frame: the encoder reads what it needs
            return None
        try:
            given = [True, request.end_image is not None] + [True] * len(request.keyframes)
            return tuple(self.image_path(rid, name).read_bytes() if there else None
                         for name, there in zip(self._input_names(len(request.keyframes)), given))
        except FileNotFoundError:
            raise InputsGone(f"render {rid}: its input images are gone from storage; delete it and submit again") from None

    async def _run(self, render: Render, request: RenderRequest) -> None:
        rid, owner = render.id, render.owner
        ended = False  # this run wrote the render's end (not: it lost the render, or the replica stops)
        try:
            images = await asyncio.to_thread(self._read_inputs, rid, request)
            result = await run_render(request, self.pools, out=self.video_path(rid), store=self.store, request_id=rid,
                                      on_event=lambda e: self._on_event(render, e), images=images,
                                      sources=(None, None),  # uploads: the video records them by hash, never by server path
                                      preview_dir=self.folder(rid) / "previews", progressive=self.progressive_path(rid))
        except asyncio.CancelledError:
            if render.cancelled_by_user:  # cancel() already wrote the record
                self.metrics.cancelled.inc()
                self._publish(render, {"type": "cancelled"})
            raise
        except Exception as e:  # any failure ends this render only; the user sees what, the log sees why
            if self.stopping:  # the replica's end, not the render's: it resumes elsewhere
                log.warning("render %s stopped with its replica: %r", rid, e)
                return
            log.exception("render %s failed", rid)
            if ended := await self.db(self.records.update, rid, owner, status="failed", error=user_error(e), eta_s=None):
                self.metrics.failed.inc()
                self._publish(render, {"type": "failed", "error": user_error(e)})
        else:
            if ended := await self.db(self.records.update, rid, owner, status="finished", frames=result.frames, eta_s=0.0):
                self.metrics.finished.inc()
                self.metrics.video_seconds.inc(result.new_frames / request.fps)  # an extended clip is not produced here
                self._publish(render, {"type": "finished", "frames": result.frames})
        finally:
            self.metrics.queue_depth.dec()
            self.live.pop(rid, None)
            if ended:  # a cancel cleans up in cancel()
                await self.retention.drop_work_files(rid)

    def _on_event(self, render: Render, event: dict) -> None:
        rid, kind, owner = render.id, event["type"], render.owner
        if kind == "finished":
            return  # published by _run once the record says so
        if kind == "plan":
            render.sections_done = len(event["reused"])
            self.db_later(self.records.update, rid, owner, status="queued", sections_total=event["sections"],
                          sections_done=render.sections_done)
        elif kind == "section_started" and not render.running:
            render.running = True
            self.db_later(self.records.update, rid, owner, status="running")
        elif kind == "step":
            self.metrics.steps.inc()
            now = time.monotonic()
            if event.get("eta_s") is not None and now - render.last_eta_write > 2:  # not one write per step
                render.last_eta_write = now
                self.db_later(self.records.update, rid, owner, eta_s=event["eta_s"])
        elif kind == "section_finished":
            render.sections_done += 1
            self.db_later(self.records.update, rid, owner, sections_done=render.sections_done)
            self.metrics.section_seconds.observe(event["seconds"])
            if event["seconds"] > 0:
                self.metrics.steps_per_second.set(render.steps / event["seconds"])
        elif kind == "section_decoded":
            self.metrics.decode_seconds.observe(event["seconds"])
        elif kind == "section_retry":
            log.warning("render %s: section %s retried: %s", rid, event["position"], event.get("error"))
            event = {k: v for k, v in event.items() if k != "error"}
        self._publish(render, {k: v for k, v in event.items() if k != "path"})  # server paths stay inside

    def _publish(self, render: Render, event: dict) -> None:
        seq = render.next_seq
        render.next_seq += 1
        render.events.append((seq, event))
        if event["type"] != "step":  # steps are live only
            self.db_later(self.records.add_event, render.id, seq, event)
        render.wake.set()
        render.wake = asyncio.Event()

    async def cancel(self, rid: str) -> bool:
        """Cancel a queued or running render, wherever it runs: the record says cancelled at once,
        the owner token is revoked (the generator stops at its next step and saves nothing), and
        if this replica runs it, its coordinator task is cancelled (freeing its Serve requests)."""
        record = await self.db(self.records.get, rid)
        if record is None or record["status"] not in UNFINISHED:
            return False
        await self.db(self.records.update, rid, status="cancelled", eta_s=None, owner=None)
        await asyncio.to_thread(write_bytes, owner_location(self.store, rid), CANCELLED_TOKEN.encode())
        render = self.live.get(rid)
        if render is not None and render.task is not None and not render.task.done():
            render.cancelled_by_user = True
            render.task.cancel()
            try:
                await render.task
            except asyncio.CancelledError:
                pass
        else:  # another replica runs it: it sees the lost lease; the event goes through the database
            self.metrics.cancelled.inc()
            await self.db(self.records.add_event, rid, await self.db(self.records.last_seq, rid) + 1, {"type": "cancelled"})
        await self.retention.drop_work_files(rid)
        # The token outlives the work files: a section another replica dispatches before it sees
        # the cancel finds the render cancelled, not ownerless, and does not run.
        await asyncio.to_thread(write_bytes, owner_location(self.store, rid), CANCELLED_TOKEN.encode())
        return True

    async def delete(self, rid: str) -> bool:
        """Remove an ended render: its files and its record. False while it is unfinished."""
        record = await self.db(self.records.get, rid)
        if record is None or record["status"] not in TERMINAL:
            return False
        await self.retention.remove(rid)
        return True

    # ---- events ----------------------------------------------------------------------------

    def open_stream(self, rid: str) -> Callable[[], None]:
        """Count one more SSE stream of `rid` (Busy past the caps); returns its release, which
        may be called more than once."""
        if sum(self.streams.values()) >= self.config.max_streams:
            raise Busy(f"{self.config.max_streams} event streams are open; retry later", 5)
        if self.streams.get(rid, 0) >= self.config.max_streams_per_render:
            raise Busy(f"{self.config.max_streams_per_render} event streams are open for this render", 5)
        self.streams[rid] = self.streams.get(rid, 0) + 1
        self.metrics.streams.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.streams[rid] -= 1
                if not self.streams[rid]:
                    del self.streams[rid]
                self.metrics.streams.dec()

        return release

    async def events(self, rid: str, after: int = -1) -> AsyncIterator[tuple[int, dict] | None]:
        """Yield (seq, event) after event id `after` until the render's terminal event, and None
        as a heartbeat when nothing happened for `heartbeat_s`. Ids increase across resumes.
        Past the end of a live render: from its next event; of an ended one: its terminal
        event again, then the end."""
        sent, quiet_since = False, time.monotonic()
        while True:
            render = self.live.get(rid)
            if render is None:  # ended, or run by another replica: follow the database
                for seq, event in await self.db(self.records.events, rid, after):
                    yield seq, event
                    sent, after, quiet_since = True, seq, time.monotonic()
                    if event["type"] in TERMINAL:
                        return
                record = await self.db(self.records.get, rid)
                if record is None:
                    return
                if record["status"] in TERMINAL:
                    if not sent:
                        ending = [(s, e) for s, e in await self.db(self.records.events, rid) if e["type"] in TERMINAL]
                        if ending:
                            yield ending[-1]
                    return
                await asyncio.sleep(min(1.0, self.config.heartbeat_s))
                if time.monotonic() - quiet_since >= self.config.heartbeat_s:
                    quiet_since = time.monotonic()
                    yield None
                continue
            after = min(after, render.next_seq - 1)
            if after < render.first_seq - 1:  # earlier runs' events live in the database only
                for seq, event in await self.db(self.records.events, rid, after):
                    if seq >= render.first_seq:
                        break
                    yield seq, event
                after = render.first_seq - 1
                continue
            wake = render.wake
            fresh = render.events[bisect.bisect_right(render.events, after, key=lambda item: item[0]):]
            for seq, event in fresh:
                yield seq, event
                sent, after = True, seq
                if event["type"] in TERMINAL:
                    return
            if not fresh and rid in self.live:
                try:
                    await asyncio.wait_for(wake.wait(), self.config.heartbeat_s)
                except TimeoutError:
                    yield None
