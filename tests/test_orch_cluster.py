"""A multi-node rehearsal on this machine, and what happens when a trial cannot be placed.

1. Two Ray nodes on 127.0.0.1 (`ray start --head` and `ray start --address`), 2 CPUs each and
   a custom resource that tells them apart (node_a, node_b); storage on a moto S3 server;
   tracking on an MLflow server. `ray job submit ... -- lfm sweep sweeps/tiny.yaml` runs two
   trials at once, each training with two DDP workers placed STRICT_SPREAD (one per node).
   From Ray's own records: each worker's node id (`ray.get_runtime_context()`, written by the
   worker next to its Ray Train run) maps, through the State API's node list, to both nodes;
   the two trials' MLflow child runs overlap in time; the bucket holds every stage the trials
   need; the cache's build records hold each stage once. It is part of `make test`; the two
   below are integration tests.
2. A Ray Train worker group that can never be placed (use_gpu on a CPU-only Ray, the fit check
   bypassed) fails after `resources.placement_timeout_s` with one line, instead of retrying
   forever (Ray 2.60's default).
3. A GPU stage of a GPU-free driver is built by a Ray task holding a GPU (a declared one here),
   a CPU stage by the driver itself (the build records' pids).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, free_port, stop_services, tiny_overrides, wait_for_http
from mlflow import MlflowClient

from orchestrator import cluster_fit
from orchestrator.config import ResourcesSection, load_sweep
from orchestrator.ray_train import PLACEMENT_DIR, TRAIN_RUNS_DIR
from orchestrator.storage import Storage
from orchestrator.sweep import cache_for

TINY = REPO / "sweeps" / "tiny.yaml"
NODE_CPUS = 2
NODES = {"node_a": True, "node_b": False}  # custom resource -> is the head
JOB_TIMEOUT_S = 480
NODE_WAIT_S = 60
REHEARSAL = [
    "name=rehearsal",
    "search.data_reduction.data_fraction=[1.0]",
    "search.data_reduction.criterion=[random]",
    "search.data_reduction.seed=[0,1]",  # two trials, each its own model
    "resources.num_workers=2",
    "resources.cpus_per_worker=0.5",
    "resources.driver_cpus=0.5",
    "resources.placement_strategy=STRICT_SPREAD",
    "resources.max_concurrent_trials=2",
]


def _ray_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_AUTH_MODE": "disabled",  # the same for both nodes, the CLI and the job driver
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    flags = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
    flags += ["--dashboard-agent-listen-port", "--runtime-env-agent-port"]
    return [item for flag in flags for item in (flag, str(free_port()))]


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _alive_nodes(url: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n.__dict__ for n in list_nodes(address=url) if n.state == "ALIVE"]


@pytest.fixture
def two_nodes(tmp_path: Path, s3_server: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A head (node_a) and a second node (node_b) on 127.0.0.1, started after the S3 server so
    both inherit its endpoint; yields (dashboard URL, environment)."""
    env = _ray_env()
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="lfmray-", dir="/tmp")  # socket paths < 108 bytes
    node_b_dir = tempfile.mkdtemp(prefix="lfmrayb-", dir="/tmp")
    base = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus", str(NODE_CPUS)]
    base += ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = base + ["--head", "--port", str(gcs), "--dashboard-port", str(dashboard)]
    head += ["--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir]
    head += ["--ray-client-server-port", str(free_port()), "--resources", '{"node_a": 1}']
    # A temp dir of its own: a node's runtime-env agent deletes the job's unpacked working
    # dir (the sweep driver's cwd) from its temp dir once no worker of its own uses it.
    second = base + ["--address", f"127.0.0.1:{gcs}", "--resources", '{"node_b": 1}']
    second += ["--temp-dir", node_b_dir]
    # Both start at once: the second node retries the head's GCS until it answers.
    processes = [_start(head + _node_ports(), env, tmp_path / "head.log")]
    processes.append(_start(second + _node_ports(), env, tmp_path / "node_b.log"))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{url}/api/version", processes[0])
        deadline = time.monotonic() + NODE_WAIT_S
        while len(_alive_nodes(url)) < len(NODES):
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        yield url, env
    finally:
        stop_services(*processes)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(node_b_dir, ignore_errors=True)


def _placements(storage: Storage) -> dict[str, list[dict]]:
    """Ray Train run name -> the placement record of each of its workers."""
    runs = {}
    for run in storage.list(TRAIN_RUNS_DIR):
        folder = f"{TRAIN_RUNS_DIR}/{run}/{PLACEMENT_DIR}"
        records = [storage.read_json(f"{folder}/{name}") for name in storage.list(folder)]
        if records:
            runs[run] = records
    return runs


def test_two_node_rehearsal(
    two_nodes: tuple[str, dict[str, str]],
    s3_server: str,
    mlflow_server: str,
    tiny_dinov2: Path,
    tmp_path: Path,
) -> None:
    url, env = two_nodes
    storage_uri = f"{s3_server}/rehearsal"
    overrides = tiny_overrides(Path("/unused"), tiny_dinov2, mlflow_server)
    overrides = [o for o in overrides if not o.startswith("storage=")]
    overrides += [f"storage={storage_uri}", *REHEARSAL]
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO)]
    submit += ["--", "lfm", "sweep", "sweeps/tiny.yaml", *overrides]
    started = time.monotonic()
    result = subprocess.run(
        submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    (tmp_path / "job.log").write_text(output)
    assert result.returncode == 0, output[-4000:]
    print(f"rehearsal sweep: {time.monotonic() - started:.0f} s")

    # Both nodes ran training workers: every run's workers sat on node_a's and node_b's node.
    resource_of = {
        node["node_id"]: next(name for name in NODES if name in node["resources_total"])
        for node in _alive_nodes(url)
    }
    storage = Storage(storage_uri)
    runs = _placements(storage)
    assert len(runs) == 2, runs
    for records in runs.values():
        assert sorted(resource_of[r["node_id"]] for r in records) == sorted(NODES)
    # The two trials were in flight at once (their MLflow child runs overlap in time).
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("rehearsal")
    children = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in run.data.tags
    ]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time
    # The bucket holds every stage of both trials, each built once.
    cfg = load_sweep(TINY, overrides)
    cache = cache_for(cfg)
    from orchestrator.stages import StageGraph
    from orchestrator.trials import expand_trials

    graph = StageGraph(cfg, cache)
    refs = {ref.key: ref for trial in expand_trials(cfg) for ref in graph.stages_of(trial)}
    assert all(cache.is_complete(ref) for ref in refs.values())
    builds = Counter((r["stage"], r["key"]) for r in cache.records())
    assert {key for _, key in builds} == set(refs)
    assert max(builds.values()) == 1, builds


