"""The render service and its API in one process (FastAPI test client over in-process
workers): admission limits, named tokens, ownership between replicas, renders whose inputs
vanished, heartbeats, retention."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.records import RenderRecords
from fp_ray.render import LocalPools
from fp_ray.request import make_request
from serving.api import bind_service, make_api
from serving.service import RenderService, ServiceConfig

SMALL = {"prompt": "a lake at dawn", "size": "64x48", "steps": "2", "seconds": "1.2"}


def files():
    return {"image": ("start.png", SAMPLE_IMAGE.read_bytes(), "image/png")}


@pytest.fixture()
def pools(components):
    return LocalPools.from_components(components)


def api_client(pools, storage, **config) -> TestClient:
    tokens = config.pop("tokens", None)
    bind_service(RenderService(pools, str(TINY_CHECKPOINT), str(storage), config=ServiceConfig(**config), tokens=tokens))
    return TestClient(make_api())


def wait_status(client, rid, states, headers=None, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/renders/{rid}", headers=headers).json()
        if record["status"] in states:
            return record
        time.sleep(0.05)  # polling a status endpoint, as a client does
    raise AssertionError(f"{rid} still {record['status']}")


def test_queue_cap_and_named_tokens(pools, tmp_path):
    with api_client(pools, tmp_path, max_queued=0, tokens={"alice": "a-secret", "bob": "b-secret"}) as client:
        assert client.get("/v1/renders", headers={"Authorization": "bearer a-secret"}).status_code == 200  # any case
        assert client.get("/v1/renders", headers={"Authorization": "Bearer c-secret"}).status_code == 401
        r = client.post("/v1/renders", data=SMALL, files=files(), headers={"Authorization": "Bearer b-secret"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and "retry" in r.json()["detail"]
        assert 'fp_ray_requests_rejected_total{limit="renders"} 1.0' in client.get("/metrics").text


def test_per_token_limit_and_relative_links(pools, tmp_path):
    headers = {"Authorization": "Bearer a-secret"}
    with api_client(pools, tmp_path, max_per_client=1, tokens={"alice": "a-secret"}) as client:
        r = client.post("/v1/renders", data={**SMALL, "steps": "20", "seconds": "6"}, files=files(), headers=headers)
        assert r.status_code == 202 and r.headers["Location"] == f"/v1/renders/{r.json()['id']}"
        second = client.post("/v1/renders", data=SMALL, files=files(), headers=headers)
        assert second.status_code == 429 and "'alice'" in second.json()["detail"]
        assert client.delete(f"/v1/renders/{r.json()['id']}", headers=headers).json()["status"] == "cancelled"
        assert client.post("/v1/renders", data=SMALL, files=files(), headers=headers).status_code == 202


def test_a_render_whose_inputs_vanished_fails_clearly_and_can_be_deleted(pools, tmp_path):
    records = RenderRecords(tmp_path / "renders.db")
    request = {"prompt": "x", "image": str(tmp_path / "renders/abc/input/start.png"), "model": str(TINY_CHECKPOINT),
               "width": 64, "height": 48, "steps": 2, "seconds": 1.2}
    records.create("abc", request)  # left by an earlier process, its input since removed
    with api_client(pools, tmp_path) as client:
        record = wait_status(client, "abc", {"failed"})
        assert "input images are gone" in record["error"]
        assert client.delete("/v1/renders/abc").json()["deleted"]
        assert client.get("/v1/renders/abc").status_code == 404


def test_an_orphan_is_taken_over_only_once_its_lease_ran_out(pools, tmp_path):
    records = RenderRecords(tmp_path / "renders.db")
    start = tmp_path / "renders/orphan/input/start"  
    start.parent.mkdir(parents=True)
    start.write_bytes(SAMPLE_IMAGE.read_bytes())
    records.create("orphan", {"prompt": "x", "image": str(start), "model": str(TINY_CHECKPOINT),
                              "width": 64, "height": 48, "steps": 2, "seconds": 1.2})
    assert records.claim("orphan", "dead-replica", lease_s=1.0)
    assert not records.claim("orphan", "other", lease_s=1.0)  # held: nobody else may take it
    with api_client(pools, tmp_path, lease_s=0.3) as client:
        assert client.get("/v1/renders/orphan").json()["status"] == "queued"  # not before the lease ran out
        record = wait_status(client, "orphan", {"finished"})
        assert record["sections_done"] == record["sections_total"] == 1
        assert not records.update("orphan", "dead-replica", status="failed")  # the old owner can no longer write


def test_idle_streams_get_heartbeats(pools, tmp_path):
    records = RenderRecords(tmp_path / "renders.db")
    records.create("held", {"prompt": "x", "image": str(SAMPLE_IMAGE), "model": str(TINY_CHECKPOINT)})
    assert records.claim("held", "another-replica", lease_s=600)  # runs elsewhere: nothing happens here
    with api_client(pools, tmp_path, heartbeat_s=0.2) as client:
        with client.stream("GET", "/v1/renders/held/events") as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line) == ": heartbeat"
        records.update("held", status="cancelled")
        records.add_event("held", 0, {"type": "cancelled"})
        with client.stream("GET", "/v1/renders/held/events") as r:  # ends with the render
            assert [line for line in r.iter_lines() if line.startswith("event:")] == ["event: cancelled"]


def test_two_replicas_on_postgresql_one_takes_over_the_others_render(pools, tmp_path, postgres_url):
    """Replica A starts a render and dies (its run stops, its lease is no longer renewed);
    replica B, on the same database and storage, takes the render over and finishes it."""
    import asyncio

    config = ServiceConfig(lease_s=0.5)
    RenderRecords(postgres_url)._change("DELETE FROM renders")
    request = make_request(prompt="x", image="upload", width=64, height=48, steps=2, seconds=2.4)

    async def scenario():
        a = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path), postgres_url, config=config)
        b = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path), postgres_url, config=config)
        rid = await a.submit(request, (SAMPLE_IMAGE.read_bytes(), None))
        assert a.records.get(rid)["owner"].startswith(a.replica)
        a.live[rid].task.cancel()  # A dies mid-render: nothing written, the lease runs out
        await asyncio.gather(a.live[rid].task, return_exceptions=True) if rid in a.live else None
        b.start()
        deadline = time.monotonic() + 60
        while (b.records.get(rid)["status"] != "finished" or rid in b.live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until B's run is over, its clean-up included
        record = b.records.get(rid)
        assert record["status"] == "finished" and record["owner"].startswith(b.replica)
        assert b.video_path(rid).read_bytes()[4:8] == b"ftyp"
        assert not a.records.update(rid, a.replica, status="failed")  # A's writes no longer land
        b._maintainer.cancel()
        return rid

    rid = asyncio.run(scenario())
    assert (tmp_path / "renders" / rid / "video.mp4").exists()
    assert not (tmp_path / "renders" / rid / "input").exists()  # retention: inputs go once it finished


def test_retention_removes_old_renders_then_the_oldest_while_over_the_size_cap(pools, tmp_path):
    import asyncio

    svc = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path), config=ServiceConfig(retention_days=1, retention_gb=1 / 1024))
    for rid, age_days, megabytes in (("old", 3, 0.1), ("big", 0.5, 2), ("new", 0, 0.1)):
        svc.records.create(rid, {"prompt": "x"})
        svc.records.update(rid, status="finished")
        svc.records._change("UPDATE renders SET updated = ? WHERE id = ?", time.time() - age_days * 86400, rid)
        svc.video_path(rid).parent.mkdir(parents=True)
        svc.video_path(rid).write_bytes(b"\0" * int(megabytes * 2**20))
    svc.records.create("running", {"prompt": "x"})  # unfinished renders are never removed
    assert asyncio.run(svc.retention.sweep()) == 2
    assert [r["id"] for r in svc.records.list()] == ["running", "new"]
    assert not svc.folder("old").exists() and not svc.folder("big").exists() and svc.video_path("new").exists()
    assert 0 < svc.metrics.storage_bytes._value.get() < 2**20


class FlakyDecoder:
    """A decoder handle whose first `failures` calls find the replica lost."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0
        self.segment = self

    async def remote(self, *args):
        from ray.exceptions import ActorUnavailableError

        self.calls += 1
        if self.calls <= self.failures:
            raise ActorUnavailableError("replica lost", None)
        return [0]


