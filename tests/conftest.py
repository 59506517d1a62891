from __future__ import annotations

import pytest

from fp_ray import TINY_CHECKPOINT
from fp_ray.models import cached_components


@pytest.fixture(scope="session")
def components():
    """The tiny checkpoint, loaded once for the whole run."""
    return cached_components(str(TINY_CHECKPOINT))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run: a CPU head and two worker nodes with two fake
    GPUs each (Ray schedules on `num_gpus` without CUDA; the actors then run on the CPU)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
