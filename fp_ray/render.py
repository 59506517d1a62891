"""One request in this process: the coordinator over in-process workers sharing one model.
The Ray path (`actors.RayPools`) runs the same coordinator over actors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from .coordinator import OnEvent, RenderResult, run_in_new_loop, run_render
from .encode import Encoded
from .models import Components, cached_components
from .request import RenderRequest
from .storage import SectionStore
from .workers import DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext, SectionJob, SegmentJob, Shared, iterate_in_thread

__all__ = ["LocalPools", "RenderResult", "render"]


class LocalPools:
    """The three workers over one set of components, each running in a thread of its own so
    decoding overlaps generation; one section generates at a time."""

    def __init__(
        self,
        encoder: EncoderWorker | None = None,
        generator: GeneratorWorker | None = None,
        decoder: DecoderWorker | None = None,
    ):
        self.encoder, self.generator, self.decoder = encoder, generator, decoder
        self._turns: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    @classmethod
    def from_components(cls, c: Components) -> "LocalPools":
        return cls(EncoderWorker(components=c), GeneratorWorker(components=c), DecoderWorker(components=c))

    async def encode(self, request: RenderRequest, images: tuple[bytes | None, ...] | None = None) -> Encoded:
        return await asyncio.to_thread(self.encoder.encode, request, images)

    async def share(self, context: RenderContext) -> Shared:
        return Shared(context.key, context)  # one process: the object itself

    def _turn(self, kind: str) -> asyncio.Lock:
        """One `kind` task at a time (a whole section: one model, one section), within the
        running event loop: a batch stage runs each row in a loop of its own (asyncio.run), and
        a lock that once had a waiter in one loop fails in the next."""
        loop = asyncio.get_running_loop()
        held = self._turns.get(kind)
        if held is None or held[0] is not loop:
            held = self._turns[kind] = (loop, asyncio.Lock())
        return held[1]

    async def generate(self, job: SectionJob) -> AsyncIterator[dict]:
        async with self._turn("generate"):
            async for event in iterate_in_thread(self.generator.generate(job)):
                yield event

    async def segment(self, job: SegmentJob) -> list[int]:
        async with self._turn("decode"):
            return await asyncio.to_thread(self.decoder.segment, job)

    async def cancel(self, request_id: str) -> None:
        self.generator.cancel(request_id)


def render(
    request: RenderRequest,
    out: str | Path,
    components: Components | None = None,
    on_event: OnEvent | None = None,
    preview_dir: str | Path | None = None,
    store: SectionStore | None = None,
    request_id: str | None = None,
    progressive: str | Path | None = None,
    keep_latents: bool = False,
) -> RenderResult:
    """Render `request` to the mp4 at `out` in this process (`run_render`'s arguments)."""
    pools = LocalPools.from_components(components or cached_components(request.model))
    return run_in_new_loop(
        run_render(request, pools, out=out, store=store, request_id=request_id, on_event=on_event,
                   preview_dir=preview_dir, progressive=progressive, keep_latents=keep_latents)
    )
