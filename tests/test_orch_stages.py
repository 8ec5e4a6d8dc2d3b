"""The stage graph without Ray: keys hold exactly what a stage depends on, and builds read
nothing else; the automatically chosen t_split of a coarse-to-fine pair.

Models are trained by the in-process trainer (lfm_core's loop in this process), so every stage
runs its real builder on the tiny sweep's data with a tiny DINOv2 as the feature extractor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm_core.autoencoder import train_autoencoder
from lfm_core.coarse_to_fine import T_SPLIT_CANDIDATES
from orchestrator import stage_keys as keys
from orchestrator.cache import StageRef
from orchestrator.config import load_sweep
from orchestrator.datasets import seeded_rows
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trainers import InProcessTrainer
from orchestrator.trials import Trial

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
FULL = "all"


def _graph(storage: Path, extractor: Path, *overrides: str) -> StageGraph:
    base = [
        f"storage={storage}",
        "tracking.uri=http://127.0.0.1:9",
        "data.limit=64",
        "data.heldout_limit=16",
        "sampling.num_samples=16",
        "sampling.t_split_calibration=8",
    ]
    for role in ("clustering", "fid", "stability"):
        base += [f"features.{role}.name=dinov2", f"features.{role}.path={extractor}"]
    cfg = load_sweep(TINY, [*base, *overrides])
    return StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)


def _built(graph: StageGraph) -> dict[str, int]:
    """Stage name -> builds recorded so far in the graph's storage."""
    counts: dict[str, int] = {}
    for record in graph.cache.records():
        counts[record["stage"]] = counts.get(record["stage"], 0) + 1
    return counts


def _full_model(graph: StageGraph, seed: int = 0) -> StageRef:
    cfg = graph.cfg
    subset = keys.subset(cfg, 1.0, FULL, seed)
    return keys.fm_model(cfg, subset, cfg.model.name, cfg.model.width, cfg.train.steps, seed)


@pytest.mark.timeout(240)
def test_a_value_outside_a_key_reuses_the_stage_and_one_inside_rebuilds_it(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    trial = Trial("data_reduction", 1.0, "random", None, None, 0)
    graph = _graph(tmp_path, tiny_dinov2)
    first = graph.metrics(trial)
    builds = _built(graph)
    assert builds["fm_model"] == 1 and builds["samples"] == 1 and builds["metrics"] == 1

    # Sampling more seeds is outside the model's key: the trained model is reused, the samples
    # (whose key holds num_samples) and everything below them are rebuilt.
    more = _graph(tmp_path, tiny_dinov2, "sampling.num_samples=24")
    assert keys.trial(more.cfg, trial).model.key == keys.trial(graph.cfg, trial).model.key
    assert keys.trial(more.cfg, trial).samples.key != keys.trial(graph.cfg, trial).samples.key
    more.metrics(trial)
    after = _built(more)
    assert after["fm_model"] == 1 and after["autoencoder"] == 1 and after["latents"] == 1
    assert after["samples"] == 2 and after["metrics"] == 2

    # Execution settings (batch sizes of features and scores) are in no key: nothing is
    # rebuilt, the metrics repeat.
    batched = _graph(tmp_path, tiny_dinov2, "features.batch_size=3", "scoring.batch_size=7")
    assert batched.metrics(trial) == first
    assert _built(batched) == after
    # The sampling batch is in no samples key (a sample depends on its seed alone), but the
    # timing stage times one batch: only it and the metrics are rebuilt.
    timed = _graph(tmp_path, tiny_dinov2, "sampling.batch_size=5")
    metrics = timed.metrics(trial)
    assert {k: v for k, v in metrics.items() if k != "speedup"} == {
        k: v for k, v in first.items() if k != "speedup"
    }
    timed_builds = _built(timed)
    assert timed_builds["timing"] == after["timing"] + 1
    assert timed_builds["metrics"] == after["metrics"] + 1
    assert {k: v for k, v in timed_builds.items() if k not in ("timing", "metrics")} == {
        k: v for k, v in after.items() if k not in ("timing", "metrics")
    }

    # A training value is in the model's key: a new model, different weights, new samples.
    lr = _graph(tmp_path, tiny_dinov2, "train.lr=0.01")
    model, old = _full_model(lr), _full_model(graph)
    assert model.key != old.key
    changed = lr.load_model(model).state_dict()
    same = graph.load_model(old).state_dict()
    assert any(not torch.equal(changed[name], same[name]) for name in same)
    assert _built(lr)["fm_model"] == 2 and _built(lr)["autoencoder"] == 1


@pytest.mark.timeout(240)
def test_snapshots_are_the_ema_weights_part_way_through(tmp_path: Path, tiny_dinov2: Path) -> None:
    graph = _graph(tmp_path, tiny_dinov2, "train.steps=6")
    cfg = graph.cfg
    subset = keys.subset(cfg, 1.0, FULL, 0)
    ref = keys.fm_model(cfg, subset, cfg.model.name, cfg.model.width, 6, 0, snapshot_every=3)
    snapshots = graph.load_snapshots(ref)
    assert [step for step, _, _ in snapshots] == [3, 6]
    assert 0 < snapshots[0][1] < snapshots[1][1]
    final = graph.load_model(ref).state_dict()
    assert all(torch.equal(snapshots[-1][2].state_dict()[k], v.cpu()) for k, v in final.items())
    # Keeping snapshots changes nothing in training: the same model without them is equal,
    # and the model trained 3 steps is the first snapshot, bit for bit.
    plain = graph.load_model(_full_model(graph)).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in final.items())
    three = _graph(tmp_path, tiny_dinov2, "train.steps=3")
    early = three.load_model(_full_model(three)).state_dict()
    assert all(torch.equal(snapshots[0][2].state_dict()[k], v.cpu()) for k, v in early.items())


