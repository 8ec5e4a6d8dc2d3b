"""The embedded data every CPU benchmark shares, built once and cached on disk.

mnist5k (4,000 train / 1,000 held-out digits) -> an AutoencoderKL trained by
lfm_core.autoencoder -> scaled train latents; the mnist classifier's features of the train
images (for the clustering criteria) and the held-out features' statistics (the FID reference).
Everything lives under `<cache_dir>/embedded-<hash of the config>/` and is reused by later runs;
a folder without its `_COMPLETE` marker is rebuilt. Trained velocity models are cached the same
way under `<cache_dir>/models/<hash>/`, with the training time of each checkpoint, so benchmarks
that need the same model (the coarse model of coarse-to-fine is the full-data model of data
reduction) train it once.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import Tensor

from benchmarks.common import CACHE_DIR, load_average
from lfm_core.autoencoder import (
    AutoencoderConfig,
    decode,
    encode,
    load_autoencoder,
    reconstruction_psnr,
    train_autoencoder,
)
from lfm_core.checkpoint import load_velocity
from lfm_core.classifier import (
    ClassifierFeatures,
    classifier_accuracy,
    load_or_train_mnist_classifier,
    train_classifier,
)
from lfm_core.data import ImageDataset, load_dataset
from lfm_core.errors import ConfigError, check_range
from lfm_core.features import FeatureExtractor
from lfm_core.metrics import ReferenceStats, fid
from lfm_core.solvers import sample, seeded_noise, uniform_grid
from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig, VelocityModel, build_velocity

# Bump when the cached files would change for the same config.
CACHE_VERSION = "1"
COMPLETE = "_COMPLETE"
DATASET = "mnist5k"


@dataclass(frozen=True)
class DataConfig:
    """The embedded data and its cache.

    Attributes:
        cache_dir: where the autoencoder, latents, classifier and models are kept.
        ae_epochs, ae_channels, ae_attention: AutoencoderConfig's epochs, block_out_channels
            and mid_block_attention (the rest are lfm_core's defaults).
        train_limit, heldout_limit: use only the first images of a split (tiny runs); None: all.
        classifier_epochs: None uses lfm_core's cached mnist classifier (its own training);
            a number trains a quick one on the (limited) train split instead (tiny runs).
    """

    cache_dir: str = str(CACHE_DIR)
    ae_epochs: int = AutoencoderConfig.epochs
    ae_channels: tuple[int, ...] = AutoencoderConfig.block_out_channels
    ae_attention: bool = AutoencoderConfig.mid_block_attention
    train_limit: int | None = None
    heldout_limit: int | None = None
    classifier_epochs: int | None = None

    def autoencoder(self) -> AutoencoderConfig:
        return AutoencoderConfig(
            block_out_channels=tuple(self.ae_channels),
            mid_block_attention=self.ae_attention,
            epochs=self.ae_epochs,
        )


TINY_DATA = DataConfig(
    ae_epochs=1,
    ae_channels=(8, 16, 16),
    ae_attention=False,
    train_limit=256,
    heldout_limit=128,
    classifier_epochs=1,
)


def content_key(value: Any) -> str:
    """sha256 hex digest of the canonical JSON of value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class EmbeddedData:
    """Everything the benchmarks read, on the CPU.

    Attributes:
        key: the cache key of this data (part of every model's key).
        vae: the autoencoder (eval mode).
        latents: scaled train latents (N, C, h, w). labels: (N,).
        train_features: classifier features of the train images (N, D).
        extractor: the FID feature extractor.
        reference: statistics of the held-out features (the FID reference).
        info: facts about it (PSNR, scaling factor, classifier accuracy, build seconds).
    """

    key: str
    vae: AutoencoderKL
    latents: Tensor
    labels: Tensor
    train_features: Tensor
    extractor: FeatureExtractor
    reference: ReferenceStats
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.latents.shape[1:]
        return int(c), int(h), int(w)

    def velocity_config(self, name: str, width: int | None) -> VelocityConfig:
        c, h, _ = self.latent_shape
        return VelocityConfig(name=name, in_channels=c, sample_size=h, width=width)

    def sample(
        self,
        model: VelocityModel,
        seeds: list[int],
        steps: int,
        solver: str = "euler",
        batch_size: int = 500,
    ) -> Tensor:
        """Latents (N, C, h, w) of model's ODE from seeded_noise(seeds[i]), in batches."""
        chunks = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
        grid = uniform_grid(steps)
        return torch.cat(
            [
                sample(model, seeded_noise(chunk, self.latent_shape), grid, solver)
                for chunk in chunks
            ]
        )

    def images(self, latents: Tensor, progress: bool = False) -> Tensor:
        """Decoded images (N, 1, 32, 32) in [-1, 1] of scaled latents (N, C, h, w)."""
        return decode(self.vae, latents, progress=progress)

    def features(self, latents: Tensor) -> Tensor:
        """FID features (N, D) of the images decoded from latents (N, C, h, w)."""
        return self.extractor(self.images(latents))

    def fid(self, latents: Tensor) -> float:
        """FID of the images decoded from latents (N >= 2, C, h, w) against the held-out split."""
        return fid(self.features(latents), self.reference)


def _split(name: str, limit: int | None) -> ImageDataset:
    data = load_dataset(DATASET, name)
    if limit is None or limit >= len(data):
        return data
    return ImageDataset(data.images[:limit], data.labels[:limit], data.num_classes, data.name)


def _extractor(
    cfg: DataConfig, folder: Path, train: ImageDataset, heldout: ImageDataset
) -> ClassifierFeatures:
    if cfg.classifier_epochs is None:
        return load_or_train_mnist_classifier(folder, progress=True)
    model = train_classifier(
        train.images, train.labels, train.num_classes, epochs=cfg.classifier_epochs, progress=False
    )
    return ClassifierFeatures(model, classifier_accuracy(model, heldout.images, heldout.labels))


def load_embedded(
    cfg: DataConfig, progress: bool = True, device: torch.device | str = "cpu"
) -> EmbeddedData:
    """The cached embedded data for cfg, built first when missing (minutes on a CPU).

    The autoencoder is trained on `device`, and it and the feature extractor are left there
    (decoding and features run there); the tensors stay on the CPU.
    """
    for key, low in (("train_limit", 2), ("heldout_limit", 2), ("classifier_epochs", 1)):
        value = getattr(cfg, key)
        if value is not None:
            check_range(key, value, low, math.inf)
    described = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    key = content_key({"version": CACHE_VERSION, "dataset": DATASET, **described})
    folder = Path(cfg.cache_dir).expanduser() / f"embedded-{key[:16]}"
    train, heldout = _split("train", cfg.train_limit), _split("heldout", cfg.heldout_limit)
    info: dict[str, Any] = {"cache": str(folder)}
    if not (folder / COMPLETE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        vae = train_autoencoder(train.images, cfg.autoencoder(), progress=progress, device=device)
        vae.save_pretrained(folder / "vae")
        info["autoencoder_train_s"] = time.perf_counter() - started
        latents = encode(vae, train.images, progress=progress)
        save_file(
            {"latents": latents.contiguous(), "labels": train.labels.contiguous()},
            str(folder / "latents.safetensors"),
        )
        facts = {
            "heldout_psnr_db": reconstruction_psnr(vae, heldout.images),
            "scaling_factor": float(vae.config.scaling_factor),
            **info,
        }
        (folder / "info.json").write_text(json.dumps(facts, indent=2))
        (folder / COMPLETE).write_text(key)
    vae = load_autoencoder(folder / "vae").to(device)
    tensors = load_file(str(folder / "latents.safetensors"))
    started = time.perf_counter()
    extractor = _extractor(cfg, folder, train, heldout).to(device)
    info["classifier_s"] = time.perf_counter() - started
    # Both classifiers are seeded and deterministic, so their features can be cached.
    reference = ReferenceStats.cached(
        folder / "heldout_stats.safetensors", lambda: extractor(heldout.images)
    )
    features_file = folder / "train_features.safetensors"
    if not features_file.is_file():
        save_file({"features": extractor(train.images).contiguous()}, str(features_file))
    info.update(json.loads((folder / "info.json").read_text()))
    info["classifier_heldout_accuracy"] = float(extractor.heldout_accuracy)
    return EmbeddedData(
        key=key,
        vae=vae,
        latents=tensors["latents"],
        labels=tensors["labels"],
        train_features=load_file(str(features_file))["features"],
        extractor=extractor,
        reference=reference,
        info=info,
    )


# ---- cached velocity models -------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One saved point of a training run: its step, the training seconds to reach it, its folder."""

    step: int
    seconds: float
    folder: Path

    def load(self, weights: str = "ema") -> VelocityModel:
        """The velocity model of this checkpoint ("ema" or the raw "model" weights)."""
        return load_velocity(self.folder, name=weights)


@dataclass(frozen=True)
class TrainedModel:
    """A trained velocity model (EMA weights) and how long it took.

    Attributes:
        model: the EMA model, CPU, eval mode.
        seconds: training-loop wall-clock seconds (measured when it was built).
        checkpoints: every checkpoint, in step order (the last is the final model).
        cached: True when it came from the cache rather than being trained now.
        load_average: the 1-minute load average when its training ended (contention).
    """

    model: VelocityModel
    seconds: float
    checkpoints: list[Checkpoint]
    cached: bool
    load_average: float


def train_cached(
    data: EmbeddedData,
    velocity: VelocityConfig,
    train: TrainConfig,
    indices: Tensor | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Train (or load) a velocity model on data.latents[indices] (all when None).

    Its initial weights depend on train.seed alone. Checkpoints every train.checkpoint_every
    steps and at the end keep both the EMA and the raw weights; their training times come from
    the loop's report callback (wall-clock since the loop was entered).
    """
    subset = None if indices is None else content_key(indices.tolist())
    key = content_key(
        {
            "version": CACHE_VERSION,
            "data": data.key,
            "velocity": velocity.to_dict(),
            "train": asdict(train),
            "subset": subset,
            # Training times are part of what is cached: they depend on the thread count.
            "threads": torch.get_num_threads(),
        }
    )
    folder = Path(data.info["cache"]).parent / "models" / key[:16]
    timing_file = folder / "timing.json"
    cached = timing_file.is_file()
    if not cached:
        shutil.rmtree(folder, ignore_errors=True)
        latents = data.latents if indices is None else data.latents[indices]
        times: dict[int, float] = {}
        started = time.perf_counter()

        def report(step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
            if checkpoint_dir is not None:
                times[step] = time.perf_counter() - started

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            model = build_velocity(velocity)
        result = train_velocity(
            model, latents, train, out_dir=folder, report=report, progress=progress
        )
        timing = {
            "seconds": result.seconds,
            "checkpoints": {str(step): seconds for step, seconds in sorted(times.items())},
            "load_average": load_average(),
        }
        timing_file.write_text(json.dumps(timing, indent=2))
    timing = json.loads(timing_file.read_text())
    checkpoints = [
        Checkpoint(int(step), float(seconds), folder / f"checkpoint-{int(step):07d}")
        for step, seconds in timing["checkpoints"].items()
    ]
    if not checkpoints:
        raise ConfigError(f"model cache {folder}: no checkpoints recorded; delete the folder")
    return TrainedModel(
        model=checkpoints[-1].load(),
        seconds=float(timing["seconds"]),
        checkpoints=checkpoints,
        cached=cached,
        load_average=float(timing["load_average"]),
    )
