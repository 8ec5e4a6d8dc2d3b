"""Data reduction: training time to reach the full-data model's FID on 50% and 25% of the data.

1. A velocity model is trained on all the embedded training latents, with checkpoints every
   `eval_every` steps; the FID of each checkpoint (EMA weights, fixed noise seeds, held-out
   reference) traces its progress, and the FID of the last one is the target.
2. Every candidate criterion selects each fraction of the training set. The best criterion of a
   fraction is the one whose kept *real* images are closest to the held-out split (FID of the
   subset's classifier features): a model learns its training distribution, so this ranks
   subsets without training on each. `--criteria` names criteria to train instead. The "loss" /
   "grad" scores come from the full-data model's first checkpoint (its raw weights: the
   paper's early checkpoint).
3. The chosen subsets are trained with the same settings and evaluated at the same steps. The
   time to the target is the training time of the first checkpoint whose FID is at most the
   target times (1 + tolerance) (`strict`: without the tolerance); the ratio divides it by the
   full-data model's own time to that level. The coarse model of benchmarks.coarse_to_fine is
   the same full-data model (same settings), so a run after that one trains it only once.

    python -m benchmarks.data_reduction [--tiny] [--fractions 0.5 0.25] [--criteria random]
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    RESULTS_DIR,
    benchmark_main,
    load_average,
    machine,
    usable_cores,
    write_json,
)
from benchmarks.embedded import (
    TINY_DATA,
    DataConfig,
    EmbeddedData,
    TrainedModel,
    load_embedded,
    train_cached,
)
from lfm_core.criteria import CRITERIA, SCORE_CRITERIA, per_sample_scores, select
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.metrics import fid
from lfm_core.solvers import METHODS
from lfm_core.train import TrainConfig
from lfm_core.velocity import VELOCITY_SIZES, VelocityModel

NAME = "data_reduction"
# "grad" needs per-sample gradients of every training latent: minutes on a CPU, so opt-in.
DEFAULT_PROXY_CRITERIA = tuple(c for c in CRITERIA if c != "grad")


@dataclass(frozen=True)
class DataReductionConfig:
    """What the data-reduction benchmark trains and evaluates.

    Attributes:
        out: results folder (`data_reduction.json` goes there).
        data: the embedded data and its cache.
        model, width: the velocity network.
        train_steps, batch_size, lr, ema_decay: training of every model (the same for all).
        eval_every: checkpoint (and FID) period in steps.
        fractions: kept fractions of the training set.
        criteria: criteria to train at each fraction; empty: the best by subset FID.
        proxy_criteria: the candidates ranked by subset FID.
        num_clusters: k of the clustering criteria (None: lfm_core's default).
        score_noise: noise-bank size of the "loss" / "grad" scores.
        num_samples, steps, solver, first_seed: how each checkpoint is sampled for FID.
        sample_batch: samples per forward pass.
        tolerance: a checkpoint reaches the target when FID <= target * (1 + tolerance).
        threads: torch threads. seed: training and selection seed. progress: show bars.
    """

    out: str = str(RESULTS_DIR)
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "dit-xs"
    width: int = 64
    train_steps: int = 3200
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.995
    eval_every: int = 200
    fractions: tuple[float, ...] = (0.5, 0.25)
    criteria: tuple[str, ...] = ()
    proxy_criteria: tuple[str, ...] = DEFAULT_PROXY_CRITERIA
    num_clusters: int | None = None
    score_noise: int = 2
    num_samples: int = 1000
    steps: int = 20
    solver: str = "euler"
    first_seed: int = 0
    sample_batch: int = 500
    tolerance: float = 0.05
    threads: int = field(default_factory=usable_cores)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, VELOCITY_SIZES)
        check_choice("solver", self.solver, METHODS)
        if not self.fractions:
            raise ConfigError("fractions: at least one value is needed")
        for fraction in self.fractions:
            check_range("fractions", fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not self.criteria and not self.proxy_criteria:
            raise ConfigError("proxy_criteria: needs at least one criterion when criteria is empty")
        for criterion in (*self.criteria, *self.proxy_criteria):
            check_choice("criteria", criterion, CRITERIA)
        for key in ("train_steps", "batch_size", "eval_every", "steps", "sample_batch", "threads"):
            check_range(key, getattr(self, key), 1, math.inf)
        check_range("num_samples", self.num_samples, 2, math.inf)
        check_range("tolerance", self.tolerance, 0.0, math.inf)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.train_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            ema_decay=self.ema_decay,
            checkpoint_every=self.eval_every,
            seed=self.seed,
        )


TINY = DataReductionConfig(
    data=TINY_DATA,
    width=16,
    train_steps=6,
    batch_size=16,
    eval_every=2,
    proxy_criteria=("random", "balanced_nearest", "loss"),
    num_clusters=4,
    score_noise=1,
    num_samples=16,
    steps=4,
    sample_batch=16,
    threads=1,
    progress=False,
)


def checkpoint_fids(
    data: EmbeddedData, trained: TrainedModel, cfg: DataReductionConfig
) -> list[dict[str, float]]:
    """FID of every checkpoint's EMA weights on the fixed seeds: [{step, seconds, fid}]."""
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.num_samples))
    rows = []
    for checkpoint in tqdm(trained.checkpoints, desc="checkpoint FID", disable=not cfg.progress):
        latents = data.sample(
            checkpoint.load("ema"), seeds, cfg.steps, cfg.solver, cfg.sample_batch
        )
        rows.append(
            {"step": checkpoint.step, "seconds": checkpoint.seconds, "fid": data.fid(latents)}
        )
    return rows


