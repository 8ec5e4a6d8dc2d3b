"""Bad input, table-driven: checkpoints (wrong model, wrong width, truncated or tampered files,
a missing or broken config.json, pickled objects), sweep files and `lfm` command lines.

Each case must fail with one line that names the bad file or key: a `ConfigError` from the
Python API, or `lfm <command>: error: ...` on stderr with exit status 2. Sweep-file keys, types
and ranges have their own table in test_orch_config.py (BAD_INPUTS); this one covers the files
and command lines around them. `test_lfm_sample_with_a_corrupt_cached_model` runs the real
`lfm sample` command (and its local Ray) in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, VENV_BIN

from lfm_core.checkpoint import (
    CONFIG_FILE,
    load_extra_state,
    load_velocity,
    save_velocity,
)
from lfm_core.errors import ConfigError
from lfm_core.files import file_sha256
from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig, build_velocity
from orchestrator import cli
from orchestrator.cache import StageRef
from orchestrator.config import load_sweep
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trials import Trial

VELOCITY = VelocityConfig(name="unet-xs", in_channels=4, sample_size=8, width=8)
TRAIN = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1)
SWEEP = """
name: bad
data: {name: digits}
search:
  main: {data_fraction: [1.0], criterion: [random]}
"""


class _Pickled:
    """An object a weights-only load must refuse (it would run code when unpickled)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("unpickled",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A velocity checkpoint (`model/`) and a training checkpoint (`train/`), saved once."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    save_velocity(root / "model", build_velocity(VELOCITY))
    latents = torch.randn(8, 4, 8, 8)
    train_velocity(build_velocity(VELOCITY), latents, TRAIN, out_dir=root / "runs", progress=False)
    (root / "runs" / f"checkpoint-{TRAIN.steps:07d}").rename(root / "train")
    return root


@pytest.fixture
def work(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of the saved checkpoints and a valid sweep file, for one case to break."""
    for name in ("model", "train"):
        shutil.copytree(saved / name, tmp_path / name)
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    (tmp_path / "storage").mkdir()
    return tmp_path


# ---- ways to break a checkpoint folder -----------------------------------------------------------


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_FILE).read_text())


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(manifest))


def _set_velocity(folder: Path, **changes: Any) -> None:
    manifest = _manifest(folder)
    manifest["config"]["velocity"].update(changes)
    _write_manifest(folder, manifest)


def _rehash(folder: Path, filename: str) -> None:
    """Record the file's current hash, as a tool that rewrote the checkpoint would."""
    manifest = _manifest(folder)
    manifest["files"][filename] = file_sha256(folder / filename)
    _write_manifest(folder, manifest)


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _load(folder: Path, name: str = "model") -> Callable[[], Any]:
    return lambda: load_velocity(folder, name=name)


def _resume(folder: Path, width: int) -> Callable[[], Any]:
    model = build_velocity(VelocityConfig(**{**VELOCITY.to_dict(), "width": width}))
    latents = torch.zeros(8, 4, 8, 8)
    return lambda: train_velocity(model, latents, TRAIN, resume_from=folder, progress=False)


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        name: the case id.
        act: given the work folder, breaks something and returns either a callable that must
            raise ConfigError or an `lfm` argv (list) that must exit with status 2.
        names: a regex the one-line message must match: the bad file or key (and what is wrong).
    """

    name: str
    act: Callable[[Path], Callable[[], Any] | list[str]]
    names: str


def _then(*steps: Callable[[], Any], result: Callable[[], Any] | list[str]) -> Any:
    for step in steps:
        step()
    return result


CASES = [
    # -- checkpoints: missing or broken config.json
    Case("no folder", lambda w: _load(w / "nowhere"), r"not found: .*/nowhere/config\.json$"),
    Case(
        "config.json missing",
        lambda w: _then(lambda: (w / "model" / CONFIG_FILE).unlink(), result=_load(w / "model")),
        r"not found: .*/model/config\.json$",
    ),
    Case(
        "config.json not JSON",
        lambda w: _then(
            lambda: (w / "model" / CONFIG_FILE).write_text("{velocity:"), result=_load(w / "model")
        ),
        r"not valid JSON: .*/model/config\.json",
    ),
    Case(
        "config.json binary",
        lambda w: _then(
            lambda: (w / "model" / CONFIG_FILE).write_bytes(b"\xff\xfe\x00"),
            result=_load(w / "model"),
        ),
        r"not valid JSON: .*/model/config\.json",
    ),
    Case(
        "config.json a list",
        lambda w: _then(
            lambda: (w / "model" / CONFIG_FILE).write_text("[]"), result=_load(w / "model")
        ),
        r"checkpoint config .*/model/config\.json must be an object with 'config' and 'files'",
    ),
    Case(
        "config.json without velocity",
        lambda w: _then(
            lambda: _write_manifest(w / "model", {**_manifest(w / "model"), "config": {}}),
            result=_load(w / "model"),
        ),
        r"checkpoint .*/model holds no velocity model config",
    ),
    Case(
        "velocity config unknown key",
        lambda w: _then(lambda: _set_velocity(w / "model", depth=3), result=_load(w / "model")),
        r"checkpoint .*/model: velocity config: .*unexpected keyword argument 'depth'",
    ),
    Case(
        "velocity config unknown model",
        lambda w: _then(
            lambda: _set_velocity(w / "model", name="unet-xxl"), result=_load(w / "model")
        ),
        r"checkpoint .*/model: velocity config: model: unknown value 'unet-xxl'; allowed: unet-xs",
    ),
    # -- checkpoints of the wrong model
    Case(
        "unet weights loaded as a dit",
        lambda w: _then(
            lambda: _set_velocity(w / "model", name="dit-xs", width=16), result=_load(w / "model")
        ),
        r"checkpoint .*/model does not fit the model: (Missing|Unexpected) key",
    ),
    Case(
        "wrong width",
        lambda w: _then(lambda: _set_velocity(w / "model", width=16), result=_load(w / "model")),
        r"checkpoint .*/model does not fit the model: size mismatch for ",
    ),
    Case(
        "conditional config, unconditional weights",
        lambda w: _then(
            lambda: _set_velocity(w / "model", num_classes=10), result=_load(w / "model")
        ),
        r"checkpoint .*/model does not fit the model: ",
    ),
    Case(
        "resume a run of another width",
        lambda w: _resume(w / "train", width=16),
        r"checkpoint .*/train does not fit the model: size mismatch for ",
    ),
    # -- weights files: truncated, tampered, missing, unlisted, not safetensors
    Case(
        "truncated safetensors",
        lambda w: _then(
            lambda: _truncate(w / "model" / "model.safetensors"), result=_load(w / "model")
        ),
        r"corrupt or truncated \(sha256 mismatch\): .*/model/model\.safetensors$",
    ),
    Case(
        "tampered safetensors",
        lambda w: _then(
            lambda: _flip_last_byte(w / "model" / "model.safetensors"), result=_load(w / "model")
        ),
        r"corrupt or truncated \(sha256 mismatch\): .*/model/model\.safetensors$",
    ),
    Case(
        "truncated safetensors, hash rewritten",
        lambda w: _then(
            lambda: _truncate(w / "model" / "model.safetensors"),
            lambda: _rehash(w / "model", "model.safetensors"),
            result=_load(w / "model"),
        ),
        r"not valid safetensors: .*/model/model\.safetensors",
    ),
    Case(
        "weights file missing",
        lambda w: _then(
            lambda: (w / "model" / "model.safetensors").unlink(), result=_load(w / "model")
        ),
        r"not found: .*/model/model\.safetensors$",
    ),
    Case(
        "weights file not in the manifest",
        lambda w: _then(
            lambda: _write_manifest(w / "model", {**_manifest(w / "model"), "files": {}}),
            result=_load(w / "model"),
        ),
        r"checkpoint file .*/model/model\.safetensors has no sha256 in .*/model/config\.json$",
    ),
    Case(
        "EMA asked of a model-only checkpoint",
        lambda w: _load(w / "model", name="ema"),
        r"not found: .*/model/ema\.safetensors$",
    ),
    Case(
        "truncated optimizer state",
        lambda w: _then(
            lambda: _truncate(w / "train" / "optimizer.pt"), result=_resume(w / "train", width=8)
        ),
        r"corrupt or truncated \(sha256 mismatch\): .*/train/optimizer\.pt$",
    ),
    Case(
        "pickled object in the optimizer state, hash rewritten",
        lambda w: _then(
            lambda: (w / "train" / "optimizer.pt").write_bytes(
                pickle.dumps({"x": _Pickled()}, protocol=2)
            ),
            lambda: _rehash(w / "train", "optimizer.pt"),
            result=lambda: load_extra_state(w / "train", "optimizer"),
        ),
        r"cannot be read with torch\.load\(weights_only=True\): .*/train/optimizer\.pt",
    ),
    Case(
        "resume from a model-only checkpoint",
        lambda w: _resume(w / "model", width=8),
        r"checkpoint .*/model: not a training checkpoint \(config\.json has no train_state",
    ),
    # -- files and command lines of `lfm`
    Case(
        "lfm validate: sweep file not UTF-8",
        lambda w: _then(
            lambda: (w / "sweep.yaml").write_bytes(b"\xff\xfe\x00name: bad"),
            result=["validate", str(w / "sweep.yaml")],
        ),
        r"^lfm validate: error: sweep file .*/sweep\.yaml is not valid YAML: 'utf-8' codec",
    ),
    Case(
        "lfm train: fraction not a number",
        lambda w: ["train", str(w / "sweep.yaml"), "--fraction", "abc"],
        r"^lfm train: error: argument --fraction: invalid float value: 'abc'$",
    ),
    Case(
        "lfm train: no sweep file",
        lambda w: ["train", str(w / "missing.yaml")],
        r"^lfm train: error: sweep file not found: .*/missing\.yaml$",
    ),
    Case(
        "lfm sample: sweep file is a list",
        lambda w: _then(
            lambda: (w / "sweep.yaml").write_text("- name: x\n"),
            result=["sample", str(w / "sweep.yaml"), "--out", str(w / "x.png")],
        ),
        r"^lfm sample: error: sweep file .*/sweep\.yaml must hold a mapping of sections$",
    ),
    Case(
        "lfm validate: search study not a mapping",
        lambda w: ["validate", str(w / "sweep.yaml"), "search.main=3"],
        r"^lfm validate: error: search\.main: must map axes \(data_fraction, ",
    ),
    Case(
        "lfm validate: profiles not a mapping",
        lambda w: _then(
            lambda: (w / "sweep.yaml").write_text(SWEEP + "profiles: [paper]\n"),
            result=["validate", str(w / "sweep.yaml")],
        ),
        r"^lfm validate: error: profiles: must map profile names to config blocks$",
    ),
    Case(
        "lfm sweep: data.root missing",
        lambda w: ["sweep", str(w / "sweep.yaml"), f"storage={w}/storage", f"data.root={w}/nope"],
        r"^lfm sweep: error: data\.root: '.*/nope' does not exist on this machine$",
    ),
    Case(
        "lfm sweep: extractor weights missing",
        lambda w: [
            "sweep",
            str(w / "sweep.yaml"),
            f"storage={w}/storage",
            "features.fid.name=dinov2",
            f"features.fid.path={w}/no-weights",
        ],
        r"^lfm sweep: error: features\.fid\.path: '.*/no-weights' does not exist",
    ),
    Case(
        "lfm sweep --resume: nothing to resume",
        lambda w: ["sweep", str(w / "sweep.yaml"), f"storage={w}/storage", "--resume"],
        r"^lfm sweep: error: --resume: no earlier run of sweep 'bad' under .*/storage$",
    ),
    Case(
        "lfm train: width too small",
        lambda w: ["train", str(w / "sweep.yaml"), "--width", "2"],
        r"^lfm train: error: search\.cli\.width: 2 must be an integer >= 4",
    ),
    Case(
        "lfm sample: fraction out of range",
        lambda w: ["sample", str(w / "sweep.yaml"), "--fraction", "1.5", "--out", "x.png"],
        r"^lfm sample: error: search\.cli\.data_fraction: 1\.5 is outside the allowed range",
    ),
    Case(
        "lfm validate: override without '='",
        lambda w: ["validate", str(w / "sweep.yaml"), "train.steps"],
        r"^lfm validate: error: override 'train\.steps': expected key=value$",
    ),
    Case(
        "lfm report: no --experiment",
        lambda w: ["report", "--out", str(w / "report")],
        r"^lfm report: error: the following arguments are required: --experiment$",
    ),
    Case(
        "lfm report: tracking database missing",
        lambda w: [
            "report",
            "--experiment",
            "bad",
            "--out",
            str(w / "report"),
            "--tracking-uri",
            f"sqlite:///{w}/none.db",
        ],
        r"^lfm report: error: tracking database .*/none\.db does not exist \(tracking URI ",
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_fails_with_one_line_naming_it(
    case: Case, work: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LFM_STORAGE", raising=False)
    action = case.act(work)
    if isinstance(action, list):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(action)
        assert exit_info.value.code == cli.EXIT_BAD_INPUT
        message = capsys.readouterr().err.strip()
        assert not ray.is_initialized()
    else:
        with pytest.raises(ConfigError) as info:
            action()
        message = str(info.value)
    assert "\n" not in message, message
    assert re.search(case.names, message), message


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_lfm_sample_with_a_corrupt_cached_model(tmp_path: Path) -> None:
    """`lfm sample` on a cache whose model checkpoint was truncated after it was stored."""
    sweep = REPO / "sweeps" / "tiny.yaml"
    overrides = [f"storage={tmp_path / 'storage'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    cfg = load_sweep(sweep, overrides)
    cache = cache_for(cfg)
    graph = StageGraph(cfg, cache)
    refs = graph.trial(Trial(cli.POINT_STUDY, 1.0, "random", None, None, 0))
    # Everything `samples` reads is in the cache; only the model's checkpoint matters here.
    for ref in refs.samples.closure().values():
        if ref.stage in ("dataset", "samples"):
            continue
        cache.get(ref, _model_builder(ref))
    weights = cache.local_dir(refs.model) / "model.safetensors"
    _truncate(weights, keep=weights.stat().st_size // 2)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LFM_STORAGE"):
        env.pop(key, None)
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [str(VENV_BIN / "lfm"), "sample", str(sweep), *overrides, "--out", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == cli.EXIT_BAD_INPUT, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    expected = (
        f"lfm sample: error: checkpoint file is corrupt or truncated (sha256 mismatch): {weights}"
    )
    assert errors == [expected], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not out.exists()


def _model_builder(ref: StageRef) -> Callable[[Path], None]:
    """Builds of the stages upstream of `samples`: a real velocity checkpoint for fm_model,
    empty folders for the rest (never read before the model fails to load)."""

    def build(folder: Path) -> None:
        if ref.stage == "fm_model":
            save_velocity(folder, build_velocity(VELOCITY))

    return build
