"""Checks that run before Ray starts: what a sweep reads and talks to, each a one-line error.

`lfm sweep` (and `lfm train` / `lfm sample`) call `check_before_ray` after the config is
validated and before `ray.init`, so a missing data folder, an empty image folder, absent
extractor weights, an MLflow server that does not answer or a Ray address with nothing behind
it fail in a second or two instead of inside every trial. Paths are checked on this machine;
a sweep submitted to a cluster (`--address`, $RAY_ADDRESS) skips the path checks, whose paths
are the cluster's.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from lfm_core.errors import ConfigError
from orchestrator.config import (
    LOCAL_PATH_PREFIXES,
    SQLITE_PREFIX,
    SweepConfig,
    check_model_shapes,
)

CONNECT_TIMEOUT_S = 3.0
# Files a local model folder holds: weights or a config naming them.
MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
# torchvision data sets read from a folder; "mnist5k" and "digits" ship with Python packages.
FOLDER_FREE_DATASETS = ("mnist5k", "digits")
RAY_GCS_PORT = 6379
RAY_DASHBOARD_PORT = 8265


def _listening(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when something accepts a TCP connection at host:port, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address to probe: "host:port" (GCS), "ray://host:port" (client),
    "http://host:port" (dashboard / job server); None for "auto" / "local" (Ray resolves
    them itself)."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    default = RAY_DASHBOARD_PORT if parts.scheme in ("http", "https") else RAY_GCS_PORT
    try:
        port = parts.port or default
    except ValueError:
        raise ConfigError(f"ray address {address!r}: the port is not a number") from None
    if not parts.hostname:
        raise ConfigError(f"ray address {address!r}: expected host:port or http://host:port")
    return parts.hostname, port


def check_ray_address(address: str) -> None:
    """A short TCP connect to a Ray address before `ray.init` (which retries for minutes).

    Raises:
        ConfigError: nothing is listening there.
    """
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    reason = _listening(*endpoint)
    if reason is not None:
        raise ConfigError(
            f"ray address {address!r}: nothing answers at {endpoint[0]}:{endpoint[1]} ({reason}); "
            "start the cluster (ray start --head) or unset RAY_ADDRESS / --address for a local Ray"
        )


def check_tracking(uri: str) -> None:
    """The MLflow tracking URI answers: a server's /health, or a sqlite file's folder can be
    created.

    Raises:
        ConfigError: the server does not answer, or the folder cannot be made.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"tracking.uri: the MLflow server at {uri} does not answer ({reason}); start it "
                "(mlflow server --host 127.0.0.1) or set tracking.uri / $MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith(SQLITE_PREFIX):
        folder = Path(uri[len(SQLITE_PREFIX) :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"tracking.uri: cannot create {str(folder)!r} ({err.strerror})"
            ) from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.uri: {str(folder)!r} is not writable")


def check_data(cfg: SweepConfig) -> None:
    """The data set's folder exists (and, for "folder", holds images).

    Raises:
        ConfigError: no root where one is needed, a missing folder, or an image folder without
            images.
    """
    data = cfg.data
    if data.name in FOLDER_FREE_DATASETS:
        return
    if data.name == "folder":
        from lfm_core.data import list_folder

        if data.root is None:
            raise ConfigError("data.root: data.name=folder needs data.root, the image folder")
        list_folder(Path(data.root).expanduser())  # one-line errors: not a folder, no images
        return
    if data.root is not None and not Path(data.root).expanduser().is_dir():
        raise ConfigError(f"data.root: {data.root!r} is not an existing folder on this machine")


def check_model_path(key: str, value: str | None) -> None:
    """A local model path (an extractor's weights, a pretrained autoencoder) exists and, when
    it is a folder, holds model files. Hub ids ("org/name") are left to the loader.

    Raises:
        ConfigError: the path is missing or the folder holds no model files.
    """
    if value is None or not value.startswith(LOCAL_PATH_PREFIXES):
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {value!r} does not exist on this machine")
    if path.is_dir() and not any(p.suffix in MODEL_FILES for p in path.rglob("*")):
        raise ConfigError(
            f"{key}: {value!r} holds no model files ({', '.join(MODEL_FILES)}): weights missing?"
        )


def check_before_ray(cfg: SweepConfig, address: str | None) -> None:
    """Every check that needs no Ray: the Ray address (when given), the tracking URI, the
    networks' shapes (`check_model_shapes`), and on a local run the data and model paths.

    Raises:
        ConfigError: the first failing check, in one line.
    """
    if address:
        check_ray_address(address)  # first: before anything that takes seconds
    check_tracking(cfg.tracking_uri)
    check_model_shapes(cfg)  # torch and diffusers load here
    if address:
        return  # the paths are the cluster's
    check_data(cfg)
    check_model_path("autoencoder.pretrained", cfg.autoencoder.pretrained)
    for role in ("clustering", "fid", "stability"):
        check_model_path(f"features.{role}.path", getattr(cfg.features, role).path)
