"""The `lfm` command's own parts: lazy imports, quiet output, early one-line errors."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from lfm_core.errors import ConfigError
from orchestrator import cli, preflight

HEAVY = ("torch", "ray", "mlflow", "diffusers")


def test_importing_the_cli_imports_no_heavy_package() -> None:
    code = (
        f"import sys, orchestrator.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


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
    assert sink.getvalue() == "kept line\norchestrator.cache: built stage latents 0123 in 1.0s\n"


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
