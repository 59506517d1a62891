"""Batch renders with Ray Data: a manifest (Parquet, JSONL or CSV; one row per video) flows
through three actor pools, encode -> generate -> decode + write, so while one row
generates, the next encodes and the previous decodes. Each row ends as an mp4 and a record;
a row's failure is its own record and never stops the others; a re-run skips rows done.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from .actors import PoolConfig
from .coordinator import generate_sections, render_context
from .segments import finish_video
from .encode import ImageError, read_request_images, request_fingerprint
from .render import LocalPools
from .request import RenderRequest, RequestError, make_request, parse_size
from .storage import SAFE_ID, SectionStore, StorageError, exists, is_uri, join, read_bytes, write_bytes
from .workers import DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext

COLUMNS = {"id", "prompt", "image", "end_image", "seconds", "seed", "schedule", "sampler", "steps", "guidance",
           "size", "width", "height", "resolution", "window", "fps", "crf"}
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
ROW_ERRORS = (RequestError, ImageError, StorageError)
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("output", pa.string()),
    ("seconds", pa.float64()), ("frames", pa.int64()), ("sections", pa.int64()), ("sections_reused", pa.int64()),
    ("reused", pa.bool_()), ("fingerprint", pa.string()), ("encode_s", pa.float64()), ("generate_s", pa.float64()),
    ("decode_s", pa.float64()), ("write_s", pa.float64()),
])


class ManifestError(ValueError):
    """A manifest that cannot be run at all (unreadable, unknown columns, bad or duplicate ids)."""


@dataclass(frozen=True)
class BatchConfig:
    """Actor pool sizes (min, max: Ray Data grows a pool up to max while work is queued) and
    what each actor asks for. Generators get a GPU each when the cluster has GPUs."""

    encoders: tuple[int, int] = (1, 1)
    generators: tuple[int, int] = (1, 1)
    decoders: tuple[int, int] = (1, 1)
    pools: PoolConfig = field(default_factory=PoolConfig)
    encoder_cpus: float = 0.5
    decoder_cpus: float = 0.5


# ---- manifest rows -> requests -------------------------------------------------------


def _value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _resolve(location: str | None, base: str) -> str | None:
    if not location or is_uri(location) or os.path.isabs(location):
        return location
    return join(base, location) if is_uri(base) else str(Path(base) / location)


def row_request(row: dict, base: str, model: str) -> RenderRequest:
    """A manifest row as a validated request; image paths are relative to the manifest."""
    fields = {k: _value(v) for k, v in row.items() if k != "id"}
    size = fields.pop("size", None)
    if size:
        fields["width"], fields["height"] = parse_size(str(size))
    fields["image"] = _resolve(fields.get("image"), base)
    fields["end_image"] = _resolve(fields.get("end_image"), base)
    return make_request(**fields, model=model)


def read_manifest(manifest: str) -> list[dict]:
    """The manifest's rows, in file order, checked as a whole (columns, ids)."""
    kind = READERS.get(Path(str(manifest)).suffix.lower())
    if kind is None:
        raise ManifestError(f"manifest {manifest}: expected .parquet, .jsonl or .csv")
    if not is_uri(manifest) and not Path(manifest).is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    ctx = ray.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = getattr(ray.data, f"read_{kind}")(str(manifest))
        rows = ds.take_all()
    except Exception as e:  # Ray wraps the reader's error; the message is what the user needs
        raise ManifestError(f"cannot read manifest {manifest}: {str(e).splitlines()[0]}") from None
    finally:
        ctx.execution_options.preserve_order = keep
    names = set(ds.schema().names)
    if unknown := names - COLUMNS:
        raise ManifestError(f"manifest {manifest}: unknown columns {sorted(unknown)}; known: {sorted(COLUMNS)}")
    if missing := {"id", "prompt"} - names:
        raise ManifestError(f"manifest {manifest}: missing columns {sorted(missing)}")
    ids = [str(_value(r["id"])) for r in rows]
    if bad := [i for i in ids if not SAFE_ID.match(i)]:
        raise ManifestError(f"manifest {manifest}: ids must be 1-128 of [A-Za-z0-9._-], not starting with . or -: {bad[:5]}")
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ManifestError(f"manifest {manifest}: duplicate ids {dupes[:5]}")
    return rows


