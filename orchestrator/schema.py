"""The names a trial's MLflow run carries: its params and metrics, and the Trial <-> params
round trip.

Keys are the same in every run so MLflow's Compare view lines them up. Writers (the stages,
`orchestrator.tracking`) and readers (`orchestrator.report`) use these names, never literals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from orchestrator.config import AUTO_T_SPLIT
from orchestrator.trials import Trial, t_split_text

T = TypeVar("T")

# Metrics of a trial's child run. The metrics stage (`stage_builders.build_metrics`) writes its
# own names into the cache (`metrics.json`); `run_metrics` turns them into these, which say what
# they compare, so one name never means two things:
FID = "fid"  # the trial's samples (coarse-to-fine ones on coarse-to-fine trials)
FID_REFERENCE = "fid_reference"  # the reference model alone (the fine model of coarse-to-fine)
FID_COARSE_ALONE = "fid_coarse_alone"  # coarse-to-fine trials: the coarse (trial's) model alone
PRECISION = "precision"
RECALL = "recall"
STABILITY_SIMILARITY = "stability_similarity"
STABILITY_UNRELATED = "stability_unrelated"
STABILITY_SIMILARITY_CENTRED = "stability_similarity_centred"
STABILITY_UNRELATED_CENTRED = "stability_unrelated_centred"
# Single-model trials: reference sampling time / this model's (about 1 at equal width).
SPEEDUP_VS_REFERENCE = "speedup_vs_reference"
FLOP_SPEEDUP_VS_REFERENCE = "flop_speedup_vs_reference"
# Coarse-to-fine trials: fine model alone / coarse-to-fine sampling, measured and FLOP bound.
SPEEDUP_VS_FINE = "speedup_vs_fine"
FLOP_SPEEDUP_VS_FINE = "flop_speedup_vs_fine"
TRAIN_TIME_S = "train_time_s"
SAMPLE_TIME_S = "sample_time_s"
# Coarse-to-fine trials: the trial's own t_split and the one chosen automatically for its pair
# (lfm_core.coarse_to_fine.choose_t_split), side by side.
SAMPLED_T_SPLIT = "t_split_sampled"
CHOSEN_T_SPLIT = "t_split_chosen"
# Coarse-to-fine trials with coarse_to_fine.seam: the same t_split with the seam-fine-tuned
# coarse model (FID of its coarse-to-fine samples, measured and FLOP-bound speedup).
FID_SEAM = "fid_seam"
SPEEDUP_VS_FINE_SEAM = "speedup_vs_fine_seam"
FLOP_SPEEDUP_VS_FINE_SEAM = "flop_speedup_vs_fine_seam"
SEAM_METRICS = (FID_SEAM, SPEEDUP_VS_FINE_SEAM, FLOP_SPEEDUP_VS_FINE_SEAM)
# The training loss of the trial's model, a step series (x axis: optimiser steps).
TRAIN_LOSS = "train_loss"
# FID floors (embedded data sets): train images themselves and their autoencoder
# reconstructions against the same reference, on as many images as a model's samples.
FID_FLOOR_DATA = "fid_floor_data"
FID_FLOOR_AUTOENCODER = "fid_floor_autoencoder"
# Time to quality (`sampling.fid_every`): the first EMA snapshot whose FID is within
# QUALITY_TOLERANCE of the full-data reference model's final FID, its step and training seconds
# (NaN: never within it); and the FID of each snapshot, a step series.
STEPS_TO_QUALITY = "steps_to_quality"
SECONDS_TO_QUALITY = "seconds_to_quality"
FID_CURVE = "fid_curve"
QUALITY_TOLERANCE = 0.05
# Every run logs these ...
COMMON_METRICS = (
    FID,
    FID_REFERENCE,
    PRECISION,
    RECALL,
    STABILITY_SIMILARITY,
    STABILITY_UNRELATED,
    STABILITY_SIMILARITY_CENTRED,
    STABILITY_UNRELATED_CENTRED,
    TRAIN_TIME_S,
    SAMPLE_TIME_S,
)
# ... single-model runs these (floors and time to quality where their stages ran) ...
SINGLE_MODEL_METRICS = (*COMMON_METRICS, SPEEDUP_VS_REFERENCE, FLOP_SPEEDUP_VS_REFERENCE)
OPTIONAL_METRICS = (FID_FLOOR_DATA, FID_FLOOR_AUTOENCODER, STEPS_TO_QUALITY, SECONDS_TO_QUALITY)
# ... coarse-to-fine runs these (t_split_chosen only where its stage ran).
COARSE_TO_FINE_METRICS = (
    *COMMON_METRICS,
    FID_COARSE_ALONE,
    SPEEDUP_VS_FINE,
    FLOP_SPEEDUP_VS_FINE,
    SAMPLED_T_SPLIT,
)
# Every name a run's (last-value) metrics may have, in this order.
METRIC_KEYS = tuple(
    dict.fromkeys(
        (
            *SINGLE_MODEL_METRICS,
            *COARSE_TO_FINE_METRICS,
            CHOSEN_T_SPLIT,
            *OPTIONAL_METRICS,
            *SEAM_METRICS,
        )
    )
)
# The metrics stage's names that are renamed (None: not a metric of the run).
_STAGE_NAMES: dict[bool, dict[str, str | None]] = {
    False: {
        "fid_model": None,  # equals fid without coarse-to-fine
        "speedup": SPEEDUP_VS_REFERENCE,
        "flop_speedup": FLOP_SPEEDUP_VS_REFERENCE,
    },
    True: {
        "fid_model": FID_COARSE_ALONE,
        "speedup": SPEEDUP_VS_FINE,
        "flop_speedup": FLOP_SPEEDUP_VS_FINE,
        "speedup_seam": SPEEDUP_VS_FINE_SEAM,
        "flop_speedup_seam": FLOP_SPEEDUP_VS_FINE_SEAM,
    },
}
# Facts of the trial's subset, logged as params (integers, not measurements).
SUBSET_SIZE = "subset_size"
LABELS_USED = "labels_used"
SUBSET_PARAMS = (SUBSET_SIZE, LABELS_USED)


def run_metrics(stage: Mapping[str, float], t_split: float | str | None) -> dict[str, float]:
    """The metrics stage's values under the run's names (see METRIC_KEYS), for a trial with
    this t_split (None: a single model; "auto": sampled at the stage's chosen t_split).
    Subset facts are left out (`run_subset_params`)."""
    renames = _STAGE_NAMES[t_split is not None]
    metrics: dict[str, float] = {}
    for key, value in stage.items():
        name = renames.get(key, key)
        if name is not None and key not in SUBSET_PARAMS:
            metrics[name] = float(value)
    if t_split == AUTO_T_SPLIT:
        metrics[SAMPLED_T_SPLIT] = float(stage[CHOSEN_T_SPLIT])
    elif t_split is not None:
        metrics[SAMPLED_T_SPLIT] = float(t_split)
    return metrics


def run_subset_params(stage: Mapping[str, float]) -> dict[str, str]:
    """The subset facts among the metrics stage's values, as integer params."""
    return {key: str(int(stage[key])) for key in SUBSET_PARAMS if key in stage}


def run_name(trial: Trial, with_study: bool = False) -> str:
    """A short run name, e.g. "f0.25 balanced_nearest s0", "w8 t0.5 f1 random s0".

    Width and t_split appear only where the trial sets them; the study where asked (sweeps of
    more than one study).
    """
    parts = [trial.study] if with_study else []
    if trial.width is not None:
        parts.append(f"w{trial.width}")
    if trial.t_split is not None:
        parts.append(f"t{t_split_text(trial.t_split)}")
    parts += [f"f{trial.data_fraction:g}", trial.criterion, f"s{trial.seed}"]
    return " ".join(parts)


# Params of a trial's child run: the trial's own point ...
STUDY = "study"
DATA_FRACTION = "data_fraction"
CRITERION = "criterion"
WIDTH = "width"
SEED = "seed"
T_SPLIT = "t_split"  # logged only on coarse-to-fine trials (absent: no t_split)
TRIAL_PARAMS = (STUDY, DATA_FRACTION, CRITERION, WIDTH, SEED, T_SPLIT)
# ... and the sweep's settings that tell its runs apart in MLflow's Compare view.
DATASET = "dataset"
MODEL = "model"
REFERENCE_MODEL = "reference_model"
TRAIN_STEPS = "train_steps"
CONDITIONAL = "conditional"
SWEEP_PARAMS = (DATASET, MODEL, REFERENCE_MODEL, TRAIN_STEPS, CONDITIONAL)
# How a width of None (the model size's base width) is logged.
BASE_WIDTH = "base"
# t_split values read back as "no t_split" (absent is the one written; "None" from older runs).
NO_T_SPLIT = ("", "None")


def width_text(width: int | None) -> str:
    """A width as logged: "8", or BASE_WIDTH for None (the size's base width)."""
    return BASE_WIDTH if width is None else str(width)


def trial_params(trial: Trial) -> dict[str, str]:
    """The trial as MLflow params (strings; `t_split` only where it applies).

    The inverse of `trial_from_params`: `trial_from_params(trial_params(t)) == t`.
    """
    params = {
        STUDY: trial.study,
        DATA_FRACTION: str(trial.data_fraction),
        CRITERION: trial.criterion,
        WIDTH: width_text(trial.width),
        SEED: str(trial.seed),
    }
    if trial.t_split is not None:
        params[T_SPLIT] = str(trial.t_split)
    return params


def _param(params: Mapping[str, str], key: str) -> str:
    try:
        return params[key]
    except KeyError:
        raise ValueError(f"param {key} is missing") from None


def _parsed(key: str, text: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"param {key}: {text!r} is not {what}") from None


def _t_split(text: str) -> float | str | None:
    if text in NO_T_SPLIT:
        return None
    return AUTO_T_SPLIT if text == AUTO_T_SPLIT else _parsed(T_SPLIT, text, float)


def trial_from_params(params: Mapping[str, str]) -> Trial:
    """The Trial that `trial_params` wrote (other params of the run are ignored).

    Raises:
        ValueError: a trial param is missing or does not parse (a run of no trial).
    """
    width = _param(params, WIDTH)
    t_split = params.get(T_SPLIT, "")
    return Trial(
        study=_param(params, STUDY),
        data_fraction=_parsed(DATA_FRACTION, _param(params, DATA_FRACTION), float),
        criterion=_param(params, CRITERION),
        width=None if width == BASE_WIDTH else _parsed(WIDTH, width, int),
        t_split=_t_split(t_split),
        seed=_parsed(SEED, _param(params, SEED), int),
    )
