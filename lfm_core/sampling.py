"""Sampling many seeds: batched coarse-to-fine sampling and side-by-side timing.

Sample i starts from `seeded_noise([seeds[i]])` and, for a class-conditional model, has class
label seeds[i] mod num_classes, guided by classifier-free guidance; so a sample depends on its
seed alone, never on the batch it was drawn in. A single model is the pair (model, model)
with t_split = 1.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lfm_core.coarse_to_fine import sample_coarse_to_fine
from lfm_core.solvers import CFG, seeded_noise
from lfm_core.velocity import VelocityModel


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn: solver steps and method, CFG scale, seeds per batch, device.

    `cfg_channels` guides only the first k latent channels (None: all; the paper's ImageNet
    setting is 3 of 8) and `grid` names the time grid (`lfm_core.solvers.GRIDS`: "uniform",
    `steps` equal steps; "paper", linspace(0, 1, steps)).
    """

    steps: int
    solver: str
    guidance_scale: float
    batch_size: int
    device: torch.device | str = "cpu"
    cfg_channels: int | None = None
    grid: str = "uniform"


@dataclass(frozen=True)
class Sampled:
    """Samples of some seeds: latents (N, c, h, w), labels (N,) or None, the ODE time in
    seconds, and the function evaluations of the coarse and fine model."""

    latents: Tensor
    labels: Tensor | None
    seconds: float
    nfe_coarse: int
    nfe_fine: int


@dataclass(frozen=True)
class Timing:
    """Median sampling seconds of the reference alone and of a trial's sampler on one batch,
    with the trial sampler's function evaluations per model."""

    reference_s: float
    trial_s: float
    nfe_coarse: int
    nfe_fine: int


def seed_labels(
    model: VelocityModel, seeds: Sequence[int], device: torch.device | str
) -> Tensor | None:
    """Class labels (N,) of the samples of `seeds` (seed mod num_classes); None: unconditional."""
    if not model.config.num_classes:
        return None
    return torch.tensor(list(seeds), device=device) % model.config.num_classes


def guided(
    model: VelocityModel, labels: Tensor | None, scale: float, channels: int | None = None
) -> Callable[..., Tensor]:
    """The velocity function of a model for one batch: classifier-free guidance when labelled
    (on the first `channels` latent channels; None: all)."""
    return model if labels is None else CFG(model, labels, scale, model.null_label, channels)


def sample_seeds(
    coarse: VelocityModel,
    fine: VelocityModel,
    seeds: Sequence[int],
    t_split: float,
    settings: SamplerSettings,
) -> Sampled:
    """Coarse-to-fine samples of `seeds`, `settings.batch_size` seeds at a time, on the CPU.

    t_split = 1: the coarse model alone; t_split = 0: the fine model alone.
    """
    config = coarse.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    parts, label_parts, seconds, nfe_coarse, nfe_fine = [], [], 0.0, 0, 0
    for start in range(0, len(seeds), settings.batch_size):
        batch = list(seeds[start : start + settings.batch_size])
        x_init = seeded_noise(batch, shape, device=settings.device)
        labels = seed_labels(coarse, batch, settings.device)
        if labels is not None:
            label_parts.append(labels.cpu())
        result = sample_coarse_to_fine(
            guided(coarse, labels, settings.guidance_scale, settings.cfg_channels),
            guided(fine, labels, settings.guidance_scale, settings.cfg_channels),
            x_init,
            t_split,
            steps=settings.steps,
            method=settings.solver,
            grid=settings.grid,
        )
        parts.append(result.samples.cpu())
        seconds += result.seconds
        nfe_coarse += result.nfe_coarse
        nfe_fine += result.nfe_fine
    labels_all = torch.cat(label_parts) if label_parts else None
    return Sampled(torch.cat(parts), labels_all, seconds, nfe_coarse, nfe_fine)


def time_against_reference(
    model: VelocityModel,
    reference: VelocityModel,
    seeds: Sequence[int],
    t_split: float,
    settings: SamplerSettings,
    repeats: int,
) -> Timing:
    """The reference alone vs (model -> reference at t_split) on `seeds`, interleaved `repeats`
    times after one untimed pass of each (lazy initialisation, allocator warm-up); medians."""
    sample_seeds(reference, reference, seeds, 0.0, settings)
    trial = sample_seeds(model, reference, seeds, t_split, settings)
    times_reference, times_trial = [], []
    for _ in range(repeats):
        times_reference.append(sample_seeds(reference, reference, seeds, 0.0, settings).seconds)
        times_trial.append(sample_seeds(model, reference, seeds, t_split, settings).seconds)
    return Timing(
        statistics.median(times_reference),
        statistics.median(times_trial),
        trial.nfe_coarse,
        trial.nfe_fine,
    )
