"""Sweeps on Ray Tune: one function trainable (the trial "driver") per point of the grid.

Trial semantics. A trial (data_fraction, criterion, width, t_split, seed):
- trains the FM model `model.name` at `width` (None: `model.width`) on subset(data_fraction,
  criterion, seed) of the training latents, with `train` settings and seed `seed`, on Ray Train;
- samples it from the fixed noise seeds `sampling.first_seed + i`, i < `sampling.num_samples`;
- `fid`: FID of those samples against the held-out split (features `features.fid`);
  `precision` / `recall`: k-NN precision and recall against the same held-out features;
- `stability_similarity`: mean cosine similarity (features `features.stability`) between each
  sample and the reference model's sample of the same seed, the reference model being trained
  on the full data at `reference.name` / `reference.width`, with the trial's seed and the same
  sampling noise; `stability_unrelated`: the same with the pairs shuffled (the baseline);
  `*_centred`: both after removing the mean feature;
- when t_split is set: coarse-to-fine sampling with this model as the coarse model for
  t < t_split and the reference as the fine model; `fid`, `precision`, `recall` and the
  stability metrics are those of the coarse-to-fine samples, `fid_model` is this model alone,
  `speedup` = reference-alone sampling time / coarse-to-fine time (measured side by side on
  one batch, median of `sampling.timing_repeats`), and `flop_speedup` is the FLOP-count bound;
- t_split "auto": the trial first builds its t_split_choice stage and then samples at the
  t_split it chose (`t_split_sampled`), with the stages of an explicit trial at that value;
- with `coarse_to_fine.seam`, a coarse-to-fine trial also fine-tunes its model with the seam
  loss against the reference at its t_split (on Ray Train) and logs `fid_seam`,
  `speedup_vs_fine_seam` and `flop_speedup_vs_fine_seam` of that model's coarse-to-fine samples;
- when t_split is not set: `speedup` = reference time / this model's time, `flop_speedup` =
  reference FLOPs / this model's FLOPs per evaluation;
- `train_time_s`: the Ray Train workers' training time; `sample_time_s`: the time to sample all
  seeds; `subset_size`; `labels_used`: labels a class-conditional model needed (0 otherwise);
  `fid_reference`: the reference model alone.
Trials share every stage they have in common through the cache (one autoencoder, feature
extractor and reference model per sweep; a data fraction of 1 is one shared model whatever the
criterion), and a stage built once is reused by later sweeps.

Resources: each trial's driver takes `resources.driver_cpus` (and `driver_gpus`), its Ray Train
workers `num_workers * cpus_per_worker` more (`orchestrator.cluster_fit`). Before any trial is
scheduled the demand is checked against the cluster's node types (a one-line error when no node
type can hold it), and the trials run at once are what the cluster holds at its autoscaler's
maximum, capped by `resources.max_concurrent_trials`: a 2-CPU machine runs one trial at a time
instead of deadlocking. A trial driver lost with its node is restarted by Tune
(`resources.max_trial_failures`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import cluster_fit, schedule, schema, tracking
from orchestrator.cache import StageCache, StageRef
from orchestrator.config import ResourcesSection, SweepConfig, check_local_paths
from orchestrator.schema import METRIC_KEYS, run_metrics
from orchestrator.stage_builders import LOSS_HISTORY
from orchestrator.stages import StageGraph
from orchestrator.storage import Storage
from orchestrator.time_budget import TimeBudget, sweep_budget
from orchestrator.trials import Trial, expand_trials

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
SWEEPS_DIR = "sweeps"
# Local clusters only: the preemption watcher (a spot-instance feature) costs one more actor
# process per Ray Train run.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def cache_for(cfg: SweepConfig) -> StageCache:
    """The stage cache under the sweep's storage."""
    return StageCache(Storage(cfg.storage_uri), wait_timeout_s=cfg.cache_wait_timeout_s)


