"""Benchmarks: the bookkeeping is exact (pure helpers), and every benchmark runs end to end at its
tiny scale through `benchmarks.run_all`, writing the JSON fields the summary promises. No
timing is asserted: the numbers at this scale mean nothing, only their arithmetic is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import coarse_to_fine, data_reduction, run_all, stability_halves, sweep_efficiency
from benchmarks.common import parse_config
from lfm_core.errors import ConfigError
from lfm_core.flops import flop_speedup_bound
from lfm_core.solvers import uniform_grid

# ---- pure helpers --------------------------------------------------------------------------


def test_parse_config_reads_tuples_optionals_bools_and_nested_fields():
    cfg, dry_run = parse_config(
        coarse_to_fine.C2FConfig(),
        coarse_to_fine.TINY,
        [
            "--pairs", "32:64", "48:96",
            "--t-splits", "0.6",
            "--data-train-limit", "none",
            "--data-ae-channels", "8", "16",
            "--no-progress",
            "--dry-run",
        ],
        "prog",
        "test",
    )  # fmt: skip
    assert dry_run
    assert cfg.width_pairs() == [(32, 64), (48, 96)]
    assert cfg.t_splits == (0.6,)
    assert cfg.data.train_limit is None and cfg.data.ae_channels == (8, 16)
    assert cfg.progress is False
    assert cfg.train_steps == coarse_to_fine.C2FConfig().train_steps  # untouched default
    tiny, _ = parse_config(coarse_to_fine.C2FConfig(), coarse_to_fine.TINY, ["--tiny"], "p", "t")
    assert tiny == coarse_to_fine.TINY


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"pairs": ("64-256",)}, "pairs"),
        ({"round_size": 300}, "round_size"),
        ({"t_splits": (1.0,)}, "t_splits"),
        ({"model": "dit-xxl"}, "model"),
    ],
)
def test_c2f_config_rejects_bad_values_in_one_line(change, key):
    with pytest.raises(ConfigError, match=key) as err:
        dataclasses.replace(coarse_to_fine.C2FConfig(), **change)
    assert "\n" not in str(err.value)


def _row(t_split, speedup, fid_ratio, bound_ratio=1.0):
    cfg = coarse_to_fine.C2FConfig()
    row = {"t_split": t_split, "speedup": speedup, "fid_ratio": fid_ratio}
    row["bound_ratio"] = bound_ratio
    row["goals"] = coarse_to_fine._goals(row, cfg)
    return row


def test_choose_takes_the_fastest_t_split_that_meets_the_goals():
    cfg = coarse_to_fine.C2FConfig()
    rows = [_row(0.5, 1.8, 1.00), _row(0.7, 2.6, 1.04), _row(0.9, 4.0, 1.30)]
    assert coarse_to_fine._choose(rows, cfg)["t_split"] == 0.7
    # 0.9 is within the FID tolerance but far from its bound: 0.7 meets every goal.
    far = [_row(0.5, 1.8, 1.00), _row(0.7, 2.6, 1.04), _row(0.9, 4.0, 1.03, bound_ratio=0.8)]
    assert coarse_to_fine._choose(far, cfg)["t_split"] == 0.7
    slow = [_row(0.5, 1.8, 1.00), _row(0.7, 2.2, 1.04, bound_ratio=0.8)]
    assert coarse_to_fine._choose(slow, cfg)["t_split"] == 0.7
    worse = [_row(0.5, 1.8, 1.10), _row(0.7, 2.6, 1.20)]
    assert coarse_to_fine._choose(worse, coarse_to_fine.C2FConfig())["t_split"] == 0.5


def test_data_reduction_full_model_is_the_coarse_model_of_coarse_to_fine():
    c2f, reduction = coarse_to_fine.C2FConfig(), data_reduction.DataReductionConfig()
    assert c2f.train_config(coarse=True) == reduction.train_config()
    assert reduction.width in {coarse for coarse, _ in c2f.width_pairs()}
    assert coarse_to_fine.TINY.train_config(coarse=True) == data_reduction.TINY.train_config()


def test_time_to_finds_the_first_checkpoint_at_or_below_the_level():
    rows = [{"step": s, "seconds": s / 10, "fid": f} for s, f in ((2, 9.0), (4, 5.0), (6, 4.0))]
    assert data_reduction.time_to(rows, 5.0)["step"] == 4
    assert data_reduction.time_to(rows, 3.0) is None


def test_analyse_counts_duplicates_and_times_each_stage_once():
    records = [
        {"stage": "autoencoder", "key": "a" * 64, "start": 0.0, "seconds": 10.0},
        {"stage": "fm_model", "key": "b" * 64, "start": 10.0, "seconds": 20.0},
        {"stage": "fm_model", "key": "b" * 64, "start": 40.0, "seconds": 25.0},  # built twice
        {"stage": "fm_model", "key": "c" * 64, "start": 30.0, "seconds": 5.0},
    ]
    out = sweep_efficiency.analyse(records, wall_s=42.0)
    assert out["unique_stage_s"] == 35.0  # the first build of b counts, once
    assert out["ratio"] == 42.0 / 35.0
    assert (out["builds"], out["unique_stages"], out["duplicate_stages"]) == (4, 3, 1)
    assert out["duplicated"] == ["fm_model/bbbbbbbbbbbb"]
    assert out["per_stage"]["fm_model"] == {"builds": 2, "seconds": 25.0}


def test_split_halves_are_disjoint_equal_and_seeded():
    a, b = stability_halves.split_halves(11, seed=3)
    assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
    assert a.tolist() == sorted(a.tolist()) and set(a.tolist()) | set(b.tolist()) <= set(range(11))
    again = stability_halves.split_halves(11, seed=3)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    assert not torch.equal(a, stability_halves.split_halves(11, seed=4)[0])


# ---- every benchmark at its tiny scale -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local, tiny_dinov2):
    """run_all at tiny scale (one sweep trial, the tiny DINOv2 as the sweep's extractor)."""
    out = tmp_path_factory.mktemp("bench")
    configs = run_all.configs_for(True, str(out), str(out / ".cache"))
    extractor = [
        f"features.{role}.{key}={value}"
        for role in ("clustering", "fid", "stability")
        for key, value in (("name", "dinov2"), ("path", tiny_dinov2))
    ]
    one_trial = [
        "search.data_reduction.data_fraction=[1.0]",
        "search.data_reduction.criterion=[random]",
    ]
    sweep = configs[sweep_efficiency.NAME]
    configs[sweep_efficiency.NAME] = dataclasses.replace(
        sweep, overrides=(*sweep.overrides, *extractor, *one_trial)
    )
    summary = run_all.run(configs, out, tiny=True)
    return out, summary


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.integration
def test_summary_holds_every_headline_number_and_the_machine(tiny_run):
    out, summary = tiny_run
    assert summary["errors"] == {}
    on_disk = _load(out, "summary")
    for key in (*run_all.SUMMARY_KEYS, "machine", "measured_on", "goals"):
        assert key in on_disk
    assert on_disk["machine"]["usable_cores"] >= 1 and on_disk["machine"]["torch"]
    assert on_disk["c2f_t_split"] in coarse_to_fine.TINY.t_splits
    assert on_disk["duplicate_stages"] == 0
    assert set(on_disk["goals"]) == {
        "c2f_speedup",
        "c2f_fid_ratio",
        "c2f_bound_ratio",
        "ray_train_throughput_ratio",
        "sweep_wall_ratio",
        "duplicate_stages",
    }
    markdown = (out / "summary.md").read_text()
    for title in ("Coarse-to-fine", "Data reduction", "Training throughput", "Sweep efficiency"):
        assert title in markdown

    # Rebuilt from the result files alone, the summary holds the same numbers.
    configs = run_all.configs_for(True, str(out), str(out / ".cache"))
    rebuilt = run_all.summarize_saved(configs, out)
    assert {k: rebuilt[k] for k in run_all.SUMMARY_KEYS} == {
        k: on_disk[k] for k in run_all.SUMMARY_KEYS
    }
    assert (out / "summary.md").read_text().startswith("# Benchmarks")


@pytest.mark.integration
def test_coarse_to_fine_rows_follow_from_their_measurements(tiny_run):
    out, summary = tiny_run
    result = _load(out, coarse_to_fine.NAME)
    cfg = coarse_to_fine.TINY
    rounds = cfg.samples_per_set * cfg.seed_sets // cfg.round_size
    (pair,) = result["pairs"]
    flops = {k: pair["models"][k]["flops_per_sample"] for k in ("coarse", "fine")}
    assert flops["coarse"] < flops["fine"]
    grid = uniform_grid(cfg.steps)
    for row in [pair["large_only"], *pair["t_splits"], pair["small_only"]]:
        t_split = row["t_split"]
        coarse_steps = cfg.steps if t_split == 1.0 else int((grid[:-1] < t_split).sum())
        assert (row["nfe_coarse"], row["nfe_fine"]) == (coarse_steps, cfg.steps - coarse_steps)
        assert len(row["seconds_rounds"]) == len(row["speedup_rounds"]) == rounds
        assert row["speedup"] == statistics.median(row["speedup_rounds"])
        bound = flop_speedup_bound(
            flops["coarse"], flops["fine"], row["nfe_coarse"], row["nfe_fine"]
        )
        assert row["flop_bound"] == pytest.approx(bound, rel=1e-12)
        assert row["bound_ratio"] == pytest.approx(row["speedup"] / row["flop_bound"], rel=1e-12)
        assert len(row["fid_sets"]) == cfg.seed_sets
        assert all(math.isfinite(f) and f >= 0 for f in row["fid_sets"])
    assert pair["large_only"]["fid_ratio"] == 1.0
    assert pair["large_only"]["speedup_rounds"] == [1.0] * rounds
    recommended = result["recommended"]
    assert summary["c2f_speedup"] == recommended["speedup"]
    assert summary["c2f_t_split"] == recommended["t_split"]
    assert pair["models"]["coarse"]["top_ops"]


@pytest.mark.integration
def test_data_reduction_measures_time_to_the_full_data_fid(tiny_run):
    out, _ = tiny_run
    result = _load(out, data_reduction.NAME)
    cfg = data_reduction.TINY
    full = result["full"]
    steps = list(range(cfg.eval_every, cfg.train_steps + 1, cfg.eval_every))
    assert [c["step"] for c in full["checkpoints"]] == steps
    assert full["target_fid"] == full["checkpoints"][-1]["fid"]
    n = cfg.data.train_limit
    for fraction in result["fractions"]:
        assert set(fraction["subset_fid"]) == set(cfg.proxy_criteria)
        best_proxy = min(fraction["subset_fid"], key=fraction["subset_fid"].get)
        (run_,) = fraction["runs"]
        assert run_["criterion"] == best_proxy
        assert run_["subset_size"] == round(fraction["fraction"] * n)
        assert [c["step"] for c in run_["checkpoints"]] == steps
        if run_["time_ratio"] is not None:
            ratio = run_["reach"]["seconds"] / full["reach"]["seconds"]
            assert run_["time_ratio"] == pytest.approx(ratio, rel=1e-12)


@pytest.mark.integration
def test_throughput_and_sweep_write_their_numbers(tiny_run):
    out, summary = tiny_run
    throughput = _load(out, "train_throughput")
    for key in ("bare_steps_per_s", "ray_steps_per_s", "ratio", "ray_fit_overhead_s"):
        assert key in throughput
    assert set(throughput["bare_seconds"]) == {"2", "4"}
    assert all(
        r["wall_s"] > r["elapsed_s"] > 0 for runs in throughput["ray_runs"].values() for r in runs
    )
    if throughput["ratio"] is not None:
        expected = throughput["ray_steps_per_s"] / throughput["bare_steps_per_s"]
        assert throughput["ratio"] == pytest.approx(expected, rel=1e-12)
    sweep = _load(out, sweep_efficiency.NAME)
    assert sweep["sweep"]["errors"] == [] and sweep["sweep"]["trials"] == 1
    assert sweep["duplicate_stages"] == 0 and sweep["builds"] == sweep["unique_stages"] > 0
    assert sweep["ratio"] == pytest.approx(sweep["wall_s"] / sweep["unique_stage_s"], rel=1e-12)
    assert sweep["rerun"]["builds"] == 0 and sweep["rerun"]["errors"] == []
    assert summary["sweep_wall_ratio"] == sweep["ratio"]


@pytest.mark.integration
def test_stability_halves_compares_disjoint_halves_on_the_same_seeds(tiny_run, tmp_path):
    out, _ = tiny_run
    tiny = stability_halves.TINY
    cfg = dataclasses.replace(
        tiny,
        out=str(tmp_path),
        data=dataclasses.replace(tiny.data, cache_dir=str(out / ".cache")),
        progress=False,
    )
    result = stability_halves.run(cfg)
    assert result["halves"] == {"size": tiny.data.train_limit // 2, "disjoint": True}
    models = result["models"]
    assert [models[name]["training_seed"] for name in ("A", "B", "B_other_seed")] == [0, 0, 1]
    assert all(math.isfinite(row["fid"]) and row["train_images"] == 128 for row in models.values())
    for spaces in result["similarity"].values():
        for s in spaces.values():
            assert -1 <= s["unrelated"] <= 1 and -1 <= s["similarity"] <= 1
    assert json.loads((tmp_path / "stability_halves.json").read_text())["models"] == models
    assert (tmp_path / "stability_halves_grid.png").is_file()
    assert "A_vs_B" in stability_halves.markdown(result)


@pytest.mark.integration
def test_gpu_script_smoke_path_runs_on_the_cpu(tiny_run, tmp_path):
    out, _ = tiny_run
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    command = [
        str(repo / "benchmarks" / "gpu.sh"),
        "--device", "cpu", "--tiny", "--out", str(tmp_path),
        "--", "--data-cache-dir", str(out / ".cache"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "coarse_to_fine.json").read_text())
    assert result["config"]["device"] == "cpu" and result["machine"]["accelerator"] is None
    assert result["summary"]["c2f_t_split"] in coarse_to_fine.TINY.t_splits
