"""Stage wiring without Ray: the automatically chosen t_split of a coarse-to-fine pair.

The two fm_model stages are written straight into the cache (randomly initialised networks,
saved the way the training stage saves them), so the t_split_choice stage runs on its real
upstream stages (the tiny sweep's autoencoder and a tiny DINOv2) without a Ray Train fit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm_core.checkpoint import save_velocity
from lfm_core.coarse_to_fine import T_SPLIT_CANDIDATES
from lfm_core.velocity import VelocityConfig, build_velocity
from orchestrator.cache import StageRef
from orchestrator.config import load_sweep
from orchestrator.stages import StageGraph, read_info
from orchestrator.sweep import cache_for

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
FULL = "all"


def _graph(tmp_path: Path, extractor: Path, budget: float) -> StageGraph:
    overrides = [
        f"storage={tmp_path}",
        "tracking.uri=http://127.0.0.1:9",
        "data.limit=64",
        "data.heldout_limit=16",
        f"sampling.t_split_budget={budget}",
        "sampling.t_split_calibration=8",
    ]
    for role in ("clustering", "fid", "stability"):
        overrides += [f"features.{role}.name=dinov2", f"features.{role}.path={extractor}"]
    cfg = load_sweep(TINY, overrides)
    return StageGraph(cfg, cache_for(cfg), progress=False)


def _random_model(graph: StageGraph, seed: int) -> StageRef:
    """An fm_model stage holding a randomly initialised network (seed `seed`)."""
    ref = graph.fm_model(graph.subset(1.0, FULL, seed), "unet-xs", 8, 10, seed)
    shape = read_info(graph.get(graph.latents()))["shape"]
    config = VelocityConfig("unet-xs", in_channels=shape[1], sample_size=shape[-1], width=8)
    torch.manual_seed(seed)
    model = build_velocity(config)
    graph.cache.get(ref, lambda folder: save_velocity(folder, model))
    return ref


@pytest.mark.timeout(240)
def test_chosen_t_split_is_the_largest_within_budget(tmp_path: Path, tiny_dinov2: Path) -> None:
    graph = _graph(tmp_path, tiny_dinov2, budget=0.05)
    fine, other = _random_model(graph, 0), _random_model(graph, 1)

    # The same network on both sides: every candidate gives the fine-only samples exactly.
    same = read_info(graph.get(graph.t_split_choice(fine, fine)))
    assert same["t_split"] == max(T_SPLIT_CANDIDATES)
    assert [float(t) for t in same["similarity"]] == sorted(T_SPLIT_CANDIDATES)
    assert all(s == pytest.approx(1.0, abs=1e-5) for s in same["similarity"].values())

    # An unrelated coarse network: the choice is the largest candidate whose recorded
    # similarity meets 1 - budget (0.0, fine only, when none does).
    pair = read_info(graph.get(graph.t_split_choice(other, fine)))
    passing = [float(t) for t, s in pair["similarity"].items() if s >= 1 - 0.05]
    assert pair["t_split"] == max(passing, default=0.0)
    assert max(pair["similarity"].values()) < 1.0

    # A budget of 0 asks for the fine-only samples exactly, which an unrelated coarse network
    # never gives: fine only. A budget of 1 accepts any samples: the largest candidate.
    for budget, expected in ((0.0, 0.0), (1.0, max(T_SPLIT_CANDIDATES))):
        other_budget = _graph(tmp_path, tiny_dinov2, budget=budget)
        choice = read_info(other_budget.get(other_budget.t_split_choice(other, fine)))
        assert choice["t_split"] == expected
