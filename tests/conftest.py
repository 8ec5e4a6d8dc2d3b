"""Shared fixtures that start real local services on 127.0.0.1: Ray, an MLflow tracking server,
an S3 API (moto server); and a tiny locally saved hub model for feature extraction.

Every service is bounded in its start-up wait and stopped in teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SERVICE_START_TIMEOUT_S = 90.0
POLL_S = 0.5
STOP_TIMEOUT_S = 30.0
LOCAL_RAY_CPUS = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers (any HTTP status: a 401 from Ray's token auth is an answer),
    the process exits, or SERVICE_START_TIMEOUT_S passes."""
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service for {url} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{url} did not answer within {SERVICE_START_TIMEOUT_S:.0f}s")


def stop_services(*processes: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop services started in their own process groups (each server and its workers): all
    are sent SIGTERM at once, so they shut down side by side; a group still running after
    `timeout_s` (counted from that signal) gets SIGKILL."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 with a sqlite store; yields its http URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # No job runner and Huey consumers (GenAI jobs, unused here): three fewer processes.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", process)
        yield uri
    finally:
        stop_services(process)
        log.close()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """An in-process local Ray with 2 CPUs, shut down after the module."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised, tiny DINOv2 saved locally (the hub loader's offline path).

    It stands in for the feature extractors in sweep tests: it loads in seconds, while the
    default MNIST classifier is trained on first use.
    """
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dinov2")
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=224,
    )
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One storage root for the tiny sweep, shared by the sweep tests (its cache carries over)."""
    return tmp_path_factory.mktemp("tiny-storage")


def start_lfm_sweep(
    sweep_file: Path, args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen:
    """`lfm sweep sweep_file *args` as its own process, in log's folder, output into `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(VENV_BIN / "lfm"), "sweep", str(sweep_file), *args],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tiny_overrides(storage: Path, extractor: Path, tracking_uri: str) -> list[str]:
    """Overrides that point sweeps/tiny.yaml at test storage, tracking and the tiny extractor."""
    overrides = [f"storage={storage}", f"tracking.uri={tracking_uri}"]
    for role in ("clustering", "fid", "stability"):
        overrides += [f"features.{role}.name=dinov2", f"features.{role}.path={extractor}"]
    return overrides


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with an empty bucket "lfm"; yields "s3://lfm".

    AWS_ENDPOINT_URL (read by pyarrow's FileSystem.from_uri and boto3) points at it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lfm")
        yield "s3://lfm"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage root: a local folder, or a prefix of a moto S3 bucket of this test's own
    (moto keeps its buckets for the whole pytest process)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_server')}/{tmp_path.name}"


@pytest.fixture
def ray_cli() -> Path:
    """The `ray` executable of this environment."""
    ray = VENV_BIN / "ray"
    assert ray.exists() or shutil.which("ray"), "the ray CLI is not installed"
    return ray if ray.exists() else Path(shutil.which("ray"))
