"""Image folders at scale: listed not loaded, encoded and embedded by Ray Data actor pools into
shards, trained from each worker's own rows; and the tiny sweep over a flat folder and a
class-subfolder folder of real digits (mnist5k as PNGs), from a local folder and from S3.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from conftest import LOCAL_RAY_CPUS, tiny_overrides
from PIL import Image
from ray import cloudpickle

from lfm_core.autoencoder import encode, load_autoencoder
from lfm_core.data import load_dataset
from lfm_core.train import TensorLatents, TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig
from orchestrator import cli, stage_keys
from orchestrator.config import load_sweep
from orchestrator.datasets import (
    ShardedLatents,
    ShardWriter,
    load_shards,
    seeded_rows,
    shard_index,
)
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for, run_sweep
from orchestrator.trainers import InProcessTrainer, seeded_velocity
from orchestrator.trials import expand_trials

pytestmark = pytest.mark.integration
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
PER_CLASS = 20  # 200 digits: 10 classes of 20
ONE_TRIAL = [
    "search.data_reduction.data_fraction=[1.0]",
    "search.data_reduction.criterion=[random]",
]


def _digits_as_pngs(root: Path, flat: bool) -> None:
    """The first PER_CLASS mnist5k training digits of each class as 28x28 PNGs."""
    train = load_dataset("mnist5k")
    pixels = ((train.images[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8).numpy()
    for label in range(10):
        folder = root if flat else root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(train.labels.numpy() == label)[:PER_CLASS]):
            Image.fromarray(pixels[i], mode="L").save(folder / f"{label}_{k:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digit-folders")
    _digits_as_pngs(root / "flat", flat=True)
    _digits_as_pngs(root / "classes", flat=False)
    return {"flat": root / "flat", "classes": root / "classes"}


def _upload(folder: Path, bucket: str, prefix: str) -> str:
    client = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*.png")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def _overrides(storage: Path, extractor: Path, tracking: str, root: str) -> list[str]:
    return [
        *tiny_overrides(storage, extractor, tracking),
        *ONE_TRIAL,
        "data.name=folder",
        f"data.root={root}",
        "data.limit=null",
        "data.heldout_limit=null",
        "autoencoder.psnr_images=16",
    ]


def test_streamed_latents_equal_the_in_memory_encoding(
    ray_local: None, folders: dict[str, Path], tiny_dinov2: Path, tmp_path: Path
) -> None:
    cfg = load_sweep(
        TINY,
        _overrides(tmp_path, tiny_dinov2, f"sqlite:///{tmp_path}/m.db", str(folders["classes"])),
    )
    graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)
    ref = stage_keys.latents(cfg)
    folder = graph.get(ref)
    streamed = load_shards(folder)
    expected = load_dataset("folder", root=folders["classes"], image_size=32)
    assert graph.info(ref)["shape"] == [len(expected), *streamed["latents"].shape[1:]]
    vae = load_autoencoder(graph.get(ref.upstream["autoencoder"]) / "vae")
    assert torch.equal(streamed["labels"], expected.labels)
    assert torch.allclose(
        streamed["latents"], encode(vae, expected.images, progress=False), atol=1e-5
    )
    assert graph.info(ref)["encode_peak_rss_mb"] > 0
    features = graph.tensors(
        stage_keys.data_features(cfg, "fid", "heldout"), "features.safetensors"
    )
    assert features["features"].shape[0] == len(
        load_dataset("folder", "heldout", root=folders["classes"])
    )


def test_a_seeded_sample_of_a_folder_reads_those_rows(
    ray_local: None, folders: dict[str, Path], tiny_dinov2: Path, tmp_path: Path
) -> None:
    """What a trained autoencoder learns from with autoencoder.train_images: the seeded rows
    of the whole split, read from the folder (the listing cut to those files)."""
    root = str(folders["classes"])
    cfg = load_sweep(TINY, _overrides(tmp_path, tiny_dinov2, f"sqlite:///{tmp_path}/m.db", root))
    graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)
    data = stage_keys.dataset(cfg)
    full, sample = graph.split(data, "train"), graph.split(data, "train", sample=24, seed=7)
    rows = torch.from_numpy(seeded_rows(len(full.labels), 24, 7))
    assert torch.equal(sample.images, full.images[rows])
    assert torch.equal(sample.labels, full.labels[rows]) and sample.num_classes == 10


def _train(latents: object, seed: int = 0) -> dict[str, torch.Tensor]:
    velocity = VelocityConfig("unet-xs", in_channels=2, sample_size=4, width=8)
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=1, log_every=3, seed=seed)
    model = seeded_velocity(velocity, seed)
    return train_velocity(model, latents, cfg, progress=False).ema.state_dict()


@pytest.mark.parametrize("hflip", [False, True])
def test_sharded_latents_train_the_same_model_as_the_tensor(tmp_path: Path, hflip: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    latents, flipped = torch.randn(2, 30, 2, 4, 4, generator=gen)
    writer = ShardWriter(tmp_path, rows_per_shard=7)  # 5 shards, the last of 2 rows
    for part in range(3):
        rows = slice(10 * part, 10 * part + 10)
        arrays = {"latents": latents[rows].numpy(), "labels": np.arange(30)[rows]}
        if hflip:
            arrays["latents_flip"] = flipped[rows].numpy()
        writer.add(arrays)
    assert writer.close()["rows"] == [7, 7, 7, 7, 2]
    subset = np.array([3, 9, 12, 13, 20, 28, 29])
    sharded = ShardedLatents(tmp_path, subset, conditional=False)
    tensor = TensorLatents(latents[subset], None, flipped[subset] if hflip else None)
    by_shards, by_tensor = _train(sharded), _train(tensor if hflip else latents[subset])
    assert all(torch.equal(by_shards[k], by_tensor[k]) for k in by_tensor)
    parts = [sharded.for_rank(r, 2).rows.tolist() for r in range(2)]
    assert parts == [[3, 9, 12, 13], [20, 28, 29]]
    assert shard_index(tmp_path)["names"] == sorted(arrays)
    # A subset's builder reads the labels alone, not the latents beside them.
    (labels,) = load_shards(tmp_path, ["labels"]).values()
    assert torch.equal(labels, torch.arange(30))


def test_tiny_sweep_over_a_flat_local_folder(
    ray_local: None, folders: dict[str, Path], tiny_dinov2: Path, tmp_path: Path
) -> None:
    """The sweep's trial body (every stage of its one trial, through the stage graph) with the
    in-process trainer: Tune and Ray Train are the S3 test's; this one keeps within budget."""
    tracking = f"sqlite:///{tmp_path}/m.db"
    cfg = load_sweep(TINY, _overrides(tmp_path, tiny_dinov2, tracking, str(folders["flat"])))
    graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)
    (trial,) = expand_trials(cfg)
    metrics = graph.metrics(trial)
    assert set(metrics) >= {"fid", "stability_similarity"}
    assert all(math.isfinite(metrics[k]) for k in ("fid", "stability_similarity"))
    info = graph.info(stage_keys.latents(cfg))
    assert info["num_classes"] == 1 and info["shape"][0] == 180
    # `lfm stats` writes the held-out folder images' statistics; FID against the .npz equals
    # FID against the folder, for the trial's samples, bit for bit.
    npz = tmp_path / "ref.npz"
    overrides = _overrides(tmp_path, tiny_dinov2, tracking, str(folders["flat"]))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stats", str(TINY), *overrides, "--out", str(npz)])
    assert exit_info.value.code == 0
    with_npz = load_sweep(TINY, [*overrides, f"features.fid_stats={npz}"])
    npz_graph = StageGraph(
        with_npz, cache_for(with_npz), trainer=InProcessTrainer(), progress=False
    )
    assert npz_graph.metrics(trial)["fid"] == metrics["fid"]


