"""Where a sweep invocation's wall time went, from the stage cache's build records.

Every stage build leaves a record (stage, key, start, end, seconds); a Ray Train stage's info
(fm_model, seam_model) also holds the seconds its training loop ran (`train_elapsed_s`), so the
rest of its build is Ray Train's fixed cost (worker-group start, data load, checkpoint upload,
teardown). The part of the trial slots' time that no build covers is the sweep's own overhead: Ray and Tune
start-up, trial scheduling, MLflow logging, waits for another trial's build and idle slots.
With several trials at once (`slots`), builds overlap: every share is of wall x slots, the time
the machine had for trials, so a sweep that leaves a slot idle shows it as `other`. A build by
the sweep's own process (the shared stages it builds first with every core) held every slot:
its seconds count once per slot.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.cache import StageCache
from orchestrator.schedule import TRAINED_STAGES

# Builds whose time is training, sampling or evaluation (stage -> category); a Ray Train
# stage's (TRAINED_STAGES) training loop is training, the rest of its build RAY_TRAIN.
CATEGORIES = {
    "autoencoder": "training",
    "extractor": "training",
    "fm_model": "training",
    "seam_model": "training",
    "seam_state": "sampling",  # the fine model's ODE run backwards
    "samples": "sampling",
    "fid_curve": "sampling",
    "timing": "sampling",
    "t_split_choice": "sampling",
}
OTHER_STAGES = "metrics"  # every other stage: features, subsets, scores, statistics, metrics
RAY_TRAIN = "ray_train_fixed"
TRAIN_SECONDS = "train_elapsed_s"


@dataclass(frozen=True)
class TimeBudget:
    """Seconds of one sweep invocation by kind.

    Attributes:
        wall: the invocation's wall time. training, sampling, metrics: build time of those
        stages (training: the training loops only). ray_train_fixed: Ray Train builds minus
        their training loops. other: wall x slots minus every build (Ray, Tune, MLflow,
        waits, idle slots). slots: trials run at once.
    """

    wall: float
    training: float
    sampling: float
    metrics: float
    ray_train_fixed: float
    other: float
    slots: int = 1

    @property
    def capacity(self) -> float:
        """Trial-slot seconds: wall x slots."""
        return self.wall * self.slots

    @property
    def useful_fraction(self) -> float:
        """Share of the trial slots' time in training, sampling and metrics."""
        useful = self.training + self.sampling + self.metrics
        return useful / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict[str, float]:
        """The seconds and the useful fraction, as plain numbers."""
        return {**asdict(self), "useful_fraction": self.useful_fraction}

    def line(self) -> str:
        """One line, e.g. "time of 700 s x 2 trial slots: 1012 s training (72%), ..."."""
        parts = [
            (self.training, "training"),
            (self.sampling, "sampling"),
            (self.metrics, "metrics"),
            (self.ray_train_fixed, "Ray Train fixed cost"),
            (self.other, "other (Ray/Tune start, MLflow, waits)"),
        ]
        shares = ", ".join(f"{s:.0f} s {name} ({s / self.capacity:.0%})" for s, name in parts)
        slots = f" x {self.slots} trial slots" if self.slots > 1 else ""
        return f"time of {self.wall:.0f} s{slots}: {shares}; useful {self.useful_fraction:.0%}"


def budget_of(
    records: Iterable[Mapping[str, Any]],
    train_seconds: Mapping[str, float],
    wall: float,
    slots: int = 1,
) -> TimeBudget:
    """The budget of these build records; `train_seconds`: fitted stage's key -> its training loop;
    `slots`: trials run at once; a record's own "slots" (default 1): the slots its build held."""
    seconds = {"training": 0.0, "sampling": 0.0, OTHER_STAGES: 0.0, RAY_TRAIN: 0.0}
    for record in records:
        category = CATEGORIES.get(record["stage"], OTHER_STAGES)
        held = record.get("slots", 1)  # slots the build held (the sweep process: all)
        if record["stage"] in TRAINED_STAGES:
            loop = min(train_seconds.get(record["key"], 0.0), record["seconds"])
            seconds["training"] += loop * held
            seconds[RAY_TRAIN] += (record["seconds"] - loop) * held
        else:
            seconds[category] += record["seconds"] * held
    built = sum(seconds.values())
    return TimeBudget(
        wall,
        seconds["training"],
        seconds["sampling"],
        seconds[OTHER_STAGES],
        seconds[RAY_TRAIN],
        max(wall * slots - built, 0.0),
        slots,
    )


def sweep_budget(cache: StageCache, since: float, wall: float, slots: int = 1) -> TimeBudget:
    """The budget of the builds that started at or after `since` (a time.time()), with
    `slots` trials at once; builds by this process (the sweep's own) held every slot."""
    here = (socket.gethostname(), os.getpid())
    records = [
        {**r, "slots": slots} if (r.get("host"), r.get("pid")) == here else r
        for r in cache.records()
        if r["start"] >= since
    ]
    train_seconds = {
        r["key"]: float(cache.entry_info(r["stage"], r["key"]).get(TRAIN_SECONDS, 0.0))
        for r in records
        if r["stage"] in TRAINED_STAGES
    }
    return budget_of(records, train_seconds, wall, slots)
