"""Paper-fidelity options (docs/paper-fidelity.md): keys only when set, one-line bad values."""

from pathlib import Path

import pytest

from lfm_core.errors import ConfigError
from orchestrator import stage_keys as keys
from orchestrator.config import load_sweep

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
BASE = ["storage=/tmp/lfm-fidelity-unused", "tracking.uri=http://127.0.0.1:9"]


def _cfg(*overrides: str):
    return load_sweep(TINY, [*BASE, *overrides])


def test_defaults_leave_the_sampling_and_autoencoder_keys_as_they_were():
    cfg = _cfg()
    assert keys._sampling_inputs(cfg) == {
        "steps": cfg.sampling.steps,
        "solver": cfg.sampling.solver,
        "first_seed": cfg.sampling.first_seed,
        "guidance_scale": cfg.sampling.guidance_scale,
    }
    assert "kind" not in keys.autoencoder(cfg).inputs
    explicit = _cfg("sampling.grid=uniform", "autoencoder.kind=kl")
    assert keys.autoencoder(explicit).key == keys.autoencoder(cfg).key
    assert keys._sampling_inputs(explicit) == keys._sampling_inputs(cfg)


def test_each_option_enters_its_keys_when_set():
    cfg = _cfg()
    paper = _cfg("sampling.grid=paper", "sampling.cfg_channels=3", "autoencoder.kind=vq")
    inputs = keys._sampling_inputs(paper)
    assert inputs["grid"] == "paper" and inputs["cfg_channels"] == 3
    assert keys.autoencoder(paper).inputs["kind"] == "vq"
    assert keys.autoencoder(paper).key != keys.autoencoder(cfg).key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.grid=cosine", "sampling.grid: unknown value 'cosine'; allowed: uniform, paper"),
        ("sampling.cfg_channels=0", "sampling.cfg_channels: 0 must be a positive integer"),
        ("sampling.cfg_channels=9", "sampling.cfg_channels: 9 exceeds the 4 latent channels"),
        ("autoencoder.kind=fsq", "autoencoder.kind: unknown value 'fsq'; allowed: kl, vq"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        _cfg(override)
    assert str(info.value) == message
