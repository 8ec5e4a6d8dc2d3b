"""Trainers: who runs lfm_core's flow-matching loop for the fm_model stage.

One small interface, `Trainer.fit`, with two implementations: `RayTrainer` (a Ray Train
TorchTrainer worker group, DDP; what sweeps use) and `InProcessTrainer` (the same loop in this
process with one worker; for unit tests, benchmarks and notebooks). Both build the network
from its seed alone and run `lfm_core.train.train_velocity` on the same data, so one worker
of either gives the same model.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from lfm_core.checkpoint import load_velocity
from lfm_core.errors import ConfigError
from lfm_core.paths import fm_loss
from lfm_core.train import LatentSource, LossFn, TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig, VelocityModel, build_velocity
from orchestrator.config import ResourcesSection

# (latents (N, C, H, W) or a LatentSource, labels (N,) or None): called on each worker, so it
# must be picklable; a source with `for_rank(rank, world)` (ShardedLatents) is cut per rank.
DataFn = Callable[[], tuple[Tensor | LatentSource, Tensor | None]]
# The weights a fit starts from, and its loss, made on each worker (picklable, like DataFn).
StartFn = Callable[[], VelocityModel]
LossFnFactory = Callable[[], LossFn]


@dataclass(frozen=True)
class Snapshot:
    """The EMA weights of a model part-way through training, and the training time to them."""

    step: int
    seconds: float
    ema: VelocityModel


@dataclass(frozen=True)
class FitResult:
    """A trained model (the EMA weights) and what the workers last reported.

    Attributes:
        ema: the EMA velocity model, on the CPU, in eval mode.
        metrics: the last report of rank 0: loss, step, world_size, elapsed_s (training time).
        snapshots: the EMA weights every `snapshot_every` steps (the last is `ema`), when asked.
        losses: (step, loss) every `log_every` steps, the mean over ranks.
    """

    ema: VelocityModel
    metrics: dict[str, float]
    snapshots: list[Snapshot] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class FitJob:
    """One model to train.

    Attributes:
        data_fn: returns (latents (N, C, H, W), labels (N,) or None) on each worker.
        velocity: the network, built from train.seed alone (identical on every rank).
        train: the optimisation settings; train.batch_size is the global batch.
        num_workers: data-parallel workers (each draws its own batches: part of the model's key).
        run_name: names the run; a rerun with the same name may resume it.
        snapshot_every: also keep the EMA weights every this many steps (None: none).
        start_fn: returns the network to start from (a fine-tuning run; None: `velocity`
            built from train.seed alone).
        loss_fn: returns the loss, loss(model, x1, x0, t, **cond) (None: flow matching).
    """

    data_fn: DataFn
    velocity: VelocityConfig
    train: TrainConfig
    num_workers: int
    run_name: str
    snapshot_every: int | None = None
    start_fn: StartFn | None = None
    loss_fn: LossFnFactory | None = None


class Trainer(Protocol):
    """Trains one velocity network and returns its EMA weights."""

    def fit(self, job: FitJob) -> FitResult:
        """Train the job's network and return its EMA weights (and snapshots when asked)."""
        ...


def seeded_velocity(config: VelocityConfig, seed: int) -> VelocityModel:
    """Build a velocity network whose initial weights depend on `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_velocity(config)


def start_model(start_fn: StartFn | None, config: VelocityConfig, seed: int) -> VelocityModel:
    """The network a fit trains: `start_fn()`'s, else `config` built from `seed` alone."""
    return start_fn() if start_fn is not None else seeded_velocity(config, seed)


def make_loss(loss_fn: LossFnFactory | None) -> LossFn:
    """The loss a fit trains with: `loss_fn()`'s, else the flow-matching loss."""
    return loss_fn() if loss_fn is not None else fm_loss


@dataclass(frozen=True)
class InProcessTrainer:
    """lfm_core's loop in this process: one worker, no Ray, no checkpoints on disk."""

    progress: bool = False

    def fit(self, job: FitJob) -> FitResult:
        if job.num_workers != 1:
            raise ConfigError(
                f"resources.num_workers: the in-process trainer runs 1 worker, {job.run_name} "
                f"asks for {job.num_workers}; use the Ray trainer or set resources.num_workers=1"
            )
        latents, labels = job.data_fn()
        model = start_model(job.start_fn, job.velocity, job.train.seed)
        snapshot_every = job.snapshot_every
        train = replace(job.train, checkpoint_every=snapshot_every) if snapshot_every else job.train
        times: dict[int, float] = {}
        started = time.perf_counter()

        def report(step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
            if checkpoint_dir is not None:
                times[step] = time.perf_counter() - started

        with tempfile.TemporaryDirectory() as out_dir:
            result = train_velocity(
                model,
                latents,
                train,
                labels=labels,
                out_dir=out_dir if snapshot_every else None,
                report=report,
                loss_fn=make_loss(job.loss_fn),
                progress=self.progress,
            )
            snapshots = [
                Snapshot(
                    step,
                    seconds,
                    load_velocity(Path(out_dir, f"checkpoint-{step:07d}"), name="ema"),
                )
                for step, seconds in sorted(times.items())
            ]
        metrics = {
            "loss": result.losses[-1][1],
            "step": float(result.steps),
            "world_size": float(result.world_size),
            "elapsed_s": result.seconds,
        }
        return FitResult(
            ema=result.ema, metrics=metrics, snapshots=snapshots, losses=list(result.losses)
        )


@dataclass(frozen=True)
class RayTrainer:
    """A Ray Train TorchTrainer per fit (see `orchestrator.ray_train.fit_velocity`).

    Attributes:
        resources: CPUs / GPU per worker, failure budget, checkpoint period.
        storage_uri: the storage root; runs live under <storage>/ray_train/<run_name>.
    """

    resources: ResourcesSection
    storage_uri: str

    def fit(self, job: FitJob) -> FitResult:
        from orchestrator.ray_train import fit_velocity

        resources = replace(self.resources, num_workers=job.num_workers)
        return fit_velocity(
            job.data_fn,
            job.velocity,
            job.train,
            resources,
            self.storage_uri,
            job.run_name,
            job.snapshot_every,
            start_fn=job.start_fn,
            loss_fn=job.loss_fn,
        )
