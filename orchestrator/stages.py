"""The stage graph of a sweep: resolves stage keys, caches their outputs, dispatches builds.

Three small parts: `orchestrator.stage_keys` (pure functions of the config that name every
stage instance and hold exactly the values it depends on), `orchestrator.stage_builders` (one
builder per stage, reading only its key) and this module, which gets a stage from the cache
or builds it (its upstream stages first), and loads stage outputs for builders and callers.
How stages run (device, batch sizes, the trainer) is the graph's `Execution`, never a key.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from lfm_core.autoencoder import DEFAULT_BATCH_SIZE, load_autoencoder
from lfm_core.checkpoint import load_velocity
from lfm_core.data import ImageDataset, load_dataset
from lfm_core.features import FeatureExtractor, build_feature_extractor
from lfm_core.metrics import ReferenceStats
from lfm_core.sampling import SamplerSettings
from lfm_core.velocity import VelocityModel
from lfm_core.vq_autoencoder import as_autoencoder, is_vq_folder, load_vq_autoencoder
from orchestrator import remote_stages, stage_keys
from orchestrator.cache import StageCache, StageRef
from orchestrator.config import SweepConfig
from orchestrator.datasets import (
    ActorPool,
    ImageSource,
    collect,
    is_sharded,
    iter_shards,
    load_shards,
    seeded_rows,
    source_of,
)
from orchestrator.stage_builders import (
    BUILDERS,
    METRICS_FILE,
    SAMPLES_FILE,
    STATS_FILE,
    read_info,
    snapshot_folder,
)
from orchestrator.stage_keys import FOLDER_DATA, SOURCE_STAGES, TrialRefs
from orchestrator.trainers import RayTrainer, Trainer
from orchestrator.trials import Trial

__all__ = ["Execution", "StageGraph", "read_info"]


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Execution:
    """How stages run; none of it changes what they write, so none of it is in a key.

    Attributes:
        trainer: trains fm_model stages (Ray Train in sweeps, in-process in tests).
        device: where models run.
        progress: show tqdm bars.
        feature_batch_size, sample_batch_size, score_batch_size: images per feature-extractor
            call, seeds per sampling batch, samples per scoring batch.
        sample_workers: processes that sample a samples stage side by side.
        encode_batch_size, decode_batch_size: images per autoencoder encode / decode call.
        data_pool: the Ray Data actor pool that encodes and embeds folder data.
    """

    trainer: Trainer
    device: torch.device
    progress: bool
    feature_batch_size: int
    sample_batch_size: int
    score_batch_size: int
    sample_workers: int = 1
    encode_batch_size: int = DEFAULT_BATCH_SIZE
    decode_batch_size: int = DEFAULT_BATCH_SIZE
    data_pool: ActorPool = ActorPool()

    @classmethod
    def of(
        cls,
        cfg: SweepConfig,
        trainer: Trainer,
        progress: bool = True,
        device: torch.device | None = None,
    ) -> Execution:
        """The execution settings a sweep config asks for (device None: `default_device()`)."""
        return cls(
            trainer=trainer,
            device=device or default_device(),
            progress=progress,
            feature_batch_size=cfg.features.batch_size,
            sample_batch_size=cfg.sampling.batch_size,
            score_batch_size=cfg.scoring.batch_size,
            sample_workers=cfg.sampling.workers,
            encode_batch_size=cfg.autoencoder.encode_batch_size,
            decode_batch_size=cfg.autoencoder.decode_batch_size,
            data_pool=data_pool(cfg),
        )


def data_pool(cfg: SweepConfig) -> ActorPool:
    """One encoding / feature actor per training worker (a GPU each when workers have one)."""
    resources = cfg.resources
    batch = cfg.autoencoder.encode_batch_size
    return ActorPool(resources.num_workers, resources.use_gpu, batch, cfg.data.stream_cpus)


class StageGraph:
    """Get-or-build of every stage of one sweep config, and typed loaders of their outputs.

    Args:
        cfg: the validated sweep config (only its keys, via stage_keys, and `Execution.of`).
        cache: the stage cache (its storage holds Ray Train runs too).
        trainer: trains fm_model stages; None: a Ray Train worker group per model.
        progress: show tqdm bars while building.
        device: where models run; None: the GPU when there is one.
    """

    def __init__(
        self,
        cfg: SweepConfig,
        cache: StageCache,
        trainer: Trainer | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        trainer = trainer or RayTrainer(cfg.resources, cache.storage.uri)
        chosen = None if device is None else torch.device(device)
        self.execution = Execution.of(cfg, trainer, progress, chosen)

    # ---- the trial's stages --------------------------------------------------------------------

    def trial(self, trial: Trial) -> TrialRefs:
        """Every stage a trial's metrics depend on (an "auto" trial's once its t_split_choice
        stage, built here when missing, has chosen)."""
        return stage_keys.trial(self.cfg, trial, self.chosen_t_split(trial))

    def chosen_t_split(self, trial: Trial) -> float | None:
        """The t_split an "auto" trial samples at: its t_split_choice stage's (built first when
        missing); None for other trials."""
        if not trial.auto:
            return None
        choice = stage_keys.pair(self.cfg, trial).choice
        assert choice is not None
        return float(self.info(choice)["t_split"])

    def stages_of(self, trial: Trial) -> list[StageRef]:
        """The cached stages a trial needs (source stages excluded), upstream first."""
        return stage_keys.stages_of(self.cfg, trial, self.chosen_t_split(trial))

    def metrics(self, trial: Trial) -> dict[str, float]:
        """The trial's metrics, building every stage they need that is not cached yet."""
        return json.loads((self.get(self.trial(trial).metrics) / METRICS_FILE).read_text())

    # ---- building --------------------------------------------------------------------------------

    def get(self, ref: StageRef) -> Path:
        """The local folder of a stage, built (once, cluster-wide) when missing.

        Upstream stages are fetched first, so a build record times its own stage only. A GPU
        stage of a GPU-free driver is built by a GPU task (`orchestrator.remote_stages`); the
        cache then holds it and this reads it.
        """
        for upstream in ref.upstream.values():
            if upstream.stage not in SOURCE_STAGES:
                self.get(upstream)
        if remote_stages.runs_remotely(self, ref):
            remote_stages.build_remotely(self, ref)
        return self.cache.get(ref, functools.partial(BUILDERS[ref.stage], self, ref))

    # ---- loaders (each builds its stage first when missing) ------------------------------------

    def tensors(
        self, ref: StageRef, filename: str, names: list[str] | None = None
    ) -> dict[str, Tensor]:
        """The tensors of one file of a stage; of a streamed (sharded) stage, every shard's
        rows concatenated (for consumers that need them all; `shards` streams them). With
        `names`, only those tensors are read (e.g. the (N,) labels without the latents)."""
        folder = self.get(ref)
        if not (folder / filename).exists() and is_sharded(folder):
            return load_shards(folder, names)
        if names is None:
            return load_file(str(folder / filename))
        with safe_open(str(folder / filename), framework="pt") as file:
            return {name: file.get_tensor(name) for name in names}

    def shards(self, ref: StageRef, names: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """The arrays of a sharded stage (latents, labels, features), one shard at a time."""
        return iter_shards(self.get(ref), names)

    def streams(self, dataset: StageRef) -> bool:
        """True for data read as a Ray Data stream (image folders) rather than one tensor."""
        return dataset.inputs["name"] == FOLDER_DATA

    def image_source(self, dataset: StageRef, split: str) -> ImageSource:
        """One split of a folder dataset stage, listed (not loaded), cut to its limit."""
        return source_of(dict(dataset.inputs), split)

    def info(self, ref: StageRef) -> dict[str, Any]:
        """The `info.json` facts of a stage."""
        return read_info(self.get(ref))

    def load_samples(self, ref: StageRef) -> dict[str, Tensor]:
        """The tensors of a samples stage: latents, grid, features_fid, features_stability, labels."""
        return self.tensors(ref, SAMPLES_FILE)

    def reference_stats(self, ref: StageRef) -> ReferenceStats:
        """The FID reference statistics of a reference_stats stage."""
        return ReferenceStats.load_npz(self.get(ref) / STATS_FILE)

    def split(
        self,
        dataset: StageRef,
        split: str,
        first: int | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> ImageDataset:
        """One split ("train" / "heldout") of a dataset stage in memory, cut to its limit (and
        to its `first` images when given); a folder is read through Ray Data.

        With `sample`, only a seeded random `sample` of those images (all when there are no
        more), in the split's order (`seeded_rows`): a folder reads only their files.
        """
        inputs = dataset.inputs
        limit = inputs["limit"] if split == "train" else inputs["heldout_limit"]
        if first is not None:
            limit = first if limit is None else min(limit, first)
        if self.streams(dataset):
            key = "limit" if split == "train" else "heldout_limit"
            source = source_of({**inputs, key: limit}, split)
            if sample is not None:
                rows = seeded_rows(len(source), sample, seed)
                source = replace(source, listing=source.listing.take(rows))
            return collect(source, self.execution.data_pool.cpus)
        data = load_dataset(inputs["name"], split, inputs["root"], inputs["image_size"])
        count = len(data) if limit is None else min(limit, len(data))
        rows = np.arange(count) if sample is None else seeded_rows(count, sample, seed)
        if len(rows) == len(data):
            return data
        index = torch.from_numpy(rows)
        indices = None if data.indices is None else data.indices[index]
        return ImageDataset(
            data.images[index], data.labels[index], data.num_classes, data.name, indices
        )

    def load_autoencoder(self, ref: StageRef) -> AutoencoderKL:
        """The autoencoder of a stage, on the stage device: an AutoencoderKL, or a VQ one
        (lfm_core.vq_autoencoder, which speaks AutoencoderKL's encode / decode interface)."""
        folder = self.get(ref) / "vae"
        if is_vq_folder(folder):
            vae = as_autoencoder(load_vq_autoencoder(folder))
        else:
            vae = load_autoencoder(folder)
        # nn.Module.to moves in place (diffusers' own `to` wrapper confuses type checkers).
        nn.Module.to(vae, self.execution.device)
        return vae

    def load_extractor(self, ref: StageRef) -> FeatureExtractor:
        """The feature extractor of an extractor stage, on the stage device."""
        extractor = build_feature_extractor(ref.inputs["name"], self.get(ref), ref.inputs["path"])
        extractor.batch_size = self.execution.feature_batch_size
        return extractor.to(self.execution.device)

    def load_model(self, ref: StageRef, snapshot: int | None = None) -> VelocityModel:
        """A trained velocity model (EMA weights; at training step `snapshot` when given) of an
        fm_model stage, on the stage device."""
        folder = self.get(ref)
        if snapshot is not None:
            folder = folder / snapshot_folder(snapshot)
        return load_velocity(folder).to(self.execution.device)

    def snapshots(self, ref: StageRef) -> list[tuple[int, float]]:
        """(step, training seconds to it) of every EMA snapshot of an fm_model stage, in order."""
        kept = read_info(self.get(ref)).get("snapshots", {})
        return sorted((int(step), float(seconds)) for step, seconds in kept.items())

    def load_snapshots(self, ref: StageRef) -> list[tuple[int, float, VelocityModel]]:
        """(step, training seconds, EMA model) of every snapshot of an fm_model stage."""
        return [(step, secs, self.load_model(ref, step)) for step, secs in self.snapshots(ref)]

    def sampler(self, inputs: Mapping[str, Any]) -> SamplerSettings:
        """Sampler settings from a stage's inputs (steps, solver, guidance_scale) and `Execution`."""
        return SamplerSettings(
            steps=inputs["steps"],
            solver=inputs["solver"],
            guidance_scale=inputs["guidance_scale"],
            batch_size=self.execution.sample_batch_size,
            device=self.execution.device,
            cfg_channels=inputs.get("cfg_channels"),
            grid=inputs.get("grid", "uniform"),
        )
