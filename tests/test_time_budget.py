"""Where a sweep's wall time went: build records by category, Ray Train's part of a fit."""

from __future__ import annotations

import pytest

from orchestrator.time_budget import budget_of


def test_builds_split_into_training_sampling_metrics_and_fixed_costs() -> None:
    records = [
        {"stage": "autoencoder", "key": "a", "seconds": 100.0},
        {"stage": "fm_model", "key": "m1", "seconds": 150.0},
        {"stage": "fm_model", "key": "m2", "seconds": 60.0},
        {"stage": "samples", "key": "s", "seconds": 8.0},
        {"stage": "fid_curve", "key": "c", "seconds": 12.0},
        {"stage": "metrics", "key": "x", "seconds": 1.0},
        {"stage": "floors", "key": "f", "seconds": 4.0},
    ]
    # m2's record says more training than its build took (clock skew): capped at the build.
    budget = budget_of(records, {"m1": 125.0, "m2": 70.0}, wall=400.0)
    assert budget.training == 100.0 + 125.0 + 60.0
    assert budget.ray_train_fixed == 25.0
    assert budget.sampling == 20.0 and budget.metrics == 5.0
    assert budget.other == 400.0 - 335.0
    assert budget.useful_fraction == pytest.approx(310.0 / 400.0)
    assert "useful 78%" in budget.line()
    # Overlapping builds (trials side by side) can sum past the wall time: other is then 0.
    assert budget_of(records, {}, wall=100.0).other == 0.0
