"""Coarse-to-fine sampling: a small velocity model for t < t_split, a large one after.

Stability makes this work: a small model trained on the same data maps noise to nearly the
same place as the large one, so it can do the early, low-detail part of the trajectory
(t = 0 noise to t_split) and hand over to the large model for [t_split, 1].
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lfm_core.errors import check_range
from lfm_core.solvers import NFECounter, sample, time_grid

# The paper's default switch time (DiT-S/2 for t < 0.7, then DiT-XL/2).
PAPER_T_SPLIT = 0.7


def uses_coarse(t: Tensor, t_split: float) -> Tensor:
    """Which times (any shape) the coarse model owns: t < t_split, and every t when t_split = 1.

    The one switch rule of this module: `CoarseToFine` applies it to each row's t and
    `sample_coarse_to_fine` to each step's start time. Returns a bool tensor of t's shape.
    """
    return (t < t_split) | (t_split == 1.0)


class CoarseToFine:
    """A velocity function: `coarse(x, t)` where t < t_split, `fine(x, t)` where t >= t_split.

    t_split = 0 is the fine model alone, t_split = 1 the coarse model alone (t = 1 included).
    Rows of one batch may sit on either side (each model then sees only its rows).
    """

    def __init__(self, coarse: Callable[..., Tensor], fine: Callable[..., Tensor], t_split: float):
        check_range("t_split", t_split, 0.0, 1.0)
        self.coarse, self.fine, self.t_split = coarse, fine, t_split

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        use_coarse = uses_coarse(t, self.t_split)
        if bool(use_coarse.all()):
            return self.coarse(x, t, **cond)
        if not bool(use_coarse.any()):
            return self.fine(x, t, **cond)
        out = torch.empty_like(x)
        for mask, model in ((use_coarse, self.coarse), (~use_coarse, self.fine)):
            sub = {k: v[mask] for k, v in cond.items()}
            out[mask] = model(x[mask], t[mask], **sub).to(out.dtype)
        return out


def _coarse_steps(times: Tensor, t_split: float) -> int:
    """How many steps of the time grid `times` (K + 1,) the coarse model takes: those whose
    start time it owns; the fine model takes over at times[_coarse_steps(times, t_split)]."""
    return int(uses_coarse(times[:-1], t_split).sum())


def seam_time(t_split: float, steps: int = 60, grid: str = "uniform") -> float:
    """The grid time at which coarse-to-fine sampling hands over to the fine model: the first
    time of `lfm_core.solvers.time_grid(steps, grid)` at or above t_split (t_split itself when
    it lies on the grid, e.g. 0.3 on a uniform 20-step grid)."""
    check_range("t_split", t_split, 0.0, 1.0)
    times = time_grid(steps, grid)
    return float(times[_coarse_steps(times, t_split)])


@torch.no_grad()
def seam_states(
    fine: Callable[..., Tensor],
    x1: Tensor,
    t_split: float,
    *,
    steps: int = 60,
    method: str = "euler",
    grid: str = "uniform",
    **cond: Tensor,
) -> Tensor:
    """The fine model's ODE run backwards from data x1 (B, C, H, W) at t = 1 to the seam.

    x_s = x1 - int_s^1 fine(x_t, t) dt, integrated by `method` over the steps of the sampling
    grid `time_grid(steps, grid)` that lie above the seam s = `seam_time(t_split, steps, grid)`,
    in reverse: the steps the fine model takes forward when coarse-to-fine sampling hands over
    at s. The paper's seam state (its inversion runs Euler from 1 to t_split in
    (1 - t_split) x 60 steps, its sampling steps per unit time). `cond` (e.g. the data's
    class_labels) goes to `fine`. Returns x_s, shape of x1, float32 (or x1's dtype if wider).
    """
    check_range("t_split", t_split, 0.0, 1.0)
    times = time_grid(steps, grid)
    backward = times[_coarse_steps(times, t_split) :].flip(0)
    return sample(_bind(fine, cond), x1, backward, method)


@dataclass(frozen=True)
class CoarseToFineResult:
    """Samples (B, C, H, W) with the work each model did and the wall-clock time."""

    samples: Tensor
    nfe_coarse: int
    nfe_fine: int
    seconds: float


def _bind(
    model: Callable[..., Tensor], cond: dict[str, Tensor]
) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, t: model(x, t, **cond)


@torch.no_grad()
def sample_coarse_to_fine(
    coarse: Callable[..., Tensor],
    fine: Callable[..., Tensor],
    x_init: Tensor,
    t_split: float,
    *,
    steps: int = 60,
    method: str = "euler",
    grid: str = "uniform",
    **cond: Tensor,
) -> CoarseToFineResult:
    """Integrate noise x_init (B, C, H, W) from t = 0 to 1, switching models at t_split.

    A whole step belongs to the model of its start time (coarse when it is below t_split), so
    a two-stage method (midpoint, heun) never mixes models inside one step; `cond` (e.g.
    class_labels) is passed to both models. `grid` names the time grid of
    `lfm_core.solvers.time_grid` ("uniform": `steps` steps; "paper": linspace(0, 1, steps)).
    """
    check_range("t_split", t_split, 0.0, 1.0)
    counted_coarse = NFECounter(_bind(coarse, cond))
    counted_fine = NFECounter(_bind(fine, cond))
    times = time_grid(steps, grid)
    coarse_steps = _coarse_steps(times, t_split)
    started = time.perf_counter()
    x = x_init
    if coarse_steps:
        x = sample(counted_coarse, x, times[: coarse_steps + 1], method)
    if coarse_steps < len(times) - 1:
        x = sample(counted_fine, x, times[coarse_steps:], method)
    seconds = time.perf_counter() - started
    samples = x
    return CoarseToFineResult(samples, counted_coarse.nfe, counted_fine.nfe, seconds)


# The switch times choose_t_split tries by default.
T_SPLIT_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class TSplitChoice:
    """The chosen t_split and the similarity to fine-only samples of every candidate tried."""

    t_split: float
    similarity: dict[float, float]


def choose_t_split(
    coarse: Callable[..., Tensor],
    fine: Callable[..., Tensor],
    x_init: Tensor,
    *,
    budget: float = 0.05,
    candidates: Sequence[float] = T_SPLIT_CANDIDATES,
    features: Callable[[Tensor], Tensor] | None = None,
    steps: int = 60,
    method: str = "euler",
    grid: str = "uniform",
    **cond: Tensor,
) -> TSplitChoice:
    """The largest t_split whose samples stay within `budget` of the fine-only samples.

    On a small calibration batch of noise x_init (B, C, H, W), each candidate's samples are
    compared with the fine-only samples of the same noise by mean cosine similarity of
    `features(samples)` (default: the flattened latents); a candidate passes when that
    similarity is at least 1 - budget. Returns 0.0 (fine only) when none passes.
    """
    check_range("budget", budget, 0.0, 1.0)
    for t_split in candidates:
        check_range("t_split", t_split, 0.0, 1.0)
    embed = features or (lambda s: s.flatten(1))
    reference = embed(
        sample_coarse_to_fine(
            coarse, fine, x_init, 0.0, steps=steps, method=method, grid=grid, **cond
        ).samples
    )
    similarity = {}
    for t_split in sorted(candidates):
        out = sample_coarse_to_fine(
            coarse, fine, x_init, t_split, steps=steps, method=method, grid=grid, **cond
        )
        cos = torch.nn.functional.cosine_similarity(
            embed(out.samples).flatten(1), reference.flatten(1)
        )
        similarity[t_split] = cos.mean().item()
    passing = [t for t, s in similarity.items() if s >= 1 - budget]
    return TSplitChoice(max(passing, default=0.0), similarity)
