"""Fail fast on actor placements a Ray cluster can never satisfy.

The asks are declared (`PoolConfig`), never read from the cluster; this check only
compares them with what the cluster is: its nodes' total resources, and the node types
an autoscaler reports it can add. A first-fit packing over the nodes decides; one that
fails names what was asked and what the cluster has.
"""

from __future__ import annotations

Bundle = dict[str, float]


class PlacementError(RuntimeError):
    """Actors asked for resources no node of the cluster has, or will ever have."""


def _fmt(resources: Bundle) -> str:
    shown = {k: v for k, v in resources.items() if v and not k.startswith(("node:", "accelerator_type:"))
             and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def fits(bundle: Bundle, resources: Bundle) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v)


def pack(asks: list[tuple[str, Bundle]], nodes: list[Bundle]) -> list[str]:
    """First-fit decreasing of `asks` (name, bundle) into `nodes`; the names left over."""
    free = [dict(n) for n in nodes]
    left = []
    for name, bundle in sorted(asks, key=lambda a: (-a[1].get("GPU", 0.0), -sum(a[1].values()))):
        node = next((n for n in free if fits(bundle, n)), None)
        if node is None:
            left.append(name)
            continue
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return left


def autoscaler_node_types() -> list[Bundle]:
    """Node types an autoscaler reports it can add (KubeRay, autoscaler v2); [] if none says."""
    import ray._private.state  # Ray Data reads the same record to size its requests

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return []
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0 and g.resources]


def check_placement(asks: dict[str, tuple[int, Bundle]], autoscaling: bool = False) -> None:
    """Raise PlacementError when the actors `asks` ({kind: (count, bundle)}) can never all
    run. Where an autoscaler reports the node types it can add, each bundle needs a node or
    node type it fits; a cluster declared `autoscaling` without such a report is trusted;
    otherwise the bundles must pack into the nodes there are."""
    import ray  # here: the CLI imports this module for its error type, and a local render needs no Ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    named = [(f"{kind} {i + 1}", bundle) for kind, (count, bundle) in asks.items() for i in range(count)]
    node_types = autoscaler_node_types()
    if autoscaling and not node_types:
        return  # declared to grow, and its autoscaler does not say into what: wait for it
    if node_types:
        unplaceable = [name for name, bundle in named if not any(fits(bundle, n) for n in nodes + node_types)]
    else:
        unplaceable = pack(named, nodes)
    if unplaceable:
        wanted = "; ".join(f"{count} {kind} x {_fmt(bundle)}" for kind, (count, bundle) in asks.items() if count)
        have = ", ".join(sorted(_fmt(n) for n in nodes)) or "no nodes"
        extra = f"; node types it can add: {', '.join(_fmt(t) for t in node_types)}" if node_types else ""
        raise PlacementError(
            f"cannot place {', '.join(unplaceable)}: asked for {wanted}; the cluster has {have}{extra}. "
            "Lower --generator-gpus/--decoder-gpus/--encoder-gpus, use --device cpu, or add nodes "
            "(--autoscaling if the cluster grows on demand)")
