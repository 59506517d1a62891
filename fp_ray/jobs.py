"""Batch renders as Ray Jobs on a running cluster, through the Jobs API (JobSubmissionClient).

`fp-ray submit` runs `fp-ray batch` on the cluster's head node (fp-ray is installed there,
see cluster.yaml); `ray job submit --working-dir . -- python jobs/render_batch.py ...`
does the same from a checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def batch_entrypoint(manifest: str, out: str, extra: list[str]) -> str:
    return shlex.join(["fp-ray", "batch", manifest, "--out", out, *extra])


AGENT_WAIT_S = 90  # a freshly started head's job agent takes a while to come up


def submit(client: JobSubmissionClient, entrypoint: str, metadata: dict) -> str:
    """Submit, retrying while the head answers that its job agent is not up yet."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, metadata=metadata)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit_batch(args: argparse.Namespace) -> str:
    client = JobSubmissionClient(args.address)
    job_id = submit(client, batch_entrypoint(args.manifest, args.out, args.batch_args), {"fp-ray": "batch", "out": args.out})
    print(f"submitted {job_id}: fp-ray job status {job_id} / fp-ray job logs {job_id}")
    if args.wait:
        asyncio.run(follow(client, job_id))
        status = client.get_job_status(job_id)
        print(f"{job_id}: {status.value}")
        if status != JobStatus.SUCCEEDED:
            sys.exit(1)
    return job_id


async def follow(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def job_command(args: argparse.Namespace) -> None:
    client = JobSubmissionClient(args.address)
    if args.action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}  {job.status.value:<9}  {job.entrypoint}")
        return
    if not args.job_id:
        raise SystemExit(f"fp-ray job {args.action}: a job id is required")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        print(f"{args.job_id}: stop {'requested' if client.stop_job(args.job_id) else 'not needed (job already ended)'}")