def test_a_lost_decoder_replica_is_retried_then_reported_as_lost():
    import asyncio

    from fp_ray.coordinator import WorkerLost
    from serving.app import ServePools

    from fp_ray.workers import SegmentJob, Shared

    job = SegmentJob(Shared("r", None), 0, None)
    decoder = FlakyDecoder(failures=2)
    assert asyncio.run(ServePools(None, None, decoder).segment(job)) == [0] and decoder.calls == 3
    with pytest.raises(WorkerLost, match="decoder replica lost 3 times"):
        asyncio.run(ServePools(None, None, FlakyDecoder(failures=3)).segment(job))


def test_the_generator_replica_stops_within_a_step_once_the_owner_token_changes(pools, tmp_path):
    """The Generator deployment's code in-process: a new owner (or a cancel) rewrites the
    token; the section in flight stops before its next step and saves no checkpoint."""
    import asyncio

    from fp_ray.storage import SectionStore, write_bytes
    from fp_ray.coordinator import render_context
    from fp_ray.workers import Cancelled, SectionJob, Shared
    from serving.app import Generator
    from serving.service import owner_location

    store = SectionStore(tmp_path / "sections")
    request = make_request(prompt="x", image=str(SAMPLE_IMAGE), width=64, height=48, steps=6, seconds=1.2)
    generator = object.__new__(Generator.func_or_class)
    generator.worker = pools.generator

    async def run(rewrite_after: int | None, seen: list[str]) -> list[str]:
        encoded = await pools.encode(request)
        section = next(s for s in encoded.plan.sections if not s.depends_on)
        ctx = render_context(encoded, "r1", store)
        job = SectionJob(Shared(ctx.key, ctx), section.position, {})
        write_bytes(owner_location(store, "r1"), b"owner-a")
        async for event in generator.generate(job):
            seen.append(event["type"])
            if seen.count("step") == rewrite_after:
                write_bytes(owner_location(store, "r1"), b"owner-b")  # another replica took the render over
        return seen

    seen: list[str] = []
    with pytest.raises(Cancelled, match="owner changed"):
        asyncio.run(run(2, seen))
    assert seen.count("step") == 2  # not one step more
    assert not any(Path(store.root).rglob("*.safetensors"))  # stopped before saving
    assert asyncio.run(run(None, [])).count("step") == 6  # untouched: runs and saves
    assert any(Path(store.root).rglob("*.safetensors"))


