"""Coarse-to-fine trials in the stage graph: `t_split: auto` samples at the chosen t_split, and
`coarse_to_fine.seam` fine-tunes the coarse model on the fine model's cached seam states.

Models are trained by the in-process trainer on the tiny sweep's data with a tiny DINOv2 as
the feature extractor (as tests/test_orch_stages.py), so every stage runs its real builder.
The two graph tests train and sample four tiny models (2-3 minutes on a loaded 2-core
machine), so they are integration tests; the key, config, schema and table tests are fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_orch_stages import _built, _graph  # the tiny graph of the stage tests

from lfm_core.coarse_to_fine import seam_states
from lfm_core.errors import ConfigError
from lfm_core.sampling import sample_seeds
from orchestrator import schema
from orchestrator import stage_keys as keys
from orchestrator.config import load_sweep
from orchestrator.report_tables import TrialRecord, coarse_to_fine_table
from orchestrator.stage_builders import LATENTS_FILE, SEAM_FILE
from orchestrator.trials import Trial

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
BASE = ["tracking.uri=http://127.0.0.1:9", "data.limit=64", "data.heldout_limit=16"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One storage for the graph tests: they share the autoencoder, latents and models."""
    return tmp_path_factory.mktemp("c2f")


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_auto_trial_samples_at_exactly_the_chosen_t_split(storage: Path, tiny_dinov2: Path) -> None:
    graph = _graph(storage, tiny_dinov2)
    auto = Trial("c2f", 0.5, "random", None, "auto", 0)
    refs = graph.trial(auto)
    choice = keys.pair(graph.cfg, auto).choice
    assert choice is not None
    chosen = graph.info(choice)["t_split"]
    assert refs.t_split == chosen and refs.samples.inputs["t_split"] == chosen
    metrics = graph.metrics(auto)
    assert metrics[schema.CHOSEN_T_SPLIT] == chosen
    assert schema.run_metrics(metrics, "auto")[schema.SAMPLED_T_SPLIT] == chosen
    # An explicit trial at the chosen value has the very same stages ...
    explicit = Trial("c2f", 0.5, "random", None, chosen, 0)
    assert keys.trial(graph.cfg, explicit).metrics.key == refs.metrics.key
    # ... and the auto trial's samples are, bit for bit, coarse-to-fine sampling at `chosen`.
    coarse, fine = graph.load_model(refs.model), graph.load_model(refs.reference)
    settings = graph.sampler(refs.samples.inputs)
    first = graph.cfg.sampling.first_seed
    seeds = list(range(first, first + graph.cfg.sampling.num_samples))
    latents = graph.load_samples(refs.samples)["latents"]
    assert torch.equal(latents, sample_seeds(coarse, fine, seeds, chosen, settings).latents)
    elsewhere = 0.9 if chosen < 0.9 else 0.3
    assert not torch.equal(latents, sample_seeds(coarse, fine, seeds, elsewhere, settings).latents)


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_seam_trial_fine_tunes_on_the_fine_models_backward_ode_states(
    storage: Path, tiny_dinov2: Path
) -> None:
    seam = ("coarse_to_fine.seam=true", "coarse_to_fine.seam_steps=4")
    graph = _graph(storage, tiny_dinov2, *seam)
    cfg, point = graph.cfg, Trial("c2f", 0.5, "random", None, 0.5, 0)
    refs = graph.trial(point)
    assert refs.seam_model is not None
    metrics = graph.metrics(point)
    for name in (schema.FID_SEAM, "speedup_seam", "flop_speedup_seam"):
        assert name in metrics
    run = schema.run_metrics(metrics, point.t_split)
    assert schema.SPEEDUP_VS_FINE_SEAM in run and schema.FID_SEAM in run
    assert _built(graph)["seam_model"] == 1  # trained once, by the graph's trainer
    # The cached states are the fine model's ODE run backwards from each training latent.
    state_ref = refs.seam_model.upstream["seam_state"]
    cached = load_file(str(graph.get(state_ref) / SEAM_FILE))["states"]
    latents = graph.tensors(keys.latents(cfg), LATENTS_FILE)["latents"]
    fine = graph.load_model(refs.reference)
    sampling = cfg.sampling
    expected = seam_states(fine, latents, 0.5, steps=sampling.steps, method=sampling.solver)
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert graph.info(state_ref)["seam_time"] == pytest.approx(0.5)
    # One seam state per (fine model, t_split): other subsets' seam models share it.
    full = Trial("c2f", 1.0, "random", None, 0.5, 0)
    assert keys.trial(cfg, full).seam_model.upstream["seam_state"].key == state_ref.key
    tuned, coarse = graph.load_model(refs.seam_model), graph.load_model(refs.model)
    assert any(
        not torch.equal(a, b) for a, b in zip(tuned.parameters(), coarse.parameters(), strict=True)
    )


