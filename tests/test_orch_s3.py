"""S3 storage on a moto server on 127.0.0.1 (a real S3 API over HTTP, no in-process mock).

1. The tiny sweep runs as `lfm sweep` with `storage=s3://...`, narrowed to fit the test budget
   to two trials that share one FM model (one Ray Train fit): the full-data model, then the
   same model as coarse-to-fine sampler. The driver process is killed (SIGKILL) after the first
   trial has finished while the second runs; `lfm sweep --resume` finishes it. MLflow then holds
   exactly one FINISHED child run per trial, and a listing of the bucket finds the Ray Train
   checkpoints, every cache entry with its `_COMPLETE` marker and manifest, and the MLflow
   artefacts. (This is also the killed-driver fault-injection test.)
2. The S3 server stops in the middle of a stage upload: the build fails with a one-line error
   after pyarrow's bounded retries, and the bucket holds no entry marked complete that is not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from conftest import REPO, start_lfm_sweep, tiny_overrides
from mlflow import MlflowClient
from moto.server import ThreadedMotoServer

from orchestrator import tracking
from orchestrator.cache import COMPLETE, MANIFEST_KEY, StageCache, StageRef
from orchestrator.config import load_sweep
from orchestrator.stages import StageGraph
from orchestrator.storage import Storage
from orchestrator.sweep import cache_for
from orchestrator.trials import expand_trials

pytestmark = pytest.mark.integration

TINY = REPO / "sweeps" / "tiny.yaml"
SWEEP_BUCKET = "lfm-sweep"
OUTAGE_BUCKET = "lfm-outage"
# One trained model for both trials; the second (coarse-to-fine) is the one the kill interrupts.
TWO_TRIALS = [
    "search.data_reduction.data_fraction=[1.0]",
    "search.data_reduction.criterion=[random]",
    "search.data_reduction.t_split=[null,0.5]",
    "sampling.t_split_calibration=8",
]
SWEEP_TIMEOUT_S = 240
POLL_S = 0.5
# pyarrow's S3 client makes 3 attempts with backoff (about 6 s when the server refuses).
OUTAGE_LIMIT_S = 60
OUTAGE_FILES = 40
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _start_moto(port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """A moto S3 server on 127.0.0.1 (its buckets live in this process and survive a restart)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    host, bound = server.get_host_and_port()
    return server, f"http://{host}:{bound}"