def init_ray(cfg: SweepConfig, address: str | None = None) -> bool:
    """Connect to `address` / $RAY_ADDRESS, or start a local Ray; returns True when local.

    An already initialised Ray (a notebook, a test, a job's driver) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=cfg.resources.num_cpus, include_dashboard=False)
    return True


def driver_threads(res: ResourcesSection) -> int:
    """Torch threads of a trial's driver: the CPUs this process may run on (its node, its
    container's affinity), capped by what the trial holds.

    The driver and its workers take turns (the driver waits while they train), so the
    driver's own stages may use the trial's CPUs without oversubscribing the node; never more
    than the node it actually runs on has (a 4-vCPU node runs 4, not 65).
    """
    available = len(os.sched_getaffinity(0))
    held = res.driver_cpus + res.num_workers * res.cpus_per_worker
    return max(1, min(available, math.floor(held)))


def trial_driver(
    config: dict[str, Any], *, cfg: SweepConfig, experiment_id: str, parent_id: str
) -> None:
    """Ray Tune function trainable: build or reuse the trial's stages, log it, report metrics."""
    from ray import tune

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(driver_threads(cfg.resources))
    trial = Trial(**config["trial"])
    graph = StageGraph(cfg, cache_for(cfg), progress=False)
    run_id = tracking.child_run(cfg, experiment_id, parent_id, trial)
    try:
        metrics = graph.metrics(trial)
        with tempfile.TemporaryDirectory() as tmp:
            tracking.finish_child(cfg, run_id, trial_outcome(graph, trial, metrics, Path(tmp)))
    except BaseException as err:
        line = tracking.error_line(err)
        tracking.fail_child(cfg, run_id, line, traceback.format_exc())
        raise TrialError(line) from err
    tune.report(run_metrics(metrics, trial.t_split))


class TrialError(RuntimeError):
    """A trial driver failed; its message is the one-line error (the traceback is in MLflow's
    traceback.txt and the sweep's log file)."""


def trial_outcome(
    graph: StageGraph, trial: Trial, metrics: dict[str, float], tmp: Path
) -> tracking.TrialOutcome:
    """What the trial's run logs; its pipeline folder is written under `tmp`."""
    refs = graph.trial(trial)
    keys = {name: ref.key for name, ref in tracking.trial_keys_refs(graph, trial).items()}
    losses = graph.info(refs.model).get(LOSS_HISTORY, [])
    curve_ref = refs.metrics.upstream.get("fid_curve")
    curve = graph.info(curve_ref) if curve_ref is not None else {"steps": [], "fid": []}
    return tracking.TrialOutcome(
        trial=trial,
        metrics=metrics,
        grid=graph.load_samples(refs.samples)["grid"],
        reference_grid=graph.load_samples(refs.reference_samples)["grid"],
        losses=[(int(step), float(loss)) for step, loss in losses],
        fid_curve=list(zip(curve["steps"], curve["fid"], strict=True)),
        keys=keys,
        pipeline=tracking.export_trial(graph, trial, tmp / tracking.PIPELINE_DIR),
    )


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep invocation did.

    Attributes:
        experiment_id, parent_run_id: where MLflow holds it.
        metrics: trial name -> its metrics (finished trials only).
        errors: names of trials that raised.
        seconds: wall-clock time of the invocation.
        time_budget: where that time went (`orchestrator.time_budget`).
        failures: trial name -> its one-line error (the trials of `errors`).
        log_file: where the failed trials' tracebacks were written (None: no failure).
    """

    experiment_id: str
    parent_run_id: str
    metrics: dict[str, dict[str, float]]
    errors: list[str]
    seconds: float
    failures: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None
    time_budget: TimeBudget | None = None


# Tune's status table: short trial names, the headline metrics, no config column.
TABLE_METRICS = {
    schema.FID: "fid",
    schema.STABILITY_SIMILARITY: "similarity",
    schema.STABILITY_UNRELATED: "unrelated",
    schema.SPEEDUP_VS_REFERENCE: "speedup_vs_ref",
    schema.SPEEDUP_VS_FINE: "speedup_vs_fine",
}
TABLE_EVERY_S = 120
_TRIAL_ERROR = re.compile(r"TrialError: (.*)")


def progress_reporter() -> Any:
    """Tune's progress: every TABLE_EVERY_S seconds one line counting the trials by status; at
    the end the table, a trial per row (short name, status, the headline metrics), under the
    elapsed time only (no scheduler, resource or log-folder lines)."""
    from collections import Counter

    from ray.tune import CLIReporter

    class TrialTable(CLIReporter):
        def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
            if done:
                self._print(self._progress_str(trials, done))
                return
            states = Counter(str(trial.status).lower() for trial in trials)
            counts = ", ".join(f"{number} {state}" for state, number in sorted(states.items()))
            seconds = time.time() - self._start_time
            self._print(f"tune: {len(trials)} trials: {counts} ({seconds:.0f} s)")

    return TrialTable(
        metric_columns=TABLE_METRICS,
        parameter_columns={"trial/seed": "seed"},  # an empty list would show the config
        max_report_frequency=TABLE_EVERY_S,
        print_intermediate_tables=True,
        max_column_length=24,
    )


def error_line(error: BaseException) -> str:
    """A failed trial's one-line error: the trial driver's TrialError message when Tune's error
    carries one, else the error's last line."""
    text = str(error)
    found = _TRIAL_ERROR.findall(text)
    if found:
        return found[-1].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def write_failures(cfg: SweepConfig, failed: dict[str, BaseException]) -> Path:
    """The failed trials' tracebacks, one section each, in the sweep's log file."""
    from orchestrator.config import resolve_locations

    path = resolve_locations(cfg.storage_uri).local_dir / "logs" / f"{cfg.name}-failures.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"==== {name}\n{err}\n\n" for name, err in failed.items()))
    return path