@pytest.fixture
def ray_seeing_s3(s3_server: str) -> Iterator[str]:
    """A local Ray started after the moto server, so its workers (trial drivers, Ray Data
    tasks) inherit AWS_ENDPOINT_URL; yields the bucket URI."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False)
    try:
        yield s3_server
    finally:
        ray.shutdown()


# (layout, location): each layout from each location through a whole sweep (the flat local
# folder also runs in-process above, with `lfm stats`); local first, while the module's Ray is
# up (the S3 cases restart Ray after their moto server).
SWEPT_FOLDERS = [("flat", "local"), ("classes", "local"), ("flat", "s3"), ("classes", "s3")]


@pytest.fixture(params=SWEPT_FOLDERS, ids=["-".join(p) for p in SWEPT_FOLDERS])
def swept_folder(request: pytest.FixtureRequest, folders: dict[str, Path]) -> tuple[str, str]:
    """(layout, root): the digits of one layout as a local folder or uploaded under an S3
    prefix, with a local Ray that can read them."""
    layout, location = request.param
    if location == "local":
        request.getfixturevalue("ray_local")
        return layout, str(folders[layout])
    bucket = request.getfixturevalue("ray_seeing_s3").removeprefix("s3://")
    return layout, _upload(folders[layout], bucket, f"digits-{layout}")


def test_tiny_sweep_over_a_folder(
    swept_folder: tuple[str, str], mlflow_server: str, tiny_dinov2: Path, tmp_path: Path
) -> None:
    """The tiny sweep end to end (Ray Tune, a Ray Train fit, every stage) over the folder."""
    layout, root = swept_folder
    cfg = load_sweep(TINY, _overrides(tmp_path, tiny_dinov2, mlflow_server, root))
    outcome = run_sweep(cfg)
    assert outcome.errors == [] and len(outcome.metrics) == 1
    (metrics,) = outcome.metrics.values()
    assert all(math.isfinite(metrics[k]) for k in ("fid", "stability_similarity"))
    graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)
    info = graph.info(stage_keys.latents(cfg))
    assert info["num_classes"] == {"flat": 1, "classes": 10}[layout]
    assert info["shape"][0] == 180  # 10% of 200 held out
