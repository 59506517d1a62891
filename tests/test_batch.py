"""Batch renders with Ray Data on the shared fake-GPU cluster: manifests in every format,
malformed rows as error records, re-runs that render nothing new, same bytes as local."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.actors import PoolConfig
from fp_ray.batch import BatchConfig, ManifestError, read_manifest, run_batch
from fp_ray.render import render
from fp_ray.request import make_request

ROW = dict(prompt="a quiet valley", seconds=1.2, size="64x48", steps=2)
CONFIG = BatchConfig(generators=(1, 2), decoders=(1, 1), pools=PoolConfig(generator_gpus=1, decoder_gpus=0, cpus=1))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def batch_run(ray_cluster, tmp_path_factory):
    """Ten rows, two malformed (an unreadable image, a bad size), run twice."""
    tmp = tmp_path_factory.mktemp("batch")
    (tmp / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    (tmp / "broken.png").write_bytes(b"not an image")
    rows = [{"id": f"clip-{i}", **ROW, "image": "start.png", "seed": i} for i in range(8)]
    rows.insert(3, {"id": "broken-image", **ROW, "image": "broken.png"})
    rows.insert(6, {"id": "bad-size", **ROW, "image": "start.png", "size": "65x48"})
    manifest = write_jsonl(tmp / "manifest.jsonl", rows)
    out = tmp / "out"
    first = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    second = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    return tmp, out, rows, first, second, mtimes


def test_batch_renders_good_rows_and_records_bad_ones(batch_run):
    tmp, out, rows, first, _, _ = batch_run
    assert [r["id"] for r in first] == [r["id"] for r in rows]  # manifest order
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"clip-{i}.mp4" for i in range(8))
    errors = {r["id"]: r["error"] for r in first if r["status"] == "error"}
    assert set(errors) == {"broken-image", "bad-size"}
    assert "broken.png is not an image" in errors["broken-image"]
    assert "multiple of 16" in errors["bad-size"]
    ok = [r for r in first if r["status"] == "ok"]
    assert all(r["frames"] == 37 and r["sections"] == 1 and not r["reused"] for r in ok)


def test_results_parquet_has_a_row_per_manifest_row(batch_run):
    _, out, rows, _, second, _ = batch_run
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == len(rows)
    assert {"id", "status", "error", "output", "seconds", "generate_s", "decode_s"} <= set(table.column_names)
    assert table.column("status").to_pylist().count("error") == 2
    assert table.to_pylist() == second


def test_rerun_renders_nothing_new(batch_run):
    _, out, _, first, second, mtimes = batch_run
    assert [r["reused"] for r in second if r["status"] == "ok"] == [True] * 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes
    assert [r["status"] for r in second] == [r["status"] for r in first]


def test_batch_video_is_byte_identical_to_local(batch_run, components, tmp_path):
    tmp, out, _, _, _, _ = batch_run
    request = make_request(prompt=ROW["prompt"], seconds=1.2, width=64, height=48, steps=2, seed=5, image=str(tmp / "start.png"))
    local = render(request, tmp_path / "local.mp4", components=components)
    assert sha(local.path) == sha(out / "clip-5.mp4")


def test_changed_row_is_rendered_again(batch_run, ray_cluster, tmp_path):
    tmp, out, rows, _, _, _ = batch_run
    manifest = write_jsonl(tmp_path / "changed.jsonl", [{**rows[0], "image": str(tmp / "start.png"), "seed": 99}])
    (record,) = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    assert record["status"] == "ok" and not record["reused"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_formats(ray_cluster, tmp_path, fmt):
    rows = [{"id": "a", "prompt": "x", "seconds": 1.2, "seed": 1}, {"id": "b", "prompt": "y", "seconds": 2.4, "seed": None}]
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        pa.csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    rows = read_manifest(str(path))
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["seconds"] == 2.4


@pytest.mark.parametrize("rows,message", [
    ([{"id": "a", "prompt": "x", "colour": "red"}], "unknown columns ['colour']"),
    ([{"id": "a", "seconds": 3}], "missing columns ['prompt']"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "duplicate ids ['a']"),
    ([{"id": "../etc/passwd", "prompt": "x"}], "ids must be"),
])
def test_bad_manifests_are_rejected_before_any_work(ray_cluster, tmp_path, rows, message):
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