class LostGenerator:
    """A generator handle whose replica is lost as the section's stream starts."""

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, job):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        from ray.exceptions import ActorUnavailableError

        raise ActorUnavailableError("replica lost", None)


def test_a_lost_generator_replica_is_reported_as_lost_for_the_coordinator_to_retry():
    import asyncio

    from fp_ray.coordinator import WorkerLost
    from fp_ray.workers import SectionJob, Shared
    from serving.app import ServePools

    async def run():
        async for _ in ServePools(None, LostGenerator(), None).generate(SectionJob(Shared("r/f/s", None), 3, {})):
            pass

    with pytest.raises(WorkerLost, match="generator replica lost during section 3"):
        asyncio.run(run())


def test_requests_name_only_registered_loras(components, tmp_path):
    from fp_ray.lora import LoraRegistry
    from fp_ray.workers import DecoderWorker, EncoderWorker, GeneratorWorker
    from test_lora import ATTENTION, make_lora, own

    registry = LoraRegistry.from_config({"style": str(make_lora(tmp_path / "style", 1, ATTENTION))})
    c = own(components)  # adapters go into a transformer of this test's own
    pools = LocalPools(EncoderWorker(components=c, loras=registry), GeneratorWorker(components=c), DecoderWorker(components=c))
    bind_service(RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path / "data"), loras=registry))
    with TestClient(make_api()) as client:
        assert client.get("/v1/loras").json() == {"loras": ["style"]}
        for loras, reason in [(str(SAMPLE_IMAGE), "unknown LoRA"), ("nope:0.5", "this server offers: style"),
                              ("style:9", "less than or equal to 4")]:
            r = client.post("/v1/renders", data={**SMALL, "loras": loras}, files=files())
            assert r.status_code == 422 and reason in r.json()["detail"], r.text
        styled = client.post("/v1/renders", data={**SMALL, "loras": "style:0.8"}, files=files()).json()["id"]
        plain = client.post("/v1/renders", data=SMALL, files=files()).json()["id"]
        for rid in (styled, plain):
            assert wait_status(client, rid, {"finished", "failed"})["status"] == "finished"
        assert client.get(f"/v1/renders/{styled}").json()["request"]["loras"] == [{"name": "style", "weight": 0.8}]
        videos = [client.get(f"/v1/renders/{rid}/video.mp4").content for rid in (styled, plain)]
        assert videos[0] != videos[1]


