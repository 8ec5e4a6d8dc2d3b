"""MLflow tracking: one experiment per sweep, a parent run per invocation, a child run per trial.

Param and metric names are `orchestrator.schema`'s, the same in every run of a kind so MLflow's
Compare view lines them up: a child's params are its trial's (`schema.trial_params`, with the
width resolved to a number), the sweep's `schema.SWEEP_PARAMS` and its subset's
`schema.SUBSET_PARAMS`; its metrics are `schema.SINGLE_MODEL_METRICS` or
`schema.COARSE_TO_FINE_METRICS` (`schema.run_metrics`), and `schema.TRAIN_LOSS` as a step
series. Its name is short (`schema.run_name`, e.g. "f0.25 balanced_nearest s0"); its tags lead
to its model: the cache keys (`lfm.key.model`, `lfm.key.autoencoder`, and `lfm.key.fine` on
coarse-to-fine trials). Artefacts: the resolved config (`config.json`), a sample grid
(`samples.png`), a same-seed comparison grid (`comparison.png`: reference model on top, this
trial below) and the trained model as a diffusers pipeline folder (`pipeline/`, see
`export_trial`). A failed trial's run is FAILED with its one-line error in the `lfm.error` tag
and the traceback in `traceback.txt`. A trial re-run (e.g. `lfm sweep --resume`) reuses its
child run, found by the `lfm.trial` tag under the same parent, so there is one child per trial.

Everything goes through an explicit `MlflowClient(uri)`, never the global active run, so trial
drivers in different processes cannot mix runs up.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from torch import Tensor

from lfm_core.images import save_comparison, save_grid
from orchestrator import schema
from orchestrator.config import SQLITE_PREFIX, SweepConfig
from orchestrator.trials import Trial

if TYPE_CHECKING:
    from orchestrator.stages import StageGraph

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "lfm.trial"
SWEEP_TAG = "lfm.sweep"
KIND_TAG = "lfm.kind"
ERROR_TAG = "lfm.error"
KEY_TAG = "lfm.key."  # + model / autoencoder / fine: the stage's cache key
TRACEBACK_FILE = "traceback.txt"
PIPELINE_DIR = "pipeline"
COMPARISON_COLUMNS = 16
# MLflow keeps tag values up to 8000 characters; an error line is cut well below that.
ERROR_CHARS = 500


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


def base_width(name: str) -> int:
    """The base width of a velocity size (what width None means), read off a meta-device build:
    every registered size's first layer has `width` output channels."""
    import torch

    from lfm_core.velocity import VelocityConfig, build_velocity

    with torch.device("meta"):
        model = build_velocity(VelocityConfig(name=name, in_channels=4, sample_size=8))
    return int(next(model.parameters()).shape[0])


