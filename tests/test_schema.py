"""orchestrator.schema: the Trial <-> MLflow params round trip and the names runs carry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import schema
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.report_tables import TrialRecord
from orchestrator.tracking import child_params
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
            assert record.trial == dataclasses.replace(trial, width=width)


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


def test_metric_keys_are_distinct_and_hold_no_chosen_t_split() -> None:
    assert len(set(schema.METRIC_KEYS)) == len(schema.METRIC_KEYS)
    assert schema.CHOSEN_T_SPLIT not in schema.METRIC_KEYS
