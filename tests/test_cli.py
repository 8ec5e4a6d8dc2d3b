"""The `lfm` command's own parts: lazy imports, quiet output, early one-line errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm_core import configs
from lfm_core.errors import ConfigError
from orchestrator import cli, preflight

HEAVY = ("torch", "ray", "mlflow", "diffusers")
REPO = Path(__file__).resolve().parents[1]
# A dead address fails within the TCP connect timeout; the rest is Python's start-up.
DEAD_ADDRESS_LIMIT_S = 20


def test_importing_the_cli_imports_no_heavy_package() -> None:
    code = (
        f"import sys, orchestrator.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


def test_a_dry_run_imports_no_heavy_package(tmp_path: Path) -> None:
    """Everything `lfm sweep --dry-run` imports (config, trials, schema, stage keys, cache)."""
    argv = ["sweep", str(REPO / "sweeps/quickstart.yaml"), f"storage={tmp_path}", "--dry-run"]
    code = (
        "import sys\n"
        "from orchestrator import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "finally:\n"
        f"    print('heavy:', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "\ntrials (" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1] == "heavy:"


def test_light_name_mirrors_equal_their_registries() -> None:
    from lfm_core import autoencoder, coarse_to_fine, criteria, data, features, paths, solvers

    assert configs.T_SAMPLING == paths.T_SAMPLING
    assert tuple(autoencoder.AUTOCAST) == configs.AUTOCAST_MODES
    assert configs.DATASETS == data.DATASETS
    assert (configs.METHODS, configs.GRIDS) == (solvers.METHODS, solvers.GRIDS)
    assert configs.CRITERIA == criteria.CRITERIA
    assert configs.SCORE_CRITERIA == criteria.SCORE_CRITERIA
    assert tuple(features.FEATURE_EXTRACTORS) == configs.FEATURE_EXTRACTORS
    assert configs.T_SPLIT_CANDIDATES == coarse_to_fine.T_SPLIT_CANDIDATES


def test_help_lists_export() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "export" in out.stdout


def test_quiet_stream_drops_ray_noise_lines_only() -> None:
    sink = io.StringIO()
    stream = cli.QuietStream(sink)
    stream.write("(pid=1) PlacementGroupCleaner: Failed to query the data source\nkept ")
    stream.write("line\n(RayTrainWorker) Reporting training result 3: ...\n")
    stream.write(" 40%|████      | 4/10 [00:01<00:02,  3.1it/s]\r")
    stream.write("orchestrator.cache: built stage latents 0123 in 1.0s\n")
    prefix = "\x1b[36m(trial_driver pid=27420)\x1b[0m "
    stream.write(
        f"{prefix}\r{prefix}\rclassifier epochs:  12%|█▎     | 1/8 [00:40<04:40, 40.07s/it]\n"
    )
    stream.write(f"{prefix}\r{prefix}\r{prefix}built stage fm_model 4567 in 2.0s\n")
    stream.write("(TrainController pid=7) Requesting resources: {'CPU': 1.0} * 1\n")
    cleaner = "\x1b[36m(PlacementGroupCleaner pid=3)\x1b[0m "
    stream.write(f"{cleaner}Traceback (most recent call last):\n{cleaner}ConnectionError: x\n")
    controller = "(TrainController pid=7) "
    stream.write(f"{controller}Failed to send resource request for train-1. If this only ")
    stream.write("happens transiently during network partition, it's safe to ignore this error.\n")
    stream.write(f"{controller}Traceback (most recent call last):\n{controller}  File 'x.py'\n")
    stream.write(f"{controller}ray.exceptions.GetTimeoutError: Get timed out\n\n")
    assert sink.getvalue() == (
        "kept line\norchestrator.cache: built stage latents 0123 in 1.0s\n"
        f"{prefix}built stage fm_model 4567 in 2.0s\n\n"
    )


def test_sample_facts_of_a_single_model_give_one_nfe() -> None:
    info = {"nfe_coarse": 40, "nfe_fine": 0, "seconds": 1.0}
    assert cli.sample_facts(info, coarse_to_fine=False) == {"nfe": 40, "seconds": 1.0}
    assert cli.sample_facts(info, coarse_to_fine=True) == info


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("http://127.0.0.1:1", ("127.0.0.1", 1)),
        ("ray://head:10001", ("head", 10001)),
        ("http://head", ("head", preflight.RAY_DASHBOARD_PORT)),
        ("auto", None),
    ],
)
def test_ray_endpoints(address: str, endpoint: tuple[str, int] | None) -> None:
    assert preflight.ray_endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["127.0.0.1:1", "http://127.0.0.1:1"])
def test_a_dead_ray_address_is_one_line_at_once(address: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^ray address .*nothing answers at 127\.0\.0\.1:1 "):
        preflight.check_ray_address(address)
    assert time.perf_counter() - started < preflight.CONNECT_TIMEOUT_S + 1


def test_a_dead_tracking_server_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^tracking\.uri: the MLflow server at .* does not"):
        preflight.check_tracking("http://127.0.0.1:1")


def test_model_paths_must_hold_model_files(tmp_path) -> None:
    empty = tmp_path / "dinov2"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no model files"):
        preflight.check_model_path("features.fid.path", str(empty))
    (empty / "config.json").write_text("{}")
    preflight.check_model_path("features.fid.path", str(empty))
    preflight.check_model_path("features.fid.path", "facebook/dinov2-small")  # hub id: later
    with pytest.raises(ConfigError, match="does not exist"):
        preflight.check_model_path("features.fid.path", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("env", "flags"),
    [({"RAY_ADDRESS": "127.0.0.1:1"}, []), ({}, ["--address", "http://127.0.0.1:1"])],
    ids=["RAY_ADDRESS", "--address"],
)
def test_lfm_sweep_against_a_dead_address_is_one_line_exit_2(
    tmp_path: Path, env: dict[str, str], flags: list[str]
) -> None:
    """As a user runs it: the address is probed before the heavy imports and before Ray."""
    command = [sys.executable, "-m", "orchestrator", "sweep", str(REPO / "sweeps/tiny.yaml")]
    started = time.perf_counter()
    run = subprocess.run(
        [*command, f"storage={tmp_path}", *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": "", **env},
        timeout=DEAD_ADDRESS_LIMIT_S * 3,
    )
    assert time.perf_counter() - started < DEAD_ADDRESS_LIMIT_S
    assert run.returncode == cli.EXIT_BAD_INPUT
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith("lfm sweep: error: ray address ")
    assert "nothing answers at 127.0.0.1:1" in run.stderr