def test_videos_record_their_settings_and_the_settings_endpoint_reads_them(pools, tmp_path):
    with api_client(pools, tmp_path, max_upload_mb=1) as client:
        r = client.post("/v1/renders", data={**SMALL, "seed": "9", "guidance": "8"}, files=files())
        rid = r.json()["id"]
        wait_status(client, rid, {"finished"})
        video = client.get(f"/v1/renders/{rid}/video.mp4").content
        head = client.head(f"/v1/renders/{rid}/video.mp4")  # was 405: curl -I, download managers
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(video) and not head.content
        assert client.head(f"/v1/renders/{rid}/sections/0.mp4").status_code == 200
        assert client.head("/v1/renders/nope/video.mp4").status_code == 404
        sidecar = tmp_path / "renders" / rid / "video.mp4.json"
        record = json.loads(sidecar.read_text())
        assert record["request"]["image"] is None and record["request"]["end_image"] is None  # no server paths
        assert record["images"]["image"]["sha256"] == hashlib.sha256(SAMPLE_IMAGE.read_bytes()).hexdigest()
        expected = {"prompt": "a lake at dawn", "seconds": 1.2, "steps": 2, "seed": 9, "guidance": 8.0, "size": "64x48",
                    "schedule": "inverted", "sampler": "unipc", "window": 9, "fps": 30, "crf": 16, "width": 64, "height": 48,
                    "cfg": 1.0, "negative_prompt": "", "cfg_rescale": 0.0, "loop": False, "cache_method": "first_block"}
        for body in ({"content": video}, {"files": {"video": ("v.mp4", video, "video/mp4")}}, {"content": sidecar.read_bytes()}):
            settings = client.post("/v1/settings", **body)
            assert settings.status_code == 200, settings.text
            assert settings.json()["fields"] == expected
            assert settings.json()["images"] == {"image": record["images"]["image"]["sha256"], "end_image": None}
        again = client.post("/v1/renders", data=settings.json()["fields"], files=files())  # the same render again
        wait_status(client, again.json()["id"], {"finished"})
        assert client.get(f"/v1/renders/{again.json()['id']}/video.mp4").content == video
        bad = client.post("/v1/settings", content=b"\x00\x00\x00\x18ftypisom" + b"\0" * 64)
        assert bad.status_code == 422 and "neither an mp4 nor a JSON file" in bad.json()["detail"]
        tampered = client.post("/v1/settings", content=sidecar.read_text().replace('"steps":2', '"steps":1000').encode())
        assert tampered.status_code == 422 and "steps" in tampered.json()["detail"]
        assert client.post("/v1/settings", content=b"0" * (2 * 1024 * 1024)).status_code == 413


