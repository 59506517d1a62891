"""Batch renders with Ray Data on the shared fake-GPU cluster: manifests in every format,
malformed rows as error records, re-runs that render nothing new, same bytes as local."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT, cli
from fp_ray.actors import PoolConfig
from fp_ray.batch import BatchConfig, ManifestError, read_manifest, row_request, run_batch
from fp_ray.render import render
from fp_ray.request import RequestError, make_request

from images import png_header_only

ROW = dict(prompt="a quiet valley", seconds=1.2, size="64x48", steps=2)
CONFIG = BatchConfig(generators=(1, 2), decoders=(1, 1), pools=PoolConfig(generator_gpus=1, decoder_gpus=0, cpus=1))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


FAILING = {"broken-image", "bad-size", "huge-image", "bad-guidance", "blocked-checkpoint", "blocked-output"}
GUIDED = dict(cfg=2.5, negative_prompt="blurry, static", cfg_rescale=0.3)  # clip-6's real guidance columns


@pytest.fixture(scope="module")
def batch_run(ray_cluster, tmp_path_factory):
    """Fourteen rows run twice. Four fail their check (an unreadable image, a bad size, an
    image over the pixel limit, a negative prompt without cfg); two pass it and fail later, in
    the generate stage (their checkpoint folder is a file) and in the decode stage (their mp4
    path is a folder). clip-6 renders with real guidance."""
    tmp = tmp_path_factory.mktemp("batch")
    (tmp / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    (tmp / "broken.png").write_bytes(b"not an image")
    (tmp / "huge.png").write_bytes(png_header_only(20000, 20000))
    rows = [{"id": f"clip-{i}", **ROW, "image": "start.png", "seed": i} for i in range(8)]
    rows[6].update(GUIDED)
    rows.insert(3, {"id": "broken-image", **ROW, "image": "broken.png"})
    rows.insert(6, {"id": "bad-size", **ROW, "image": "start.png", "size": "65x48"})
    rows.insert(1, {"id": "huge-image", **ROW, "image": "huge.png"})
    rows.insert(9, {"id": "bad-guidance", **ROW, "image": "start.png", "negative_prompt": "blurry"})
    rows.insert(5, {"id": "blocked-checkpoint", **ROW, "image": "start.png", "seed": 100})
    rows.append({"id": "blocked-output", **ROW, "image": "start.png", "seed": 101})
    manifest = write_jsonl(tmp / "manifest.jsonl", rows)
    out = tmp / "out"
    (out / "sections").mkdir(parents=True)
    (out / "sections" / "blocked-checkpoint").write_text("a file where the row's checkpoints go")
    (out / "blocked-output.mp4").mkdir()
    first = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4") if p.is_file()}
    second = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    return tmp, out, rows, first, second, mtimes


def test_batch_renders_good_rows_and_records_bad_ones(batch_run):
    tmp, out, rows, first, _, _ = batch_run
    assert [r["id"] for r in first] == [r["id"] for r in rows]  # manifest order
    assert sorted(p.name for p in out.glob("*.mp4") if p.is_file()) == sorted(f"clip-{i}.mp4" for i in range(8))
    errors = {r["id"]: r["error"] for r in first if r["status"] == "error"}
    assert set(errors) == FAILING
    assert "broken.png' is not an image" in errors["broken-image"]
    assert "multiple of 16" in errors["bad-size"]
    assert "huge.png' is too large" in errors["huge-image"]
    assert "negative_prompt: needs cfg above 1" in errors["bad-guidance"]
    assert errors["blocked-checkpoint"].startswith("generate: ")
    assert errors["blocked-output"].startswith("decode: ")
    ok = [r for r in first if r["status"] == "ok"]
    assert len(ok) == 8 and all(r["frames"] == 37 and r["sections"] == 1 and not r["reused"] for r in ok)
    # every row's record is on disk, failed ones included
    for r in first:
        assert json.loads((out / "records" / f"{r['id']}.json").read_text())["status"] == r["status"]


def test_results_parquet_has_a_row_per_manifest_row(batch_run):
    _, out, rows, _, second, _ = batch_run
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == len(rows)
    assert {"id", "status", "error", "output", "seconds", "generate_s", "decode_s"} <= set(table.column_names)
    assert table.column("status").to_pylist().count("error") == len(FAILING)
    assert table.to_pylist() == second


def test_a_rendered_row_leaves_no_checkpoints(batch_run):
    """Once a row's video and record are written its checkpoints go (over 2 GB for a 10-minute
    video); a row that failed keeps its own, for the run that tries it again."""
    _, out, _, _, _, _ = batch_run
    assert {p.name for p in (out / "sections").iterdir()} == {"blocked-checkpoint", "blocked-output"}
    (kept,) = (out / "sections" / "blocked-output").iterdir()
    assert (kept / "section_000.safetensors").is_file()


def test_rerun_renders_nothing_new(batch_run):
    _, out, _, first, second, mtimes = batch_run
    assert [r["reused"] for r in second if r["status"] == "ok"] == [True] * 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4") if p.is_file()} == mtimes
    assert [r["status"] for r in second] == [r["status"] for r in first]


def test_batch_video_is_byte_identical_to_local(batch_run, components, tmp_path):
    tmp, out, _, _, _, _ = batch_run
    request = make_request(prompt=ROW["prompt"], seconds=1.2, width=64, height=48, steps=2, seed=5, image=str(tmp / "start.png"))
    local = render(request, tmp_path / "local.mp4", components=components)
    assert sha(local.path) == sha(out / "clip-5.mp4")
    # the row's video records its request, with the manifest's image resolved, and renders again from it
    record = json.loads((out / "clip-5.mp4.json").read_text())
    assert record["request"]["image"] == str((tmp / "start.png").resolve()) and record["request"]["seed"] == 5
    assert cli.main(["render", "--from", str(out / "clip-5.mp4"), "--out", str(tmp_path / "again.mp4")]) == 0
    assert sha(tmp_path / "again.mp4") == sha(out / "clip-5.mp4")
    guided = render(request.model_copy(update={"seed": 6, **GUIDED}), tmp_path / "guided.mp4", components=components)
    assert sha(guided.path) == sha(out / "clip-6.mp4")  # the guidance columns reached the generator
    assert sha(render(request.model_copy(update={"seed": 6}), tmp_path / "plain.mp4", components=components).path) != sha(guided.path)


def test_changed_row_is_rendered_again(batch_run, ray_cluster, tmp_path):
    """A changed row renders again; the checkpoints an earlier batch kept (--keep-sections) of
    its former render go with the new render's own."""
    tmp, out, rows, first, _, _ = batch_run
    former = next(r for r in first if r["id"] == rows[0]["id"])["fingerprint"]
    kept = out / "sections" / rows[0]["id"] / former[:16]
    kept.mkdir(parents=True)
    (kept / "section_000.safetensors").write_bytes(b"as --keep-sections leaves it")
    manifest = write_jsonl(tmp_path / "changed.jsonl", [{**rows[0], "image": str(tmp / "start.png"), "seed": 99}])
    (record,) = run_batch(manifest, str(out), str(TINY_CHECKPOINT), CONFIG)
    assert record["status"] == "ok" and not record["reused"] and record["fingerprint"] != former
    assert not (out / "sections" / rows[0]["id"]).exists()