def time_to(rows: list[dict[str, float]], level: float) -> dict[str, float] | None:
    """The first checkpoint row whose FID is at most `level`, None when none is."""
    return next((row for row in rows if row["fid"] <= level), None)


def _subset_fids(
    data: EmbeddedData, probe: VelocityModel | None, fraction: float, cfg: DataReductionConfig
) -> dict[str, dict[str, Any]]:
    """criterion -> {indices, subset_fid}: how close each candidate subset is to the held-out split."""
    scores: dict[str, torch.Tensor] = {}
    out = {}
    candidates = cfg.criteria or cfg.proxy_criteria
    for criterion in candidates:
        if criterion in SCORE_CRITERIA and criterion not in scores:
            if probe is None:
                raise ConfigError(f"criteria: {criterion!r} needs a probe checkpoint")
            scores[criterion] = per_sample_scores(
                probe,
                data.latents,
                kind=criterion,
                num_noise=cfg.score_noise,
                progress=cfg.progress,
            )
        indices = select(
            criterion,
            fraction,
            features=data.train_features,
            scores=scores.get(criterion),
            num_clusters=cfg.num_clusters,
            seed=cfg.seed,
        )
        out[criterion] = {
            "indices": indices,
            "subset_fid": fid(data.train_features[indices], data.reference),
        }
    return out


def _reach(rows: list[dict[str, float]], target: float, cfg: DataReductionConfig) -> dict[str, Any]:
    within = time_to(rows, target * (1 + cfg.tolerance))
    strict = time_to(rows, target)
    return {
        "within_tolerance": within,
        "strict": strict,
        "seconds": None if within is None else within["seconds"],
    }


def run(cfg: DataReductionConfig) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `<out>/data_reduction.json`."""
    torch.set_num_threads(cfg.threads)
    started, load_start = time.perf_counter(), load_average()
    data = load_embedded(cfg.data, progress=cfg.progress)
    velocity = data.velocity_config(cfg.model, cfg.width)
    full = train_cached(data, velocity, cfg.train_config(), progress=cfg.progress)
    full_rows = checkpoint_fids(data, full, cfg)
    target = full_rows[-1]["fid"]
    full_reach = _reach(full_rows, target, cfg)
    needs_probe = any(c in SCORE_CRITERIA for c in (cfg.criteria or cfg.proxy_criteria))
    probe = full.checkpoints[0].load("model") if needs_probe else None
    fractions = []
    for fraction in cfg.fractions:
        candidates = _subset_fids(data, probe, fraction, cfg)
        chosen = list(cfg.criteria) or [min(candidates, key=lambda c: candidates[c]["subset_fid"])]
        runs = []
        for criterion in chosen:
            trained = train_cached(
                data, velocity, cfg.train_config(), candidates[criterion]["indices"], cfg.progress
            )
            rows = checkpoint_fids(data, trained, cfg)
            reach = _reach(rows, target, cfg)
            ratio = None
            if reach["seconds"] is not None and full_reach["seconds"]:
                ratio = reach["seconds"] / full_reach["seconds"]
            runs.append(
                {
                    "criterion": criterion,
                    "subset_size": int(candidates[criterion]["indices"].numel()),
                    "checkpoints": rows,
                    "reach": reach,
                    "time_ratio": ratio,
                    "train_seconds": trained.seconds,
                    "cached": trained.cached,
                }
            )
        best = min(
            runs,
            key=lambda r: (
                r["time_ratio"] is None,
                r["time_ratio"] or 0.0,
                r["checkpoints"][-1]["fid"],
            ),
        )
        fractions.append(
            {
                "fraction": fraction,
                "subset_fid": {c: v["subset_fid"] for c, v in candidates.items()},
                "runs": runs,
                "best": {"criterion": best["criterion"], "time_ratio": best["time_ratio"]},
            }
        )
    result = {
        "benchmark": NAME,
        "config": asdict(cfg),
        "machine": machine(),
        "full": {
            "checkpoints": full_rows,
            "target_fid": target,
            "reach": full_reach,
            "train_seconds": full.seconds,
            "cached": full.cached,
            "subset_fid": fid(data.train_features, data.reference),
        },
        "fractions": fractions,
        "summary": {f"dr_time_ratio_{f['fraction']:g}": f["best"]["time_ratio"] for f in fractions},
        "load_average": {"start": load_start, "end": load_average()},
        "seconds": time.perf_counter() - started,
    }
    write_json(Path(cfg.out) / f"{NAME}.json", result)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown for summary.md."""
    cfg, full = result["config"], result["full"]
    reach = full["reach"]["seconds"]
    lines = [
        f"## Data reduction ({cfg['model']} width {cfg['width']}, {cfg['train_steps']} steps, "
        f"FID every {cfg['eval_every']} steps on {cfg['num_samples']} samples)",
        "",
        f"Full data: final FID {full['target_fid']:.2f} (the target; reached within "
        f"{cfg['tolerance']:.0%} after {_fmt(reach, '.0f')} s of training).",
        "",
        "| fraction | criterion | subset FID (real images) | final FID | time to target | time / full |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in result["fractions"]:
        for run_ in fraction["runs"]:
            lines.append(
                f"| {fraction['fraction']:g} | {run_['criterion']} "
                f"| {fraction['subset_fid'][run_['criterion']]:.2f} "
                f"| {run_['checkpoints'][-1]['fid']:.2f} | {_fmt(run_['reach']['seconds'], '.0f')} s "
                f"| {_fmt(run_['time_ratio'], '.2f')} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(DataReductionConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
