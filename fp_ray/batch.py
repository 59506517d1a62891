"""Batch renders with Ray Data: a manifest (Parquet, JSONL or CSV; one row per video) flows
through three actor pools, encode -> generate -> decode + write, so while one row
generates, the next encodes and the previous decodes. Each row ends as an mp4 and a record;
a row's failure is its own record and never stops the others; a re-run skips rows done.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import pickle
import time
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.exceptions import ActorDiedError

from .actors import PoolConfig, start_error
from .coordinator import SectionLatents, WorkerLost, generate_sections, render_context
from .encode import decode_request_images, read_request_images, request_fingerprint
from .extend import checked_request
from .lora import LoraRegistry
from .metadata import model_identity
from .models import ModelSpec
from .placement import check_placement
from .render import LocalPools
from .request import RenderRequest, excerpt, make_request, parse_size
from .segments import finish_video
from .speed import SpeedOptions
from .storage import FINGERPRINT, SAFE_ID, SectionStore, exists, is_uri, join, read_bytes, write_bytes
from .workers import DecoderWorker, EncoderWorker, GeneratorWorker, RenderContext

log = logging.getLogger(__name__)

COLUMNS = {"id", "prompt", "image", "end_image", "extend", "seconds", "seed", "schedule", "sampler", "steps", "guidance",
           "size", "width", "height", "resolution", "window", "fps", "crf", "cache_threshold", "cache_method", "cfg", "negative_prompt",
           "cfg_rescale", "loras", "keyframes", "loop"}
READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
MAX_MANIFEST_BYTES = 2**30  # millions of rows; never a device read to its end
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
    what each actor asks for and how it loads (`pools`: declared GPUs, device, memory mode,
    sources)."""

    encoders: tuple[int, int] = (1, 1)
    generators: tuple[int, int] = (1, 1)
    decoders: tuple[int, int] = (1, 1)
    pools: PoolConfig = field(default_factory=PoolConfig)
    encoder_cpus: float = 0.5
    decoder_cpus: float = 0.5
    # A row's section checkpoints (latents, segments, seam pixels: over 2 GB for a 10-minute
    # video at 640x640) are removed once its video and record are written; True keeps them.
    keep_sections: bool = False


# ---- manifest rows -> requests -------------------------------------------------------


def _value(v):
    # NaN is a value, refused as such: rows come from pyarrow (a pandas NaN is a null there)
    # or JSON, where a NaN was written, not left out
    return v.item() if hasattr(v, "item") else v


def _resolve(location: str | None, base: str) -> str | None:
    if not isinstance(location, str) or not location or is_uri(location) or os.path.isabs(location):
        return location  # not text: the request model names the column and the type
    return join(base, location) if is_uri(base) else str(Path(base) / location)


def row_request(row: dict, base: str, model: str) -> RenderRequest:
    """A manifest row as a validated request; image paths are relative to the manifest."""
    fields = {k: _value(v) for k, v in row.items() if k != "id"}
    size = fields.pop("size", None)
    if size:
        fields["width"], fields["height"] = parse_size(str(size))
    fields["image"] = _resolve(fields.get("image"), base)
    fields["end_image"] = _resolve(fields.get("end_image"), base)
    fields["extend"] = _resolve(fields.get("extend"), base)
    request = make_request(**fields, model=model)
    # A LoRA path relative to the manifest, as images are; anything else stays a path or hub id.
    here = [c.model_copy(update={"name": _resolve(c.name, base)}) if not is_uri(base) and (Path(base) / c.name).exists()
            else c for c in request.loras]
    keys = tuple(k.model_copy(update={"image": _resolve(k.image, base)}) for k in request.keyframes)
    return request.model_copy(update={"loras": tuple(here), "keyframes": keys})


def _parse_rows(manifest: str, kind: str, data: bytes) -> list[dict]:
    """Rows as dicts. JSON Lines and CSV are read row by row, so a value's type is decided in
    its own row (a bad value is that row's error, and ids like "007" stay strings)."""
    if kind == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8-sig")
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = [{k: (v if v != "" else None) for k, v in row.items()} for row in reader]
        if ragged := next((n for n, row in enumerate(rows, 1) if None in row), None):  # DictReader files extra values under None
            raise ManifestError(f"manifest {manifest}: row {ragged} has more values than the header has columns")
        return rows
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"manifest {manifest}: line {number} is not JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ManifestError(f"manifest {manifest}: expected one JSON object per line (or an array of objects)")
    return rows