# ---- records ---------------------------------------------------------------------------


def record_location(out: str, rid: str) -> str:
    return join(out, "records", f"{rid}.json")


def video_location(out: str, rid: str) -> str:
    return join(out, f"{rid}.mp4")


def new_record(rid: str, **fields) -> dict:
    record = {name: None for name in RESULT_SCHEMA.names}
    record.update(id=rid, status="ok", reused=False)
    record.update(fields)
    return record


def error_record(rid: str, error: Exception) -> dict:
    return new_record(rid, status="error", error=f"{type(error).__name__}: {error}")


def previous_record(out: str, rid: str, fingerprint: str) -> dict | None:
    """The record of an earlier run that rendered this very row, if its video still exists."""
    try:
        record = json.loads(read_bytes(record_location(out, rid)))
    except FileNotFoundError:
        return None
    if record.get("status") == "ok" and record.get("fingerprint") == fingerprint and exists(record["output"]):
        return {**record, "reused": True}
    return None


def _rows(batch: pd.DataFrame) -> list[dict]:
    return batch.to_dict("records")


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"id": [r["id"] for r in rows], "record": [json.dumps(r["record"]) for r in rows],
                         "payload": [r.get("payload") for r in rows]})


def check_row(row: dict, out: str, base: str, model: str) -> dict:
    """Validate a row (no model needed): an error record, the record of an earlier run that
    rendered this very row, or a new record with the request to render as payload."""
    rid = str(_value(row["id"]))
    try:
        request = row_request(row, base, model)
        fp = request_fingerprint(request, read_request_images(request))
    except ROW_ERRORS as e:
        return {"id": rid, "record": error_record(rid, e), "payload": None}
    earlier = previous_record(out, rid, fp)
    if earlier is not None:
        return {"id": rid, "record": earlier, "payload": None}
    return {"id": rid, "record": new_record(rid, fingerprint=fp), "payload": pickle.dumps(request)}


# ---- the three stages (Ray Data actor classes) ---------------------------------------------