def test_seam_off_keeps_the_metrics_key_and_adds_no_stage(tmp_path: Path) -> None:
    plain = load_sweep(TINY, [f"storage={tmp_path}", *BASE])
    off = load_sweep(TINY, [f"storage={tmp_path}", *BASE, "coarse_to_fine.seam_weight=0.5"])
    on = load_sweep(TINY, [f"storage={tmp_path}", *BASE, "coarse_to_fine.seam=true"])
    point = Trial("c2f", 0.5, "random", None, 0.5, 0)
    assert keys.trial(plain, point).metrics.key == keys.trial(off, point).metrics.key
    assert keys.trial(plain, point).seam_model is None
    assert keys.trial(on, point).metrics.key != keys.trial(plain, point).metrics.key
    single = Trial("c2f", 0.5, "random", None, None, 0)
    assert keys.trial(on, single).metrics.key == keys.trial(plain, single).metrics.key
    # The seam model trains a quarter of train.steps by default, from the coarse model.
    tuned = keys.trial(on, point).seam_model
    assert tuned is not None and tuned.inputs["train"]["steps"] == max(1, on.train.steps // 4)
    assert tuned.inputs["weight"] == 0.1


def test_auto_t_split_config_schema_and_names(tmp_path: Path) -> None:
    base = [f"storage={tmp_path}", *BASE]
    cfg = load_sweep(TINY, [*base, "search.c2f.t_split=[auto, 0.5, 1]"])
    assert cfg.search["c2f"].t_split == ["auto", 0.5, 1.0]
    trial = Trial("c2f", 0.5, "random", 8, "auto", 0)
    assert schema.trial_from_params(schema.trial_params(trial)) == trial
    assert schema.run_name(trial) == "w8 tauto f0.5 random s0"
    assert trial.name.endswith("-tauto-s0")
    with pytest.raises(ValueError, match="auto needs the chosen"):
        keys.trial(cfg, trial)
    assert keys.stages_of(cfg, trial)[-1].stage == "t_split_choice"
    with pytest.raises(ConfigError) as bad:
        load_sweep(TINY, [*base, "search.c2f.t_split=[sometimes]"])
    assert str(bad.value).startswith("search.c2f.t_split: 'sometimes' is not allowed")
    assert "\n" not in str(bad.value) and "auto" in str(bad.value)
    with pytest.raises(ConfigError, match="^train.t_sampling: 'logit_normal'"):
        load_sweep(TINY, [*base, "coarse_to_fine.seam=true", "train.t_sampling=logit_normal"])
    with pytest.raises(ConfigError, match="^coarse_to_fine.seam_weight"):
        load_sweep(TINY, [*base, "coarse_to_fine.seam_weight=-1"])


def _record(t_split: float | str, seed: int, metrics: dict[str, float]) -> TrialRecord:
    trial = Trial("c2f", 1.0, "random", 8, t_split, seed)
    params = {**schema.trial_params(trial), schema.MODEL: "unet-xs"}
    params[schema.REFERENCE_MODEL] = "unet-xs"
    return TrialRecord.from_run(f"r{t_split}{seed}", "n", "FINISHED", params, metrics)


def test_table3_has_the_auto_row_with_its_chosen_t_split_and_seam_columns() -> None:
    records = [
        _record(0.5, 0, {schema.FID: 10.0, schema.FID_SEAM: 9.0}),
        _record("auto", 0, {schema.FID: 12.0, schema.CHOSEN_T_SPLIT: 0.3}),
        _record("auto", 1, {schema.FID: 14.0, schema.CHOSEN_T_SPLIT: 0.3}),
    ]
    table = coarse_to_fine_table(records)
    assert [row.labels[3] for row in table.rows] == ["0.5", "auto (0.30)"]
    assert table.cell(table.rows[1], schema.FID).mean == 13.0
    assert table.cell(table.rows[0], schema.FID_SEAM).mean == 9.0