def _point_env_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """AWS_ENDPOINT_URL is read by pyarrow (Ray, the cache), boto3 and MLflow's S3 store."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto server with the sweep bucket; the AWS variables point at it for the module."""
    server, endpoint = _start_moto()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _point_env_at(monkeypatch, endpoint)
        boto3.client("s3").create_bucket(Bucket=SWEEP_BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


def _keys(bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object of the bucket under prefix -> its size."""
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


def _complete_entries(bucket: str, keys: dict[str, int]) -> dict[str, dict]:
    """Cache entry prefix -> its `_COMPLETE` marker, asserting that each marked entry holds every
    file its manifest lists, at the listed size."""
    s3 = boto3.client("s3")
    entries = {}
    for key in keys:
        if not key.endswith(f"/{COMPLETE}"):
            continue
        prefix = key[: -len(COMPLETE)]
        marker = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for name, size in marker[MANIFEST_KEY].items():
            assert keys.get(prefix + name) == size, f"{prefix}{name} missing or partial"
        entries[prefix.rstrip("/")] = marker
    return entries


def _trial_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{tracking.KIND_TAG}` = 'trial'"
    )


def _kill_when_second_trial_runs(
    process: subprocess.Popen, client: MlflowClient, experiment: str, log: Path
) -> list:
    """SIGKILL the driver once one trial is FINISHED and another RUNNING; returns those runs."""
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        runs = _trial_runs(client, experiment)
        statuses = Counter(run.info.status for run in runs)
        if statuses["FINISHED"] >= 1 and statuses["RUNNING"] >= 1:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return runs
        time.sleep(POLL_S)
    process.kill()
    pytest.fail(f"no trial finished within {SWEEP_TIMEOUT_S}s: {log.read_text()[-3000:]}")


@pytest.mark.timeout(2 * SWEEP_TIMEOUT_S + 60)
def test_sweep_on_s3_survives_a_killed_driver_and_stores_everything_in_the_bucket(
    moto_endpoint: str, mlflow_server: str, tiny_dinov2: Path, tmp_path: Path
) -> None:
    storage = f"s3://{SWEEP_BUCKET}/tiny"
    overrides = [*tiny_overrides(storage, tiny_dinov2, mlflow_server), *TWO_TRIALS]
    cfg = load_sweep(TINY, overrides)
    trials = expand_trials(cfg)
    assert [t.t_split for t in trials] == [None, 0.5]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LFM_LOCAL_CACHE": str(tmp_path / "mirror")}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LFM_STORAGE"):
        env.pop(key, None)
    client = MlflowClient(mlflow_server)

    first = start_lfm_sweep(TINY, overrides, env, tmp_path / "first.log")
    before = _kill_when_second_trial_runs(first, client, cfg.experiment, tmp_path / "first.log")
    assert len(before) == 2

    second = start_lfm_sweep(TINY, [*overrides, "--resume"], env, tmp_path / "resume.log")
    try:
        second.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if second.poll() is None:
            second.kill()
    output = (tmp_path / "resume.log").read_text()
    assert second.returncode == 0, output[-3000:]
    assert "2 trials finished, 0 failed" in output

    # MLflow: the killed trial's run was reused, not duplicated; nothing is left RUNNING.
    parent = Storage(storage).read_json(f"sweeps/{cfg.name}/parent_run.json")["parent_run_id"]
    runs = _trial_runs(client, cfg.experiment)
    assert sorted(r.data.tags[tracking.TRIAL_TAG] for r in runs) == sorted(t.name for t in trials)
    assert {r.info.run_id for r in runs} == {r.info.run_id for r in before}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[tracking.PARENT_TAG] for r in runs} == {parent}
    assert client.get_run(parent).info.status == "FINISHED"

    keys = _keys(SWEEP_BUCKET, "tiny/")
    # Cache: exactly the trials' stages are complete, each holding its manifest, built once.
    entries = _complete_entries(SWEEP_BUCKET, keys)
    graph = StageGraph(cfg, cache_for(cfg))
    needed = {ref.rel for trial in trials for ref in graph.stages_of(trial)}
    assert {rel.removeprefix("tiny/") for rel in entries} == needed
    records = cache_for(cfg).records()
    assert Counter((r["stage"], r["key"]) for r in records).most_common(1)[0][1] == 1
    assert len(records) == len(needed)
    # Ray Train: every FM model's run left its checkpoints (weights, EMA, optimizer, config).
    models = [rel.rsplit("/", 1)[1] for rel in needed if rel.startswith("cache/fm_model/")]
    assert len(models) == 1
    for key in models:
        prefix = f"tiny/ray_train/fm_model-{key[:16]}/checkpoint_"
        files = {k.rsplit("/", 1)[1] for k in keys if k.startswith(prefix)}
        assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "config.json"} <= files
    # MLflow artefacts of every trial run live in the bucket.
    for run in runs:
        assert run.info.artifact_uri.startswith(f"{storage}/mlflow/")
        artefacts = run.info.artifact_uri.removeprefix(f"s3://{SWEEP_BUCKET}/") + "/"
        names = {k.removeprefix(artefacts) for k in keys if k.startswith(artefacts)}
        assert {"config.json", "samples.png", "comparison.png"} <= names
        # ... and the trained pipeline folder (the coarse-to-fine one for t_split trials).
        pipeline = {name for name in names if name.startswith("pipeline/")}
        assert pipeline and names == {"config.json", "samples.png", "comparison.png"} | pipeline
        assert any(name.endswith("diffusion_pytorch_model.safetensors") for name in pipeline)


@pytest.mark.timeout(2 * OUTAGE_LIMIT_S)
def test_s3_outage_mid_upload_fails_fast_and_leaves_no_false_complete_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server, endpoint = _start_moto()
    _point_env_at(monkeypatch, endpoint)
    boto3.client("s3").create_bucket(Bucket=OUTAGE_BUCKET)
    cache = StageCache(Storage(f"s3://{OUTAGE_BUCKET}/run"), local_root=tmp_path / "mirror")
    ref = StageRef("outage", "1", {"files": OUTAGE_FILES})
    prefix = f"run/{ref.rel}/"

    def build(folder: Path) -> None:
        for i in range(OUTAGE_FILES):
            (folder / f"part-{i:03d}.bin").write_bytes(bytes([i % 256]) * 4096)

    def stop_after_a_few_uploads() -> None:
        s3, deadline = boto3.client("s3"), time.monotonic() + OUTAGE_LIMIT_S
        while time.monotonic() < deadline:
            if s3.list_objects_v2(Bucket=OUTAGE_BUCKET, Prefix=prefix)["KeyCount"] >= 3:
                break
            time.sleep(0.01)
        server.stop()

    stopper = threading.Thread(target=stop_after_a_few_uploads)
    stopper.start()
    started = time.monotonic()
    try:
        with pytest.raises(OSError) as info:
            cache.get(ref, build)
        elapsed = time.monotonic() - started
    finally:
        stopper.join()
    message = str(info.value)
    assert "\n" not in message and elapsed < OUTAGE_LIMIT_S, (elapsed, message)
    assert message.startswith(
        f"stage outage {ref.key[:12]}: storing it under s3://{OUTAGE_BUCKET}/"
    )
    assert "Could not connect" in message
    assert not (tmp_path / "mirror" / ref.stage / ref.key).exists()

    # The same server again (its buckets live in this process): a partial entry, not marked.
    server, _ = _start_moto(int(endpoint.rsplit(":", 1)[1]))
    try:
        partial = _keys(OUTAGE_BUCKET, prefix)
        assert 3 <= len(partial) < OUTAGE_FILES and prefix + COMPLETE not in partial
        assert _complete_entries(OUTAGE_BUCKET, _keys(OUTAGE_BUCKET)) == {}
        assert not cache.is_complete(ref)
        # Once the server is back, the entry is built again and completed whole.
        folder = cache.get(ref, build)
        assert len(list(folder.glob("part-*.bin"))) == OUTAGE_FILES
        entries = _complete_entries(OUTAGE_BUCKET, _keys(OUTAGE_BUCKET))
        assert list(entries) == [prefix.rstrip("/")]
        assert len(entries[prefix.rstrip("/")][MANIFEST_KEY]) == OUTAGE_FILES
    finally:
        server.stop()