def test_user_errors_never_show_stored_input_paths():
    from fp_ray.extend import ClipError
    from fp_ray.request import excerpt
    from serving.service import user_error

    for path in ("/srv/fp/renders/0123456789abcdef/input/clip.mp4", "/srv/" + "x" * 200 + "/renders/0123456789abcdef/input/clip.mp4"):
        message = user_error(ClipError(f"extend: {excerpt(path, 120)}: is corrupt (a frame does not decode)"))
        assert message == "extend: the upload: is corrupt (a frame does not decode)", message


def test_a_json_body_not_in_utf8_gets_400(pools, tmp_path):
    with api_client(pools, tmp_path) as client:
        r = client.post("/v1/renders", content='{"prompt": "café"}'.encode("latin-1"), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"] == "body is not valid JSON: not UTF-8", r.text  # was a 500


def test_settings_of_a_record_with_odd_keyframes_are_read(pools, tmp_path):
    with api_client(pools, tmp_path) as client:
        record = {"format": "fp-ray/render/1", "request": {"prompt": "x", "keyframes": 5}, "images": {"image": {"sha256": "0"}, "keyframes": 5, "extend": 5}}
        r = client.post("/v1/settings", content=json.dumps(record).encode())
        assert r.status_code == 200 and "keyframes" not in r.json()["images"], r.text  # was a 500 (zip over an int)


def test_concurrent_submissions_never_pass_the_queue_cap(pools, tmp_path):
    import asyncio

    svc = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path), config=ServiceConfig(max_queued=2))
    request = make_request(prompt="x", width=64, height=48, steps=20, seconds=6, image="upload")

    async def submit_all():
        results = await asyncio.gather(*[svc.submit(request, (SAMPLE_IMAGE.read_bytes(), None)) for _ in range(6)], return_exceptions=True)
        for rid in [r for r in results if isinstance(r, str)]:
            await svc.cancel(rid)
        return results

    results = asyncio.run(submit_all())
    assert sum(isinstance(r, str) for r in results) == 2, results  # all six passed the count before any was recorded
    assert all(type(r).__name__ == "Busy" for r in results if not isinstance(r, str))


def test_a_client_gone_mid_upload_ends_as_a_4xx_not_an_escaped_exception(pools, tmp_path):
    """The proxy has cancelled the request by then: an exception escaping the handler was
    logged as a never-retrieved future with its traceback, once per client that went away."""
    import asyncio

    from fastapi import HTTPException
    from starlette.requests import Request

    from serving.api import read_body, read_upload

    bind_service(RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path)))
    for kind in ("multipart/form-data; boundary=X", "application/json"):
        for read in (read_body, lambda request: read_upload(request, 1 << 20)):
            messages = iter([{"type": "http.request", "body": b'--X\r\nContent-Disposition: form-data; name="a"\r\n\r\nb', "more_body": True},
                             {"type": "http.disconnect"}])

            async def receive():
                return next(messages)

            scope = {"type": "http", "method": "POST", "path": "/v1/renders", "query_string": b"", "headers": [(b"content-type", kind.encode())]}
            with pytest.raises(HTTPException) as e:
                asyncio.run(read(Request(scope, receive)))
            assert e.value.status_code == 400 and "went away" in e.value.detail


def test_bad_query_and_path_parameters_get_a_short_reason(pools, tmp_path):
    with api_client(pools, tmp_path) as client:
        for url, reason in [("/v1/renders?limit=" + "x" * 30000, "limit: Input should be a valid integer"),
                            ("/v1/renders/abc/sections/" + "9" * 5000 + ".mp4", "position: ")]:
            r = client.get(url)
            assert r.status_code == 422 and r.json()["detail"].startswith(reason) and len(r.text) < 400, r.text[:300]  # was the whole value


