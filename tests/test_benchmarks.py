"""Benchmarks: the bookkeeping is exact (pure helpers), and every benchmark runs end to end at its
tiny scale through `benchmarks.run_all`, building its artefacts through the stage graph (one
shared cache: a stage is built once across benchmarks, and a rerun builds nothing). No timing
is asserted: the numbers at this scale mean nothing; their arithmetic, and what the maths fixes
(identical coarse and fine models: FLOP bound and FID ratio exactly 1), is checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (
    c2f_timing,
    coarse_to_fine,
    data_reduction,
    run_all,
    stability_halves,
    sweep_efficiency,
    train_throughput,
)
from benchmarks.common import Embedded, Stages, parse_config
from lfm_core.errors import ConfigError
from lfm_core.flops import flop_speedup_bound
from lfm_core.metrics import stability
from lfm_core.solvers import seeded_noise, uniform_grid
from orchestrator import stage_keys
from orchestrator.config import CoarseToFineSection, SamplingSection, load_sweep
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trainers import InProcessTrainer
from orchestrator.trials import expand_trials

# ---- pure helpers --------------------------------------------------------------------------


def test_parse_config_applies_key_value_overrides_to_nested_sections():
    cfg, dry_run = parse_config(
        coarse_to_fine.C2FConfig(),
        coarse_to_fine.TINY,
        [
            "pairs=[32:64, 48:96]",
            "t_splits=[0.6]",
            "coarse_steps=null",
            "train.steps=10",
            "sampling.steps=7",
            "stages.overrides=['data.limit=64', 'autoencoder.block_out_channels=[8,16,16]']",
            "progress=false",
            "--dry-run",
        ],
        "prog",
        "test",
    )
    assert dry_run
    assert cfg.width_pairs() == [(32, 64), (48, 96)]
    assert cfg.t_splits == (0.6,)
    assert cfg.coarse_steps is None
    assert cfg.stages.overrides == ("data.limit=64", "autoencoder.block_out_channels=[8,16,16]")
    assert (cfg.train.steps, cfg.sampling.steps) == (10, 7)
    assert cfg.progress is False
    default = coarse_to_fine.C2FConfig()
    assert cfg.train.lr == default.train.lr  # untouched nested default
    assert cfg.sampling.num_samples == default.sampling.num_samples
    tiny, _ = parse_config(coarse_to_fine.C2FConfig(), coarse_to_fine.TINY, ["--tiny"], "p", "t")
    assert tiny == coarse_to_fine.TINY


def test_parse_config_names_a_bad_key_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(coarse_to_fine.C2FConfig(), coarse_to_fine.TINY, ["train.stepz=3"], "p", "")
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("p: error: train.stepz: unknown key; allowed: steps, batch_size")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"pairs": ("64-256",)}, "pairs"),
        ({"sampling": SamplingSection(num_samples=2000, batch_size=300)}, "sampling.batch_size"),
        ({"seed_sets": 3}, "seed_sets"),
        ({"t_splits": (1.0,)}, "t_splits"),
        ({"model": "dit-xxl"}, "model"),
        ({"precision": "fp8"}, "precision"),
        ({"precision": "bf16"}, "precision"),
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


def test_choose_may_take_a_seam_row_and_says_so():
    cfg = coarse_to_fine.C2FConfig()
    plain = [_row(0.7, 2.6, 1.04), _row(0.8, 3.4, 1.20)]
    seam = {**_row(0.8, 3.3, 1.03), "seam": True}
    assert coarse_to_fine._choose(plain, cfg) == {
        "t_split": 0.7,
        "seam": False,
        "reason": "fastest that meets every goal",
    }
    assert coarse_to_fine._choose([*plain, seam], cfg)["seam"] is True


def test_samplers_of_lists_large_c2f_small_then_one_seam_sampler_per_t_split():
    coarse, seam5, seam8 = (torch.nn.Identity() for _ in range(3))
    samplers = coarse_to_fine.samplers_of(coarse, (0.8, 0.5), {0.8: seam8, 0.5: seam5})
    assert list(samplers) == [
        "large_only",
        "c2f@0.5",
        "c2f@0.8",
        "small_only",
        "c2f+seam@0.5",
        "c2f+seam@0.8",
    ]
    assert [t for t, _ in samplers.values()] == [0.0, 0.5, 0.8, 1.0, 0.5, 0.8]
    assert samplers["c2f@0.8"][1] is coarse and samplers["c2f+seam@0.8"][1] is seam8


@pytest.mark.parametrize("scale", ["full", "tiny"])
def test_data_reduction_full_model_is_the_coarse_model_of_coarse_to_fine(scale, tmp_path):
    c2f = coarse_to_fine.C2FConfig() if scale == "full" else coarse_to_fine.TINY
    reduction = data_reduction.DataReductionConfig() if scale == "full" else data_reduction.TINY
    stages = Stages(overrides=c2f.stages.overrides, storage=str(tmp_path))
    assert reduction.stages.overrides == c2f.stages.overrides
    c2f_graph = Embedded(stages, {"train": c2f.train, "sampling": c2f.sampling})
    reduction_graph = Embedded(stages, reduction.sections())
    coarse = coarse_to_fine.model_refs(c2f_graph, c2f)[reduction.model.width, "coarse"]
    full = data_reduction.model_ref(reduction_graph, reduction_graph.full_subset(), reduction)
    assert coarse.key == full.key  # one stage: whichever benchmark runs second trains nothing
    assert list(tmp_path.iterdir()) == []  # naming stages builds nothing


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


def test_throughput_markdown_shows_an_unmeasured_rate_as_n_a():
    # A NaN rate (the long run was not slower) is written as null and read back as None.
    result = {
        "config": {"model": {"name": "dit-xs", "width": 16}, "train": {"batch_size": 16}},
        "bare_steps_per_s": 12.5,
        "ray_steps_per_s": None,
        "ratio": None,
        "goals": {"ratio": {"goal": 0.9}},
        "ray_init_s": None,
        "ray_fit_overhead_s": 20.0,
    }
    result["config"]["threads"] = 1
    text = train_throughput.markdown(result)
    assert "| bare lfm_core loop | 12.50 |" in text
    assert "| Ray Train worker (1 worker) | n/a |" in text
    assert "Ratio Ray / bare: n/a (goal >= 0.9)" in text


# ---- every benchmark at its tiny scale -------------------------------------------------------


def _dinov2(path):
    """Overrides that make the tiny DINOv2 every role's extractor (loads in a second)."""
    return tuple(
        f"features.{role}.{key}={value}"
        for role in ("clustering", "fid", "stability")
        for key, value in (("name", "dinov2"), ("path", path))
    )


