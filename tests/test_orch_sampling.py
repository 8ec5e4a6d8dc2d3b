"""Sampling at scale: N workers give the same bits as one, and FID against an .npz of
reference statistics equals FID against the features they were computed from.

Models are trained by the in-process trainer on the tiny sweep's data; the 3-worker samples
are made by Ray tasks on a local Ray (2 CPUs), each with its own graph on the same cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import stage_keys as keys
from orchestrator.config import load_sweep
from orchestrator.stage_builders import STATS_FILE
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trainers import InProcessTrainer
from orchestrator.trials import Trial

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
TRIAL = Trial("data_reduction", 1.0, "random", None, 0.5, 0)


def _graph(storage: Path, extractor: Path, *overrides: str) -> StageGraph:
    base = [
        f"storage={storage}",
        "tracking.uri=http://127.0.0.1:9",
        "data.limit=64",
        "data.heldout_limit=32",
        "sampling.num_samples=40",
        "sampling.batch_size=8",
        "sampling.t_split_calibration=4",
    ]
    for role in ("clustering", "fid", "stability"):
        base += [f"features.{role}.name=dinov2", f"features.{role}.path={extractor}"]
    cfg = load_sweep(TINY, [*base, *overrides])
    return StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)


@pytest.mark.timeout(300)
def test_three_sampling_workers_give_the_bits_of_one(
    tmp_path: Path, tiny_dinov2: Path, ray_local: None
) -> None:
    one = _graph(tmp_path / "one", tiny_dinov2)
    three = _graph(tmp_path / "three", tiny_dinov2, "sampling.workers=3")
    assert keys.trial(one.cfg, TRIAL).samples.key == keys.trial(three.cfg, TRIAL).samples.key
    first, second = one.metrics(TRIAL), three.metrics(TRIAL)
    for ref in ("samples", "reference_samples"):
        a = one.load_samples(getattr(one.trial(TRIAL), ref))
        b = three.load_samples(getattr(three.trial(TRIAL), ref))
        assert a.keys() == b.keys() == {"grid", "latents", "features_fid", "features_stability"}
        assert a["latents"].shape[0] == 40 and a["grid"].shape[0] == 40
        assert all(torch.equal(a[name], b[name]) for name in a)
    for name in ("fid", "fid_model", "fid_reference", "stability_similarity", "precision"):
        assert first[name] == second[name]


@pytest.mark.timeout(300)
def test_fid_against_an_npz_equals_fid_against_its_features(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    heldout = _graph(tmp_path, tiny_dinov2)
    expected = heldout.metrics(TRIAL)
    stats_ref = keys.reference_stats(heldout.cfg)
    npz = tmp_path / "ref.npz"
    npz.write_bytes((heldout.get(stats_ref) / STATS_FILE).read_bytes())
    with np.load(npz) as data:
        assert set(data.files) == {"mu", "sigma", "n"} and int(data["n"]) == 32

    from_npz = _graph(tmp_path, tiny_dinov2, f"features.fid_stats={npz}")
    assert keys.reference_stats(from_npz.cfg).key != stats_ref.key
    metrics = from_npz.metrics(TRIAL)
    for name in ("fid", "fid_model", "fid_reference"):
        assert metrics[name] == expected[name]

    # An .npz of other features (the wrong dimension) is a one-line error naming the key.
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(3), sigma=np.eye(3))
    wrong = _graph(tmp_path, tiny_dinov2, f"features.fid_stats={tmp_path / 'wrong.npz'}")
    with pytest.raises(Exception, match=r"^features\.fid_stats: the reference has 3-d features"):
        wrong.metrics(TRIAL)
