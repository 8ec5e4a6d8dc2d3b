"""Training throughput: the Ray Train worker loop against a bare PyTorch loop, in one run.

Both run lfm_core.train.train_velocity on the same model, data (the embedded latents: the
latents stage of the benchmarks' stage graph), batch and thread count: the bare loop in this process, the Ray path through
orchestrator.ray_train.fit_velocity (a TorchTrainer with one worker holding the same cores, its
report callback forwarding metrics and the final checkpoint to Ray). The steady-state rate of
each comes from two runs of different lengths, short then long, interleaved bare / Ray:
rate = (long - short) steps / (time(long) - time(short)), so fixed costs (worker start-up,
accelerate set-up, the first slow steps, the final checkpoint) cancel. The time of a Ray run is
the worker's own `elapsed_s`; Ray's start-up (`ray.init`) and each fit's fixed overhead (fit
wall-clock minus the worker's elapsed time) are reported apart.

    python -m benchmarks.train_throughput [--tiny] [--dry-run] [model.width=128] [long_steps=250]
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from benchmarks.common import (
    RESULTS_DIR,
    TINY_STAGES,
    Clock,
    Embedded,
    Stages,
    benchmark_main,
    fmt,
    goal,
    median,
    record_result,
    usable_cores,
)
from lfm_core.errors import ConfigError, check_range
from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig
from orchestrator.config import ModelSection, ResourcesSection
from orchestrator.ray_train import fit_velocity
from orchestrator.sweep import LOCAL_RAY_ENV
from orchestrator.trainers import seeded_velocity

NAME = "train_throughput"


@dataclass(frozen=True)
class ThroughputConfig:
    """What the throughput benchmark trains.

    Attributes:
        out: results folder (`train_throughput.json` goes there).
        stages: the embedded data (its latents stage is the training data).
        model: the velocity network.
        train: training settings (its steps are replaced by short_steps / long_steps; Ray
            reports every log_every steps).
        short_steps, long_steps: the two run lengths whose difference gives the rate.
        repeats: how many (short, long) pairs of each path (medians kept).
        threads: torch threads of the bare loop and of the Ray worker (its CPUs).
        min_ratio: the goal for Ray / bare steady-state steps per second.
        progress: show progress bars.
    """

    out: str = str(RESULTS_DIR)
    stages: Stages = field(default_factory=Stages)
    model: ModelSection = ModelSection(name="dit-xs", width=128)
    train: TrainConfig = TrainConfig(batch_size=128, log_every=50)
    short_steps: int = 50
    long_steps: int = 250
    repeats: int = 1
    threads: int = field(default_factory=usable_cores)
    min_ratio: float = 0.9
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("short_steps", "repeats", "threads"):
            check_range(key, getattr(self, key), 1, math.inf)
        if self.long_steps <= self.short_steps:
            raise ConfigError(
                f"long_steps: {self.long_steps} must exceed short_steps={self.short_steps}"
            )


TINY = ThroughputConfig(
    stages=TINY_STAGES,
    model=ModelSection(name="dit-xs", width=16),
    train=TrainConfig(batch_size=16, log_every=2),
    short_steps=2,
    long_steps=4,
    threads=1,
    progress=False,
)


def load_latents(path: str) -> tuple[Tensor, None]:
    """The training data of a Ray worker: (latents (N, C, H, W), no labels) from a file."""
    return load_file(path)["latents"], None


def _bare(latents: Tensor, velocity: VelocityConfig, train: TrainConfig, progress: bool) -> float:
    """Seconds of lfm_core's loop alone (no checkpoints, no reports)."""
    model = seeded_velocity(velocity, train.seed)
    return train_velocity(model, latents, train, progress=progress).seconds


def _ray(
    latents_file: str,
    velocity: VelocityConfig,
    train: TrainConfig,
    cfg: ThroughputConfig,
    storage: str,
) -> dict[str, float]:
    """One fit through the orchestrator: the worker's elapsed seconds and the fit's wall-clock."""
    resources = ResourcesSection(num_workers=1, cpus_per_worker=cfg.threads, max_failures=0)
    started = time.perf_counter()
    result = fit_velocity(
        functools.partial(load_latents, latents_file),
        velocity,
        train,
        resources,
        storage,
        run_name=f"throughput-{train.steps}-{uuid.uuid4().hex[:8]}",
    )
    wall = time.perf_counter() - started
    return {"elapsed_s": float(result.metrics["elapsed_s"]), "wall_s": wall}


