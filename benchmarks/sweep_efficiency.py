"""Sweep efficiency: a sweep's wall-clock time against the sum of its unique stages' times.

Runs a small sweep (benchmarks/sweep.yaml: trials that share an autoencoder, features, a
reference model and a full-data model) through orchestrator.sweep.run_sweep on a fresh storage
root, then reads the stage cache's build records: one record per build, so a stage key with
two records was built twice. ratio = wall time (Ray start-up included) / sum over unique stage
keys of their build seconds: what the orchestration (Ray, Tune, trial drivers, MLflow) adds on
top of the work itself, or, when trials run side by side, what concurrency saves (< 1). The
same sweep then runs again under a new name on the same storage: every stage must come from
the cache (`rerun_builds` = 0), and its wall time is the pure orchestration cost.

    python -m benchmarks.sweep_efficiency [--tiny] [--dry-run] [overrides=[train.steps=100]]
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, Clock, benchmark_main, fmt, goal, record_result
from lfm_core.errors import check_range
from orchestrator.config import load_sweep
from orchestrator.sweep import cache_for, init_ray, run_sweep

NAME = "sweep_efficiency"
SWEEP_FILE = Path(__file__).resolve().parent / "sweep.yaml"
RERUN_SUFFIX = "-rerun"


@dataclass(frozen=True)
class SweepBenchConfig:
    """Which sweep runs and where.

    Attributes:
        out: results folder (`sweep_efficiency.json` goes there).
        sweep_file: the sweep (YAML).
        overrides: key=value overrides of the sweep file.
        storage: the storage root; None: a fresh temporary folder, deleted afterwards (a reused
            root would serve cached stages and time nothing).
        rerun: run the sweep a second time on the same storage (all stages cached).
        max_ratio: the goal for wall time / unique stage time.
    """

    out: str = str(RESULTS_DIR)
    sweep_file: str = str(SWEEP_FILE)
    overrides: tuple[str, ...] = ()
    storage: str | None = None
    rerun: bool = True
    max_ratio: float = 1.2

    def __post_init__(self) -> None:
        check_range("max_ratio", self.max_ratio, 0.0, math.inf, low_open=True)


# The sweep file at toy size: every stage runs, in seconds of work each.
TINY = SweepBenchConfig(
    overrides=(
        "data.limit=128",
        "data.heldout_limit=64",
        "autoencoder.block_out_channels=[8,16,16]",
        "autoencoder.mid_block_attention=false",
        "autoencoder.epochs=1",
        "model.width=16",
        "reference.width=16",
        "train.steps=4",
        "train.batch_size=16",
        "train.log_every=2",
        "train.warmup_steps=1",
        "scoring.probe_steps=4",
        "scoring.num_noise=1",
        "sampling.steps=2",
        "sampling.num_samples=16",
        "sampling.batch_size=16",
    ),
)


def analyse(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Unique stage time, builds per key and the wall / stage-time ratio from build records."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[(record["stage"], record["key"])].append(record)
    first = {key: min(builds, key=lambda r: r["start"]) for key, builds in by_key.items()}
    unique_s = sum(r["seconds"] for r in first.values())
    per_stage: dict[str, dict[str, float]] = defaultdict(lambda: {"builds": 0, "seconds": 0.0})
    for (stage, _), record in first.items():
        per_stage[stage]["builds"] += 1
        per_stage[stage]["seconds"] += record["seconds"]
    duplicated = sorted(f"{stage}/{key[:12]}" for (stage, key), b in by_key.items() if len(b) > 1)
    return {
        "wall_s": wall_s,
        "unique_stage_s": unique_s,
        "ratio": wall_s / unique_s if unique_s else math.nan,
        "builds": len(records),
        "unique_stages": len(by_key),
        "duplicate_stages": len(duplicated),
        "duplicated": duplicated,
        "per_stage": dict(per_stage),
    }


def run(cfg: SweepBenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `<out>/sweep_efficiency.json`."""
    import ray

    clock = Clock.start()
    storage = cfg.storage or tempfile.mkdtemp(prefix="lfm-sweep-bench-")
    try:
        sweep = load_sweep(cfg.sweep_file, [*cfg.overrides, f"storage={storage}"])
        cache = cache_for(sweep)
        wall_started = time.perf_counter()
        own_ray = init_ray(sweep)
        ray_init_s = time.perf_counter() - wall_started
        try:
            outcome = run_sweep(sweep)
            wall_s = time.perf_counter() - wall_started
            records = cache.records()
            first = analyse(records, wall_s)
            rerun = None
            if cfg.rerun:
                again = load_sweep(
                    cfg.sweep_file,
                    [*cfg.overrides, f"storage={storage}", f"name={sweep.name}{RERUN_SUFFIX}"],
                )
                second = run_sweep(again)
                rerun = {
                    "wall_s": second.seconds,
                    "builds": len(cache.records()) - len(records),
                    "errors": second.errors,
                }
        finally:
            if own_ray:
                ray.shutdown()
    finally:
        if cfg.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
    first["ratio_without_ray_start"] = (wall_s - ray_init_s) / first["unique_stage_s"]
    body = {
        "sweep": {
            "name": sweep.name,
            "trials": len(outcome.metrics) + len(outcome.errors),
            "errors": outcome.errors,
            "max_concurrent_trials": sweep.resources.max_concurrent_trials,
            "resolved": sweep.to_dict(),
        },
        "ray_init_s": ray_init_s,
        **first,
        "rerun": rerun,
        "summary": {
            "sweep_wall_ratio": first["ratio"],
            "duplicate_stages": first["duplicate_stages"],
        },
    }
    goals = {
        "ratio": goal(first["ratio"], cfg.max_ratio, higher_is_better=False),
        "duplicate_stages": goal(first["duplicate_stages"], 0, higher_is_better=False),
    }
    return record_result(NAME, cfg, clock, body, goals)


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown for summary.md."""
    lines = [
        f"## Sweep efficiency ({result['sweep']['trials']} trials, "
        f"{result['unique_stages']} unique stages, {result['builds']} builds)",
        "",
        f"Wall time {result['wall_s']:.1f} s (Ray start {result['ray_init_s']:.1f} s) against "
        f"{result['unique_stage_s']:.1f} s of unique stage builds: ratio {fmt(result['ratio'], '.2f')} "
        f"({fmt(result['ratio_without_ray_start'], '.2f')} without Ray's start); stages built twice: "
        f"{result['duplicate_stages']}.",
        "",
        "| stage | builds | seconds |",
        "|---|---|---|",
    ]
    for stage, row in sorted(result["per_stage"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"| {stage} | {row['builds']} | {row['seconds']:.1f} |")
    rerun = result["rerun"]
    if rerun is not None:
        lines += [
            "",
            f"Second run of the same sweep (new name, same storage): {rerun['builds']} builds, "
            f"{rerun['wall_s']:.1f} s.",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(SweepBenchConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