def test_a_replica_that_shuts_down_leaves_its_renders_to_resume(pools, tmp_path):
    """A replica's shutdown (Serve calls the ingress's __del__: a redeploy, a stopped server)
    neither fails its renders nor drops their checkpoints: they are let go unfinished, and a
    restarted replica takes them over at once and finishes them, reusing the sections made."""
    import asyncio

    request = make_request(prompt="x", image="upload", width=64, height=48, steps=2, seconds=3.6)

    async def scenario():
        a = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path))
        rid = await a.submit(request, (SAMPLE_IMAGE.read_bytes(), None))
        deadline = time.monotonic() + 60
        while not a.records.get(rid)["sections_done"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until a section is checkpointed
        await a.stop()
        record = a.records.get(rid)
        assert record["status"] in ("queued", "running") and record["owner"] is None and not a.live
        assert list((tmp_path / "sections" / rid).glob("*/section_*.safetensors"))  # the sections made stay
        b = RenderService(pools, str(TINY_CHECKPOINT), str(tmp_path))
        b.start()  # takes it over at once: no lease to wait out
        while (b.records.get(rid)["status"] != "finished" or rid in b.live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b.records.get(rid)["status"] == "finished"
        await b.stop()  # the events queued for the database are written by then
        events = [e for _, e in b.records.events(rid)]
        assert [e["type"] for e in events].count("plan") == 2 and events[-1]["type"] == "finished"
        assert next(e for e in reversed(events) if e["type"] == "plan")["reused"]  # resumed, not redone

    asyncio.run(scenario())


class CancelledMidChunk:
    """A decoder worker whose chunk is cancelled while it decodes: the cancel drops the render's
    work files, then the chunk's seam half lands in the store."""

    def __init__(self, ctx, drop):
        self.contexts = type("Contexts", (), {"get": staticmethod(lambda shared: ctx)})()
        self.ctx, self.drop, self.calls = ctx, drop, 0

    def segment(self, job):
        from fp_ray.storage import SectionStore

        self.calls += 1
        self.drop()
        SectionStore(self.ctx.store).save(self.ctx.request_id, self.ctx.fingerprint, job.position, torch.zeros(2), "lead")
        return []


def test_a_chunk_decoded_after_its_render_was_cancelled_leaves_nothing_behind(tmp_path):
    """The Decoder deployment's code in-process: a seam half saved after the cancel dropped the
    render's work files is removed (left, it stayed until the render was deleted); the cancel's
    token stays, and a chunk of a cancelled render is not decoded at all."""
    import asyncio
    import shutil
    from types import SimpleNamespace

    from fp_ray.storage import SectionStore, write_bytes
    from fp_ray.workers import Cancelled, SegmentJob, Shared
    from serving.app import Decoder
    from serving.service import CANCELLED_TOKEN, owner_location

    store = SectionStore(tmp_path / "sections")
    ctx = SimpleNamespace(store=store.root, request_id="r1", fingerprint="f" * 64)
    token = owner_location(store, "r1")

    def cancel():  # as RenderService.cancel: token revoked, work files dropped, token written again
        write_bytes(token, CANCELLED_TOKEN.encode())
        shutil.rmtree(tmp_path / "sections" / "r1")
        write_bytes(token, CANCELLED_TOKEN.encode())

    decoder = object.__new__(Decoder.func_or_class)
    decoder.worker = CancelledMidChunk(ctx, cancel)
    write_bytes(token, b"owner-a")
    with pytest.raises(Cancelled, match="decoded after the render was cancelled"):
        asyncio.run(decoder.segment(SegmentJob(Shared("k", None), 3, {})))
    assert sorted(p.name for p in (tmp_path / "sections").rglob("*") if p.is_file()) == ["owner"]
    with pytest.raises(Cancelled, match="not decoded"):
        asyncio.run(decoder.segment(SegmentJob(Shared("k", None), 4, {})))
    assert decoder.worker.calls == 1
    decoder.worker = CancelledMidChunk(ctx, lambda: write_bytes(token, b"owner-b"))  # taken over, not cancelled
    write_bytes(token, b"owner-a")
    asyncio.run(decoder.segment(SegmentJob(Shared("k", None), 5, {})))
    assert store.load("r1", "f" * 64, 5, "lead") is not None  # the new owner's to use
