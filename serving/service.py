"""The online render service: records in SQLite, artifacts in the storage folder, one
coordinator task per render, live progress events for Server-Sent Events, Prometheus
metrics. Knows nothing of HTTP (serving/api.py) or of Serve (serving/app.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fp_ray.coordinator import Pools, run_render
from fp_ray.records import UNFINISHED, RenderRecords
from fp_ray.request import RenderRequest
from fp_ray.storage import SectionStore

TERMINAL_EVENTS = ("finished", "failed", "cancelled")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.submitted = Counter("fp_ray_renders_submitted", "Renders accepted", registry=r)
        self.finished = Counter("fp_ray_renders_finished", "Renders that wrote their video", registry=r)
        self.failed = Counter("fp_ray_renders_failed", "Renders that failed", registry=r)
        self.cancelled = Counter("fp_ray_renders_cancelled", "Renders cancelled by a user", registry=r)
        self.queue_depth = Gauge("fp_ray_render_queue_depth", "Renders queued or running", registry=r)
        self.section_seconds = Histogram("fp_ray_section_seconds", "Seconds to generate one section", registry=r,
                                         buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300))
        self.steps = Counter("fp_ray_steps", "Sampler steps run (rate() gives steps/s)", registry=r)
        self.steps_per_second = Gauge("fp_ray_steps_per_second", "Steps/s of the last finished section", registry=r)
        self.video_seconds = Counter("fp_ray_video_seconds", "Seconds of video produced", registry=r)
        self.decode_seconds = Histogram("fp_ray_decode_seconds", "Seconds from asking for a chunk's decode to having it (queueing included)", registry=r,
                                        buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60))


class Render:
    """A live render: its task and the events seen so far (listeners wait on `changed`)."""

    def __init__(self, rid: str, steps: int):
        self.id, self.steps = rid, steps
        self.sections_done = 0
        self.events: list[dict] = []
        self.changed = asyncio.Condition()
        self.task: asyncio.Task | None = None


class RenderService:
    def __init__(self, pools: Pools, model: str, storage: str, database: str | None = None,
                 auth_token: str | None = None, max_upload_mb: float = 25.0):
        self.pools, self.model = pools, model
        self.storage = Path(storage)
        self.records = RenderRecords(database or self.storage / "renders.db")
        self.store = SectionStore(self.storage / "sections")
        self.auth_token = auth_token
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.metrics = Metrics()
        self.live: dict[str, Render] = {}
        self._resumed = False

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

    # ---- lifecycle -------------------------------------------------------------------------

    def resume_unfinished(self) -> None:
        """Once per process: restart every render a previous process left unfinished; its
        finished sections come back from the checkpoints."""
        if self._resumed:
            return
        self._resumed = True
        for record in self.records.unfinished():
            if record["id"] not in self.live:
                self._start(record["id"], RenderRequest(**record["request"]), resumed=True)

    def submit(self, request: RenderRequest, image: bytes, end_image: bytes | None) -> str:
        """Store the inputs, record the render and start it; returns its id at once."""
        rid = uuid.uuid4().hex[:16]
        self.image_path(rid, "start").parent.mkdir(parents=True, exist_ok=True)
        self.image_path(rid, "start").write_bytes(image)
        fields = {"image": str(self.image_path(rid, "start")), "model": self.model}
        if end_image is not None:
            self.image_path(rid, "end").write_bytes(end_image)
            fields["end_image"] = str(self.image_path(rid, "end"))
        request = request.model_copy(update=fields)
        self.records.create(rid, request.model_dump())
        self.metrics.submitted.inc()
        self._start(rid, request)
        return rid

    def _start(self, rid: str, request: RenderRequest, resumed: bool = False) -> None:
        render = self.live[rid] = Render(rid, request.steps)
        render.events = [e for _, e in self.records.events(rid)] if resumed else []
        self.metrics.queue_depth.inc()
        render.task = asyncio.get_running_loop().create_task(self._run(render, request))

    async def _run(self, render: Render, request: RenderRequest) -> None:
        rid = render.id
        images = (self.image_path(rid, "start").read_bytes(),
                  self.image_path(rid, "end").read_bytes() if request.end_image else None)
        try:
            result = await run_render(request, self.pools, out=self.video_path(rid), store=self.store, request_id=rid,
                                      on_event=lambda e: self._on_event(render, e), images=images,
                                      preview_dir=self.folder(rid) / "previews", progressive=self.progressive_path(rid))
        except asyncio.CancelledError:
            self.records.update(rid, status="cancelled", eta_s=None)
            self.metrics.cancelled.inc()
            await self._publish(render, {"type": "cancelled"})
            raise
        except Exception as e:  # any failure ends this render only; the user sees why
            self.records.update(rid, status="failed", error=f"{type(e).__name__}: {e}", eta_s=None)
            self.metrics.failed.inc()
            await self._publish(render, {"type": "failed", "error": f"{type(e).__name__}: {e}"})
        else:
            self.records.update(rid, status="finished", frames=result.frames, eta_s=0.0)
            self.metrics.finished.inc()
            self.metrics.video_seconds.inc(result.frames / request.fps)
        finally:
            self.metrics.queue_depth.dec()
            self.live.pop(rid, None)

    def _on_event(self, render: Render, event: dict) -> None:
        rid, kind = render.id, event["type"]
        if kind == "plan":
            render.sections_done = len(event["reused"])
            self.records.update(rid, status="queued", sections_total=event["sections"], sections_done=render.sections_done)
        elif kind == "section_started":
            self.records.update(rid, status="running")
        elif kind == "step":
            self.metrics.steps.inc()
            if event.get("eta_s") is not None:
                self.records.update(rid, eta_s=event["eta_s"])
        elif kind == "section_finished":
            render.sections_done += 1
            self.records.update(rid, sections_done=render.sections_done)
            self.metrics.section_seconds.observe(event["seconds"])
            if event["seconds"] > 0:
                self.metrics.steps_per_second.set(render.steps / event["seconds"])
        elif kind == "section_decoded":
            self.metrics.decode_seconds.observe(event["seconds"])
        event = {k: v for k, v in event.items() if k != "path"}  # server paths stay inside
        asyncio.get_running_loop().create_task(self._publish(render, event))

    async def _publish(self, render: Render, event: dict) -> None:
        async with render.changed:
            seq = len(render.events)
            render.events.append(event)
            if event["type"] != "step":
                self.records.add_event(render.id, seq, event)
            render.changed.notify_all()

    async def cancel(self, rid: str) -> bool:
        """Cancel a queued or running render: its coordinator task is cancelled, which
        cancels its in-flight section requests; a generator stops after its current step."""
        render = self.live.get(rid)
        if render is None or render.task is None or render.task.done():
            return False
        render.task.cancel()
        try:
            await render.task
        except asyncio.CancelledError:
            pass
        return True

    async def events(self, rid: str, start: int = 0):
        """Yield (seq, event) from `start`, live until the render ends."""
        render = self.live.get(rid)
        if render is None:  # ended (or from an earlier process): what the database kept
            for seq, event in self.records.events(rid):
                if seq >= start:
                    yield seq, event
            return
        seq = start
        while True:
            async with render.changed:
                while seq >= len(render.events):
                    await render.changed.wait()
                batch = render.events[seq:]
            for event in batch:
                yield seq, event
                seq += 1
                if event["type"] in TERMINAL_EVENTS:
                    return


def sse(seq: int, event: dict) -> str:
    return f"id: {seq}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


def public(record: dict, base: str) -> dict:
    """A record as the API shows it: no server paths."""
    request = {k: v for k, v in record["request"].items() if k not in ("image", "end_image", "model")}
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


def is_unfinished(record: dict) -> bool:
    return record["status"] in UNFINISHED


