"""Prometheus metrics of one ingress replica (scraped at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.submitted = Counter("fp_ray_renders_submitted", "Renders accepted, by token name", ["client"], registry=r)
        self.rejected = Counter("fp_ray_requests_rejected", "Requests refused at an admission limit", ["limit"], registry=r)
        self.finished = Counter("fp_ray_renders_finished", "Renders that wrote their video", registry=r)
        self.failed = Counter("fp_ray_renders_failed", "Renders that failed", registry=r)
        self.cancelled = Counter("fp_ray_renders_cancelled", "Renders cancelled by a user", registry=r)
        self.queue_depth = Gauge("fp_ray_render_queue_depth", "Renders queued or running on this replica", registry=r)
        self.section_seconds = Histogram("fp_ray_section_seconds", "Seconds to generate one section", registry=r,
                                         buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300))
        self.steps = Counter("fp_ray_steps", "Sampler steps run (rate() gives steps/s)", registry=r)
        self.steps_per_second = Gauge("fp_ray_steps_per_second", "Steps/s of the last finished section", registry=r)
        self.video_seconds = Counter("fp_ray_video_seconds", "Seconds of video generated (an extended clip not counted)", registry=r)
        self.decode_seconds = Histogram("fp_ray_decode_seconds", "Seconds from asking for a chunk's decode to having it (queueing included)", registry=r,
                                        buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60))
        self.storage_bytes = Gauge("fp_ray_storage_bytes", "Bytes under the storage folder (renders and checkpoints)", registry=r)
        self.streams = Gauge("fp_ray_event_streams", "Open SSE streams on this replica", registry=r)