def test_a_decode_tried_again_after_its_row_ended_keeps_the_row(tmp_path):
    """A decode stage whose worker was lost after the row's record was written (its
    checkpoints already gone) is tried again: it returns the written record instead of
    failing on the missing sections and overwriting it. Another run of the same render that
    fails (a second batch on this out, its checkpoints removed under it) leaves that record
    too. A row whose record could not be written keeps its checkpoints (a rerun resumes), as
    does every row with keep_sections (`--keep-sections`)."""
    from fp_ray.batch import DecodeStage, EncodeStage, GenerateStage, check_manifest, error_record

    (tmp_path / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    out, store = tmp_path / "out", str(tmp_path / "out" / "sections")
    rows = [{"id": rid, **ROW, "image": "start.png"} for rid in ("one", "two", "kept")]
    checked = check_manifest(write_jsonl(tmp_path / "m.jsonl", rows), str(out), str(TINY_CHECKPOINT))
    spec = CONFIG.pools.spec(str(TINY_CHECKPOINT))
    encode, generate, decode = EncodeStage(spec), GenerateStage(spec, store), DecodeStage(spec, str(out), store)

    def generated(row):
        row = {"id": row["id"], "record": json.dumps(row["record"]), "payload": row["payload"]}
        for stage in (encode, generate):
            row = {**(made := stage.run(row)), "record": json.dumps(made["record"])}
        return row

    one, two, kept = (generated(row) for row in checked)
    first = decode.run(one)["record"]
    assert first["status"] == "ok" and not (out / "sections" / "one").exists()
    video = (out / "one.mp4").read_bytes()
    assert decode.run(one)["record"] == first and json.loads((out / "records" / "one.json").read_text()) == first
    assert (out / "one.mp4").read_bytes() == video
    failed = {**error_record("one", FileNotFoundError("section_000.safetensors"), "decode"), "fingerprint": first["fingerprint"]}
    fragment = out / "sections" / "one" / first["fingerprint"][:16] / "segment_001.mp4"  # written by the run that failed
    fragment.parent.mkdir(parents=True)
    fragment.write_bytes(b"mp4")
    assert decode.ended(failed)["record"] == first and json.loads((out / "records" / "one.json").read_text()) == first
    assert not (out / "sections" / "one").exists()
    (out / "records" / "two.json").mkdir()  # where row two's record goes
    assert decode.run(two)["record"]["status"] == "ok" and (out / "two.mp4").is_file()
    assert list((out / "sections" / "two").glob("*/section_000.safetensors"))
    assert DecodeStage(spec, str(out), store, keep_sections=True).run(kept)["record"]["status"] == "ok"  # --keep-sections
    assert list((out / "sections" / "kept").glob("*/section_000.safetensors")) and (out / "kept.mp4").is_file()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_formats(tmp_path, fmt):
    rows = [{"id": "a", "prompt": "x", "seconds": 1.2, "seed": 1}, {"id": "b", "prompt": "y", "seconds": 2.4, "seed": None}]
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        pa.csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    rows = read_manifest(str(path))
    assert [r["id"] for r in rows] == ["a", "b"] and float(rows[1]["seconds"]) == 2.4  # CSV: text, read by the request model


def test_every_request_field_is_a_manifest_column(tmp_path):
    from fp_ray.batch import COLUMNS
    from fp_ray.request import RenderRequest

    assert set(RenderRequest.model_fields) - {"model"} <= COLUMNS  # the model is the batch's own
    rows = [{"id": "a", "prompt": "x", "cache_threshold": 0.1, "fps": 24, "window": 5, **GUIDED}]
    (row,) = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    assert row["cache_threshold"] == 0.1
    request = row_request(row, str(tmp_path), str(TINY_CHECKPOINT))
    assert (request.cfg, request.negative_prompt, request.cfg_rescale) == (2.5, "blurry, static", 0.3)


def test_nan_in_a_row_is_refused_not_read_as_left_out(tmp_path):
    for column in ("seconds", "cache_threshold"):  # NaN was the default: a 5 s video, or no step cache at all
        with pytest.raises(RequestError, match=f"{column}: Input should be"):
            row_request({"id": "a", "prompt": "x", column: float("nan")}, str(tmp_path), str(TINY_CHECKPOINT))


@pytest.mark.parametrize("column", ["seed", "steps", "seconds"])
def test_a_boolean_where_a_number_goes_is_refused(tmp_path, column):
    with pytest.raises(RequestError, match=f"{column}: expected a number, got true"):  # was read as 1
        row_request({"id": "a", "prompt": "x", column: True}, str(tmp_path), str(TINY_CHECKPOINT))
    assert row_request({"id": "a", "prompt": "x", column: "1"}, str(tmp_path), str(TINY_CHECKPOINT))  # CSV's text still reads


@pytest.mark.parametrize("value", [5, ["a.png"], {"path": "a.png"}])
def test_an_image_column_that_is_not_text_names_the_column(tmp_path, value):
    with pytest.raises(RequestError, match="image: Input should be a valid string"):  # was "TypeError: expected str, bytes or os.PathLike object"
        row_request({"id": "a", "prompt": "x", "image": value}, str(tmp_path), str(TINY_CHECKPOINT))


def test_ids_stay_strings_in_csv_and_bad_json_lines_are_named(tmp_path):
    (tmp_path / "m.csv").write_text("id,prompt,seconds\n007,x,\n")
    (row,) = read_manifest(str(tmp_path / "m.csv"))
    assert row == {"id": "007", "prompt": "x", "seconds": None}
    (tmp_path / "ragged.csv").write_text("id,prompt\na,x\nb,y,z\n")
    with pytest.raises(ManifestError, match="row 2 has more values than the header has columns"):  # was "unknown columns [None]"
        read_manifest(str(tmp_path / "ragged.csv"))
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(ManifestError, match="line 2 is not JSON"):
        read_manifest(str(tmp_path / "m.jsonl"))
    for name, text in [("deep.jsonl", '{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
                       ("deep.json", '[{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match="cannot read manifest .*recursion"):  # was a RecursionError traceback
            read_manifest(str(tmp_path / name))


def test_cli_batch_checks_the_manifest_before_starting_ray(tmp_path, monkeypatch, capsys):
    def no_ray(address):
        raise AssertionError("Ray must not start for a manifest that cannot run")

    monkeypatch.setattr(cli, "connect", no_ray)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    assert cli.main(["batch", manifest, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp-ray: error: manifest") and "duplicate ids ['a']" in err


def test_cli_batch_exit_code_says_rows_failed(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "connect", lambda address: None)  # this test's Ray is already connected
    (tmp_path / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    rows = [{"id": "good", **ROW, "image": "start.png"}, {"id": "bad", **ROW, "image": "start.png", "seconds": -1}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    code = cli.main(["batch", manifest, "--out", str(tmp_path / "out"), "--generator-gpus", "1", "--decoder-gpus", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "bad: " in out and "1 rendered, 0 already done, 1 failed" in out
    assert (tmp_path / "out" / "good.mp4").is_file()


@pytest.mark.parametrize("rows,message", [
    ([{"id": "a", "prompt": "x", "colour": "red"}], "unknown columns ['colour']"),
    ([{"id": "a", "seconds": 3}], "missing columns ['prompt']"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "duplicate ids ['a']"),
    ([{"id": "../etc/passwd", "prompt": "x"}], "ids must be"),
    ([{"id": "clip\n", "prompt": "x"}], "ids must be"),
    ([{"id": "a", "prompt": "x"}, {"prompt": "y"}], "rows without an id: [2]"),
    ([], "no rows"),
])
def test_bad_manifests_are_rejected_before_any_work(tmp_path, rows, message):
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))


def test_lora_column_paths_relative_to_the_manifest_and_missing_ones_as_row_errors(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save_file

    from fp_ray.batch import check_manifest

    (tmp_path / "loras").mkdir()
    save_file({"transformer.proj_out.lora_A.weight": torch.ones(4, 8)}, tmp_path / "loras" / "style.safetensors")
    rows = [{"id": "plain", **ROW}, {"id": "styled", **ROW, "loras": [{"name": "loras/style.safetensors", "weight": 0.8}]},
            {"id": "text", **ROW, "loras": "loras/style.safetensors:0.5"}, {"id": "gone", **ROW, "loras": "loras/gone.safetensors"}]
    checked = {r["id"]: r for r in check_manifest(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "out"), str(TINY_CHECKPOINT))}
    assert checked["gone"]["payload"] is None and "no such file or folder" in checked["gone"]["record"]["error"]
    styled = pickle.loads(checked["styled"]["payload"])
    assert [(c.name, c.weight) for c in styled.loras] == [(str(tmp_path / "loras" / "style.safetensors"), 0.8)]
    fingerprints = {checked[k]["record"]["fingerprint"] for k in ("plain", "styled", "text")}
    assert len(fingerprints) == 3


def test_a_finished_row_rendered_as_another_render_is_said_to_render_again(tmp_path):
    """A row whose earlier record is ok but of another fingerprint (other fields or images, a
    new model or output revision) renders again, and the check says so; one with the same
    fingerprint is reused; one whose video is gone renders, not 'again'; a garbled record counts
    as none."""
    from fp_ray.batch import check_manifest, record_location

    out = tmp_path / "out"
    rows = [{"id": k, **ROW} for k in ("changed", "same", "gone", "garbled")]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    fingerprint = check_manifest(manifest, str(out), str(TINY_CHECKPOINT))[0]["record"]["fingerprint"]
    (out / "records").mkdir(parents=True)
    for rid, fp in (("changed", "0" * 64), ("same", fingerprint), ("gone", fingerprint)):
        video = out / f"{rid}.mp4"
        video.write_bytes(b"mp4") if rid != "gone" else None
        Path(record_location(str(out), rid)).write_text(json.dumps({"id": rid, "status": "ok", "fingerprint": fp, "output": str(video)}))
    Path(record_location(str(out), "garbled")).write_text("[1, 2]")
    checked = {r["id"]: r for r in check_manifest(manifest, str(out), str(TINY_CHECKPOINT))}
    assert checked["same"]["payload"] is None and checked["same"]["record"]["reused"]
    assert checked["changed"]["payload"] is not None and checked["changed"]["again"]
    assert checked["gone"]["payload"] is not None and not checked["gone"]["again"]
    assert checked["garbled"]["payload"] is not None and not checked["garbled"]["again"]
    # the checkpoints a run may remove: those of the earlier render as another render only
    assert checked["changed"]["replaces"] == "0" * 64 and "replaces" not in checked["gone"]
    Path(record_location(str(out), "gone")).write_text(json.dumps({"id": "gone", "status": "error", "fingerprint": "1" * 64}))
    (row,) = [r for r in check_manifest(manifest, str(out), str(TINY_CHECKPOINT)) if r["id"] == "gone"]
    assert row["replaces"] == "1" * 64 and not row["again"]  # a failed render's, of other settings
    # a record's fingerprint names a folder under the store: one that is not a sha256 ("../..",
    # the record written by hand or garbled) names none, or a rerun would remove what it points at
    Path(record_location(str(out), "gone")).write_text(json.dumps({"id": "gone", "status": "error", "fingerprint": "../../victim"}))
    (row,) = [r for r in check_manifest(manifest, str(out), str(TINY_CHECKPOINT)) if r["id"] == "gone"]
    assert "replaces" not in row


def test_a_record_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, caplog):
    from fp_ray.batch import check_manifest

    (tmp_path / "out" / "records" / "bad.json").mkdir(parents=True)  # where the row's record goes
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "bad", **ROW, "seconds": -1}])
    (row,) = check_manifest(manifest, str(tmp_path / "out"), str(TINY_CHECKPOINT))
    assert row["record"]["status"] == "error"
    (logged,) = [r for r in caplog.records if "record of row bad" in r.getMessage()]
    assert logged.exc_info is None and "Is a directory" in logged.getMessage()


class KillsItsWorker:
    """A row payload whose unpickling ends the process that reads it: a row that crashes its
    stage's worker every time (as one that runs its node out of memory does)."""

    def __reduce__(self):
        import os

        return os._exit, (1,)


def test_a_row_that_keeps_killing_its_worker_ends_as_an_error_and_the_others_go_on(ray_cluster, tmp_path):
    import pickle

    from fp_ray.batch import check_manifest

    (tmp_path / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    rows = [{"id": "good", **ROW, "image": "start.png", "seconds": 1}, {"id": "poison", **ROW, "image": "start.png", "seed": 1}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = str(tmp_path / "out")
    checked = check_manifest(manifest, out, str(TINY_CHECKPOINT))
    checked[1]["payload"] = pickle.dumps(KillsItsWorker())
    config = dataclasses.replace(CONFIG, generators=(1, 1), pools=dataclasses.replace(CONFIG.pools, max_restarts=1))
    good, poison = run_batch(manifest, out, str(TINY_CHECKPOINT), config, checked=checked)  # ends: no endless retries
    assert good["status"] == "ok" and (tmp_path / "out" / "good.mp4").is_file()
    assert poison["status"] == "error" and poison["error"].startswith("batch: WorkerLost: ")
    assert "2 times" in poison["error"]  # the first try and --max-restarts 1 more
    assert json.loads((tmp_path / "out" / "records" / "poison.json").read_text())["status"] == "error"
    assert pq.read_table(tmp_path / "out" / "results.parquet").column("status").to_pylist() == ["ok", "error"]


def test_actors_that_cannot_load_their_model_give_each_row_one_line(ray_cluster, tmp_path, caplog):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TINY_CHECKPOINT, model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", **ROW, "image": "start.png"}])
    (record,) = run_batch(manifest, str(tmp_path / "out"), str(model), CONFIG)
    assert record["error"].startswith("batch: WorkerStartError: a worker failed to load its model: fp_ray.models.ModelNotFoundError: "
                                      "cannot load HunyuanVideoFramepackTransformer3DModel")
    assert "\x1b" not in record["error"] and "Traceback" not in record["error"]
    assert not [r for r in caplog.records if r.name.startswith("fp_ray") and r.exc_info]  # the command shows no traceback


def test_a_row_lost_after_its_record_was_written_keeps_that_record(ray_cluster, tmp_path):
    """A row whose try wrote its video and record (its checkpoints then removed) and lost its
    worker before the result came back, its tries used up, or a second batch on this out
    that finished the row: the driver keeps that record instead of writing over it (the rerun
    would render the whole row again). A row lost before that is an error with its fingerprint."""
    import pickle

    from fp_ray.batch import check_manifest, new_record, record_location

    (tmp_path / "start.png").write_bytes(SAMPLE_IMAGE.read_bytes())
    rows = [{"id": rid, **ROW, "image": "start.png"} for rid in ("written", "lost")]
    manifest, out = write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out"
    checked = check_manifest(manifest, str(out), str(TINY_CHECKPOINT))
    (out / "records").mkdir(parents=True)
    (out / "written.mp4").write_bytes(b"mp4")
    fingerprints = [row["record"]["fingerprint"] for row in checked]
    written = new_record("written", output=str(out / "written.mp4"), fingerprint=fingerprints[0], frames=37)
    Path(record_location(str(out), "written")).write_text(json.dumps(written))
    for row in checked:
        row["payload"] = pickle.dumps(KillsItsWorker())
    config = dataclasses.replace(CONFIG, generators=(1, 1), pools=dataclasses.replace(CONFIG.pools, max_restarts=0))
    kept, lost = run_batch(manifest, str(out), str(TINY_CHECKPOINT), config, checked=checked)
    assert kept == written and json.loads(Path(record_location(str(out), "written")).read_text()) == written
    assert lost["status"] == "error" and lost["error"].startswith("batch: WorkerLost: ") and lost["fingerprint"] == fingerprints[1]
