"""`fp-ray submit` runs a batch as a Ray Job through the dashboard's Jobs API, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fp_ray import SAMPLE_IMAGE


def fp_ray(*args, timeout=240):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the local cluster uses Ray's token auth
    return subprocess.run([sys.executable, "-m", "fp_ray.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_submit_runs_the_batch_as_a_job_and_reports_status_and_logs(ray_cluster, tmp_path):
    rows = [{"id": "job-clip", "prompt": "a lake", "image": str(SAMPLE_IMAGE), "seconds": 1.2, "size": "64x48", "steps": 2}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    address = ray_cluster.dashboard_url
    done = fp_ray("submit", str(manifest), "--out", str(out), "--address", address, "--wait", "--", "--decoders", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 rendered, 0 already done, 0 failed" in done.stdout
    job_id = done.stdout.split()[1].rstrip(":")
    assert (out / "job-clip.mp4").stat().st_size > 0
    status = fp_ray("job", "status", job_id, "--address", address)
    assert f"{job_id}: SUCCEEDED" in status.stdout
    logs = fp_ray("job", "logs", job_id, "--address", address)
    assert "1 rendered" in logs.stdout
