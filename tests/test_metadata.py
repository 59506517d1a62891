"""The render record a video carries: what it holds, how it reads back from an mp4 or a
sidecar, and how a re-render finds its images again."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT, __version__
from fp_ray.metadata import (FORMAT, MetadataError, Provenance, dumps, folder_digest, model_identity, parse_metadata,
                             read_metadata, recorded_image, render_metadata, sha256)
from fp_ray.request import make_request
from fp_ray.video import encode_segment, join_segments

SAMPLE_SHA = sha256(SAMPLE_IMAGE.read_bytes())


def record_for(request, end_sha=None, sources=None) -> dict:
    return render_metadata(request, Provenance(SAMPLE_SHA, end_sha, {"transformer": {"source": None, "sha256": "x"}}), sources)


def test_record_holds_every_request_field_portably(tmp_path, monkeypatch):
    image = tmp_path / "start.png"
    shutil.copy(SAMPLE_IMAGE, image)
    monkeypatch.chdir(tmp_path)
    request = make_request(prompt="0s: a; 1s: b", image="start.png", end_image="start.png", seed=7, width=64, height=48)
    record = record_for(request, end_sha=SAMPLE_SHA)
    assert record["format"] == FORMAT and record["fp_ray_version"] == __version__
    assert set(record["request"]) == set(type(request).model_fields)
    assert record["request"]["image"] == record["request"]["end_image"] == str(image)  # absolute: re-renders from anywhere
    assert record["request"]["model"] is None  # the shipped checkpoint, whatever folder it is installed in
    assert record["images"] == {"image": {"sha256": SAMPLE_SHA}, "end_image": {"sha256": SAMPLE_SHA}}
    assert make_request(**record["request"]).seed == 7  # the fields are a request again
    uploaded = record_for(request, end_sha=SAMPLE_SHA, sources=(None, None))
    assert uploaded["request"]["image"] is None and uploaded["request"]["end_image"] is None
    assert dumps(record) == dumps(record_for(request, end_sha=SAMPLE_SHA))  # same request, same bytes


def test_model_identity_hashes_local_folders_and_sees_a_changed_config(tmp_path):
    identity = model_identity(str(TINY_CHECKPOINT))
    assert identity["transformer"] == identity["base"] == identity["image_encoder"]
    assert identity["transformer"]["source"] is None and len(identity["transformer"]["sha256"]) == 64
    copy = tmp_path / "ckpt"
    shutil.copytree(TINY_CHECKPOINT, copy)
    assert model_identity(str(copy))["transformer"] == {"source": str(copy), "sha256": identity["transformer"]["sha256"]}
    config = copy / "transformer" / "config.json"
    config.write_text(config.read_text().replace("{", '{"edited": 1, ', 1))
    folder_digest.cache_clear()
    assert model_identity(str(copy))["transformer"]["sha256"] != identity["transformer"]["sha256"]
    assert model_identity("lllyasviel/FramePackI2V_HY", "org/base", "org/siglip")["transformer"] == {
        "source": "lllyasviel/FramePackI2V_HY", "sha256": None}


def test_parse_reads_mp4_tags_sidecars_and_truncated_mp4_headers(tmp_path):
    record = record_for(make_request(prompt="x"))
    segment = encode_segment(np.zeros((3, 48, 64, 3), dtype=np.uint8), 30, 16)
    video = join_segments([segment], tmp_path / "v.mp4", 30, {"comment": dumps(record)})
    data = video.read_bytes()
    assert parse_metadata(data) == record
    assert parse_metadata(data[: data.index(b"mdat") + 4]) == record  # the record sits in the moov, before the frames
    (tmp_path / "v.mp4.json").write_text(dumps(record))
    assert read_metadata(tmp_path / "v.mp4.json") == record


@pytest.mark.parametrize("content,reason", [
    ("plain-mp4", "is not a video fp-ray made"),
    (b"hello", "neither an mp4 nor a JSON file"),
    (b"{not json", "does not parse"),
    (json.dumps({"format": "other", "request": {}}).encode(), "expected format 'fp-ray/render/1'"),
    (json.dumps({"format": FORMAT, "request": {}, "images": {}}).encode(), "record is incomplete"),
])
def test_files_without_a_record_are_refused_with_a_reason(tmp_path, content, reason):
    if content == "plain-mp4":
        content = join_segments([encode_segment(np.zeros((2, 48, 64, 3), dtype=np.uint8), 30, 16)], tmp_path / "plain.mp4", 30).read_bytes()
    with pytest.raises(MetadataError, match=reason):
        parse_metadata(content)
    with pytest.raises(MetadataError, match="file not found"):
        read_metadata(tmp_path / "missing.mp4")


def test_recorded_images_are_used_only_while_their_bytes_match(tmp_path):
    image = tmp_path / "start.png"
    shutil.copy(SAMPLE_IMAGE, image)
    record = record_for(make_request(prompt="x", image=str(image)))
    assert recorded_image(record, "image", None, "--image") == str(image)
    assert recorded_image(record, "image", "/other.png", "--image") == "/other.png"  # the user's choice wins
    assert recorded_image(record, "end_image", None, "--end-image") is None
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(MetadataError, match=r"--image: the start image .* has changed since the render .*give the original with --image"):
        recorded_image(record, "image", None, "--image")
    image.unlink()
    with pytest.raises(MetadataError, match="is gone; give it with --image"):
        recorded_image(record, "image", None, "--image")
    sample = record_for(make_request(prompt="x"))  # no image given: the sample image, by its hash
    assert recorded_image(sample, "image", None, "--image") is None
    uploaded = record_for(make_request(prompt="x", image=str(SAMPLE_IMAGE)), end_sha="ab" * 32, sources=(None, None))
    uploaded["images"]["image"]["sha256"] = "cd" * 32
    with pytest.raises(MetadataError, match="does not say where its start image is"):
        recorded_image(uploaded, "image", None, "--image")