def _prebuilt_sweep_models(sweep, storage):
    """Train the sweep's models in-process on `storage` first: the sweep then pays no Ray Train
    start-up (seconds per fit on 2 cores), and still builds its other stages once."""
    cfg = load_sweep(sweep.sweep_file, [*sweep.overrides, f"storage={storage}"])
    graph = StageGraph(cfg, cache_for(cfg), InProcessTrainer(), progress=False)
    for trial in expand_trials(cfg):
        graph.get(graph.trial(trial).model)
    return dataclasses.replace(sweep, storage=str(storage))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local, tiny_dinov2):
    """run_all at tiny scale on one stage cache (one sweep trial, the tiny DINOv2 extractor);
    data reduction with an unbounded tolerance, so every model reaches the target at once."""
    out = tmp_path_factory.mktemp("bench")
    configs = run_all.configs_for(True, str(out), str(out / ".cache"), (), _dinov2(tiny_dinov2))
    one_trial = (
        "search.data_reduction.data_fraction=[1.0]",
        "search.data_reduction.criterion=[random]",
    )
    sweep = configs[sweep_efficiency.NAME]
    sweep = dataclasses.replace(sweep, overrides=(*sweep.overrides, *one_trial))
    configs[sweep_efficiency.NAME] = _prebuilt_sweep_models(sweep, out / "sweep-storage")
    reduction = configs[data_reduction.NAME]
    configs[data_reduction.NAME] = dataclasses.replace(reduction, tolerance=1e9)
    summary = run_all.run(configs, out, tiny=True)
    return out, summary, configs


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def _records(configs):
    return Embedded(configs[coarse_to_fine.NAME].stages, {}).cache.records()


