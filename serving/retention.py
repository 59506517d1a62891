"""What the service keeps on disk, and for how long: a finished render keeps its video and
previews only (its inputs and section checkpoints go as soon as it ends); ended renders are
removed after `days`, and the oldest ended ones first while storage is over `gb`."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fp_ray.storage import join, remove_tree

if TYPE_CHECKING:
    from serving.service import RenderService

log = logging.getLogger(__name__)


def tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed while we walked
                pass
    return total


class Retention:
    def __init__(self, service: RenderService, days: float | None, gb: float | None):
        self.service, self.days, self.gb = service, days, gb

    async def drop_work_files(self, rid: str) -> None:
        """An ended render needs neither its inputs nor its checkpoints any more."""
        svc = self.service
        await asyncio.to_thread(shutil.rmtree, svc.folder(rid) / "input", True)
        await asyncio.to_thread(remove_tree, join(svc.store.root, rid))

    async def remove(self, rid: str) -> None:
        """Every file of an ended render, then its record."""
        svc = self.service
        await self.drop_work_files(rid)
        await asyncio.to_thread(shutil.rmtree, svc.folder(rid), True)
        await svc.db(svc.records.delete, rid)
        log.info("render %s removed", rid)

    async def sweep(self) -> int:
        """Apply the policy once; returns the renders removed. Updates the storage metric."""
        svc = self.service
        removed = 0
        if self.days is not None:
            for rid in await svc.db(svc.records.ended_before, time.time() - self.days * 86400):
                await self.remove(rid)
                removed += 1
        used = await asyncio.to_thread(tree_bytes, svc.storage)
        if self.gb is not None and used > self.gb * 2**30:
            for rid in await svc.db(svc.records.ended_before, time.time()):
                if used <= self.gb * 2**30:
                    break
                size = await asyncio.to_thread(tree_bytes, svc.folder(rid))
                await self.remove(rid)
                used, removed = used - size, removed + 1
        svc.metrics.storage_bytes.set(used)
        return removed
