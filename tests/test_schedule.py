"""The order trials run in and the stages a local sweep builds before them (pure key maths)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_sweep
from orchestrator.schedule import run_order, shared_stages, trained_models
from orchestrator.trials import expand_trials

QUICKSTART = Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"


def test_the_reference_trains_beside_another_model_not_after_it(tmp_path: Path) -> None:
    cfg = load_sweep(QUICKSTART, [f"storage={tmp_path}"])
    trials = expand_trials(cfg)
    order = run_order(cfg, trials)
    assert sorted(order, key=trials.index) == trials  # the same trials, each once
    # First the full-data trial (its model is the reference, nothing else), then one trial per
    # model not trained yet (each also needs the reference), then the rest in file order.
    assert [t.name for t in order] == [
        "data_reduction-f1-balanced_nearest-wbase-tnone-s0",
        "data_reduction-f0.25-balanced_nearest-wbase-tnone-s0",
        "capacity-f1-random-w8-tnone-s0",
        "capacity-f1-random-wbase-tnone-s0",
        "coarse_to_fine-f1-random-w8-tauto-s0",
        "coarse_to_fine-f1-random-w8-t0.5-s0",
        "coarse_to_fine-f1-random-w8-t0.8-s0",
    ]
    models = [trained_models(cfg, t) for t in order]
    assert len(models[0]) == 1 and all(models[0] < m for m in models[1:3])
    assert len(set().union(*models)) == 3 and all(m <= models[2] for m in models[4:])


def test_shared_stages_stop_before_any_trained_velocity_model(tmp_path: Path) -> None:
    cfg = load_sweep(QUICKSTART, [f"storage={tmp_path}"])
    stages = [ref.stage for ref in shared_stages(cfg, expand_trials(cfg))]
    assert stages == [
        "autoencoder",
        "latents",
        "extractor",
        "data_features",
        "subset",
        "reference_stats",
        "floors",
    ]
    assert shared_stages(cfg, []) == []
