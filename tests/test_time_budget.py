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
        {"stage": "seam_state", "key": "q", "seconds": 5.0},
        {"stage": "seam_model", "key": "m3", "seconds": 30.0},
    ]
    # m2's record says more training than its build took (clock skew): capped at the build.
    budget = budget_of(records, {"m1": 125.0, "m2": 70.0, "m3": 20.0}, wall=400.0)
    assert budget.training == 100.0 + 125.0 + 60.0 + 20.0
    assert budget.ray_train_fixed == 25.0 + 10.0
    assert budget.sampling == 25.0 and budget.metrics == 5.0
    assert budget.other == 400.0 - 370.0
    assert budget.useful_fraction == pytest.approx(335.0 / 400.0)
    assert "useful 84%" in budget.line()
    # Overlapping builds (trials side by side) can sum past the wall time: other is then 0.
    assert budget_of(records, {}, wall=100.0).other == 0.0


def test_two_trial_slots_share_their_time() -> None:
    """Two trials at once for 200 s: 400 slot-seconds, of which 300 built and 100 idle."""
    records = [
        {"stage": "fm_model", "key": "m1", "seconds": 180.0},
        {"stage": "fm_model", "key": "m2", "seconds": 120.0},
    ]
    budget = budget_of(records, {"m1": 160.0, "m2": 100.0}, wall=200.0, slots=2)
    assert budget.capacity == 400.0
    assert budget.ray_train_fixed == 40.0 and budget.other == 100.0
    assert budget.useful_fraction == pytest.approx(260.0 / 400.0)
    assert budget.line().startswith("time of 200 s x 2 trial slots: 260 s training (65%)")
    # A build that held both slots (the sweep's own process, every core) counts twice.
    shared = [{"stage": "autoencoder", "key": "a", "seconds": 50.0, "slots": 2}, *records]
    budget = budget_of(shared, {"m1": 160.0, "m2": 100.0}, wall=250.0, slots=2)
    assert budget.training == 100.0 + 260.0 and budget.other == 500.0 - 400.0