@pytest.mark.integration
def test_summary_holds_every_headline_number_and_the_machine(tiny_run):
    out, summary, configs = tiny_run
    assert summary["errors"] == {}
    on_disk = _load(out, "summary")
    assert set(run_all.SUMMARY_KEYS) <= set(on_disk)
    assert on_disk["machine"]["usable_cores"] >= 1 and on_disk["machine"]["torch"]
    assert on_disk["measured_on"] == on_disk["machine"]["description"]
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
    for name in run_all.BENCHMARKS:
        result = _load(out, name)
        assert result["benchmark"] == name and result["machine"]["cpu"]
        assert result["config"] == json.loads(json.dumps(dataclasses.asdict(configs[name])))
    markdown = (out / "summary.md").read_text()
    for title in ("Coarse-to-fine", "Data reduction", "Training throughput", "Sweep efficiency"):
        assert title in markdown

    # Rebuilt from the result files alone, the summary holds the same numbers.
    rebuilt = run_all.summarize_saved(configs, out)
    assert {k: rebuilt[k] for k in run_all.SUMMARY_KEYS} == {
        k: on_disk[k] for k in run_all.SUMMARY_KEYS
    }
    assert (out / "summary.md").read_text().startswith("# Benchmarks")


@pytest.mark.integration
def test_every_stage_is_built_once_and_a_rerun_builds_nothing(tiny_run, tmp_path):
    out, _, configs = tiny_run
    records = _records(configs)
    keys = [(r["stage"], r["key"]) for r in records]
    assert len(keys) == len(set(keys))
    # 3 tiny widths (16 x 6 steps for c2f and data reduction, 32), 2 subset models, 1 probe.
    assert sum(stage == "fm_model" for stage, _ in keys) == 5
    for name in (coarse_to_fine.NAME, data_reduction.NAME):
        module, _, _ = run_all.BENCHMARKS[name]
        module.run(dataclasses.replace(configs[name], out=str(tmp_path)))
    assert len(_records(configs)) == len(records)


@pytest.mark.integration
def test_identical_coarse_and_fine_models_give_bound_and_fid_ratio_exactly_one(tiny_run):
    out, _, _ = tiny_run
    result = _load(out, coarse_to_fine.NAME)
    same = next(p for p in result["pairs"] if p["coarse_width"] == p["fine_width"])
    training = result["training"]
    assert training["coarse 16"]["train_seconds"] == training["fine 16"]["train_seconds"]
    assert not training["coarse 16"]["cached"] and training["fine 16"]["cached"]
    for row in [same["large_only"], *same["t_splits"], same["small_only"]]:
        assert row["flop_bound"] == 1.0
        assert row["fid_ratio"] == 1.0 and row["fid_ratio_sets"] == [1.0] * 2
        assert row["fid_sets"] == same["large_only"]["fid_sets"]