@pytest.mark.timeout(240)
def test_chosen_t_split_is_the_largest_within_budget(tmp_path: Path, tiny_dinov2: Path) -> None:
    graph = _graph(tmp_path, tiny_dinov2, "sampling.t_split_budget=0.05")
    cfg = graph.cfg
    fine, other = _full_model(graph, 0), _full_model(graph, 1)

    # The same network on both sides: every candidate gives the fine-only samples exactly.
    same = graph.info(keys.t_split_choice(cfg, fine, fine))
    assert same["t_split"] == max(T_SPLIT_CANDIDATES)
    assert [float(t) for t in same["similarity"]] == sorted(T_SPLIT_CANDIDATES)
    assert all(s == pytest.approx(1.0, abs=1e-5) for s in same["similarity"].values())

    # Another network (another seed) as the coarse model: the choice is the largest candidate
    # whose recorded similarity meets 1 - budget (0.0, fine only, when none does).
    pair = graph.info(keys.t_split_choice(cfg, other, fine))
    passing = [float(t) for t, s in pair["similarity"].items() if s >= 1 - 0.05]
    assert pair["t_split"] == max(passing, default=0.0)
    assert max(pair["similarity"].values()) < 1.0

    # A budget of 0 asks for the fine-only samples exactly, which another network never gives:
    # fine only. A budget of 1 accepts any samples: the largest candidate.
    for budget, expected in ((0.0, 0.0), (1.0, max(T_SPLIT_CANDIDATES))):
        other_budget = _graph(tmp_path, tiny_dinov2, f"sampling.t_split_budget={budget}")
        choice = other_budget.info(keys.t_split_choice(other_budget.cfg, other, fine))
        assert choice["t_split"] == expected


