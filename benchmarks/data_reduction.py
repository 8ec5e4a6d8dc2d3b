"""Data reduction: training time to reach the full-data model's FID on 50% and 25% of the data.

1. A velocity model is trained on all the embedded training latents, keeping its EMA weights
   every `eval_every` steps (an fm_model stage with snapshots, benchmarks.common); the FID of
   each snapshot (fixed noise seeds, against the held-out split's features) traces its
   progress, and the FID of the last one is the target.
2. Every candidate criterion selects each fraction of the training set (subset stages, with
   their features and scores stages). The best criterion of a fraction is the one whose kept
   *real* images are closest to the held-out split (FID of the subset's FID-extractor
   features): a model learns its training distribution, so this ranks subsets without
   training on each. `--criteria` names criteria to train instead. The "loss" / "grad" scores
   come from the graph's probe model (all the data, `scoring.probe_steps`: an early checkpoint).
3. The chosen subsets are trained with the same settings and evaluated at the same steps. The
   time to the target is the training time of the first snapshot whose FID is at most the
   target times (1 + tolerance) (`strict`: without the tolerance); the ratio divides it by the
   full-data model's own time to that level. The coarse model of benchmarks.coarse_to_fine is
   the same full-data stage (same settings), so whichever runs second trains nothing for it.

    python -m benchmarks.data_reduction [--tiny] [--dry-run] [fractions=[0.5,0.25]] [criteria=[random]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    RESULTS_DIR,
    TINY_STAGES,
    Clock,
    Embedded,
    Stages,
    benchmark_main,
    fmt,
    record_result,
    usable_cores,
)
from lfm_core.criteria import CRITERIA
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.metrics import fid
from lfm_core.train import TrainConfig
from orchestrator import stage_keys
from orchestrator.cache import StageRef
from orchestrator.config import ModelSection, SamplingSection, ScoringSection

NAME = "data_reduction"
NOT_REACHED = "not reached"
# "grad" needs per-sample gradients of every training latent: minutes on a CPU, so opt-in.
DEFAULT_PROXY_CRITERIA = tuple(c for c in CRITERIA if c != "grad")


@dataclass(frozen=True)
class DataReductionConfig:
    """What the data-reduction benchmark trains and evaluates.

    Attributes:
        out: results folder (`data_reduction.json` goes there).
        stages: the embedded data, autoencoder and extractors (benchmarks.common.Stages).
        model: the velocity network (a VELOCITY_SIZES name and width).
        train: training of every model (the same for all).
        eval_every: snapshot (and FID) period in steps.
        fractions: kept fractions of the training set.
        criteria: criteria to train at each fraction; empty: the best by subset FID.
        proxy_criteria: the candidates ranked by subset FID.
        scoring: k of the clustering criteria, the probe's steps and the noise bank of the
            "loss" / "grad" scores.
        sampling: how each snapshot is sampled for FID (steps, solver, num_samples from
            first_seed, batch_size per forward pass).
        tolerance: a snapshot reaches the target when FID <= target * (1 + tolerance).
        threads: torch threads. progress: show bars. The training seed is train.seed, and
            it is the selection seed too.
    """

    out: str = str(RESULTS_DIR)
    stages: Stages = field(default_factory=Stages)
    model: ModelSection = ModelSection(name="unet-s", width=16)
    train: TrainConfig = TrainConfig(
        steps=3000, batch_size=128, lr=2e-3, warmup_steps=30, ema_decay=0.99
    )
    eval_every: int = 500
    fractions: tuple[float, ...] = (0.5, 0.25)
    criteria: tuple[str, ...] = ()
    proxy_criteria: tuple[str, ...] = DEFAULT_PROXY_CRITERIA
    scoring: ScoringSection = ScoringSection(probe_steps=200, num_noise=2)
    sampling: SamplingSection = SamplingSection(steps=20, num_samples=1000, batch_size=500)
    tolerance: float = 0.05
    threads: int = field(default_factory=usable_cores)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ConfigError("fractions: at least one value is needed")
        for fraction in self.fractions:
            check_range("fractions", fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not self.criteria and not self.proxy_criteria:
            raise ConfigError("proxy_criteria: needs at least one criterion when criteria is empty")
        for criterion in (*self.criteria, *self.proxy_criteria):
            check_choice("criteria", criterion, CRITERIA)
        for key in ("eval_every", "threads"):
            check_range(key, getattr(self, key), 1, math.inf)
        check_range("tolerance", self.tolerance, 0.0, math.inf)

    def sections(self) -> dict[str, Any]:
        """The SweepConfig sections this benchmark sets (benchmarks.common.Embedded)."""
        return {
            "model": self.model,
            "train": self.train,
            "scoring": self.scoring,
            "sampling": self.sampling,
        }


TINY = DataReductionConfig(
    stages=TINY_STAGES,
    model=ModelSection(name="dit-xs", width=16),
    train=TrainConfig(steps=6, batch_size=16, warmup_steps=1, log_every=2),
    eval_every=2,
    proxy_criteria=("random", "balanced_nearest", "loss"),
    scoring=ScoringSection(num_clusters=4, probe_steps=2, num_noise=1),
    sampling=SamplingSection(steps=4, num_samples=16, batch_size=16),
    threads=1,
    progress=False,
)


def model_ref(embedded: Embedded, subset: StageRef, cfg: DataReductionConfig) -> StageRef:
    """The fm_model stage of a subset, with EMA snapshots every eval_every steps."""
    model = cfg.model
    return embedded.model_ref(subset, model.name, model.width, snapshot_every=cfg.eval_every)


def checkpoint_fids(
    embedded: Embedded, ref: StageRef, cfg: DataReductionConfig
) -> list[dict[str, float]]:
    """FID of every snapshot's EMA weights on the fixed seeds: [{step, seconds, fid}]."""
    first = cfg.sampling.first_seed
    seeds = list(range(first, first + cfg.sampling.num_samples))
    snapshots = embedded.graph.load_snapshots(ref)
    return [
        {"step": step, "seconds": seconds, "fid": embedded.fid(embedded.sample(model, seeds))}
        for step, seconds, model in tqdm(snapshots, desc="snapshot FID", disable=not cfg.progress)
    ]


