"""Proof that a batch render makes the cluster grow GPU workers from zero and shrink back.

Ray's fake multi-node provider (`ray.cluster_utils.AutoscalingCluster`) starts real raylets on
this machine as the autoscaler asks: a CPU head, and `gpu_generator` nodes (1 fake GPU,
fp_generator: 1) with min_workers 0 and a short idle timeout. A batch of rows whose generator
actors declare {GPU: 1, fp_generator: 1} in their PoolConfig is submitted to the cluster while
it has no GPU at all; the script samples the node count and the autoscaler's pending resource
demand every second and fails unless GPU nodes went 0 -> >=1 -> 0 and every GPU demand the
autoscaler saw is a declared bundle (nothing was read from the cluster: it had no GPUs to read).

    python scripts/autoscaling_proof.py [--rows 4] [--out bench/results/autoscaling.json]

It runs `ray stop --force` first (the fake provider needs a fresh head): run it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.cluster_utils import AutoscalingCluster
from ray.experimental import internal_kv

from fp_ray import SAMPLE_IMAGE, TINY_CHECKPOINT
from fp_ray.actors import PoolConfig
from fp_ray.batch import BatchConfig, run_batch

IDLE_MINUTES = 0.1  # 6 s

# The fake provider's cluster config (Ray's wheels do not ship its example file): no SSH, no
# setup; the autoscaler starts raylets on this machine for the node types below.
FAKE_CLUSTER = {
    "cluster_name": "fp-ray-fake",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        # the shape of cluster.yaml's gpu_generator: one GPU and the fp_generator resource
        "gpu_generator": {"resources": {"CPU": 2, "GPU": 1, "fp_generator": 1}, "node_config": {},
                          "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_MINUTES, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class FakeAutoscalingCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        return FAKE_CLUSTER


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def gpu_demand() -> list[dict[str, float]]:
    """The GPU bundles waiting for a node (pending actors, and what Ray Data asks the
    autoscaler for ahead of them), as the autoscaler's last report lists them."""
    raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return []
    report = json.loads(raw).get("load_metrics_report", {})
    demand = (report.get("resource_demand") or []) + (report.get("request_demand") or [])
    return [dict(bundle) for bundle, _count in demand if bundle.get("GPU")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--out", default="bench/results/autoscaling.json")
    p.add_argument("--timeout", type=float, default=240)
    args = p.parse_args()
    # The fake provider runs `ray start`: the one installed beside this Python.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

    cluster = FakeAutoscalingCluster(head_resources={"CPU": 2}, worker_node_types={})
    cluster.start()
    timeline: list[tuple[float, int, str]] = []
    demands: list[tuple[float, dict]] = []
    phase = {"now": "idle"}
    config = BatchConfig(generators=(1, 2), decoders=(1, 1),
                         pools=PoolConfig(generator_gpus=1, decoder_gpus=0, encoder_gpus=0, cpus=1, autoscaling=True,
                                          resources={"generator": {"fp_generator": 1}}))
    declared = {kind: config.pools.bundle(kind) for kind in ("generator", "decoder", "encoder")}
    stop = threading.Event()
    try:
        ray.init("auto", log_to_driver=False)
        t0 = time.monotonic()

        def sample():
            while not stop.is_set():
                now = round(time.monotonic() - t0, 1)
                timeline.append((now, gpu_nodes(), phase["now"]))
                demands.extend((now, d) for d in gpu_demand() if not any(d == seen for _, seen in demands))
                stop.wait(1.0)

        threading.Thread(target=sample, daemon=True).start()
        stop.wait(3)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "m.jsonl"
            manifest.write_text("".join(json.dumps({"id": f"row-{i}", "prompt": "a lake", "image": str(SAMPLE_IMAGE),
                                                    "seconds": 1.2, "size": "64x48", "steps": 4, "seed": i}) + "\n"
                                        for i in range(args.rows)))
            phase["now"] = "batch"
            records = run_batch(str(manifest), str(Path(tmp) / "out"), str(TINY_CHECKPOINT), config)
        phase["now"] = "after"
        finished_at = time.monotonic()
        while gpu_nodes() > 0 and time.monotonic() - finished_at < args.timeout:
            stop.wait(1.0)
        stop.set()
        timeline.append((round(time.monotonic() - t0, 1), gpu_nodes(), "end"))
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()

    counts = [n for _, n, _ in timeline]
    ok = [r for r in records if r["status"] == "ok"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "rows": args.rows, "rendered": len(ok), "idle_timeout_minutes": IDLE_MINUTES,
        "gpu_nodes_at_start": counts[0], "gpu_nodes_max": max(counts), "gpu_nodes_at_end": counts[-1],
        "scale_up_s": next((t for t, n, _ in timeline if n > 0), None),
        "scale_down_s": next((t for t, n, ph in timeline if ph in ("after", "end") and n == 0), None),
        "declared": declared,
        "gpu_demand_seen": [{"t": t, "bundle": d} for t, d in demands],
        "timeline": timeline,
    }
    declared_gpu = [b for b in declared.values() if b.get("GPU")]
    from_declarations = bool(demands) and all(any(d == {k: v for k, v in b.items() if v} for b in declared_gpu)
                                               for _, d in demands)
    first_node = result["scale_up_s"]
    demand_first = bool(demands) and first_node is not None and demands[0][0] <= first_node
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    changes = [timeline[0]] + [row for prev, row in zip(timeline, timeline[1:]) if row[1] != prev[1] or row[2] != prev[2]]
    for t, n, ph in changes:
        print(f"t={t:6.1f}s  GPU nodes {n}  ({ph})")
    for t, d in demands:
        print(f"t={t:6.1f}s  autoscaler sees GPU demand {d}")
    print(f"declared: {declared}")
    print(f"{len(ok)}/{args.rows} rows rendered; GPU nodes {result['gpu_nodes_at_start']} -> max {result['gpu_nodes_max']} "
          f"-> {result['gpu_nodes_at_end']}; GPU demand from the declarations: {from_declarations}, "
          f"before the first GPU node: {demand_first}; wrote {args.out}")
    if not (result["gpu_nodes_at_start"] == 0 and result["gpu_nodes_max"] >= 1 and result["gpu_nodes_at_end"] == 0
            and len(ok) == args.rows and from_declarations and demand_first):
        raise SystemExit("autoscaling proof failed")


if __name__ == "__main__":
    main()
