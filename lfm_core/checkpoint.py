"""Checkpoint I/O: safetensors weights plus a JSON of the resolved config, never pickles.

A checkpoint is a folder: `<name>.safetensors` per module, optional `<name>.pt` for optimizer
state (read with torch.load(weights_only=True)), and `config.json` holding the resolved config
and the sha256 of every file, verified before any file is used.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lfm_core.errors import ConfigError
from lfm_core.files import file_sha256
from lfm_core.velocity import VelocityConfig, VelocityModel, build_velocity

CONFIG_FILE = "config.json"
MAX_DETAIL_CHARS = 300


def _state(module: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    state = module.state_dict() if isinstance(module, nn.Module) else module
    # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap here.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    directory: str | Path,
    modules: dict[str, nn.Module | dict[str, Tensor]],
    config: dict[str, Any],
    *,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write modules as `<name>.safetensors`, extra_state entries as `<name>.pt`, then config.json.

    config.json is written last, so a folder without it is an incomplete checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for name, module in modules.items():
        path = directory / f"{name}.safetensors"
        save_file(_state(module), str(path))
        files[path.name] = file_sha256(path)
    for name, state in (extra_state or {}).items():
        path = directory / f"{name}.pt"
        torch.save(state, path)
        files[path.name] = file_sha256(path)
    tmp = directory / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps({"config": config, "files": files}, indent=2, sort_keys=True))
    tmp.replace(directory / CONFIG_FILE)
    return directory


def _manifest(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else err.reason
        raise ConfigError(f"checkpoint config is not valid JSON: {path} ({reason})") from None
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("config"), dict)
        and isinstance(manifest.get("files"), dict)
    ):
        raise ConfigError(
            f"checkpoint config {path} must be an object with 'config' and 'files' objects "
            "(as written by save_checkpoint)"
        )
    return manifest


def load_config(directory: str | Path) -> dict[str, Any]:
    """The resolved config saved with a checkpoint."""
    return _manifest(Path(directory))["config"]


def _verified(directory: Path, filename: str) -> Path:
    path = directory / filename
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    expected = _manifest(directory)["files"].get(filename)
    if expected is None:
        raise ConfigError(f"checkpoint file {path} has no sha256 in {directory / CONFIG_FILE}")
    if file_sha256(path) != expected:
        raise ConfigError(f"checkpoint file is corrupt or truncated (sha256 mismatch): {path}")
    return path


def load_state(directory: str | Path, name: str) -> dict[str, Tensor]:
    """Load `<name>.safetensors` from a checkpoint folder after checking its hash."""
    path = _verified(Path(directory), f"{name}.safetensors")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ConfigError(f"checkpoint file is not valid safetensors: {path} ({err})") from None


def load_extra_state(directory: str | Path, name: str) -> Any:
    """Load `<name>.pt` (optimizer state and the like) with torch.load(weights_only=True)."""
    path = _verified(Path(directory), f"{name}.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:  # torch's messages span many lines
        raise ConfigError(
            f"checkpoint file cannot be read with torch.load(weights_only=True): {path} "
            f"({type(err).__name__}; it must hold only tensors and plain containers)"
        ) from None


def load_into(module: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Load a state dict, turning a shape or key mismatch into a one-line ConfigError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        if len(detail) > MAX_DETAIL_CHARS:  # key lists of a different architecture run long
            detail = detail[:MAX_DETAIL_CHARS] + " ..."
        raise ConfigError(f"checkpoint {source} does not fit the model: {detail}") from None


def save_velocity(
    directory: str | Path, model: VelocityModel, config: dict[str, Any] | None = None
) -> Path:
    """Save a velocity model with its VelocityConfig (under "velocity") and any extra config."""
    full = {**(config or {}), "velocity": model.config.to_dict()}
    return save_checkpoint(directory, {"model": model}, full)


def load_velocity(directory: str | Path, name: str = "model") -> VelocityModel:
    """Rebuild a velocity model from its saved config and load its weights (verified)."""
    config = load_config(directory)
    if not isinstance(config.get("velocity"), dict):
        raise ConfigError(f"checkpoint {directory} holds no velocity model config")
    try:
        model = build_velocity(VelocityConfig(**config["velocity"]))
    except (TypeError, ConfigError) as err:  # TypeError: a key VelocityConfig does not have
        raise ConfigError(f"checkpoint {directory}: velocity config: {err}") from None
    load_into(model, load_state(directory, name), directory)
    return model.eval()
