"""Cluster configs: cluster.yaml against Ray's own schema, KubeRay manifests structurally,
and all of them naming the same GPU node-type resources the Serve config asks for."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fp_ray.cli import pool_config
from fp_ray.jobs import batch_entrypoint

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_cluster_yaml_is_valid_for_the_cluster_launcher():
    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray fills its defaults, then checks its schema
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert all(t["min_workers"] == 0 for t in gpu_types.values())  # zero GPU workers when idle
    assert {"fp_generator", "fp_decoder"} <= {r for t in gpu_types.values() for r in t["resources"]}
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())
    assert all("--metrics-export-port" in c for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])


def test_rayservice_embeds_the_serve_config_and_scales_gpu_groups_from_zero():
    service = load("deploy/rayservice.yaml")
    assert service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load("serving/config.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups.values())
    assert "fp_generator" in groups["gpu-generator"]["rayStartParams"]["resources"]
    assert "fp_decoder" in groups["gpu-decoder"]["rayStartParams"]["resources"]
    for g in groups.values():
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_serve_replicas_ask_for_the_node_type_resources():
    deployments = {d["name"]: d for d in load("serving/config.yaml")["applications"][0]["deployments"]}
    assert deployments["Generator"]["ray_actor_options"]["resources"] == {"fp_generator": 1}
    assert deployments["Decoder"]["ray_actor_options"]["resources"] == {"fp_decoder": 1}


def test_rayjob_runs_the_batch_entrypoint_with_node_type_resources():
    job = load("deploy/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["fp-ray", "batch"]
    from fp_ray.cli import main  # the entrypoint's flags parse as `fp-ray batch` flags
    import argparse

    parser_args = argv[2:]
    assert "--generator-resource" in parser_args and "fp_generator=1" in parser_args
    assert batch_entrypoint("m.parquet", "out", ["--generators", "1-8"]).startswith("fp-ray batch m.parquet --out out")
    assert callable(main) and argparse  # imported for the flags' parser
    args = argparse.Namespace(generators=(1, 8), decoders=(1, 4), encoders=(1, 1), generator_gpus=None, decoder_gpus=None,
                              encoder_gpus=None, generator_resource=[("fp_generator", 1.0)], decoder_resource=[("fp_decoder", 1.0)], encoder_resource=[],
                              max_restarts=3, dtype=None, autoscaling=True, device=None, memory="auto", base=None,
                              image_encoder=None, force_schedule=False, address="auto")
    assert pool_config(args).resources == {"generator": {"fp_generator": 1.0}, "decoder": {"fp_decoder": 1.0}}


def test_every_config_reads_base_and_image_encoder_from_the_local_copies():
    local = {"FP_RAY_BASE_MODEL": "/models/HunyuanVideo", "FP_RAY_IMAGE_ENCODER": "/models/flux_redux_bfl", "HF_HUB_OFFLINE": "1"}
    options = load("cluster.yaml")["docker"]["run_options"]
    assert all(f"-e {k}={v}" in options for k, v in local.items())
    for name in ("deploy/rayservice.yaml", "deploy/rayjob.yaml"):
        spec = load(name)["spec"]
        cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
        for group in cluster["workerGroupSpecs"]:
            env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
            assert env == local
    argv = shlex.split(load("deploy/rayjob.yaml")["spec"]["entrypoint"])
    assert argv[argv.index("--base") + 1] == "/models/HunyuanVideo" and "--autoscaling" in argv
    app_args = load("serving/config.yaml")["applications"][0]["args"]
    assert (app_args["base"], app_args["image_encoder"]) == ("/models/HunyuanVideo", "/models/flux_redux_bfl")
