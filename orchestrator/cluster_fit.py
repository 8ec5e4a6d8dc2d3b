"""Does a sweep's trial fit a cluster? Pure functions over node types, checked before scheduling.

A trial's demand is three kinds of bundle: its driver (Tune's trial actor: `driver_cpus`,
`driver_gpus`), `num_workers` Ray Train workers (`cpus_per_worker`, one GPU with `use_gpu`,
`worker_resources`) and, when the sweep uses GPUs but the driver holds none, one GPU stage task
at a time (`orchestrator.remote_stages`: latents, features, samples, scores, timing on a GPU
node). The driver waits while its workers or its stage task run, so a trial's peak is the
driver plus the larger of the two.

A node type is what one node offers (CPU, GPU, custom resources) and how many of it the cluster
can ever have: a Ray cluster launcher file (`available_node_types`; resources written there, or
inferred from a known AWS instance type as the launcher does), a KubeRay RayJob / RayCluster
file (the Ray container's cpu / nvidia.com/gpu limits, overridden by rayStartParams), or a
running cluster (its nodes, plus the autoscaler's node types where Ray publishes them).

A bundle no node type can hold is refused in one line naming the resource, the demand and the
largest node; the concurrency of a sweep is what the cluster holds at its autoscaler's maximum,
capped by `resources.max_concurrent_trials`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lfm_core.errors import ConfigError
from orchestrator.config import ResourcesSection

# (vCPUs, GPUs) of AWS instance types the Ray launcher infers resources for (EC2's own
# figures); cluster files should still write them out in `resources`.
AWS_INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "m5.8xlarge": (32, 0),
    "c5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6e.xlarge": (4, 1),
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}
KUBERAY_KINDS = ("RayJob", "RayCluster")
GPU_LIMIT_SUFFIX = "gpu"  # nvidia.com/gpu, amd.com/gpu
# Ray node resources that are not scheduling demands of a trial.
IGNORED_RESOURCES = ("memory", "object_store_memory")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` leaves on the head
UNLIMITED = 10**6


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its resources and how many of it the cluster can have at most."""

    name: str
    resources: Mapping[str, float]
    max_count: int


@dataclass(frozen=True)
class Bundle:
    """`count` identical resource requests of one role (driver, Ray Train worker, stage task)."""

    role: str
    resources: Mapping[str, float]
    count: int = 1


@dataclass(frozen=True)
class TrialDemand:
    """What one trial asks of the cluster.

    Attributes:
        driver, workers: the trial actor and its Ray Train worker group.
        stage_task: the GPU stage task (None: the driver builds those stages itself).
        strategy: the worker group's placement strategy.
    """

    driver: Bundle
    workers: Bundle
    stage_task: Bundle | None
    strategy: str = "PACK"

    @property
    def bundles(self) -> list[Bundle]:
        return [self.driver, self.workers, *([self.stage_task] if self.stage_task else [])]

    def peak(self) -> dict[str, float]:
        """Resources the trial holds at once: the driver plus its workers or its stage task."""
        total = dict(self.driver.resources)
        busy = _times(self.workers.resources, self.workers.count)
        if self.stage_task is not None:
            task = self.stage_task.resources
            busy = {k: max(busy.get(k, 0.0), task.get(k, 0.0)) for k in {*busy, *task}}
        for key, amount in busy.items():
            total[key] = total.get(key, 0.0) + amount
        return total

    def describe(self) -> str:
        """e.g. "driver {CPU: 1} + 8 workers x {CPU: 8, GPU: 1} + stage task {CPU: 8, GPU: 1}"."""
        text = f"driver {fmt(self.driver.resources)} + {self.workers.count} workers x "
        text += fmt(self.workers.resources)
        if self.stage_task is not None:
            text += f" + stage task {fmt(self.stage_task.resources)}"
        return text


class PlacementError(RuntimeError):
    """A Ray Train worker group that was not placed within resources.placement_timeout_s."""


def fmt(resources: Mapping[str, float]) -> str:
    """Resources as "{CPU: 8, GPU: 1}" (zeros left out)."""
    items = [f"{key}: {value:g}" for key, value in sorted(resources.items()) if value]
    return "{" + ", ".join(items) + "}"