def _rate(short: float, long: float, cfg: ThroughputConfig) -> float:
    """Steady-state steps per second from the times of the short and the long run."""
    return (cfg.long_steps - cfg.short_steps) / (long - short) if long > short else math.nan


def _measure(
    latents_file: str, latents: Tensor, velocity: VelocityConfig, cfg: ThroughputConfig
) -> tuple[dict[int, list[float]], dict[int, list[dict[str, float]]]]:
    """Seconds of each bare run and {elapsed_s, wall_s} of each Ray run, per run length,
    interleaved bare / Ray, short then long, `repeats` times."""
    bare: dict[int, list[float]] = {cfg.short_steps: [], cfg.long_steps: []}
    ray_runs: dict[int, list[dict[str, float]]] = {cfg.short_steps: [], cfg.long_steps: []}
    with tempfile.TemporaryDirectory(prefix="lfm-throughput-") as storage:
        for _ in range(cfg.repeats):
            for steps in (cfg.short_steps, cfg.long_steps):
                train = replace(cfg.train, steps=steps)
                bare[steps].append(_bare(latents, velocity, train, cfg.progress))
                ray_runs[steps].append(_ray(latents_file, velocity, train, cfg, storage))
    return bare, ray_runs


def run(cfg: ThroughputConfig) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `<out>/train_throughput.json`."""
    import ray

    torch.set_num_threads(cfg.threads)
    clock = Clock.start()
    embedded = Embedded(cfg.stages, {"train": cfg.train}, progress=cfg.progress)
    c, h, _ = embedded.latent_shape
    velocity = VelocityConfig(
        name=cfg.model.name, in_channels=c, sample_size=h, width=cfg.model.width
    )
    own_ray = not ray.is_initialized()
    ray_init_s = None
    if own_ray:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        init_started = time.perf_counter()
        ray.init(num_cpus=cfg.threads, include_dashboard=False, log_to_driver=cfg.progress)
        ray_init_s = time.perf_counter() - init_started
    try:
        bare, ray_runs = _measure(str(embedded.latents_file), embedded.latents, velocity, cfg)
    finally:
        if own_ray:
            ray.shutdown()
    ray_elapsed = {s: [r["elapsed_s"] for r in runs] for s, runs in ray_runs.items()}
    bare_rate = _rate(median(bare[cfg.short_steps]), median(bare[cfg.long_steps]), cfg)
    ray_rate = _rate(median(ray_elapsed[cfg.short_steps]), median(ray_elapsed[cfg.long_steps]), cfg)
    ratio = ray_rate / bare_rate
    overheads = [r["wall_s"] - r["elapsed_s"] for runs in ray_runs.values() for r in runs]
    long_wall = median([r["wall_s"] for r in ray_runs[cfg.long_steps]])
    body = {
        "velocity": velocity.to_dict(),
        "bare_seconds": {str(s): v for s, v in bare.items()},
        "ray_runs": {str(s): v for s, v in ray_runs.items()},
        "bare_steps_per_s": bare_rate,
        "ray_steps_per_s": ray_rate,
        "ratio": ratio,
        "ray_init_s": ray_init_s,
        "ray_fit_overhead_s": median(overheads),
        "end_to_end": {
            "bare_long_steps_per_s": cfg.long_steps / median(bare[cfg.long_steps]),
            "ray_long_steps_per_s_incl_fit_overhead": cfg.long_steps / long_wall,
        },
        "summary": {"ray_train_throughput_ratio": ratio},
    }
    goals = {"ratio": goal(ratio, cfg.min_ratio, higher_is_better=True)}
    return record_result(NAME, cfg, clock, body, goals)


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown for summary.md."""
    cfg = result["config"]
    init = result["ray_init_s"]
    return "\n".join(
        [
            f"## Training throughput ({cfg['model']['name']} width {cfg['model']['width']}, "
            f"batch {cfg['train']['batch_size']}, {cfg['threads']} threads)",
            "",
            "| path | steady-state steps/s |",
            "|---|---|",
            f"| bare lfm_core loop | {fmt(result['bare_steps_per_s'], '.2f')} |",
            f"| Ray Train worker (1 worker) | {fmt(result['ray_steps_per_s'], '.2f')} |",
            "",
            f"Ratio Ray / bare: {fmt(result['ratio'], '.3f')} (goal >= {result['goals']['ratio']['goal']}). "
            f"Ray start-up (ray.init): {fmt(init, '.1f')} s; fixed cost per "
            f"fit (worker group start, data load, teardown): {result['ray_fit_overhead_s']:.1f} s.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    benchmark_main(ThroughputConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
