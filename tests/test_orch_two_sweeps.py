"""Two whole sweeps started together on one storage build every shared stage once.

Two `lfm sweep sweeps/tiny.yaml` processes (two users with a terminal each: different sweep
names, each with its own local Ray and, for S3, its own local mirror as on two machines) start
at the same moment on one storage, a local folder or a prefix of a moto S3 bucket. Their one
trial is the same point, so every stage is shared. From the cache's own build records: each
stage of the trial was built exactly once, and one sweep waited on the other's build leases;
both exit 0 with the same metrics.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, start_lfm_sweep, tiny_overrides
from mlflow import MlflowClient

from orchestrator import tracking
from orchestrator.config import load_sweep
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trials import expand_trials

pytestmark = pytest.mark.integration

TINY = REPO / "sweeps" / "tiny.yaml"
# One trial, so one Ray Train fit in all (the full-data model is the reference too).
ONE_TRIAL = [
    "search.data_reduction.data_fraction=[1.0]",
    "search.data_reduction.criterion=[random]",
]
SWEEP_NAMES = ("twin-a", "twin-b")
SWEEP_TIMEOUT_S = 400
WAITED = "waiting for the build by"


def _sweep_env(mirror: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LFM_LOCAL_CACHE": str(mirror)}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LFM_STORAGE"):
        env.pop(key, None)
    return env


def _trial_metrics(client: MlflowClient, experiment: str) -> dict[str, float]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{tracking.KIND_TAG}` = 'trial'"
    )
    assert run.info.status == "FINISHED"
    return run.data.metrics


@pytest.mark.timeout(SWEEP_TIMEOUT_S + 60)
def test_two_sweeps_started_together_build_every_stage_once(
    storage_root: str, mlflow_server: str, tiny_dinov2: Path, tmp_path: Path
) -> None:
    overrides = [*tiny_overrides(storage_root, tiny_dinov2, mlflow_server), *ONE_TRIAL]
    # Names (and so MLflow experiments) of this storage's pair: the server serves both pairs.
    where = "s3" if storage_root.startswith("s3://") else "local"
    names = [f"{name}-{where}" for name in SWEEP_NAMES]
    logs = [tmp_path / name / "sweep.log" for name in names]
    for log in logs:
        log.parent.mkdir()
    processes = [
        start_lfm_sweep(TINY, [*overrides, f"name={name}"], _sweep_env(log.parent / "mirror"), log)
        for name, log in zip(names, logs, strict=True)
    ]
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [log.read_text() for log in logs]
    for name, process, output in zip(names, processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert f"sweep {name!r}: 1 trials finished, 0 failed" in output

    cfg = load_sweep(TINY, overrides)
    cache = cache_for(cfg)
    (trial,) = expand_trials(cfg)
    needed = {ref.key: ref for ref in StageGraph(cfg, cache).stages_of(trial)}
    assert all(cache.is_complete(ref) for ref in needed.values())
    builds = Counter((record["stage"], record["key"]) for record in cache.records())
    assert {key for _, key in builds} == set(needed)
    assert max(builds.values()) == 1, builds
    # They did race: at least one sweep waited for a build the other held.
    assert any(WAITED in output for output in outputs)
    client = MlflowClient(mlflow_server)
    first, second = (_trial_metrics(client, name) for name in names)
    assert first == second