def gpu_first(resources: Mapping[str, float]) -> list[tuple[str, float]]:
    """Resources in the order errors name them: GPU (the scarce one) first, then by name."""
    return sorted(resources.items(), key=lambda item: (item[0] != "GPU", item[0]))


def _times(resources: Mapping[str, float], count: int) -> dict[str, float]:
    return {key: value * count for key, value in resources.items()}


def trial_demand(res: ResourcesSection) -> TrialDemand:
    """The demand of one trial of a sweep with these resources."""
    driver = {"CPU": res.driver_cpus, "GPU": res.driver_gpus}
    worker = {"CPU": res.cpus_per_worker, "GPU": 1.0 if res.use_gpu else 0.0}
    worker.update(res.worker_resources)
    task = None
    if res.use_gpu and not res.driver_gpus:
        task = Bundle("GPU stage task", {"CPU": res.cpus_per_worker, "GPU": 1.0})
    return TrialDemand(
        Bundle("trial driver", _positive(driver)),
        Bundle("Ray Train worker", _positive(worker), res.num_workers),
        task,
        res.placement_strategy,
    )


def _positive(resources: Mapping[str, float]) -> dict[str, float]:
    return {key: float(value) for key, value in resources.items() if value > 0}


def per_node(bundle: Bundle, node: NodeType) -> int:
    """How many of `bundle`'s requests one node of this type holds."""
    counts = [
        math.floor(node.resources.get(key, 0.0) / amount + 1e-9)
        for key, amount in bundle.resources.items()
    ]
    return min(counts) if counts else UNLIMITED


def largest(nodes: Iterable[NodeType]) -> NodeType:
    """The node type with the most GPUs, then CPUs."""
    return max(nodes, key=lambda n: (n.resources.get("GPU", 0.0), n.resources.get("CPU", 0.0)))