@pytest.mark.integration
def test_coarse_to_fine_rows_follow_from_their_measurements(tiny_run):
    out, summary, _ = tiny_run
    result = _load(out, coarse_to_fine.NAME)
    cfg = coarse_to_fine.TINY
    rounds = cfg.sampling.num_samples // cfg.sampling.batch_size
    pair = next(p for p in result["pairs"] if p["coarse_width"] < p["fine_width"])
    flops = {k: pair["models"][k]["flops_per_sample"] for k in ("coarse", "fine")}
    assert flops["coarse"] < flops["fine"]
    grid = uniform_grid(cfg.sampling.steps)
    for row in [pair["large_only"], *pair["t_splits"], pair["small_only"]]:
        t_split = row["t_split"]
        steps = cfg.sampling.steps
        coarse_steps = steps if t_split == 1.0 else int((grid[:-1] < t_split).sum())
        assert (row["nfe_coarse"], row["nfe_fine"]) == (coarse_steps, steps - coarse_steps)
        assert len(row["seconds_rounds"]) == len(row["speedup_rounds"]) == rounds
        assert row["speedup"] == statistics.median(row["speedup_rounds"])
        bound = flop_speedup_bound(
            flops["coarse"], flops["fine"], row["nfe_coarse"], row["nfe_fine"]
        )
        assert row["flop_bound"] == pytest.approx(bound, rel=1e-12)
        assert row["bound_ratio"] == pytest.approx(row["speedup"] / row["flop_bound"], rel=1e-12)
        assert len(row["fid_sets"]) == cfg.seed_sets
        assert row["fid"] == pytest.approx(statistics.mean(row["fid_sets"]), rel=1e-12)
        loop_share = pair["solver_loop_s"] / row["seconds_median"]
        assert row["solver_share"] == pytest.approx(loop_share, rel=1e-12) and loop_share > 0
    assert pair["large_only"]["flop_bound"] == 1.0 and pair["large_only"]["fid_ratio"] == 1.0
    assert pair["large_only"]["speedup_rounds"] == [1.0] * rounds
    # The small model alone: fine / coarse FLOPs per evaluation, every evaluation coarse.
    small = pair["small_only"]
    assert small["flop_bound"] == pytest.approx(flops["fine"] / flops["coarse"], rel=1e-12)
    recommended = result["recommended"]
    assert summary["c2f_speedup"] == recommended["speedup"]
    assert summary["c2f_t_split"] == recommended["t_split"]
    assert result["goals"] == recommended["goals"]
    assert pair["models"]["coarse"]["top_ops"]