def _tuner(
    cfg: SweepConfig,
    trials: list[Trial],
    ids: tuple[str, str],
    resume: bool,
    concurrent: int,
) -> Any:
    from ray import tune

    experiment_id, parent_id = ids

    storage = Storage(cfg.storage_uri)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_driver, cfg=cfg, experiment_id=experiment_id, parent_id=parent_id
        ),
        {"cpu": cfg.resources.driver_cpus, "gpu": cfg.resources.driver_gpus},
    )
    path = storage.uri_of(f"{TUNE_DIR}/{cfg.name}")
    if resume:
        # Finished trials keep their results; unfinished and errored ones run again.
        return tune.Tuner.restore(path, trainable=trainable, restart_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            reuse_actors=True,  # trial drivers keep their imports (torch, lfm_core, mlflow)
            trial_name_creator=lambda t: schema.run_name(Trial(**t.config["trial"])),
            trial_dirname_creator=lambda t: f"{Trial(**t.config['trial']).name}-{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage.uri_of(TUNE_DIR),
            progress_reporter=progress_reporter(),
            verbose=1,
            # A driver lost with its node (spot preemption) restarts; its cached stages and its
            # Ray Train run (same name) carry on from where they were.
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_trial_failures),
        ),
    )


def can_resume(cfg: SweepConfig) -> bool:
    """True when the sweep has a Tune state to restore and a parent run to continue."""
    from ray import tune

    storage = Storage(cfg.storage_uri)
    return storage.exists(f"{SWEEPS_DIR}/{cfg.name}/parent_run.json") and tune.Tuner.can_restore(
        storage.uri_of(f"{TUNE_DIR}/{cfg.name}")
    )


def fit_cluster(cfg: SweepConfig, cluster_file: str | None = None) -> int:
    """Check the trials against the connected cluster before anything is scheduled; the
    number of trials to run at once.

    Node types: `cluster_file`'s, else the autoscaler's where Ray publishes them, else the
    cluster's nodes as they are (a cluster that does not grow, e.g. a local one).

    Raises:
        ConfigError: one line naming the resource, the demand and the largest node.
    """
    from lfm_core.errors import ConfigError

    nodes, hint = cluster_fit.running_node_types(cluster_file)
    demand = cluster_fit.trial_demand(cfg.resources)
    error = cluster_fit.fit_error(demand, nodes)
    if error is not None:
        raise ConfigError(error + hint)
    concurrent = cluster_fit.max_concurrent(demand, nodes, cfg.resources.max_concurrent_trials)
    log.info("trial demand %s; %d trial(s) at once", demand.describe(), concurrent)
    return concurrent