def child_params(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    """The child run's params: the trial's, its width resolved to a number (None: `model.width`,
    else the size's base width), then the sweep's (identical keys in every run; t_split only
    where it applies)."""
    width = trial.width if trial.width is not None else cfg.model.width
    sweep: dict[str, Any] = {
        schema.DATASET: cfg.data.name,
        schema.MODEL: cfg.model.name,
        schema.REFERENCE_MODEL: cfg.reference.name,
        schema.TRAIN_STEPS: cfg.train.steps,
        schema.CONDITIONAL: cfg.data.conditional,
    }
    resolved = width if width is not None else base_width(cfg.model.name)
    params = schema.trial_params(dataclasses.replace(trial, width=resolved))
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
    name = schema.run_name(trial, with_study=len(cfg.search) > 1)
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_batch(
        run.info.run_id, params=[Param(k, v) for k, v in child_params(cfg, trial).items()]
    )
    return run.info.run_id


@dataclass(frozen=True)
class TrialOutcome:
    """What a finished trial's run logs.

    Attributes:
        trial: the trial.
        metrics: the metrics stage's values (its own names; `schema.run_metrics` renames them).
        grid: (N, C, H, W) in [-1, 1], this trial's first samples.
        reference_grid: (N, C, H, W), the reference model's samples of the same seeds.
        losses: (step, training loss) of the trial's model, in step order (may be empty: a
            model cached before loss histories were kept).
        fid_curve: (step, FID) of the trial model's EMA snapshots (`sampling.fid_every`).
        keys: tag suffix -> cache key (model, autoencoder, fine).
        pipeline: a diffusers pipeline folder of the trial's model(s), or None.
    """

    trial: Trial
    metrics: dict[str, float]
    grid: Tensor
    reference_grid: Tensor
    losses: Sequence[tuple[int, float]] = ()
    fid_curve: Sequence[tuple[int, float]] = ()
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    pipeline: Path | None = None


def _metric(key: str, value: float, step: int = 0) -> Metric:
    return Metric(key, float(value) if math.isfinite(value) else math.nan, 0, step)


def finish_child(cfg: SweepConfig, run_id: str, outcome: TrialOutcome) -> None:
    """Log a trial's metrics, loss curve, params of its subset, tags, config, grids and
    pipeline, and mark its run FINISHED (non-finite values are logged as NaN)."""
    client = client_for(cfg)
    metrics = schema.run_metrics(outcome.metrics, outcome.trial.t_split)
    values = [_metric(k, v) for k, v in metrics.items()]
    values += [_metric(schema.TRAIN_LOSS, loss, step) for step, loss in outcome.losses]
    values += [_metric(schema.FID_CURVE, value, step) for step, value in outcome.fid_curve]
    subset = schema.run_subset_params(outcome.metrics)
    tags = {f"{KEY_TAG}{name}": key for name, key in outcome.keys.items()}
    # log_batch takes at most 1000 metrics per call.
    for start in range(0, max(len(values), 1), 1000):
        client.log_batch(run_id, metrics=values[start : start + 1000])
    client.log_batch(run_id, params=[Param(k, v) for k, v in subset.items()])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_grid(outcome.grid, Path(tmp, "samples.png"))
        columns = min(COMPARISON_COLUMNS, outcome.grid.shape[0], outcome.reference_grid.shape[0])
        grids = [outcome.reference_grid[:columns], outcome.grid[:columns]]
        save_comparison(grids, Path(tmp, "comparison.png"))
        client.log_artifacts(run_id, tmp)
    if outcome.pipeline is not None:
        client.log_artifacts(run_id, str(outcome.pipeline), PIPELINE_DIR)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and message, whitespace collapsed, cut to ERROR_CHARS."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def fail_child(cfg: SweepConfig, run_id: str, error: str = "", traceback: str = "") -> None:
    """Mark a trial's run FAILED (its driver raised), with the error line as the `lfm.error`
    tag and the traceback as `traceback.txt`."""
    client = client_for(cfg)
    if error:
        client.set_tag(run_id, ERROR_TAG, error)
    if traceback:
        client.log_text(run_id, traceback, TRACEBACK_FILE)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))


def export_trial(graph: StageGraph, trial: Trial, directory: Path) -> Path:
    """Write a trial's trained model as a diffusers pipeline folder, building what is missing.

    A single-model trial gives a `LatentFlowPipeline` (its model and autoencoder); a
    coarse-to-fine trial a `CoarseToFinePipeline` (its model as coarse, the reference as fine,
    its t_split). Either loads with the class's `from_pretrained`, or with diffusers'
    `DiffusionPipeline.from_pretrained(directory, custom_pipeline=str(
    lfm_core.pipeline.custom_pipeline_file(directory)), trust_remote_code=True)`.

    Returns:
        The folder.
    """
    from lfm_core.pipeline import export_coarse_to_fine, export_pipeline

    refs = graph.trial(trial)
    vae = graph.load_autoencoder(trial_keys_refs(graph, trial)["autoencoder"])
    model = graph.load_model(refs.model)
    if refs.t_split is None:
        export_pipeline(directory, vae, model)
    else:
        export_coarse_to_fine(directory, vae, model, graph.load_model(refs.reference), refs.t_split)
    return directory


def trial_keys_refs(graph: StageGraph, trial: Trial) -> dict[str, Any]:
    """The stage refs a trial's run tags by key: model, autoencoder (and fine, coarse-to-fine)."""
    from orchestrator import stage_keys

    refs = stage_keys.pair(graph.cfg, trial)  # no t_split needed: "auto" trials choose nothing
    found = {"model": refs.model, "autoencoder": stage_keys.autoencoder(graph.cfg)}
    if trial.t_split is not None:
        found["fine"] = refs.reference
    return found


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