@pytest.mark.integration
def test_gpu_stages_of_a_gpu_free_driver_run_as_gpu_tasks(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    import ray

    from orchestrator.stages import StageGraph
    from orchestrator.trainers import InProcessTrainer
    from orchestrator.trials import expand_trials

    overrides = tiny_overrides(tmp_path, tiny_dinov2, f"sqlite:///{tmp_path}/mlflow.db")
    small = ["data.limit=64", "data.heldout_limit=32", "resources.use_gpu=true"]
    cfg = load_sweep(TINY, [*overrides, *small])
    # A declared GPU: Ray schedules the task on it (torch finds no CUDA and runs on the CPU).
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer())
        refs = graph.trial(expand_trials(cfg)[0])
        graph.get(refs.subset.upstream["latents"])
        pids = {r["stage"]: r["pid"] for r in graph.cache.records()}
    finally:
        ray.shutdown()
    assert pids["autoencoder"] == os.getpid()  # a CPU stage: built by the driver itself
    assert pids["latents"] != os.getpid()  # a GPU stage: built by the GPU task


@pytest.mark.integration
def test_a_worker_group_that_cannot_be_placed_fails_in_one_line(
    ray_local: None, tmp_path: Path
) -> None:
    import torch

    from lfm_core.train import TrainConfig
    from lfm_core.velocity import VelocityConfig
    from orchestrator.ray_train import fit_velocity

    def data() -> tuple[torch.Tensor, None]:
        return torch.randn(8, 4, 8, 8), None

    velocity = VelocityConfig(name="unet-xs", in_channels=4, sample_size=8, width=8)
    resources = ResourcesSection(use_gpu=True, placement_timeout_s=5)
    started = time.monotonic()
    with pytest.raises(cluster_fit.PlacementError) as info:
        fit_velocity(
            data, velocity, TrainConfig(steps=2, batch_size=4), resources, str(tmp_path), "x"
        )
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "resources: Ray Train run x: 1 workers x {CPU: 1, GPU: 1} (PACK) were not placed within "
        "resources.placement_timeout_s=5 s (WorkerGroupStartupTimeoutError)"
    )