def build_shared_stages(cfg: SweepConfig, trials: list[Trial]) -> None:
    """Build the stages every trial shares (`schedule.shared_stages`) in this process, with
    the threads of every CPU the local Ray has, before several trials start at once."""
    refs = schedule.shared_stages(cfg, trials)
    log.info("building %d stages every trial shares first: %s", len(refs), stage_names(refs))
    threads = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(min(cpus, cfg.resources.num_cpus or cpus))
    try:
        graph = StageGraph(cfg, cache_for(cfg))
        for ref in refs:
            graph.get(ref)
    finally:
        torch.set_num_threads(threads)


def stage_names(refs: list[StageRef]) -> str:
    """The stages' names, each once, in order: "autoencoder, latents, ..."."""
    return ", ".join(dict.fromkeys(ref.stage for ref in refs))


def run_sweep(
    cfg: SweepConfig,
    resume: bool = False,
    address: str | None = None,
    cluster_file: str | None = None,
) -> SweepOutcome:
    """Run (or with resume=True, finish) a sweep on Ray Tune and track it in MLflow.

    Args:
        cluster_file: the cluster's launcher / KubeRay file, for its node types (None: ask the
            running cluster).

    Raises:
        ConfigError: resume without anything to resume, or trials that cannot fit the cluster.
    """
    from lfm_core.errors import ConfigError

    started, started_at = time.perf_counter(), time.time()
    trials = expand_trials(cfg)
    storage = Storage(cfg.storage_uri)
    if resume and not can_resume(cfg):
        raise ConfigError(f"--resume: no earlier run of sweep {cfg.name!r} under {cfg.storage}")
    if not (address or os.environ.get("RAY_ADDRESS")):
        check_local_paths(cfg)
    local = init_ray(cfg, address)
    concurrent = fit_cluster(cfg, cluster_file)
    trials = schedule.run_order(cfg, trials)
    if local and concurrent > 1 and not resume:
        build_shared_stages(cfg, trials)
    experiment_id = tracking.ensure_experiment(cfg)
    state = f"{SWEEPS_DIR}/{cfg.name}/parent_run.json"
    if resume:
        parent_id = storage.read_json(state)["parent_run_id"]
        tracking.reopen(cfg, parent_id)
    else:
        parent_id = tracking.start_parent(cfg, experiment_id, len(trials))
        storage.write_json(state, {"parent_run_id": parent_id, "experiment_id": experiment_id})
    failed = True
    try:
        ids = (experiment_id, parent_id)
        results = _tuner(cfg, trials, ids, resume, concurrent).fit()
        failed = results.num_errors > 0
    finally:
        tracking.close_parent(cfg, experiment_id, parent_id, failed)
    wall = time.perf_counter() - started
    budget = sweep_budget(cache_for(cfg), started_at, wall, concurrent)
    storage.write_json(f"{SWEEPS_DIR}/{cfg.name}/time_budget.json", budget.as_dict())
    return _outcome(cfg, results, (experiment_id, parent_id), budget)


def _outcome(
    cfg: SweepConfig, results: Any, ids: tuple[str, str], budget: TimeBudget
) -> SweepOutcome:
    """The sweep's outcome from Tune's results (failed trials' tracebacks into the log file)."""
    metrics: dict[str, dict[str, float]] = {}
    raised: dict[str, BaseException] = {}
    for result in results:
        # A trial whose actor never started has no config: name it by its folder.
        name = Trial(**result.config["trial"]).name if result.config else Path(result.path).name
        if result.error is not None:
            raised[name] = result.error
        else:
            metrics[name] = {k: v for k, v in (result.metrics or {}).items() if k in METRIC_KEYS}
    return SweepOutcome(
        *ids,
        metrics,
        list(raised),
        budget.wall,
        failures={name: error_line(err) for name, err in raised.items()},
        log_file=write_failures(cfg, raised) if raised else None,
        time_budget=budget,
    )