def read_manifest(manifest: str) -> list[dict]:
    """The manifest's rows, in file order, checked as a whole (columns, ids). Needs no Ray:
    a manifest that cannot run is refused before any cluster starts."""
    kind = READERS.get(Path(str(manifest)).suffix.lower())
    if kind is None:
        raise ManifestError(f"manifest {excerpt(manifest)}: expected .parquet, .jsonl, .json or .csv")
    try:
        data = read_bytes(manifest, MAX_MANIFEST_BYTES)
    except (FileNotFoundError, IsADirectoryError):
        raise ManifestError(f"manifest not found: {excerpt(manifest)}") from None
    except OSError as e:
        raise ManifestError(f"cannot read manifest {excerpt(manifest)}: {e}") from None
    try:
        rows = _parse_rows(manifest, kind, data)
    except ManifestError:
        raise
    except (ValueError, RecursionError, pa.ArrowException, csv.Error) as e:  # RecursionError: JSON nested too deeply
        raise ManifestError(f"cannot read manifest {manifest}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not rows:
        raise ManifestError(f"manifest {manifest}: no rows")
    names = {name for row in rows for name in row}
    if unknown := names - COLUMNS:
        raise ManifestError(f"manifest {manifest}: unknown columns {sorted(unknown)[:10]}; known: {sorted(COLUMNS)}")
    if missing := {"id", "prompt"} - names:
        raise ManifestError(f"manifest {manifest}: missing columns {sorted(missing)}")
    if missing_id := [n for n, r in enumerate(rows, 1) if _value(r.get("id")) is None]:
        raise ManifestError(f"manifest {manifest}: rows without an id: {missing_id[:5]}")
    ids = [str(_value(r["id"])) for r in rows]
    if bad := [excerpt(i, 40) for i in ids if not SAFE_ID.match(i)]:
        raise ManifestError(f"manifest {manifest}: ids must be 1-128 of [A-Za-z0-9._-], not starting with . or -: {bad[:5]}")
    if dupes := sorted(i for i, n in Counter(ids).items() if n > 1):
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


def error_record(rid: str, error: BaseException, stage: str | None = None) -> dict:
    """The record of a row that failed: where (a stage, or the check) and why, in one line."""
    reason = str(error).strip().splitlines()[0][:1000] if str(error).strip() else "(no message)"
    where = f"{stage}: " if stage else ""
    return new_record(rid, status="error", error=f"{where}{type(error).__name__}: {reason}")


def write_record(out: str, record: dict) -> bool:
    """Written as the row ends, so a job that dies later loses no finished row. A storage
    failure here is logged in one line, not raised (the command's output stays one line per
    row): the row's result still reaches results.parquet. Returns whether it was written."""
    try:
        write_bytes(record_location(out, record["id"]), json.dumps(record).encode())
        return True
    except Exception as e:
        log.error("cannot write the record of row %s: %s: %s", record["id"], type(e).__name__, e)
        return False


def previous_record(out: str, rid: str) -> dict | None:
    """The record an earlier run wrote for this row id, if any (one that cannot be read counts
    as none: the row renders)."""
    try:
        record = json.loads(read_bytes(record_location(out, rid)))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def rendered(record: dict | None, fingerprint: str | None = None) -> bool:
    """Whether `record` is of a row rendered (with this fingerprint, when given) whose video still exists."""
    return (record is not None and record.get("status") == "ok" and isinstance(record.get("output"), str)
            and fingerprint in (None, record.get("fingerprint")) and exists(record["output"]))


def finished_record(out: str, rid: str, fingerprint: str | None) -> dict | None:
    """The record of a run that rendered this very render of the row (its video still
    there): an earlier try of this batch, or another batch on this out."""
    earlier = previous_record(out, rid) if fingerprint else None
    return earlier if rendered(earlier, fingerprint) else None


def _rows(batch: pd.DataFrame) -> list[dict]:
    return batch.to_dict("records")


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame({"id": [r["id"] for r in rows], "record": [json.dumps(r["record"]) for r in rows],
                         "payload": [r.get("payload") for r in rows]})


def check_row(row: dict, out: str, base: str, model: str, identity: dict) -> dict:
    """Validate a row without a model (fields, images decoded within the image limits): an
    error record, the record of an earlier run that rendered this very row, or a new record
    with the request to render as payload. Whatever goes wrong is this row's error alone.
    `identity`: the model's (metadata.model_identity), part of the fingerprint as the encoder makes it."""
    rid = str(_value(row["id"]))
    try:
        request = row_request(row, base, model)
        images = read_request_images(request)
        decode_request_images(request, images)
        clip_sha256 = None
        if request.extend:  # the clip's size and fps become the row's; its bytes part of the fingerprint
            request, clip_sha256 = checked_request(request)
        fp = request_fingerprint(request, images, LoraRegistry().resolve(request.loras), clip_sha256, identity)
        earlier = previous_record(out, rid)
        if rendered(earlier, fp):
            return {"id": rid, "record": {**earlier, "reused": True}, "payload": None}
        # rendered before as another render: other fields or images, another model, or an fp-ray
        # whose output revision differs (the command says why a finished row renders again)
        again = rendered(earlier)
    except Exception as e:
        return {"id": rid, "record": error_record(rid, e), "payload": None}
    row = {"id": rid, "record": new_record(rid, fingerprint=fp), "payload": pickle.dumps(request), "again": again}
    former = earlier.get("fingerprint") if earlier else None
    # a path in its folder's name: one a record did not get from fp-ray ("../..") removes nothing
    if isinstance(former, str) and FINGERPRINT.match(former) and former != fp:
        # an earlier run's render of this row as another render (finished or failed): its
        # checkpoints, if it left any, serve no run of this row any more
        row["replaces"] = former
    return row


# ---- the three stages (Ray Data actor classes) ---------------------------------------------


class RowStage(ABC):
    """A Ray Data stage that works on one row at a time. Rows that failed earlier pass
    through untouched; any exception this stage raises on a row becomes that row's error
    record (logged with its traceback), and the other rows go on."""

    name = "stage"

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _frame([self.run(row) for row in _rows(batch)])

    def run(self, row: dict) -> dict:
        record = json.loads(row["record"])
        if row["payload"] is None:
            return self.ended(record)
        try:
            return self.process(row["id"], record, row["payload"])
        except Exception as e:
            log.exception("row %s failed in the %s stage", row["id"], self.name)
            # the fingerprint stays: the render whose checkpoints a later run resumes or removes
            return self.ended({**error_record(row["id"], e, self.name), "fingerprint": record.get("fingerprint")})

    @abstractmethod
    def process(self, rid: str, record: dict, payload: bytes) -> dict:
        """This stage's work on one row that has not failed: the row for the next stage."""

    def ended(self, record: dict) -> dict:
        return {"id": record["id"], "record": record}


class EncodeStage(RowStage):
    name = "encode"

    def __init__(self, spec: ModelSpec):
        self.worker = EncoderWorker(spec)

    def process(self, rid: str, record: dict, payload: bytes) -> dict:
        t = time.perf_counter()
        encoded = self.worker.encode(pickle.loads(payload))
        record.update(fingerprint=encoded.fingerprint, encode_s=time.perf_counter() - t)
        return {"id": rid, "record": record, "payload": pickle.dumps(encoded)}


class GenerateStage(RowStage):
    name = "generate"

    def __init__(self, spec: ModelSpec, store: str, speed: SpeedOptions | None = None):
        self.pools = LocalPools(generator=GeneratorWorker(spec, speed=speed))
        self.store = SectionStore(store)

    def process(self, rid: str, record: dict, payload: bytes) -> dict:
        ctx = render_context(pickle.loads(payload), rid, self.store)
        done, reused, seconds = asyncio.run(self._generate(ctx))
        record.update(generate_s=seconds, sections_reused=len(reused))
        # the latents stay in the store (each section is saved before it counts as done): the
        # row carries the render's context only, whatever the video's length
        return {"id": rid, "record": record, "payload": pickle.dumps(ctx)}

    async def _generate(self, ctx: RenderContext):
        return await generate_sections(ctx, await self.pools.share(ctx), self.pools)


class DecodeStage(RowStage):
    """The coordinator's tail over this stage's decoder: segments, the joined
    `{out}/{id}.mp4`. Every row that reaches it, rendered or failed, has its record written
    here as it ends."""

    name = "decode"

    def __init__(self, spec: ModelSpec, out: str, store: str, keep_sections: bool = False):
        self.pools = LocalPools(decoder=DecoderWorker(spec))
        self.out, self.store, self.keep_sections = out, SectionStore(store), keep_sections

    def process(self, rid: str, record: dict, payload: bytes) -> dict:
        ctx = pickle.loads(payload)
        earlier = finished_record(self.out, rid, ctx.fingerprint)
        if earlier is not None:
            # an earlier try of this row ended after its record but before its result came
            # back (its worker lost): the video is whole, its checkpoints may be gone already
            written = True
        else:
            done = SectionLatents.stored(ctx, range(ctx.plan.num_sections), check=False)
            output, timings, frames = asyncio.run(self._finish(ctx, done, video_location(self.out, rid)))
            record.update(output=output, seconds=frames / ctx.request.fps, frames=frames, sections=ctx.plan.num_sections,
                          decode_s=timings["decode"], write_s=timings["write"])
            earlier, written = record, write_record(self.out, record)
        if written and not self.keep_sections:  # without its record, a rerun would render the row again
            drop_sections(self.store, rid, ctx.fingerprint)
        return {"id": rid, "record": earlier}

    async def _finish(self, ctx: RenderContext, done: dict, where: str):
        return await finish_video(ctx, await self.pools.share(ctx), self.pools, done, where)

    def ended(self, record: dict) -> dict:
        earlier = finished_record(self.out, record["id"], record.get("fingerprint")) if record["status"] == "error" else None
        if earlier is not None:
            # another run of this very render (a second batch on this out) finished it, and
            # removed the checkpoints this one failed on: its video and record stand, and what
            # this run wrote into its folder since (segments, seam pixels) goes
            if not self.keep_sections:
                drop_sections(self.store, record["id"], record["fingerprint"])
            return {"id": record["id"], "record": earlier}
        write_record(self.out, record)
        return {"id": record["id"], "record": record}


def drop_sections(store: SectionStore, rid: str, fingerprint: str) -> None:
    """Remove a rendered row's checkpoints; one that cannot be removed is logged in one line
    (the row is rendered all the same)."""
    try:
        store.remove(rid, fingerprint)
    except OSError as e:  # StorageError too
        log.error("cannot remove the checkpoints of row %s in %s: %s: %s", rid, store.root, type(e).__name__, e)


# ---- the job ----------------------------------------------------------------------------


def _pool(sizes: tuple[int, int]) -> ray.data.ActorPoolStrategy:
    low, high = sizes
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def manifest_base(manifest: str) -> str:
    """Where a manifest's relative image paths start: its own folder."""
    return str(manifest).rsplit("/", 1)[0] if is_uri(manifest) else str(Path(manifest).resolve().parent)


def check_manifest(manifest: str, out: str, model: str, sources: tuple[str | None, str | None] = (None, None)) -> list[dict]:
    """Read and check a manifest without Ray: ManifestError if it cannot run at all, else one
    checked row per manifest row (see `check_row`), in manifest order. Rows that fail their
    check get their record written at once. `sources`: the base model and image encoder the
    encoders load (`--base`, `--image-encoder`), whose digests are in each row's fingerprint."""
    rows = read_manifest(manifest)
    base = manifest_base(manifest)
    identity = model_identity(model, *sources)  # what the encoders record; digests cached per folder
    # Checking reads and decodes each image once and runs no model: threads suffice.
    with ThreadPoolExecutor(16) as pool:
        checked = list(pool.map(lambda row: check_row(row, out, base, model, identity), rows))
    for row in checked:
        if row["record"]["status"] == "error":
            write_record(out, row["record"])
    return checked


def run_batch(manifest: str, out: str, model: str, config: BatchConfig = BatchConfig(), store: str | None = None,
              checked: list[dict] | None = None) -> list[dict]:
    """Render every row of `manifest` into `out` ({id}.mp4, records/{id}.json, results.parquet).
    Returns the records in manifest order. `checked`: the rows `check_manifest` returned, when
    the caller checked the manifest before starting Ray. Needs a connected Ray (ray.init).
    Devices, sources, memory mode and speed options of the stages: `config.pools`."""
    pools = config.pools
    checked = checked if checked is not None else check_manifest(manifest, out, model, (pools.base, pools.image_encoder))
    check_placement({"encoder": (max(1, config.encoders[0]), pools.bundle("encoder", config.encoder_cpus)),
                     "generator": (max(1, config.generators[0]), pools.bundle("generator")),
                     "decoder": (max(1, config.decoders[0]), pools.bundle("decoder", config.decoder_cpus))},
                    pools.autoscaling)
    spec = pools.spec(model)
    store = store or join(out, "sections")
    # A crashed actor restarts as often as it crashes (the pool serves every row), but each
    # row is tried at most 1 + max_restarts times: a row that crashes its worker each time
    # (out of memory, a native crash) would otherwise be retried forever and the batch never end.
    common = dict(batch_size=1, batch_format="pandas", zero_copy_batch=False, max_restarts=-1,
                  max_task_retries=pools.max_restarts)
    records = {r["id"]: r["record"] for r in checked}
    if not config.keep_sections:
        sections = SectionStore(store)
        for r in checked:
            if r.get("replaces") and sections.folder(r["id"], r["replaces"]) != sections.folder(r["id"], r["record"]["fingerprint"]):
                drop_sections(sections, r["id"], r["replaces"])
    todo = [{"id": r["id"], "record": json.dumps(r["record"]), "payload": r["payload"]} for r in checked if r["payload"] is not None]
    if todo:
        # Ray 2.60 has no named map_batches parameter for the retries: its deprecation warning
        # for them would be the command's output
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            stream = (
                ray.data.from_items(todo, override_num_blocks=len(todo))  # a block per row: rows spread over actors
                .map_batches(EncodeStage, fn_constructor_args=(spec,), compute=_pool(config.encoders),
                             num_gpus=pools.gpus("encoder"), num_cpus=config.encoder_cpus, resources=pools.resources.get("encoder"), **common)
                .map_batches(GenerateStage, fn_constructor_args=(spec, store, pools.speed), compute=_pool(config.generators),
                             num_gpus=pools.gpus("generator"), num_cpus=pools.cpus, resources=pools.resources.get("generator"), **common)
                .map_batches(DecodeStage, fn_constructor_args=(spec, out, store, config.keep_sections), compute=_pool(config.decoders),
                             num_gpus=pools.gpus("decoder"), num_cpus=config.decoder_cpus, resources=pools.resources.get("decoder"), **common)
                .select_columns(["id", "record"])
            )
        # a row whose tries are used up is dropped from the stream (one block per row), not the batch
        stream.context.max_errored_blocks = -1
        pending = {r["id"] for r in todo}
        lost = WorkerLost(f"the worker running this row was lost {1 + pools.max_restarts} times (killed, out of "
                          "memory or crashed); the other rows went on")
        try:
            for row in stream.iter_rows():  # rows arrive as they end
                records[row["id"]] = json.loads(row["record"])
                pending.discard(row["id"])
        except Exception as e:
            # The pipeline itself broke (e.g. actors that cannot load their model): rows already
            # ended keep their results; the others are recorded as not rendered, in one line each.
            lost = pipeline_error(e)
            log.error("the batch pipeline stopped: %s: %s", type(lost).__name__, str(lost).strip().split("\n")[0])
        for rid in pending:
            fingerprint = records[rid]["fingerprint"]
            if (earlier := finished_record(out, rid, fingerprint)) is not None:
                # a try that wrote the row's video and record (and removed its checkpoints) and was
                # lost before its result came back, or another batch on this out that finished it
                records[rid] = earlier
                continue
            # the fingerprint stays: the render whose checkpoints a later run resumes or removes
            records[rid] = {**error_record(rid, lost, "batch"), "fingerprint": fingerprint}
            write_record(out, records[rid])
    ordered = [records[r["id"]] for r in checked]
    write_results(ordered, join(out, "results.parquet"))
    return ordered


def pipeline_error(e: Exception) -> Exception:
    """What broke a pipeline, for its rows' records: an actor whose constructor raised (Ray
    Data raises its ActorDiedError, or wraps it) as that constructor's error in one line."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    died = [c for c in chain if isinstance(c, ActorDiedError) and "creation task" in str(c)]
    return start_error(died[0]) if died else e


def write_results(records: list[dict], where: str) -> None:
    table = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(where, buffer.getvalue())
