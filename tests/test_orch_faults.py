"""Fault injection on Ray Train: a worker process killed mid-training (SIGKILL) is replaced and
the run continues from its last checkpoint (FailureConfig), with the production `fit_velocity`.

Each worker records, when it starts, its PID and the step of the checkpoint it resumes from
(`ray.train.get_checkpoint()`); the test kills the first worker once Ray Train has registered a
checkpoint. (The killed sweep driver and `lfm sweep --resume` are in test_orch_s3.py, where they
share the S3 sweep run to keep the suite's time budget.)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from torch import Tensor

from lfm_core.checkpoint import load_config
from lfm_core.train import TrainConfig
from lfm_core.velocity import VelocityConfig
from orchestrator.config import ResourcesSection
from orchestrator.ray_train import TRAIN_RUNS_DIR, fit_velocity

pytestmark = pytest.mark.integration
# Ray workers cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VELOCITY = VelocityConfig(name="unet-xs", in_channels=4, sample_size=8, width=8)
STEPS = 200
CHECKPOINT_EVERY = 50  # few reports: each one waits about a second on the controller
TRAIN = TrainConfig(steps=STEPS, batch_size=8, warmup_steps=1, log_every=CHECKPOINT_EVERY)
RESOURCES = ResourcesSection(
    num_workers=1, cpus_per_worker=1, max_failures=1, checkpoint_every=CHECKPOINT_EVERY
)
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
KILL_TIMEOUT_S = 120


def _latents() -> Tensor:
    return torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _recording_data_fn(record_dir: str) -> tuple[Tensor, None]:
    """The data function, run by each worker as it starts: records its PID and resume step."""
    import ray.train

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = int(load_config(directory)["train_state"]["step"])
    record = {"pid": os.getpid(), "resume_step": step, "time": time.time()}
    Path(record_dir, f"start-{os.getpid()}.json").write_text(json.dumps(record))
    return _latents(), None


def _starts(record_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in record_dir.glob("start-*.json")]
    return sorted(records, key=lambda r: r["time"])


def _registered_checkpoint(run_dir: Path) -> bool:
    """True once Ray Train's controller has registered a checkpoint of the run."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def _kill_first_worker_after_a_checkpoint(record_dir: Path, run_dir: Path, killed: list) -> None:
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        starts = _starts(record_dir)
        if starts and _registered_checkpoint(run_dir):
            os.kill(starts[0]["pid"], signal.SIGKILL)
            killed.append(starts[0]["pid"])
            return
        time.sleep(0.05)


@pytest.mark.timeout(KILL_TIMEOUT_S + 120)
def test_killed_worker_resumes_from_its_last_checkpoint(ray_local: None, tmp_path: Path) -> None:
    records = tmp_path / "starts"
    records.mkdir()
    run_name = "killed-worker"
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_first_worker_after_a_checkpoint,
        args=(records, tmp_path / TRAIN_RUNS_DIR / run_name, killed),
    )
    killer.start()
    try:
        result = fit_velocity(
            functools.partial(_recording_data_fn, str(records)),
            VELOCITY,
            TRAIN,
            RESOURCES,
            str(tmp_path),
            run_name,
        )
    finally:
        killer.join()

    first, second = _starts(records)
    assert killed == [first["pid"]] and second["pid"] != first["pid"]
    assert first["resume_step"] == 0
    # The replacement worker continued from a checkpoint taken before the kill...
    assert 0 < second["resume_step"] < STEPS
    assert second["resume_step"] % CHECKPOINT_EVERY == 0
    # ...and the run went on to the last step.
    assert result.metrics["step"] == STEPS
    assert result.ema.config == VELOCITY
