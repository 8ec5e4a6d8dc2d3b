"""Flow-matching training on Ray Train: a `TorchTrainer` whose workers run lfm_core's loop.

Each worker calls `lfm_core.train.train_velocity`, which runs DDP through accelerate whenever a
torch.distributed process group exists (Ray Train creates one: gloo on CPU, nccl on GPU). The
loop's `report` callback forwards metrics and checkpoints to `ray.train.report`; a restarted
worker group (FailureConfig) or a new fit with the same run name continues from
`ray.train.get_checkpoint()`. lfm_core itself never sees Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lfm_core.checkpoint import load_velocity
from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig
from orchestrator import cluster_fit
from orchestrator.config import ResourcesSection
from orchestrator.datasets import ShardedLatents, peak_rss_mb
from orchestrator.trainers import (
    DataFn,
    FitResult,
    LossFnFactory,
    Snapshot,
    StartFn,
    make_loss,
    start_model,
)

CHECKPOINTS_KEPT = 2
# In every checkpoint: the (step, loss) reports of the run so far (the loss curve MLflow logs).
LOSSES_FILE = "losses.json"
TRAIN_RUNS_DIR = "ray_train"


@contextlib.contextmanager
def _restored(checkpoint: Any) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield directory


PLACEMENT_DIR = "placement"
# Ray Train V2 reads this in its controller (propagated from the process calling fit()).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _record_placement(config: dict[str, Any], rank: int, started: float) -> None:
    """Where this worker ran, as Ray sees it: <run>/placement/rank-<r>.json on storage."""
    import ray

    from orchestrator.storage import Storage

    record = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "resources": ray.get_runtime_context().get_assigned_resources(),
        "start": started,
        "end": time.time(),
    }
    folder = f"{TRAIN_RUNS_DIR}/{config['run_name']}/{PLACEMENT_DIR}"
    Storage(config["storage_uri"]).write_json(f"{folder}/rank-{rank}.json", record)


def _gpu_flags(tf32: bool) -> None:
    """TF32 matmuls / convolutions on GPUs when asked (bf16 autocast is TrainConfig's)."""
    if tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function: load the data, build the model, run lfm_core's loop."""
    import ray.train

    started_at = time.time()
    torch.set_num_threads(config["threads"])
    _gpu_flags(config.get("tf32", False))
    context = ray.train.get_context()
    latents, labels = config["data_fn"]()
    if isinstance(latents, ShardedLatents):  # each rank reads only its own rows
        latents = latents.for_rank(context.get_world_rank(), context.get_world_size())
    train_cfg: TrainConfig = config["train"]
    model = start_model(config.get("start_fn"), config["velocity"], train_cfg.seed)
    started = time.perf_counter()
    losses: list[list[float]] = []  # (step, loss) so far; each checkpoint carries them

    def report(step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        losses.append([step, metrics["loss"]])
        if checkpoint_dir:
            Path(checkpoint_dir, LOSSES_FILE).write_text(json.dumps(losses))
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        extra = {"elapsed_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
        ray.train.report({**metrics, **extra}, checkpoint=checkpoint)

    with (
        tempfile.TemporaryDirectory() as out_dir,
        _restored(ray.train.get_checkpoint()) as resume_dir,
    ):
        losses.extend(_losses(resume_dir))
        train_velocity(
            model,
            latents,
            train_cfg,
            labels=labels,
            out_dir=out_dir,
            resume_from=resume_dir,
            report=report,
            loss_fn=make_loss(config.get("loss_fn")),
            progress=context.get_world_rank() == 0,
            compile_model=config.get("compile", False),
        )
    if config.get("storage_uri"):
        _record_placement(config, context.get_world_rank(), started_at)


def fit_velocity(
    data_fn: DataFn,
    velocity: VelocityConfig,
    train: TrainConfig,
    resources: ResourcesSection,
    storage_uri: str,
    run_name: str,
    snapshot_every: int | None = None,
    *,
    start_fn: StartFn | None = None,
    loss_fn: LossFnFactory | None = None,
) -> FitResult:
    """Train one velocity model with a Ray Train TorchTrainer and return its EMA weights.

    Args:
        data_fn: returns (latents (N, C, H, W), labels (N,) or None) on each worker.
        velocity: the network to build (seeded with train.seed, identical on every rank).
        train: the optimisation settings; train.batch_size is the global batch.
        resources: workers, CPUs / GPU per worker, failure budget, checkpoint period.
        storage_uri: the storage root; runs live under <storage>/ray_train/<run_name>.
        run_name: the run's name; a fit with the same name continues the same run.
        snapshot_every: keep every checkpoint, one each this many steps, and return their EMA
            weights as snapshots (None: keep the last CHECKPOINTS_KEPT, return none).
        start_fn, loss_fn: the network to start from and the loss, made on each worker
            (None: `velocity` from train.seed, flow matching); see `trainers.FitJob`.

    Raises:
        RuntimeError: the run ended without a checkpoint.
    """
    if snapshot_every:
        train = replace(train, checkpoint_every=snapshot_every)
    elif resources.checkpoint_every:
        train = replace(train, checkpoint_every=resources.checkpoint_every)
    loop_config = {
        "data_fn": data_fn,
        "velocity": velocity,
        "train": train,
        "threads": resources.torch_threads or max(1, math.floor(resources.cpus_per_worker)),
        "tf32": resources.tf32,
        "compile": resources.compile,
        "run_name": run_name,
        "storage_uri": storage_uri,
        "start_fn": start_fn,
        "loss_fn": loss_fn,
    }
    os.environ[START_TIMEOUT_ENV] = str(resources.placement_timeout_s)
    trainer = _torch_trainer(loop_config, resources, storage_uri, run_name, snapshot_every)
    return _fit_result(_fit(trainer, resources, run_name), run_name, snapshot_every)


def _fit(trainer: Any, resources: ResourcesSection, run_name: str) -> Any:
    """`trainer.fit()`; a worker group that could not be placed is one PlacementError line."""
    from ray.train.v2._internal.exceptions import (
        InsufficientClusterResourcesError,
        WorkerGroupStartupTimeoutError,
    )
    from ray.train.v2.api.exceptions import ControllerError

    try:
        return trainer.fit()
    except ControllerError as err:
        cause = err.controller_failure
        if not isinstance(
            cause, WorkerGroupStartupTimeoutError | InsufficientClusterResourcesError
        ):
            raise
        demand = cluster_fit.trial_demand(resources).workers
        raise cluster_fit.PlacementError(
            f"resources: Ray Train run {run_name}: {demand.count} workers x "
            f"{cluster_fit.fmt(demand.resources)} ({resources.placement_strategy}) were not "
            f"placed within resources.placement_timeout_s={resources.placement_timeout_s:g} s "
            f"({type(cause).__name__}); the cluster has {_cluster_total()}"
        ) from None


def _cluster_total() -> str:
    import ray

    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return cluster_fit.fmt(total)


def _torch_trainer(
    loop_config: dict[str, Any],
    resources: ResourcesSection,
    storage_uri: str,
    run_name: str,
    snapshot_every: int | None,
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import FailureConfig  # ray.train's under Train V2

    per_worker = dict(cluster_fit.trial_demand(resources).workers.resources)
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=resources.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=f"{storage_uri}/{TRAIN_RUNS_DIR}",
            # A worker group that cannot be placed within placement_timeout_s fails the run
            # (Ray's default retries its start forever: controller_failure_limit=-1).
            failure_config=FailureConfig(
                max_failures=resources.max_failures, controller_failure_limit=0
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=None if snapshot_every else CHECKPOINTS_KEPT
            ),
        ),
    )


def _losses(directory: str | None) -> list[list[float]]:
    """The (step, loss) list a checkpoint folder carries (none: [])."""
    path = Path(directory, LOSSES_FILE) if directory else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else []


def _fit_result(result: Any, run_name: str, snapshot_every: int | None) -> FitResult:
    """The EMA weights of the run's last checkpoint (and of every kept one, as snapshots)."""
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        ema = load_velocity(Path(directory), name="ema")
        losses = [(int(step), float(loss)) for step, loss in _losses(directory)]
    snapshots = []
    for checkpoint, metrics in (result.best_checkpoints or []) if snapshot_every else []:
        with checkpoint.as_directory() as directory:
            snapshot = load_velocity(Path(directory), name="ema")
        snapshots.append(Snapshot(int(metrics["step"]), float(metrics["elapsed_s"]), snapshot))
    snapshots.sort(key=lambda s: s.step)
    return FitResult(
        ema=ema, metrics=dict(result.metrics or {}), snapshots=snapshots, losses=losses
    )