@pytest.mark.timeout(240)
def test_halves_are_disjoint_equal_and_seeded(tmp_path: Path, tiny_dinov2: Path) -> None:
    graph = _graph(tmp_path, tiny_dinov2)
    n = graph.info(keys.latents(graph.cfg))["shape"][0]

    def indices(which: str, seed: int) -> list[int]:
        return graph.tensors(keys.half(graph.cfg, which, seed), "indices.safetensors")[
            "indices"
        ].tolist()

    a, b = indices("A", 3), indices("B", 3)
    assert len(a) == len(b) == n // 2 and not set(a) & set(b)
    assert a == sorted(a) and b == sorted(b) and set(a) | set(b) <= set(range(n))
    assert a != indices("A", 4)
    with pytest.raises(ValueError, match="half: 'C' is not one of A, B"):
        keys.half(graph.cfg, "C", 3)


@pytest.mark.timeout(240)
def test_new_criteria_are_wired_into_the_subset_keys(tmp_path: Path, tiny_dinov2: Path) -> None:
    graph = _graph(tmp_path, tiny_dinov2, "scoring.probe_steps=3")
    cfg = graph.cfg
    n = graph.info(keys.latents(cfg))["shape"][0]

    def kept(criterion: str) -> set[int]:
        ref = keys.subset(cfg, 0.5, criterion, 0)
        return set(graph.tensors(ref, "indices.safetensors")["indices"].tolist())

    # The hardest and the easiest halves of one scores stage: disjoint, together everything.
    hardest, easiest = kept("loss"), kept("loss_lowest")
    loss, lowest = keys.subset(cfg, 0.5, "loss", 0), keys.subset(cfg, 0.5, "loss_lowest", 0)
    assert loss.upstream["scores"].key == lowest.upstream["scores"].key
    assert len(hardest) == len(easiest) == n // 2 and hardest | easiest == set(range(n))
    # Cluster criteria carry their k (and a non-default k-means kind) in the key.
    assert (
        keys.subset(cfg, 0.5, "drop_cluster", 0).inputs["num_clusters"] == cfg.scoring.num_clusters
    )
    assert "kmeans" not in keys.subset(cfg, 0.5, "balanced_nearest", 0).inputs
    spherical = _graph(tmp_path, tiny_dinov2, "scoring.kmeans=spherical").cfg
    assert keys.subset(spherical, 0.5, "balanced_nearest", 0).inputs["kmeans"] == "spherical"
    assert len(kept("drop_cluster")) == n // 2
    # class_skew reads the labels: skew 1 keeps one class only. (mnist5k's train split is
    # sorted by class: its first 900 digits are 0s, 1s and a few 2s.)
    skewed = _graph(tmp_path / "skew", tiny_dinov2, "data.limit=900", "scoring.skew_class=1")
    labels = skewed.tensors(keys.latents(skewed.cfg), "latents.safetensors")["labels"]
    assert set(labels.tolist()) == {0, 1, 2}
    indices = skewed.tensors(keys.subset(skewed.cfg, 0.25, "class_skew", 0), "indices.safetensors")
    assert set(labels[indices["indices"]].tolist()) == {1}
    assert indices["indices"].numel() == 225


