"""Declared actor resources on the shared fake-GPU cluster (a CPU head, two nodes with two
GPUs each): what fits is placed, what never can fails at once with what was asked and
what the cluster has, and fp-ray's own one-machine Ray shares a single GPU."""

from __future__ import annotations

import pytest

from fp_ray import TINY_CHECKPOINT
from fp_ray.actors import PoolConfig, RayPools
from fp_ray.placement import PlacementError, check_placement, pack


def asks(config: PoolConfig) -> dict:
    return {kind: (getattr(config, f"{kind}s"), config.bundle(kind)) for kind in ("encoder", "generator", "decoder")}


def test_defaults_declare_gpus_for_every_actor_kind():
    c = PoolConfig()
    assert (c.gpus("generator"), c.gpus("decoder"), c.gpus("encoder")) == (1.0, 0.5, 0.5)
    assert PoolConfig(device="cpu").bundle("generator") == {"CPU": 0.5, "GPU": 0.0}
    assert PoolConfig(resources={"generator": {"fp_generator": 1}}).bundle("generator")["fp_generator"] == 1


def test_one_gpu_machine_packs_encoder_generator_and_decoder_onto_it():
    c = PoolConfig.one_machine(1)
    assert sum(c.gpus(k) for k in ("generator", "decoder", "encoder")) <= 1.0
    assert pack([(k, c.bundle(k)) for k in ("generator", "decoder", "encoder")], [{"CPU": 2, "GPU": 1}]) == []
    assert pack([(k, PoolConfig().bundle(k)) for k in ("generator", "decoder", "encoder")], [{"CPU": 2, "GPU": 1}])
    assert PoolConfig.one_machine(0).device == "cpu"
    assert PoolConfig.one_machine(1, generator_gpus=1.0, decoder_gpus=0.0, encoder_gpus=0.0).generator_gpus == 1.0


def test_fitting_asks_pass(ray_cluster):
    check_placement(asks(PoolConfig(generators=2)))  # 2 + 0.5 + 0.5 GPUs on 2 x 2 GPUs


@pytest.mark.parametrize("config,asked", [
    (PoolConfig(generators=5), "5 generator x {CPU: 0.5, GPU: 1}"),
    (PoolConfig(generator_gpus=3), "1 generator x {CPU: 0.5, GPU: 3}"),
    (PoolConfig(resources={"decoder": {"fp_decoder": 1}}), "1 decoder x {CPU: 0.5, GPU: 0.5, fp_decoder: 1}"),
])
def test_unsatisfiable_asks_fail_fast_saying_what_was_asked_and_what_there_is(ray_cluster, config, asked):
    with pytest.raises(PlacementError) as e:
        RayPools(str(TINY_CHECKPOINT), config)  # fails before any actor is created
    assert asked in str(e.value), str(e.value)
    assert "the cluster has {CPU: 2, GPU: 2}, {CPU: 2, GPU: 2}, {CPU: 2}" in str(e.value), str(e.value)


def test_an_autoscaling_cluster_is_waited_for(ray_cluster):
    check_placement(asks(PoolConfig(generators=5, autoscaling=True)), autoscaling=True)