@pytest.mark.integration
def test_seam_option_fine_tunes_the_coarse_model_per_t_split_through_the_graph(tiny_run, tmp_path):
    _, _, configs = tiny_run
    before = {(r["stage"], r["key"]) for r in _records(configs)}
    cfg = dataclasses.replace(
        configs[coarse_to_fine.NAME],
        out=str(tmp_path),
        pairs=("16:32",),
        t_splits=(0.5,),
        coarse_to_fine=CoarseToFineSection(seam=True),
    )
    result = coarse_to_fine.run(cfg)
    built = {(r["stage"], r["key"]) for r in _records(configs)} - before
    assert sorted(stage for stage, _ in built) == ["seam_model", "seam_state"]
    pair = result["pairs"][0]
    (plain,), (seam,) = pair["t_splits"], pair["seam_t_splits"]
    assert (seam["seam"], plain["seam"], seam["t_split"]) == (True, False, 0.5)
    assert (seam["nfe_coarse"], seam["nfe_fine"]) == (plain["nfe_coarse"], plain["nfe_fine"])
    assert seam["flop_bound"] == plain["flop_bound"]
    # Another coarse model on the same noise: other samples.
    assert seam["fid_sets"] != plain["fid_sets"]
    tuned = result["training"]["coarse 16 seam to 32 at 0.5"]
    assert tuned["steps"] == max(1, cfg.train.steps // 4) and not tuned["cached"]
    assert result["summary"]["c2f_seam"] == result["recommended"]["seam"]


@pytest.mark.integration
def test_data_reduction_measures_time_to_the_full_data_fid(tiny_run):
    out, _, configs = tiny_run
    result = _load(out, data_reduction.NAME)
    c2f = _load(out, coarse_to_fine.NAME)
    cfg = configs[data_reduction.NAME]
    full = result["full"]
    steps = list(range(cfg.eval_every, cfg.train.steps + 1, cfg.eval_every))
    assert [c["step"] for c in full["checkpoints"]] == steps
    assert full["target_fid"] == full["checkpoints"][-1]["fid"]
    # The full-data model is coarse-to-fine's coarse model: trained there, cached here, and
    # its final snapshot is the model c2f sampled alone (first seed set: the same seeds).
    assert full["cached"] and full["train_seconds"] == c2f["training"]["coarse 16"]["train_seconds"]
    same = next(p for p in c2f["pairs"] if p["coarse_width"] == p["fine_width"])
    assert full["target_fid"] == pytest.approx(same["small_only"]["fid_sets"][0], rel=1e-6)
    # An unbounded tolerance: every model reaches the target at its first snapshot.
    assert full["reach"]["within_tolerance"] == full["checkpoints"][0]
    n = Embedded(cfg.stages, cfg.sections()).latents.shape[0]
    assert n == 256
    for fraction in result["fractions"]:
        assert set(fraction["subset_fid"]) == set(cfg.proxy_criteria)
        best_proxy = min(fraction["subset_fid"], key=fraction["subset_fid"].get)
        (run_,) = fraction["runs"]
        assert run_["criterion"] == best_proxy == fraction["best"]["criterion"]
        assert run_["subset_size"] == round(fraction["fraction"] * n)
        assert [c["step"] for c in run_["checkpoints"]] == steps
        assert run_["reach"]["within_tolerance"] == run_["checkpoints"][0]
        ratio = run_["checkpoints"][0]["seconds"] / full["checkpoints"][0]["seconds"]
        assert run_["time_ratio"] == ratio == fraction["best"]["time_ratio"]
        assert result["summary"][f"dr_time_ratio_{fraction['fraction']:g}"] == ratio


@pytest.mark.integration
def test_throughput_and_sweep_write_their_numbers(tiny_run):
    out, summary, _ = tiny_run
    throughput = _load(out, "train_throughput")
    cfg = run_all.BENCHMARKS["train_throughput"][2]
    assert set(throughput["bare_seconds"]) == set(throughput["ray_runs"]) == {"2", "4"}
    assert all(
        r["wall_s"] > r["elapsed_s"] > 0 for runs in throughput["ray_runs"].values() for r in runs
    )

    def rate(short, long):  # None where the long run was not slower (JSON has no NaN)
        return (cfg.long_steps - cfg.short_steps) / (long - short) if long > short else None

    bare = rate(*(statistics.median(throughput["bare_seconds"][s]) for s in ("2", "4")))
    ray = rate(
        *(statistics.median(r["elapsed_s"] for r in throughput["ray_runs"][s]) for s in ("2", "4"))
    )
    assert throughput["bare_steps_per_s"] == bare and throughput["ray_steps_per_s"] == ray
    expected = None if bare is None or ray is None else ray / bare
    assert throughput["ratio"] == expected == summary["ray_train_throughput_ratio"]
    assert throughput["goals"]["ratio"]["value"] == expected
    sweep = _load(out, sweep_efficiency.NAME)
    assert sweep["sweep"]["errors"] == [] and sweep["sweep"]["trials"] == 1
    assert sweep["duplicate_stages"] == 0 and sweep["builds"] == sweep["unique_stages"] > 0
    assert sweep["ratio"] == pytest.approx(sweep["wall_s"] / sweep["unique_stage_s"], rel=1e-12)
    assert sweep["rerun"]["builds"] == 0 and sweep["rerun"]["errors"] == []
    assert summary["sweep_wall_ratio"] == sweep["ratio"]


@pytest.mark.integration
def test_stability_halves_compares_disjoint_halves_on_the_same_seeds(tiny_run, tmp_path):
    _, _, configs = tiny_run
    stages = configs[coarse_to_fine.NAME].stages
    cfg = dataclasses.replace(stability_halves.TINY, out=str(tmp_path), stages=stages)
    result = stability_halves.run(cfg)
    assert result["halves"] == {"size": 128, "disjoint": True}
    models = result["models"]
    assert [models[name]["training_seed"] for name in ("A", "B", "B_other_seed")] == [0, 0, 1]
    assert all(row["train_images"] == 128 for row in models.values())
    # The similarity is lfm_core's, on the FID features the samples stages hold.
    embedded = Embedded(stages, {"model": cfg.model, "train": cfg.train, "sampling": cfg.sampling})
    features = {}
    for name, which, seed in (("A", "A", 0), ("B", "B", 0), ("B_other_seed", "B", 1)):
        half = stage_keys.half(embedded.cfg, which, cfg.split_seed)
        ref = embedded.model_ref(half, cfg.model.name, cfg.model.width, seed=seed)
        samples = embedded.graph.load_samples(stage_keys.samples(embedded.cfg, ref))
        features[name] = samples["features_fid"]
    for pair, (left, right) in stability_halves.PAIRS.items():
        expected = stability(features[left], features[right], cfg.unrelated_seed)
        assert result["similarity"][pair]["classifier"] == dataclasses.asdict(expected)
    # Same-seed pixels of barely trained models from one initialisation: far above unrelated,
    # and above the pair that shares no training seed.
    pixels = {pair: spaces["pixels"] for pair, spaces in result["similarity"].items()}
    for s in pixels.values():
        assert s["similarity"] > s["unrelated"] + 0.1
    assert pixels["A_vs_B"]["similarity"] > pixels["A_vs_B_other_seed"]["similarity"]
    assert json.loads((tmp_path / "stability_halves.json").read_text())["models"] == models
    assert (tmp_path / "stability_halves_grid.png").is_file()
    assert "A_vs_B" in stability_halves.markdown(result)


@pytest.mark.integration
def test_gpu_script_smoke_path_runs_on_the_cpu(tiny_run, tmp_path):
    _, _, configs = tiny_run
    stages = configs[coarse_to_fine.NAME].stages
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    command = [
        str(repo / "benchmarks" / "gpu.sh"),
        "--device", "cpu", "--tiny", "--out", str(tmp_path),
        "--", f"stages.storage={stages.storage}",
        "stages.overrides=[" + ", ".join(f"'{item}'" for item in stages.overrides) + "]",
    ]  # fmt: skip
    before = len(_records(configs))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "coarse_to_fine.json").read_text())
    assert result["config"]["device"] == "cpu" and result["machine"]["accelerator"] is None
    assert result["summary"]["c2f_t_split"] in coarse_to_fine.TINY.t_splits
    assert len(_records(configs)) == before  # every model came from the cache