@pytest.mark.timeout(240)
def test_fid_curve_points_are_the_fids_of_models_trained_that_far(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    trial = Trial("data_reduction", 1.0, "random", None, None, 0)
    graph = _graph(tmp_path, tiny_dinov2, "train.steps=6", "sampling.fid_every=3")
    metrics = graph.metrics(trial)
    refs = keys.trial(graph.cfg, trial)
    curve = graph.info(refs.metrics.upstream["fid_curve"])
    assert curve["steps"] == [3, 6]
    assert 0 < curve["seconds"][0] < curve["seconds"][1]
    # The last point is the final model's FID; the first, that of the model trained 3 steps
    # (the snapshot is its EMA weights bit for bit, and sampling depends on the seeds alone).
    assert curve["fid"][1] == metrics["fid"]
    three = _graph(tmp_path, tiny_dinov2, "train.steps=3")
    assert curve["fid"][0] == three.metrics(trial)["fid"]
    # The full-data trial is its own reference: it reaches its own final FID by the end.
    expected = 3.0 if curve["fid"][0] <= 1.05 * metrics["fid_reference"] else 6.0
    assert metrics["steps_to_quality"] == expected
    assert metrics["seconds_to_quality"] == curve["seconds"][int(expected) // 3 - 1]


def test_to_quality_is_the_first_point_within_five_percent() -> None:
    from orchestrator.stage_builders import to_quality

    curve = {"steps": [100, 200, 300], "seconds": [1.0, 2.0, 3.0], "fid": [90.0, 52.4, 50.0]}
    assert to_quality(curve, 50.0) == (200.0, 2.0)  # 52.4 <= 52.5
    assert to_quality(curve, 49.8) == (300.0, 3.0)  # 52.4 > 52.29, 50.0 <= 52.29
    steps, seconds = to_quality(curve, 40.0)
    assert steps != steps and seconds != seconds  # NaN: never within 5%


@pytest.mark.timeout(240)
def test_floors_are_the_fids_of_train_images_and_their_reconstructions(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    from lfm_core.autoencoder import decode, encode
    from lfm_core.metrics import fid

    # As many floor images as the train split holds: the floor is the FID of the whole split.
    graph = _graph(tmp_path, tiny_dinov2, "sampling.num_samples=64")
    cfg = graph.cfg
    floors = graph.info(keys.floors(cfg))
    stats = graph.reference_stats(keys.reference_stats(cfg))
    train_features = graph.tensors(keys.data_features(cfg, "fid", "train"), "features.safetensors")
    assert floors["num_images"] == 64
    assert floors["fid_data"] == pytest.approx(fid(train_features["features"], stats), rel=1e-6)
    images = graph.split(keys.dataset(cfg), "train").images
    vae = graph.load_autoencoder(keys.autoencoder(cfg))
    extractor = graph.load_extractor(keys.extractor(cfg, "fid"))
    reconstructions = decode(vae, encode(vae, images, progress=False), progress=False)
    expected = fid(extractor(reconstructions, progress=False), stats)
    assert floors["fid_autoencoder"] == pytest.approx(expected, rel=1e-6)
    assert floors["fid_autoencoder"] > floors["fid_data"]


@pytest.mark.timeout(240)
def test_the_autoencoder_learns_from_a_seeded_sample_of_the_training_split(
    tmp_path: Path, tiny_dinov2: Path
) -> None:
    graph = _graph(tmp_path, tiny_dinov2, "autoencoder.train_images=24")
    cfg, data = graph.cfg, keys.dataset(graph.cfg)
    full = graph.split(data, "train")
    sample = graph.split(data, "train", sample=24, seed=cfg.autoencoder.seed)
    rows = torch.from_numpy(seeded_rows(len(full.labels), 24, cfg.autoencoder.seed))
    assert rows.unique().numel() == 24 and torch.equal(rows, rows.sort().values)
    assert torch.equal(sample.images, full.images[rows])
    assert torch.equal(sample.labels, full.labels[rows])
    assert torch.equal(graph.split(data, "train", sample=10_000).images, full.images)
    # The size is in the key (a pretrained autoencoder trains nothing: not in its key).
    ref, plain = keys.autoencoder(cfg), keys.autoencoder(_graph(tmp_path, tiny_dinov2).cfg)
    assert ref.inputs["train_images"] == 24 and ref.key != plain.key
    pretrained = _graph(
        tmp_path, tiny_dinov2, "autoencoder.train_images=24", "autoencoder.pretrained=x"
    )
    assert "train_images" not in keys.autoencoder(pretrained.cfg).inputs
    # The stage trains on exactly those images.
    expected = train_autoencoder(full.images[rows], cfg.autoencoder.core(), progress=False)
    built = graph.load_autoencoder(ref).state_dict()
    assert all(torch.equal(built[k], v) for k, v in expected.state_dict().items())
