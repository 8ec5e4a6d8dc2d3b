"""The names a trial's MLflow run carries: its params and metrics, and the Trial <-> params
round trip.

Keys are the same in every run so MLflow's Compare view lines them up. Writers (the stages,
`orchestrator.tracking`) and readers (`orchestrator.report`) use these names, never literals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from orchestrator.trials import Trial

T = TypeVar("T")

# Metrics the metrics stage writes for every trial.
FID = "fid"
FID_MODEL = "fid_model"
FID_REFERENCE = "fid_reference"
PRECISION = "precision"
RECALL = "recall"
STABILITY_SIMILARITY = "stability_similarity"
STABILITY_UNRELATED = "stability_unrelated"
STABILITY_SIMILARITY_CENTRED = "stability_similarity_centred"
STABILITY_UNRELATED_CENTRED = "stability_unrelated_centred"
SPEEDUP = "speedup"
FLOP_SPEEDUP = "flop_speedup"
TRAIN_TIME_S = "train_time_s"
SAMPLE_TIME_S = "sample_time_s"
SUBSET_SIZE = "subset_size"
LABELS_USED = "labels_used"
# ... all of them, in this order (the same keys everywhere, for MLflow's Compare).
METRIC_KEYS = (
    FID,
    FID_MODEL,
    FID_REFERENCE,
    PRECISION,
    RECALL,
    STABILITY_SIMILARITY,
    STABILITY_UNRELATED,
    STABILITY_SIMILARITY_CENTRED,
    STABILITY_UNRELATED_CENTRED,
    SPEEDUP,
    FLOP_SPEEDUP,
    TRAIN_TIME_S,
    SAMPLE_TIME_S,
    SUBSET_SIZE,
    LABELS_USED,
)
# Coarse-to-fine trials also log this: their pair's automatically chosen t_split
# (lfm_core.coarse_to_fine.choose_t_split).
CHOSEN_T_SPLIT = "t_split_chosen"

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
        t_split=None if t_split in NO_T_SPLIT else _parsed(T_SPLIT, t_split, float),
        seed=_parsed(SEED, _param(params, SEED), int),
    )
