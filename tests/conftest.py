from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fp_ray import TINY_CHECKPOINT
from fp_ray.models import cached_components


@pytest.fixture(scope="session")
def components():
    """The tiny checkpoint, loaded once for the whole run."""
    return cached_components(str(TINY_CHECKPOINT))


@pytest.fixture(scope="session")
def video_frames(components):
    """(plan, cond, latents by position) -> the video's (F, H, W, 3) uint8 frames, before
    H.264: every chunk decoded, cut and crossfaded into segments by the workers' functions."""
    from fp_ray.decode import decode_chunk, decode_input, segment_pixels, split_chunk, to_frames

    def frames(plan, cond, done):
        parts = [split_chunk(plan, s.position, decode_chunk(components.vae, decode_input(plan, s, cond, done)))
                 for s in plan.by_position()]
        segments = [segment_pixels(plan, lead, parts[k - 1][1] if k else None) for k, (lead, _) in enumerate(parts)]
        return np.concatenate([to_frames(s) for s in segments])

    return frames


@pytest.fixture(scope="session")
def as_segments():
    """(plan, frames) -> what a player shows for these frames once cut into the plan's
    segments, each encoded as the decoders do: the joined mp4 must decode to exactly this."""
    import io

    from fp_ray.decode import segment_frames
    from fp_ray.video import encode_segment, read_frames

    def encoded(plan, frames, fps: int = 30, crf: int = 16) -> np.ndarray:
        cuts = np.cumsum(segment_frames(plan))[:-1]
        return np.concatenate([read_frames(io.BytesIO(encode_segment(f, fps, crf))) for f in np.split(frames, cuts)])

    return encoded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run: a CPU head and two worker nodes with two fake
    GPUs each (Ray schedules on `num_gpus` without CUDA; the actors then run on the CPU)."""
    import ray
    from ray.cluster_utils import Cluster

    # Job drivers started by the cluster find `fp-ray` on PATH, as on a real cluster's image.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    head = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.dashboard_url = f"http://127.0.0.1:{head['dashboard_port']}"
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (trust auth on 127.0.0.1); skipped where none can start."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="fp-ray-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-t", "60", "-l", str(folder / "log"),
                        "-o", f"-p {port} -k {folder} -h 127.0.0.1", "start"], check=True, capture_output=True, timeout=90)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not start here: {e}")
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)
