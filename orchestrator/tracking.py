"""MLflow tracking: one experiment per sweep, a parent run per invocation, a child run per trial.

Param and metric names are `orchestrator.schema`'s, the same in every run so MLflow's Compare
view lines them up: a child's params are its trial's (`schema.trial_params`, with the width
resolved) and the sweep's `schema.SWEEP_PARAMS`; its metrics are `schema.METRIC_KEYS` (and
`schema.CHOSEN_T_SPLIT` on coarse-to-fine trials). Artefacts: the resolved config
(`config.json`), a sample grid (`samples.png`) and a same-seed comparison grid
(`comparison.png`: reference model on top, this trial below). A trial re-run (e.g.
`lfm sweep --resume`) reuses its child run, found by the `lfm.trial` tag under the same parent,
so there is one child per trial.

Everything goes through an explicit `MlflowClient(uri)`, never the global active run, so trial
drivers in different processes cannot mix runs up.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from torch import Tensor

from lfm_core.images import save_comparison, save_grid
from orchestrator import schema
from orchestrator.config import SQLITE_PREFIX, SweepConfig
from orchestrator.trials import Trial

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "lfm.trial"
SWEEP_TAG = "lfm.sweep"
KIND_TAG = "lfm.kind"
COMPARISON_COLUMNS = 16


def client_for(cfg: SweepConfig) -> MlflowClient:
    """A client of the sweep's tracking URI (the sqlite file's folder is created if needed)."""
    uri = cfg.tracking_uri
    if uri.startswith(SQLITE_PREFIX):
        Path(uri[len(SQLITE_PREFIX) :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(cfg: SweepConfig) -> str:
    """The sweep's experiment id, created (with the database schema) when missing.

    Call it in the sweep driver before any trial starts: parallel schema creation races.
    """
    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(
        cfg.experiment, artifact_location=cfg.tracking.artifact_location
    )


def start_parent(cfg: SweepConfig, experiment_id: str, num_trials: int) -> str:
    """Create this invocation's parent run, log the resolved config; returns its run id."""
    client = client_for(cfg)
    run = client.create_run(
        experiment_id,
        run_name=f"{cfg.name}-sweep",
        tags={SWEEP_TAG: cfg.name, KIND_TAG: "sweep", "profile": cfg.profile},
    )
    run_id = run.info.run_id
    params = {
        "sweep": cfg.name,
        "profile": cfg.profile,
        "num_trials": num_trials,
        "dataset": cfg.data.name,
    }
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    return run_id


def reopen(cfg: SweepConfig, parent_id: str) -> None:
    """Mark a parent run RUNNING again (a resumed sweep continues its parent)."""
    client_for(cfg).update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))


def child_params(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    """The child run's params: the trial's, its width resolved (None: `model.width`), then the
    sweep's (identical keys in every run; t_split only where it applies)."""
    width = trial.width if trial.width is not None else cfg.model.width
    sweep: dict[str, Any] = {
        schema.DATASET: cfg.data.name,
        schema.MODEL: cfg.model.name,
        schema.REFERENCE_MODEL: cfg.reference.name,
        schema.TRAIN_STEPS: cfg.train.steps,
        schema.CONDITIONAL: cfg.data.conditional,
    }
    params = schema.trial_params(dataclasses.replace(trial, width=width))
    return {**params, **{key: str(value) for key, value in sweep.items()}}


def child_run(cfg: SweepConfig, experiment_id: str, parent_id: str, trial: Trial) -> str:
    """The trial's child run id: its existing run under this parent, else a new one (RUNNING)."""
    client = client_for(cfg)
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial.name}'",
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id
    tags = {PARENT_TAG: parent_id, TRIAL_TAG: trial.name, SWEEP_TAG: cfg.name, KIND_TAG: "trial"}
    run = client.create_run(experiment_id, run_name=trial.name, tags=tags)
    client.log_batch(
        run.info.run_id, params=[Param(k, v) for k, v in child_params(cfg, trial).items()]
    )
    return run.info.run_id


def finish_child(
    cfg: SweepConfig,
    run_id: str,
    metrics: dict[str, float],
    grid: Tensor,
    reference_grid: Tensor,
) -> None:
    """Log a trial's metrics, config and grids, and mark its run FINISHED.

    Args:
        metrics: name -> value (non-finite values are logged as NaN, which MLflow shows).
        grid: (N, C, H, W) in [-1, 1], this trial's first samples.
        reference_grid: (N, C, H, W), the reference model's samples of the same seeds.
    """
    client = client_for(cfg)
    values = [
        Metric(k, float(v) if math.isfinite(v) else math.nan, 0, 0) for k, v in metrics.items()
    ]
    client.log_batch(run_id, metrics=values)
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_grid(grid, Path(tmp, "samples.png"))
        columns = min(COMPARISON_COLUMNS, grid.shape[0], reference_grid.shape[0])
        save_comparison([reference_grid[:columns], grid[:columns]], Path(tmp, "comparison.png"))
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))


def fail_child(cfg: SweepConfig, run_id: str) -> None:
    """Mark a trial's run FAILED (its driver raised)."""
    client_for(cfg).set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))


def close_parent(cfg: SweepConfig, experiment_id: str, parent_id: str, failed: bool) -> int:
    """End the parent run; children still RUNNING (trials that never finished) become KILLED.

    Returns:
        The number of children marked KILLED.
    """
    client = client_for(cfg)
    running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for run in running:
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    client.set_terminated(parent_id, status=RunStatus.to_string(status))
    return len(running)


def children(cfg: SweepConfig, experiment_id: str, parent_id: str) -> list[Any]:
    """The parent's child runs (mlflow Run objects)."""
    return client_for(cfg).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