class EncodeStage:
    def __init__(self, model: str, device: str | None = None):
        self.worker = EncoderWorker(model, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _frame([self.encode(row) for row in _rows(batch)])

    def encode(self, row: dict) -> dict:
        record = json.loads(row["record"])
        t = time.perf_counter()
        try:
            encoded = self.worker.encode(pickle.loads(row["payload"]))
        except ROW_ERRORS as e:  # e.g. the image changed or vanished since the check
            return {"id": row["id"], "record": error_record(row["id"], e)}
        record.update(fingerprint=encoded.fingerprint, encode_s=time.perf_counter() - t)
        return {"id": row["id"], "record": record, "payload": pickle.dumps(encoded)}


class GenerateStage:
    def __init__(self, model: str, store: str, device: str | None = None, dtype: str | None = None):
        self.pools = LocalPools(generator=GeneratorWorker(model, device, dtype))
        self.store = SectionStore(store)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _frame([self.generate(row) for row in _rows(batch)])

    def generate(self, row: dict) -> dict:
        record = json.loads(row["record"])
        if row["payload"] is None:
            return {"id": row["id"], "record": record}
        ctx = render_context(pickle.loads(row["payload"]), row["id"], self.store)
        done, reused, seconds = asyncio.run(self._generate(ctx))
        record.update(generate_s=seconds, sections_reused=len(reused))
        return {"id": row["id"], "record": record, "payload": pickle.dumps((ctx, dict(done.items())))}

    async def _generate(self, ctx: RenderContext):
        return await generate_sections(ctx, await self.pools.share(ctx), self.pools)


class DecodeStage:
    """The coordinator's tail over this stage's decoder: segments, the joined
    `{out}/{id}.mp4`, then the row's record."""

    def __init__(self, model: str, out: str, device: str | None = None):
        self.pools = LocalPools(decoder=DecoderWorker(model, device))
        self.out = out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _frame([self.finish(row) for row in _rows(batch)])

    def finish(self, row: dict) -> dict:
        record = json.loads(row["record"])
        if row["payload"] is not None:
            ctx, done = pickle.loads(row["payload"])
            output, timings = asyncio.run(self._finish(ctx, done, video_location(self.out, row["id"])))
            frames = ctx.plan.pixel_frames
            record.update(output=output, seconds=frames / ctx.request.fps, frames=frames, sections=ctx.plan.num_sections,
                          decode_s=timings["decode"], write_s=timings["write"])
            # written as the row ends, so a job that dies later loses no finished row
            write_bytes(record_location(self.out, row["id"]), json.dumps(record).encode())
        return {"id": row["id"], "record": record}

    async def _finish(self, ctx: RenderContext, done: dict, where: str):
        return await finish_video(ctx, await self.pools.share(ctx), self.pools, done, where)


# ---- the job ----------------------------------------------------------------------------


def _pool(sizes: tuple[int, int]) -> ray.data.ActorPoolStrategy:
    low, high = sizes
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def run_batch(manifest: str, out: str, model: str, config: BatchConfig = BatchConfig(), store: str | None = None,
              device: str | None = None) -> list[dict]:
    """Render every row of `manifest` into `out` ({id}.mp4, records/{id}.json, results.parquet).
    Returns the records in manifest order. Needs a connected Ray (ray.init)."""
    manifest_rows = read_manifest(manifest)
    ids = [str(_value(r["id"])) for r in manifest_rows]
    base = str(manifest).rsplit("/", 1)[0] if is_uri(manifest) else str(Path(manifest).resolve().parent)
    store = store or join(out, "sections")
    pools = config.pools
    common = dict(batch_size=1, batch_format="pandas", zero_copy_batch=False)
    # Checking reads each image once (to fingerprint it) and runs no model: threads suffice.
    with ThreadPoolExecutor(16) as pool:
        checked = list(pool.map(lambda row: check_row(row, out, base, model), manifest_rows))
    records = {r["id"]: r["record"] for r in checked}
    todo = [{**r, "record": json.dumps(r["record"])} for r in checked if r["payload"] is not None]
    if todo:
        rendered = (
            ray.data.from_items(todo, override_num_blocks=len(todo))  # a block per row: rows spread over actors
            .map_batches(EncodeStage, fn_constructor_args=(model, device), compute=_pool(config.encoders),
                         num_gpus=pools.gpus("encoder"), num_cpus=config.encoder_cpus, **common)
            .map_batches(GenerateStage, fn_constructor_args=(model, store, device, pools.dtype), compute=_pool(config.generators),
                         num_gpus=pools.gpus("generator"), num_cpus=pools.cpus, resources=pools.resources.get("generator"), **common)
            .map_batches(DecodeStage, fn_constructor_args=(model, out, device), compute=_pool(config.decoders),
                         num_gpus=pools.gpus("decoder"), num_cpus=config.decoder_cpus, resources=pools.resources.get("decoder"), **common)
            .select_columns(["id", "record"])
            .take_all()
        )
        records.update({r["id"]: json.loads(r["record"]) for r in rendered})
    for record in records.values():  # error records; rendered rows wrote theirs in DecodeStage
        if record["status"] == "error":
            write_bytes(record_location(out, record["id"]), json.dumps(record).encode())
    ordered = [records[i] for i in ids]
    write_results(ordered, join(out, "results.parquet"))
    return ordered


def write_results(records: list[dict], where: str) -> None:
    table = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(where, buffer.getvalue())