def test_timing_script_path_times_random_weights_against_the_flop_bound(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    command = [str(repo / "benchmarks" / "gpu.sh"), "--timing", "--device", "cpu", "--tiny",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "c2f_timing.json").read_text())
    assert result["config"]["coarse"] == c2f_timing.TINY.coarse
    rows = {row["t_split"]: row for row in result["rows"]}
    assert set(rows) == {0.0, 0.5, 1.0}
    assert rows[0.0]["speedup"] == rows[0.0]["flop_bound"] == 1.0
    for row in rows.values():
        assert row["speedup"] == statistics.median(row["speedup_rounds"])
        assert row["bound_ratio"] == pytest.approx(row["speedup"] / row["flop_bound"])
    assert result["compile_seconds"] is None


@pytest.mark.integration
def test_compiled_models_give_the_eager_velocities():
    model = c2f_timing.random_model("dit-xs", 4, 8)
    cfg = dataclasses.replace(
        coarse_to_fine.TINY, compile=True, sampling=SamplingSection(num_samples=32, batch_size=8)
    )
    seeds = list(range(8))
    models, seconds = coarse_to_fine.prepare_models({(0, "coarse"): model}, seeds, (4, 8, 8), cfg)
    x = seeded_noise(seeds, (4, 8, 8))
    t = torch.full((8,), 0.3)
    with torch.no_grad():
        assert (models[0, "coarse"](x, t) - model(x, t)).abs().max() < 1e-5
    assert seconds is not None and seconds > 0
