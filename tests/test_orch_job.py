"""`ray job submit ... -- lfm sweep` against a `ray start --head` cluster on 127.0.0.1.

The head runs with --block in its own process group, so teardown stops exactly this cluster
(what `ray stop` does, without touching other Ray instances on a shared machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, free_port, stop_services, tiny_overrides, wait_for_http
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

JOB_TIMEOUT_S = 480
STOP_TIMEOUT_S = 60


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A 2-CPU Ray head on 127.0.0.1 with the job server; yields (dashboard URL, environment)."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # One auth mode for head, CLI and job driver (a ~/.ray/auth_token would switch the
        # head alone to token auth); the cluster listens on 127.0.0.1 only.
        "RAY_AUTH_MODE": "disabled",
        # Nothing to drain on a one-node test cluster: stop at once on SIGTERM.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2"]
    command += ["--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    temp_dir = tempfile.mkdtemp(prefix="lfmray-", dir="/tmp")
    command += ["--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{url}/api/version", head)
        yield url, env
    finally:
        stop_services(head, timeout_s=STOP_TIMEOUT_S)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_a_sweep(
    ray_head: tuple[str, dict[str, str]], tiny_dinov2: Path, tiny_storage: Path
) -> None:
    url, env = ray_head
    tracking_db = tiny_storage / "job-mlflow.db"
    overrides = tiny_overrides(tiny_storage, tiny_dinov2, f"sqlite:///{tracking_db}")
    # Two trials are enough here; with the end-to-end test's cache they build nothing.
    overrides += ["name=tiny-job", "search.data_reduction.data_fraction=[0.5]"]
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO)]
    submit += ["--", "lfm", "sweep", "sweeps/tiny.yaml", *overrides]
    result = subprocess.run(
        submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert "results folder:" in output

    client = MlflowClient(f"sqlite:///{tracking_db}")
    experiment = client.get_experiment_by_name("tiny-job")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_job_submit_as_the_readme_shows_reuses_the_local_cache(
    ray_head: tuple[str, dict[str, str]], tiny_dinov2: Path, tiny_storage: Path
) -> None:
    """README's steps: `--working-dir .`, the entrypoint `lfm` from the head's PATH, absolute
    storage; afterwards a local dry run over the same storage finds every stage cached."""
    url, env = ray_head
    overrides = tiny_overrides(tiny_storage, tiny_dinov2, f"sqlite:///{tiny_storage}/readme.db")
    overrides += ["name=tiny-readme", "search.data_reduction.criterion=[random]"]
    submit = ["ray", "job", "submit", "--address", url, "--working-dir", "."]
    submit += ["--", "lfm", "sweep", "sweeps/tiny.yaml", *overrides]
    result = subprocess.run(
        submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    assert f"results folder: {tiny_storage}" in output

    dry_run = ["lfm", "sweep", "sweeps/tiny.yaml", *overrides, "--dry-run"]
    plan = subprocess.run(dry_run, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    [stages] = [line for line in plan.stdout.splitlines() if line.startswith("stages: ")]
    distinct, cached = (int(word) for word in stages.split()[1:4:2])
    assert distinct == cached > 0, stages


HANG_LIMIT_S = 60


def test_job_asking_for_gpus_a_cpu_cluster_lacks_fails_in_one_line(
    ray_head: tuple[str, dict[str, str]], tiny_dinov2: Path, tmp_path: Path
) -> None:
    """Issue 12's hang: Ray Train retried a GPU worker group on a CPU-only head forever. The
    sweep now compares the trial's demand with the cluster's nodes before scheduling a trial."""
    url, env = ray_head
    overrides = tiny_overrides(tmp_path, tiny_dinov2, f"sqlite:///{tmp_path}/mlflow.db")
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO)]
    submit += ["--", "lfm", "sweep", "sweeps/tiny.yaml", *overrides, "resources.use_gpu=true"]
    started = time.monotonic()
    result = subprocess.run(
        submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert seconds < HANG_LIMIT_S, f"{seconds:.0f} s"
    # The job's log is printed as it runs and again in the failure's status message.
    errors = sorted({line for line in output.splitlines() if line.startswith("lfm sweep: error")})
    assert len(errors) == 1, output[-4000:]
    assert re.fullmatch(
        r"lfm sweep: error: resources: a Ray Train worker needs GPU: 1 \(\{CPU: 1, GPU: 1\}\) "
        r"but no node type has more than GPU: 0; largest node: node \S+ \{CPU: 2\} "
        r"\(node types: this cluster's nodes, .* pass --cluster FILE\)",
        errors[0],
    ), errors[0]
    print(f"GPU demand on a CPU-only head refused after {seconds:.1f} s")
