"""orchestrator.schema: the Trial <-> MLflow params round trip and the names runs carry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import schema
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.report_tables import TrialRecord
from orchestrator.tracking import base_width, child_params
from orchestrator.trials import Trial, expand_trials

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
PROFILES = ("embedded", "paper")


def _trials(tmp_path: Path) -> dict[str, tuple[SweepConfig, list[Trial]]]:
    """Every sweep file under every profile it has: (config, its trials)."""
    found = {}
    for path in SWEEPS:
        for profile in PROFILES:
            if profile != "embedded" and f"{profile}:" not in path.read_text():
                continue
            cfg = load_sweep(path, [f"profile={profile}", f"storage={tmp_path}"])
            found[f"{path.name}:{profile}"] = (cfg, expand_trials(cfg))
    return found


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LFM_STORAGE", raising=False)


def test_every_trial_of_the_sweep_files_survives_the_round_trip(tmp_path: Path) -> None:
    sweeps = _trials(tmp_path)
    assert len(sweeps) >= len(SWEEPS) + 5  # five files have a paper profile
    trials = [t for _, ts in sweeps.values() for t in ts]
    # The files cover both sides of every None: base widths and plain (no t_split) trials.
    assert any(t.width is None for t in trials) and any(t.width is not None for t in trials)
    assert any(t.t_split is None for t in trials) and any(t.t_split is not None for t in trials)
    for trial in trials:
        params = schema.trial_params(trial)
        assert all(isinstance(v, str) for v in params.values())
        assert schema.trial_from_params(params) == trial


def test_report_rebuilds_the_logged_trial_with_its_width_resolved(tmp_path: Path) -> None:
    for cfg, trials in _trials(tmp_path).values():
        for trial in trials:
            params = child_params(cfg, trial)
            assert set(params) == {*schema.TRIAL_PARAMS, *schema.SWEEP_PARAMS} - (
                set() if trial.t_split is not None else {schema.T_SPLIT}
            )
            record = TrialRecord.from_run("id", trial.name, "FINISHED", params, {})
            width = trial.width if trial.width is not None else cfg.model.width
            width = width if width is not None else base_width(cfg.model.name)
            assert params[schema.WIDTH].isdigit()  # a number, never "base"
            assert record.trial == dataclasses.replace(trial, width=width)


def test_base_widths_are_the_sizes_own() -> None:
    assert base_width("unet-s") == 32 and base_width("unet-xs") == 16
    assert base_width("dit-xs") == 128 and base_width("dit-xl") == 1152


def test_none_is_written_and_read_back_one_way() -> None:
    trial = Trial("s", 0.25, "random", None, None, 3)
    params = schema.trial_params(trial)
    assert params[schema.WIDTH] == schema.BASE_WIDTH and schema.T_SPLIT not in params
    # Older runs logged t_split "None"; it still reads as no t_split.
    assert schema.trial_from_params({**params, schema.T_SPLIT: "None"}) == trial
    assert schema.trial_params(dataclasses.replace(trial, width=8, t_split=0.7)) == {
        **params,
        schema.WIDTH: "8",
        schema.T_SPLIT: "0.7",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({schema.SEED: None}, "param seed is missing"),
        ({schema.STUDY: None}, "param study is missing"),
        ({schema.DATA_FRACTION: "half"}, "param data_fraction: 'half' is not a number"),
        ({schema.WIDTH: "wide"}, "param width: 'wide' is not an integer"),
        ({schema.T_SPLIT: "late"}, "param t_split: 'late' is not a number"),
    ],
)
def test_params_of_no_trial_are_one_line_errors(change: dict, message: str) -> None:
    params = schema.trial_params(Trial("s", 0.5, "random", 8, 0.5, 0))
    params = {k: v for k, v in {**params, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=f"^{message}$"):
        schema.trial_from_params(params)


def test_metric_keys_are_distinct() -> None:
    assert len(set(schema.METRIC_KEYS)) == len(schema.METRIC_KEYS)
    assert schema.TRAIN_LOSS not in schema.METRIC_KEYS  # a step series, not a last value


STAGE = {
    "fid": 10.0,
    "fid_model": 12.0,
    "fid_reference": 9.0,
    "speedup": 1.5,
    "flop_speedup": 2.0,
    "subset_size": 128.0,
    "labels_used": 0.0,
    "t_split_chosen": 0.3,
}


def test_run_metrics_say_what_they_compare() -> None:
    single = schema.run_metrics({k: v for k, v in STAGE.items() if k != "t_split_chosen"}, None)
    assert single == {
        schema.FID: 10.0,
        schema.FID_REFERENCE: 9.0,
        schema.SPEEDUP_VS_REFERENCE: 1.5,
        schema.FLOP_SPEEDUP_VS_REFERENCE: 2.0,
    }
    pair = schema.run_metrics(STAGE, 0.5)
    assert pair == {
        schema.FID: 10.0,
        schema.FID_COARSE_ALONE: 12.0,
        schema.FID_REFERENCE: 9.0,
        schema.SPEEDUP_VS_FINE: 1.5,
        schema.FLOP_SPEEDUP_VS_FINE: 2.0,
        schema.CHOSEN_T_SPLIT: 0.3,
        schema.SAMPLED_T_SPLIT: 0.5,
    }
    assert set(pair) <= set(schema.METRIC_KEYS) and set(single) <= set(schema.METRIC_KEYS)
    assert schema.run_subset_params(STAGE) == {"subset_size": "128", "labels_used": "0"}


def test_run_names_are_short() -> None:
    trial = Trial("data_reduction", 0.25, "balanced_nearest", None, None, 0)
    assert schema.run_name(trial) == "f0.25 balanced_nearest s0"
    pair = Trial("coarse_to_fine", 1.0, "random", 8, 0.5, 1)
    assert schema.run_name(pair, with_study=True) == "coarse_to_fine w8 t0.5 f1 random s1"