def time_to(rows: list[dict[str, float]], level: float) -> dict[str, float] | None:
    """The first checkpoint row whose FID is at most `level`, None when none is."""
    return next((row for row in rows if row["fid"] <= level), None)


def subset_fids(
    embedded: Embedded, fraction: float, cfg: DataReductionConfig
) -> dict[str, dict[str, Any]]:
    """criterion -> {ref, size, subset_fid}: each candidate subset stage and how close its real
    images' features are to the held-out split's."""
    features = embedded.data_features("train")
    out = {}
    for criterion in cfg.criteria or cfg.proxy_criteria:
        ref = stage_keys.subset(embedded.cfg, fraction, criterion, cfg.train.seed)
        indices = embedded.indices(ref)
        out[criterion] = {
            "ref": ref,
            "size": int(indices.numel()),
            "subset_fid": fid(features[indices], embedded.reference),
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


def _train_run(
    embedded: Embedded,
    criterion: str,
    candidate: dict[str, Any],
    target: float,
    full_seconds: float | None,
    cfg: DataReductionConfig,
) -> dict[str, Any]:
    """Train one subset's model and time it to the full-data target FID."""
    ref = model_ref(embedded, candidate["ref"], cfg)
    _, facts = embedded.trained(ref)
    rows = checkpoint_fids(embedded, ref, cfg)
    reach = _reach(rows, target, cfg)
    ratio = None
    if reach["seconds"] is not None and full_seconds:
        ratio = reach["seconds"] / full_seconds
    return {
        "criterion": criterion,
        "subset_size": candidate["size"],
        "checkpoints": rows,
        "reach": reach,
        "time_ratio": ratio,
        **facts,
    }


def _fraction(
    embedded: Embedded,
    fraction: float,
    target: float,
    full_seconds: float | None,
    cfg: DataReductionConfig,
) -> dict[str, Any]:
    """Rank the candidate subsets of one fraction, train the chosen ones, keep the fastest."""
    candidates = subset_fids(embedded, fraction, cfg)
    chosen = list(cfg.criteria) or [min(candidates, key=lambda c: candidates[c]["subset_fid"])]
    runs = [_train_run(embedded, c, candidates[c], target, full_seconds, cfg) for c in chosen]
    best = min(
        runs,
        key=lambda r: (
            r["time_ratio"] is None,
            r["time_ratio"] or 0.0,
            r["checkpoints"][-1]["fid"],
        ),
    )
    return {
        "fraction": fraction,
        "subset_fid": {c: v["subset_fid"] for c, v in candidates.items()},
        "runs": runs,
        "best": {"criterion": best["criterion"], "time_ratio": best["time_ratio"]},
    }


def run(cfg: DataReductionConfig) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `<out>/data_reduction.json`."""
    torch.set_num_threads(cfg.threads)
    clock = Clock.start()
    embedded = Embedded(cfg.stages, cfg.sections(), progress=cfg.progress)
    full = model_ref(embedded, embedded.full_subset(), cfg)
    _, full_facts = embedded.trained(full)
    full_rows = checkpoint_fids(embedded, full, cfg)
    target = full_rows[-1]["fid"]
    full_reach = _reach(full_rows, target, cfg)
    fractions = [
        _fraction(embedded, fraction, target, full_reach["seconds"], cfg)
        for fraction in cfg.fractions
    ]
    body = {
        "data": embedded.info(),
        "full": {
            "checkpoints": full_rows,
            "target_fid": target,
            "reach": full_reach,
            **full_facts,
            "subset_fid": fid(embedded.data_features("train"), embedded.reference),
        },
        "fractions": fractions,
        "summary": {f"dr_time_ratio_{f['fraction']:g}": f["best"]["time_ratio"] for f in fractions},
    }
    return record_result(NAME, cfg, clock, body, {})


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown for summary.md."""
    cfg, full = result["config"], result["full"]
    reach = full["reach"]["seconds"]
    lines = [
        f"## Data reduction ({cfg['model']['name']} width {cfg['model']['width']}, "
        f"{cfg['train']['steps']} steps, FID every {cfg['eval_every']} steps on "
        f"{cfg['sampling']['num_samples']} samples)",
        "",
        f"Full data: final FID {full['target_fid']:.2f} (the target; reached within "
        f"{cfg['tolerance']:.0%} after {fmt(reach, '.0f', NOT_REACHED)} s of training).",
        "",
        "| fraction | criterion | subset FID (real images) | final FID | time to target | time / full |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in result["fractions"]:
        for run_ in fraction["runs"]:
            lines.append(
                f"| {fraction['fraction']:g} | {run_['criterion']} "
                f"| {fraction['subset_fid'][run_['criterion']]:.2f} "
                f"| {run_['checkpoints'][-1]['fid']:.2f} | {fmt(run_['reach']['seconds'], '.0f', NOT_REACHED)} s "
                f"| {fmt(run_['time_ratio'], '.2f', NOT_REACHED)} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(DataReductionConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
