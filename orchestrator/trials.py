"""Trials: the points of a sweep's search space.

A trial is one (data_fraction, criterion, width, t_split, seed) point of one study's grid. The
sweep's trials are the union of every study's grid product, in file order, each point once (a
point listed by two studies belongs to the first).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config import AUTO_T_SPLIT, SweepConfig


@dataclass(frozen=True)
class Trial:
    """One point of the search space.

    Attributes:
        study: the grid it comes from (e.g. "data_reduction").
        data_fraction: fraction of the training set kept, in (0, 1].
        criterion: the scoring criterion that picks the subset (irrelevant at fraction 1).
        width: the model's width (None: the sweep's `model.width`).
        t_split: coarse-to-fine switch time with the reference as the fine model; None: none;
            "auto" (AUTO_T_SPLIT): the one the trial's t_split_choice stage chooses.
        seed: seed of the subset selection and of the model's training.
    """

    study: str
    data_fraction: float
    criterion: str
    width: int | None
    t_split: float | str | None
    seed: int

    @property
    def auto(self) -> bool:
        """True when the trial samples at the automatically chosen t_split."""
        return self.t_split == AUTO_T_SPLIT

    @property
    def point(self) -> tuple[Any, ...]:
        """The trial's coordinates without its study."""
        return (self.data_fraction, self.criterion, self.width, self.t_split, self.seed)

    @property
    def name(self) -> str:
        """A short readable name, e.g. "data_reduction-f0.5-random-wbase-tnone-s0"."""
        width = "base" if self.width is None else str(self.width)
        t_split = t_split_text(self.t_split)
        return f"{self.study}-f{self.data_fraction:g}-{self.criterion}-w{width}-t{t_split}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The trial as plain values (Tune's param space; `Trial(**d)` rebuilds it). Its MLflow
        params are `orchestrator.schema.trial_params`'s."""
        return asdict(self)


def t_split_text(t_split: float | str | None) -> str:
    """A t_split as trial and run names write it: "0.5", "auto" or "none"."""
    if t_split is None:
        return "none"
    return t_split if isinstance(t_split, str) else f"{t_split:g}"


def expand_trials(cfg: SweepConfig) -> list[Trial]:
    """Every trial of the sweep, in file order, each point once."""
    trials: dict[tuple[Any, ...], Trial] = {}
    for study, grid in cfg.search.items():
        axes = (grid.data_fraction, grid.criterion, grid.width, grid.t_split, grid.seed)
        for fraction, criterion, width, t_split, seed in itertools.product(*axes):
            trial = Trial(study, float(fraction), criterion, width, t_split, int(seed))
            trials.setdefault(trial.point, trial)
    return list(trials.values())