def worker_groups(demand: TrialDemand, nodes: list[NodeType]) -> int:
    """How many whole worker groups the cluster can place at once at its maximum size."""
    bundle = demand.workers
    fitting = [n for n in nodes if per_node(bundle, n) > 0]
    if demand.strategy == "STRICT_PACK":
        return sum(n.max_count * (per_node(bundle, n) // bundle.count) for n in fitting)
    if demand.strategy == "STRICT_SPREAD" and sum(n.max_count for n in fitting) < bundle.count:
        return 0
    slots = sum(n.max_count * min(per_node(bundle, n), UNLIMITED) for n in fitting)
    return slots // bundle.count


def _bundle_error(bundle: Bundle, nodes: list[NodeType], big: NodeType) -> str | None:
    """Why no node type can hold one request of `bundle`; None when one can."""
    if any(per_node(bundle, n) > 0 for n in nodes):
        return None
    for key, amount in gpu_first(bundle.resources):
        most = max(n.resources.get(key, 0.0) for n in nodes)
        if most < amount:
            return (
                f"resources: a {bundle.role} needs {key}: {amount:g} ({fmt(bundle.resources)}) "
                f"but no node type has more than {key}: {most:g}; largest node: {big.name} "
                f"{fmt(big.resources)}"
            )
    return (
        f"resources: no node type holds a whole {bundle.role} {fmt(bundle.resources)}; "
        f"largest node: {big.name} {fmt(big.resources)}"
    )


def fit_error(demand: TrialDemand, nodes: list[NodeType]) -> str | None:
    """Why no cluster of these node types can ever run the trial, in one line; None if it can."""
    if not nodes:
        return "resources: the cluster has no node types"
    big = largest(nodes)
    for bundle in demand.bundles:
        error = _bundle_error(bundle, nodes, big)
        if error is not None:
            return error
    if worker_groups(demand, nodes) >= 1:
        return None
    workers = demand.workers
    total = _times(workers.resources, workers.count)
    group = f"{workers.count} workers x {fmt(workers.resources)}, {demand.strategy}"
    for key, amount in gpu_first(total):
        most = max(n.resources.get(key, 0.0) for n in nodes)
        if demand.strategy == "STRICT_PACK" and most < amount:
            return (
                f"resources: a Ray Train worker group ({group}) needs {key}: {amount:g} on one "
                f"node but no node type has more than {key}: {most:g}; largest node: {big.name} "
                f"{fmt(big.resources)}"
            )
    return (
        f"resources: a Ray Train worker group ({group}) needs {fmt(total)} but the cluster "
        f"cannot place it even at its largest; largest node: {big.name} {fmt(big.resources)} "
        f"(up to {big.max_count})"
    )


def check_fit(demand: TrialDemand, nodes: list[NodeType]) -> None:
    """Raise the one-line `fit_error` as a ConfigError."""
    error = fit_error(demand, nodes)
    if error is not None:
        raise ConfigError(error)


def max_concurrent(demand: TrialDemand, nodes: list[NodeType], cap: int | None) -> int:
    """Trials that fit side by side at the cluster's maximum size, capped by `cap` (at least 1)."""
    total: dict[str, float] = {}
    for node in nodes:
        for key, amount in node.resources.items():
            total[key] = total.get(key, 0.0) + amount * node.max_count
    fit = min(
        (math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in demand.peak().items() if v > 0),
        default=UNLIMITED,
    )
    fit = max(1, min(fit, worker_groups(demand, nodes)))
    return min(fit, cap) if cap else fit


# ---- node types from cluster files ------------------------------------------------------------


def node_types_from_launcher(config: Mapping[str, Any]) -> list[NodeType]:
    """The node types of a Ray cluster launcher config (head included, as one node)."""
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", UNLIMITED))
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = _inferred(name, spec.get("node_config") or {})
        resources.update({k: float(v) for k, v in (spec.get("resources") or {}).items()})
        count = min(int(spec.get("max_workers", 0)), cap) + (1 if name == head else 0)
        types.append(NodeType(str(name), resources, count))
    return types


def _inferred(name: str, node_config: Mapping[str, Any]) -> dict[str, float]:
    """CPU / GPU of a known AWS instance type (what the launcher fills in when not written)."""
    instance = node_config.get("InstanceType")
    if instance is None:
        return {}
    if instance not in AWS_INSTANCE_TYPES:
        raise ConfigError(
            f"node type {name}: instance type {instance!r} has no known resources; "
            "write them under `resources`"
        )
    cpus, gpus = AWS_INSTANCE_TYPES[instance]
    return {"CPU": float(cpus), "GPU": float(gpus)} if gpus else {"CPU": float(cpus)}


def _quantity(text: str | float) -> float:
    """A Kubernetes quantity ("4", "500m", "2k") as a number, rounded up as Ray's autoscaler does."""
    value = str(text)
    scale = {"m": 1e-3, "k": 1e3}.get(value[-1], 1.0)
    number = float(value[:-1]) if value[-1] in "mk" else float(value)
    return float(math.ceil(number * scale))


def _kuberay_group(name: str, group: Mapping[str, Any], count: int) -> NodeType:
    """One KubeRay group: its Ray container's limits, overridden by rayStartParams."""
    container = group["template"]["spec"]["containers"][0]
    limits = {
        **(container.get("resources") or {}).get("requests", {}),
        **(container.get("resources") or {}).get("limits", {}),
    }
    params = group.get("rayStartParams") or {}
    resources: dict[str, float] = {}
    if "cpu" in limits:
        resources["CPU"] = _quantity(limits["cpu"])
    for key, value in limits.items():
        if key.endswith(f"/{GPU_LIMIT_SUFFIX}") and _quantity(value) > 0:
            resources["GPU"] = _quantity(value)
    if "num-cpus" in params:
        resources["CPU"] = float(params["num-cpus"])
    if "num-gpus" in params:
        resources["GPU"] = float(params["num-gpus"])
    custom = params.get("resources")
    if custom:
        resources.update(json.loads(str(custom).strip("'\"").replace('\\"', '"')))
    resources.update({k: _quantity(v) for k, v in (group.get("resources") or {}).items()})
    return NodeType(name, resources, count)


def node_types_from_kuberay(doc: Mapping[str, Any]) -> list[NodeType]:
    """The node types of a KubeRay RayJob (spec.rayClusterSpec) or RayCluster (spec)."""
    spec = doc["spec"]["rayClusterSpec"] if doc.get("kind") == "RayJob" else doc["spec"]
    types = [_kuberay_group("headgroup", spec["headGroupSpec"], 1)]
    for group in spec.get("workerGroupSpecs") or []:
        count = int(group.get("maxReplicas", 0)) * int(group.get("numOfHosts", 1))
        types.append(_kuberay_group(str(group["groupName"]), group, count))
    return types


def node_types_from_file(path: str | os.PathLike[str]) -> list[NodeType]:
    """Node types of a launcher YAML or a KubeRay RayJob / RayCluster file.

    Raises:
        ConfigError: a missing file or one that is neither, in one line.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--cluster: {file} does not exist")
    doc = yaml.safe_load(file.read_text())
    if isinstance(doc, dict) and doc.get("kind") in KUBERAY_KINDS:
        return node_types_from_kuberay(doc)
    if isinstance(doc, dict) and "available_node_types" in doc:
        return node_types_from_launcher(doc)
    raise ConfigError(
        f"--cluster: {file} is neither a Ray cluster launcher file (available_node_types) "
        f"nor a KubeRay {' / '.join(KUBERAY_KINDS)}"
    )


# ---- node types of a running cluster ------------------------------------------------------------


def node_types_from_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[NodeType]:
    """Each alive node of `ray.nodes()` as a node type of one (a cluster that does not grow)."""
    types = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = {
            key: float(value)
            for key, value in (node.get("Resources") or {}).items()
            if key not in IGNORED_RESOURCES and not key.startswith("node:")
        }
        types.append(NodeType(f"node {node.get('NodeManagerAddress', '?')}", resources, 1))
    return types


def autoscaler_node_types() -> list[NodeType] | None:
    """The running cluster's autoscaler node types: what Ray publishes in GCS (autoscaler v2),
    else the head's `ray up` bootstrap config; None when neither is there."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: any failure means "not published"
        config = None
    if config is not None and config.node_group_configs:
        return [
            NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, _count(g.max_count))
            for g in config.node_group_configs
        ]
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if bootstrap.is_file():
        return node_types_from_launcher(yaml.safe_load(bootstrap.read_text()))
    return None


def _count(max_count: int) -> int:
    return UNLIMITED if max_count < 0 else int(max_count)


NODES_ONLY_HINT = (
    " (node types: this cluster's nodes, as no autoscaler publishes its own; for an "
    "autoscaling cluster pass --cluster FILE)"
)


def running_node_types(cluster_file: str | None = None) -> tuple[list[NodeType], str]:
    """Node types of the connected Ray: `cluster_file`'s, else the autoscaler's, else its
    nodes; and the hint a refusal adds (non-empty only in the last case)."""
    import ray

    if cluster_file is not None:
        return node_types_from_file(cluster_file), ""
    types = autoscaler_node_types()
    if types:
        return types, ""
    return node_types_from_nodes(ray.nodes()), NODES_ONLY_HINT


def plan_lines(res: ResourcesSection, trial_names: list[str], nodes: list[NodeType]) -> list[str]:
    """What `lfm sweep --dry-run --cluster` prints: each trial's demand and where it fits.

    Raises:
        ConfigError: the one-line `fit_error` when the trials can never run there.
    """
    demand = trial_demand(res)
    check_fit(demand, nodes)
    lines = [f"cluster ({len(nodes)} node types):"]
    for node in nodes:
        lines.append(f"  {node.name:<16} {fmt(node.resources):<28} up to {node.max_count}")
        for bundle in demand.bundles:
            held = per_node(bundle, node)
            if held:
                lines.append(f"    holds {min(held, UNLIMITED)} x {bundle.role}")
    concurrent = max_concurrent(demand, nodes, res.max_concurrent_trials)
    lines.append(f"trial demand: {demand.describe()}; peak {fmt(demand.peak())}")
    lines.append(f"fits: yes; {concurrent} trial(s) at once at the cluster's maximum")
    lines += [f"  {name}: {demand.describe()}: fits" for name in trial_names]
    return lines
