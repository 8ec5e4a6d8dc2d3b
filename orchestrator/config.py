"""Sweep files: typed, frozen sections, loaded with OmegaConf and validated before Ray starts.

A sweep file is YAML over `SweepConfig`. Sections that configure an lfm_core component reuse its
frozen dataclass (`TrainConfig`; `AutoencoderConfig` plus where to load a pretrained one), so a
typo or a wrong type is caught by OmegaConf against the same fields lfm_core takes. Loading
merges, in order: the schema defaults, the file, the file's `profiles.<profile>` block (e.g.
`profile=paper`) and `key=value` overrides from the command line (`parse_overrides`, the one
parser of them; `apply_overrides` applies them to any frozen config dataclass). Every error is a
one-line `ConfigError` naming the key and the allowed values.

Search space: `search` maps a study name (e.g. "data_reduction") to a grid over `data_fraction`,
`criterion`, `width`, `t_split` and `seed`; each axis is a list or `{grid_search: [...]}` (a
scalar is a one-point axis). The trials are the union of the grids' products.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from yaml import YAMLError

# lfm_core.configs, not the modules that use its configs: this module imports no torch.
from lfm_core.configs import (
    AUTOCAST_MODES,
    CRITERIA,
    DATASETS,
    FEATURE_EXTRACTORS,
    GRIDS,
    KMEANS_KINDS,
    METHODS,
    NORMALISATIONS,
    VELOCITY_SIZES,
    AutoencoderConfig,
    TrainConfig,
    VelocityConfig,
)
from lfm_core.errors import ConfigError, check_choice, check_range
from orchestrator.storage import S3_SCHEME, check_storage_uri

EMBEDDED_PROFILE = "embedded"
# Exit status of a command line given bad input (argparse's own).
EXIT_BAD_INPUT = 2
STORAGE_ENV = "LFM_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_RESULTS_DIR = "results"
SQLITE_PREFIX = "sqlite:///"
GRID_SEARCH = "grid_search"
LOCAL_PATH_PREFIXES = ("/", ".", "~")
AXES = ("data_fraction", "criterion", "width", "t_split", "seed")
# The one string a t_split axis takes: the t_split its t_split_choice stage chooses.
AUTO_T_SPLIT = "auto"
C = TypeVar("C")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DataSection:
    """The image data set and how much of it to use.

    Attributes:
        name: one of lfm_core.data.DATASETS.
        root: data folder (torchvision sets) or image folder ("folder").
        image_size: side length for "folder" data sets.
        limit: use only the first `limit` training images (tiny runs); None: all.
        heldout_limit: use only the first `heldout_limit` held-out images; None: all.
        conditional: train class-conditional models (labels used and saved with samples).
        heldout_root: "folder" only: the official validation folder (local or s3://), used
            whole as the held-out split; None: 10% of root is held out (stratified, fixed).
        hflip: also encode the mirrored training images; each training draw takes the
            mirrored latents with probability 1/2 (the paper's horizontal flips).
        stream_cpus: CPUs each Ray Data read task and each encoding / feature actor of a
            folder reserves (an actor also takes a GPU when resources.use_gpu).
    """

    name: str = "mnist5k"
    root: str | None = None
    image_size: int = 32
    limit: int | None = None
    heldout_limit: int | None = None
    conditional: bool = False
    heldout_root: str | None = None
    hflip: bool = False
    stream_cpus: float = 0.5


@dataclass(frozen=True)
class AutoencoderSection(AutoencoderConfig):
    """AutoencoderConfig (trained on the training split), or a pretrained one to load.

    Attributes:
        pretrained: a local folder or hub id (lfm_core.autoencoder.load_autoencoder); when
            set, nothing is trained and the architecture fields only describe the latent shape.
        subfolder: the autoencoder's folder inside a pretrained repo (e.g. "vae").
        kind: "kl" (diffusers' AutoencoderKL, lfm_core.autoencoder) or "vq" (diffusers'
            VQModel, lfm_core.vq_autoencoder; the paper trains its own VQ-GAN f8).
        encode_batch_size: images per encoder forward pass (latents, PSNR).
        decode_batch_size: latents per decoder forward pass (PSNR, samples).
        autocast: "no", "bf16" or "fp16": encode and decode under torch.autocast (GPU).
        psnr_images: the held-out PSNR uses the first this many held-out images; None: all.
        train_images: a trained autoencoder learns from a seeded random subset of this many
            training images (seed `seed`; a folder reads only those files), so its memory
            does not grow with the data set; None: the whole training split.
    """

    pretrained: str | None = None
    subfolder: str | None = None
    kind: str = "kl"
    encode_batch_size: int = 256
    decode_batch_size: int = 256
    autocast: str = "no"
    psnr_images: int | None = None
    train_images: int | None = None

    def core(self) -> AutoencoderConfig:
        """The lfm_core config (this section without the loading fields)."""
        return AutoencoderConfig(
            **{f.name: getattr(self, f.name) for f in fields(AutoencoderConfig)}
        )

    def latent_shape(self) -> tuple[int, int]:
        """(latent channels, latent side) for images of side `sample_size`."""
        return self.latent_channels, self.sample_size // 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class ExtractorSection:
    """One feature extractor of lfm_core.features.

    Attributes:
        name: a key of lfm_core.features.FEATURE_EXTRACTORS.
        path: a local copy of its weights (or another hub id); None: its default source.
    """

    name: str = "mnist_classifier"
    path: str | None = None


@dataclass(frozen=True)
class FeaturesSection:
    """Feature extractors: for the clustering criteria, for FID and for stability.

    The paper used CLIP ViT-B/32, Inception-v3 and DINOv2 / ArcFace; the embedded default is
    one small MNIST classifier for all three.
    """

    clustering: ExtractorSection = field(default_factory=ExtractorSection)
    fid: ExtractorSection = field(default_factory=ExtractorSection)
    stability: ExtractorSection = field(default_factory=ExtractorSection)
    batch_size: int = 256
    # FID reference: an .npz of (mu, sigma) of the fid extractor's features (ADM's
    # VIRTUAL_imagenet256_labeled.npz and torch-fidelity's files have this form; `lfm stats`
    # writes one); None: the held-out split's features.
    fid_stats: str | None = None


@dataclass(frozen=True)
class ModelSection:
    """A velocity network from lfm_core.velocity.VELOCITY_SIZES, at its base width or `width`."""

    name: str = "unet-s"
    width: int | None = None


@dataclass(frozen=True)
class ReferenceSection:
    """The reference model: full training data; the fine model of coarse-to-fine trials.

    Attributes:
        name: a size from VELOCITY_SIZES.
        width: its width (None: the size's base width).
        steps: training steps (None: the same as `train.steps`).
    """

    name: str = "unet-s"
    width: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class ScoringSection:
    """Inputs of the scoring criteria.

    Attributes:
        num_clusters: k-means clusters of the clustering criteria (None: lfm_core's default).
        probe_steps: training steps of the probe model whose per-sample loss / gradient norm
            scores the "loss" and "grad" criteria (trained on all data, like the paper's early
            checkpoint).
        num_noise: size of the noise bank of the scores.
        batch_size: samples per scoring pass.
        kmeans: "euclidean" (scikit-learn k-means++ on unit features) or "spherical" (the
            paper's cluster_features.py: cosine assignment, renormalised centres).
        normalise: per-t normalisation of loss / grad scores: "mean" (the data set's mean) or
            "ema" (the paper's grad_loss_scoring.py running EMA, alpha 0.9).
        skew, skew_class: "class_skew" keeps round(skew x size) samples of class skew_class.
        mix_nearest: "cluster_mix" keeps this share of each cluster nearest to its centre.
    """

    num_clusters: int | None = None
    probe_steps: int = 200
    num_noise: int = 2
    batch_size: int = 64
    kmeans: str = "euclidean"
    normalise: str = "mean"
    skew: float = 1.0
    skew_class: int = 0
    mix_nearest: float = 0.2


@dataclass(frozen=True)
class SamplingSection:
    """How every model is sampled: sample i starts from the noise of seed `first_seed + i`.

    Attributes:
        steps: ODE steps from t = 0 to 1.
        solver: one of lfm_core.solvers.METHODS.
        num_samples: samples per model (FID, stability and grids use them all).
        first_seed: noise seed of sample 0.
        batch_size: samples per forward pass.
        guidance_scale: classifier-free guidance scale of conditional models (1: none).
        timing_repeats: repeats of the side-by-side timing behind `speedup` (median kept).
        t_split_budget: the automatically chosen t_split of a coarse-to-fine pair is the largest
            whose samples keep a mean same-seed cosine similarity (stability features) of at
            least 1 - t_split_budget to the fine model's own samples.
        t_split_calibration: calibration seeds (the first ones) behind that choice.
        workers: processes that sample a stage's seeds side by side (Ray tasks when more than
            one; GPU tasks with resources.use_gpu). Each sample depends on its seed alone, so
            the samples are the same bits for any number of workers: not part of any key.
        cfg_channels: classifier-free guidance on the first k latent channels only, the rest
            being the conditional prediction; None guides all. The paper's ImageNet setting
            is 3 (of 8).
        grid: the Euler time grid, one of lfm_core.solvers.GRIDS: "uniform" (`steps` equal
            steps) or "paper" (linspace(0, 1, steps): steps - 1 steps, as the paper's code).
        fid_every: also keep every trained model's EMA weights each this many training steps
            and measure FID at each on the same seeds (time to quality: the steps and seconds
            a model needs to come within 5% of the full-data model's final FID); None: only
            the final weights.
    """

    steps: int = 20
    solver: str = "euler"
    num_samples: int = 500
    first_seed: int = 0
    batch_size: int = 250
    guidance_scale: float = 1.0
    timing_repeats: int = 3
    t_split_budget: float = 0.05
    t_split_calibration: int = 64
    workers: int = 1
    cfg_channels: int | None = None
    grid: str = "uniform"
    fid_every: int | None = None


@dataclass(frozen=True)
class CoarseToFineSection:
    """Seam fine-tuning of the coarse models of coarse-to-fine trials.

    With `seam`, every coarse-to-fine trial also fine-tunes its coarse model with
    `lfm_core.paths.SeamLoss` against the fine model at the trial's t_split (FM loss on
    [0, t_split) plus `seam_weight` x the velocity gap at the seam states, the fine model's
    ODE run backwards from each training latent) and reports FID and speedup with it beside
    those without it.

    Attributes:
        seam: fine-tune and report the seam rows (off: no extra stages, keys unchanged).
        seam_weight: the seam term's weight; 0.1 is the paper's (train_fm.py --seam-weight).
        seam_steps: fine-tuning steps from the trained coarse model (the `train` settings
            otherwise); None: a quarter of `train.steps`, a short continuation (the paper gives
            no count), so a seam trial costs at most a quarter more training than one without.
    """

    seam: bool = False
    seam_weight: float = 0.1
    seam_steps: int | None = None

    def steps(self, train_steps: int) -> int:
        """The fine-tuning steps for models trained `train_steps` steps."""
        return self.seam_steps or max(1, train_steps // 4)


@dataclass(frozen=True)
class GridSection:
    """One study's grid: every combination of the axes is a trial.

    `width: null` means `model.width`; `t_split: null` means no coarse-to-fine, `auto` the
    t_split chosen for the trial's model pair (`sampling.t_split_budget`).
    """

    data_fraction: list[float] = field(default_factory=lambda: [1.0])
    criterion: list[str] = field(default_factory=lambda: ["random"])
    width: list[int | None] = field(default_factory=lambda: [None])
    t_split: list[float | str | None] = field(default_factory=lambda: [None])
    seed: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class ResourcesSection:
    """Cluster resources of each trial (`orchestrator.cluster_fit` checks them against the cluster).

    Attributes:
        num_workers: Ray Train workers per FM training (DDP).
        use_gpu: one GPU per worker (nccl) instead of CPU (gloo); with driver_gpus 0 the
            driver's GPU stages run as Ray tasks holding one GPU (orchestrator.remote_stages).
        cpus_per_worker: CPUs per Ray Train worker (and per GPU stage task); may be fractional.
        driver_cpus: CPUs of each trial's driver (Tune's trial actor); may be fractional.
        driver_gpus: GPUs of each trial's driver, which builds the non-training stages
            (autoencoder, features, sampling, metrics) itself when > 0; 0 keeps it GPU-free.
        worker_resources: custom Ray resources each Ray Train worker holds (e.g. {node_a: 1}).
        placement_strategy: Ray placement strategy of the worker group (PACK, SPREAD,
            STRICT_PACK, STRICT_SPREAD).
        torch_threads: torch threads of each Ray Train worker (None: cpus_per_worker). A
            trial's driver idles while its workers train, so on a machine that runs one trial
            at a time the workers may use the driver's CPU too.
        max_concurrent_trials: cap on trials running at once (None: what the cluster can hold
            at its autoscaler's maximum).
        max_failures: Ray Train restarts from the last checkpoint after a worker failure.
        max_trial_failures: Tune restarts of a trial driver that died (a preempted node); -1:
            without limit.
        placement_timeout_s: how long a Ray Train worker group may wait to be placed (the
            autoscaler's time to add nodes) before its trial fails with a one-line error.
        tf32: TF32 matmuls and convolutions in the Ray Train workers on GPUs (Ampere and
            later); off keeps float32 exact.
        compile: `torch.compile` the network in the Ray Train workers (how it trains, not what
            it learns: in no stage key); off keeps CPU runs bit-identical.
        num_cpus: CPUs of a local Ray started by `lfm` (None: all); ignored with a cluster.
        checkpoint_every: FM training checkpoint period in steps (0: only at the end).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    driver_cpus: float = 1.0
    driver_gpus: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"
    torch_threads: int | None = None
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    max_trial_failures: int = 0
    placement_timeout_s: float = 600.0
    tf32: bool = False
    compile: bool = False
    num_cpus: int | None = None
    checkpoint_every: int = 0


@dataclass(frozen=True)
class TrackingSection:
    """MLflow. `uri` None: $MLFLOW_TRACKING_URI, else sqlite under the storage folder.

    Attributes:
        uri: tracking URI (sqlite:///abs/path.db or http://host:port).
        experiment: experiment name (None: the sweep's name).
        artifact_location: where a new experiment keeps artefacts (None: <storage>/mlflow).
    """

    uri: str | None = None
    experiment: str | None = None
    artifact_location: str | None = None


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep file.

    Attributes:
        name: the sweep's name (Ray Tune run and default MLflow experiment).
        profile: "embedded" (the file's defaults) or a name under the file's `profiles`.
        storage: absolute path or s3://bucket/prefix for cache, checkpoints and artefacts
            (None: $LFM_STORAGE, else ./results made absolute).
        cache_wait_timeout_s: an overall limit on waiting for a stage another process is
            building (None: none; a waiter follows the builder's lease renewals and takes the
            build over when they stop, see orchestrator.cache).
    """

    name: str = "sweep"
    profile: str = EMBEDDED_PROFILE
    storage: str | None = None
    cache_wait_timeout_s: float | None = None
    data: DataSection = field(default_factory=DataSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    model: ModelSection = field(default_factory=ModelSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    coarse_to_fine: CoarseToFineSection = field(default_factory=CoarseToFineSection)
    search: dict[str, GridSection] = field(default_factory=dict)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    @property
    def storage_uri(self) -> str:
        """The resolved storage root (set by `load_sweep`)."""
        if self.storage is None:
            raise ConfigError("storage: not resolved; load sweep files with load_sweep")
        return self.storage

    @property
    def tracking_uri(self) -> str:
        """The resolved MLflow tracking URI (set by `load_sweep`)."""
        if self.tracking.uri is None:
            raise ConfigError("tracking.uri: not resolved; load sweep files with load_sweep")
        return self.tracking.uri

    @property
    def experiment(self) -> str:
        """The MLflow experiment name."""
        return self.tracking.experiment or self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON values (logged to MLflow, printed by --dry-run)."""
        return dataclasses.asdict(self)


def _schema() -> DictConfig:
    schema = OmegaConf.structured(SweepConfig)
    # lfm_core's frozen dataclasses come in read-only; merging needs them writable.
    OmegaConf.set_readonly(schema, False)
    return schema


def _allowed_keys(full_key: str, root: DictConfig | None = None) -> list[str]:
    """Field names of the section holding `full_key` (e.g. "train.stepz" -> TrainConfig's) in
    `root` (None: the sweep file's schema)."""
    node: Any = _schema() if root is None else root
    parts = full_key.split(".")[:-1]
    for position, part in enumerate(parts):
        if part not in node:
            return []
        node = node[part]
        if root is None and part == "search" and position + 1 < len(parts):
            node = OmegaConf.structured(GridSection)
            break
    return [str(key) for key in node] if isinstance(node, DictConfig) else []


def _one_line(err: OmegaConfBaseException, root: DictConfig | None = None) -> ConfigError:
    """An OmegaConf error (several lines) as a one-line ConfigError naming the key."""
    key = getattr(err, "full_key", None) or "config"
    if isinstance(err, ConfigKeyError):
        allowed = ", ".join(_allowed_keys(key, root))
        return ConfigError(f"{key}: unknown key; allowed: {allowed}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{key}: {first}")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, exit status 2, no usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """The command line's `key=value` overrides as one config layer (the one parser of them).

    Keys are dotted paths ("train.steps"); values are YAML ("500", "[random, loss]", "null").

    Raises:
        ConfigError: an item without "=", or a value that does not parse. One line.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides: cannot parse ({' '.join(str(err).split())})") from None


def format_override(key: str, value: Any) -> str:
    """The `key=value` item that `parse_overrides` reads back as `value` (None: null; a list or
    tuple: [a, b])."""

    def text(v: Any) -> str:
        return "null" if v is None else str(v)

    if isinstance(value, list | tuple):
        return f"{key}=[{', '.join(text(v) for v in value)}]"
    return f"{key}={text(value)}"


def apply_overrides(default: C, overrides: Sequence[str]) -> C:
    """A frozen config dataclass with `key=value` overrides applied, type-checked by OmegaConf
    against its fields (nested dataclasses by dotted keys, tuples as lists).

    Raises:
        ConfigError: as `parse_overrides`, or a key or value the dataclass does not take.
    """
    root = OmegaConf.structured(default)
    # Frozen dataclasses come in read-only; merging needs them writable.
    OmegaConf.set_readonly(root, False)
    try:
        merged = OmegaConf.merge(root, parse_overrides(overrides))
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(err, root) from None
    return cast(C, result)


def _axis(value: Any) -> Any:
    """A search axis as a list: `{grid_search: [...]}` and scalars are normalised."""
    if isinstance(value, DictConfig | dict):
        if set(value.keys()) != {GRID_SEARCH}:
            raise ConfigError(
                f"search axis {dict(value)!r}: use a list or {{{GRID_SEARCH}: [...]}}"
            )
        value = value[GRID_SEARCH]
    if isinstance(value, ListConfig | list):
        return list(value)
    return [value]


def _number(value: Any) -> Any:
    """An integer as a float (a union-typed axis does not convert it); anything else as is."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _normalise_search(layer: DictConfig) -> None:
    """Rewrite every search axis of one config layer (file, profile or overrides) as a list."""
    search = layer.get("search") if isinstance(layer, DictConfig) else None
    if not isinstance(search, DictConfig):
        return
    for key, grid in search.items():
        study = str(key)
        if not isinstance(grid, DictConfig):
            raise ConfigError(f"search.{study}: must map axes ({', '.join(AXES)}) to lists")
        for axis in [str(name) for name in grid]:
            try:
                grid[axis] = _axis(grid[axis])
                if axis == "t_split":  # 0 and 1 as numbers: the axis also takes a string
                    grid[axis] = [_number(value) for value in grid[axis]]
            except ConfigError as err:
                raise ConfigError(f"search.{study}.{axis}: {err}") from None


def _read_layers(path: Path, overrides: list[str]) -> tuple[DictConfig, DictConfig, DictConfig]:
    """(file without profiles, the chosen profile block, command-line overrides)."""
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"sweep file {path} is not valid YAML: {reason}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"sweep file {path} must hold a mapping of sections")
    cli = parse_overrides(overrides)
    profiles = loaded.pop("profiles", None) or OmegaConf.create({})
    if not isinstance(profiles, DictConfig):
        raise ConfigError("profiles: must map profile names to config blocks")
    profile = cli.get("profile") or loaded.get("profile") or EMBEDDED_PROFILE
    if profile != EMBEDDED_PROFILE and profile not in profiles:
        raise ConfigError(
            f"profile: unknown value {profile!r}; allowed: {', '.join([EMBEDDED_PROFILE, *profiles])}"
        )
    block = profiles.get(profile) or OmegaConf.create({})
    layers = (loaded, block, cli)
    for layer in layers:
        _normalise_search(layer)
    block["profile"] = profile
    return layers


def _to_object(merged: DictConfig) -> SweepConfig:
    """Instantiate the dataclasses; lfm_core's own checks run here, prefixed by their section."""
    parts: dict[str, Any] = {}
    for name in merged:
        key = str(name)
        node = merged[key]
        if not isinstance(node, DictConfig):
            parts[key] = node
            continue
        try:
            parts[key] = OmegaConf.to_object(node)
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}") from None
        except OmegaConfBaseException as err:
            raise _one_line(err) from None
    return SweepConfig(**parts)


def _check_positive(key: str, value: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < 1:
        raise ConfigError(f"{key}: {value!r} must be a positive integer")


def _check_model(key: str, name: str, width: int | None) -> None:
    """The network's name and width; `check_model_shapes` builds it (needs torch)."""
    check_choice(f"{key}.name", name, VELOCITY_SIZES)
    if width is not None:
        _check_positive(f"{key}.width", width)
    try:
        VelocityConfig(name=name, width=width)
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}") from None


def _models(cfg: SweepConfig) -> list[tuple[str, str, int | None]]:
    """(config key, size name, width) of every network the sweep trains."""
    models = [
        ("model", cfg.model.name, cfg.model.width),
        ("reference", cfg.reference.name, cfg.reference.width),
    ]
    for study, grid in cfg.search.items():
        models += [(f"search.{study}", cfg.model.name, width) for width in grid.width]
    return models


def check_model_shapes(cfg: SweepConfig) -> None:
    """Build every network of the sweep on the meta device (no memory): catches any size /
    width mismatch with the latent shape.

    Not part of `validate`: it imports torch and diffusers (seconds), so `--dry-run` and config
    errors answer without them; `lfm validate` and the checks before Ray starts
    (`orchestrator.preflight`) call it.

    Raises:
        ConfigError: the first network that cannot be built, naming its key.
    """
    import torch

    from lfm_core.velocity import build_velocity

    channels, side = cfg.autoencoder.latent_shape()
    for key, name, width in dict.fromkeys(_models(cfg)):
        velocity = VelocityConfig(name=name, in_channels=channels, sample_size=side, width=width)
        try:
            with torch.device("meta"):
                build_velocity(velocity)
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}") from None


def _validate_data_scale(cfg: SweepConfig) -> None:
    """The streaming data and autoencoder settings: folders only where they apply."""
    if cfg.data.heldout_root is not None and cfg.data.name != "folder":
        raise ConfigError(
            f"data.heldout_root: only for data.name=folder (data.name is {cfg.data.name!r})"
        )
    check_range("data.stream_cpus", cfg.data.stream_cpus, 0.0, math.inf, low_open=True)
    section = cfg.autoencoder
    _check_positive("autoencoder.encode_batch_size", section.encode_batch_size)
    _check_positive("autoencoder.decode_batch_size", section.decode_batch_size)
    _check_positive("autoencoder.psnr_images", section.psnr_images, optional=True)
    _check_positive("autoencoder.train_images", section.train_images, optional=True)
    check_choice("autoencoder.autocast", section.autocast, AUTOCAST_MODES)


AUTOENCODER_KINDS = ("kl", "vq")


def _validate_fidelity_options(cfg: SweepConfig) -> None:
    """sampling.cfg_channels, sampling.grid and autoencoder.kind (docs/paper-fidelity.md)."""
    sampling = cfg.sampling
    _check_positive("sampling.cfg_channels", sampling.cfg_channels, optional=True)
    channels = cfg.autoencoder.latent_shape()[0]
    if sampling.cfg_channels is not None and sampling.cfg_channels > channels:
        raise ConfigError(
            f"sampling.cfg_channels: {sampling.cfg_channels} exceeds the {channels} latent channels"
        )
    check_choice("sampling.grid", sampling.grid, GRIDS)
    if sampling.grid == "paper" and sampling.steps < 2:
        raise ConfigError(f"sampling.steps: {sampling.steps} must be >= 2 with sampling.grid=paper")
    check_choice("autoencoder.kind", cfg.autoencoder.kind, AUTOENCODER_KINDS)


def validate(cfg: SweepConfig) -> None:
    """Check values the types cannot: names, ranges and combinations.

    Raises:
        ConfigError: naming the first bad key and its allowed values.
    """
    if not _NAME.fullmatch(cfg.name):
        raise ConfigError(f"name: {cfg.name!r} must be letters, digits, '_', '.' or '-'")
    check_choice("data.name", cfg.data.name, DATASETS)
    _check_positive("data.image_size", cfg.data.image_size)
    _check_positive("data.limit", cfg.data.limit, optional=True)
    _check_positive("data.heldout_limit", cfg.data.heldout_limit, optional=True)
    _validate_data_scale(cfg)
    for role in ("clustering", "fid", "stability"):
        extractor = getattr(cfg.features, role)
        check_choice(f"features.{role}.name", extractor.name, FEATURE_EXTRACTORS)
    _check_positive("features.batch_size", cfg.features.batch_size)
    _check_model("model", cfg.model.name, cfg.model.width)
    _check_model("reference", cfg.reference.name, cfg.reference.width)
    _check_positive("reference.steps", cfg.reference.steps, optional=True)
    _check_positive("scoring.num_clusters", cfg.scoring.num_clusters, optional=True)
    for key in ("probe_steps", "num_noise", "batch_size"):
        _check_positive(f"scoring.{key}", getattr(cfg.scoring, key))
    check_choice("scoring.kmeans", cfg.scoring.kmeans, KMEANS_KINDS)
    check_choice("scoring.normalise", cfg.scoring.normalise, NORMALISATIONS)
    check_range("scoring.skew", cfg.scoring.skew, 0.0, 1.0)
    check_range("scoring.skew_class", cfg.scoring.skew_class, 0, math.inf)
    check_range("scoring.mix_nearest", cfg.scoring.mix_nearest, 0.0, 1.0)
    for key in (
        "steps",
        "num_samples",
        "batch_size",
        "timing_repeats",
        "t_split_calibration",
        "workers",
    ):
        _check_positive(f"sampling.{key}", getattr(cfg.sampling, key))
    check_range("sampling.t_split_budget", cfg.sampling.t_split_budget, 0.0, 1.0)
    if cfg.sampling.fid_every is not None:
        check_range("sampling.fid_every", cfg.sampling.fid_every, 1, cfg.train.steps)
    if cfg.sampling.num_samples < 2:
        raise ConfigError(f"sampling.num_samples: {cfg.sampling.num_samples} must be >= 2")
    check_choice("sampling.solver", cfg.sampling.solver, METHODS)
    check_range("sampling.first_seed", cfg.sampling.first_seed, 0, math.inf)
    check_range("sampling.guidance_scale", cfg.sampling.guidance_scale, 0.0, math.inf)
    _validate_fidelity_options(cfg)
    _validate_search(cfg)
    _validate_coarse_to_fine(cfg)
    _validate_resources(cfg)
    if cfg.cache_wait_timeout_s is not None:
        check_range("cache_wait_timeout_s", cfg.cache_wait_timeout_s, 0.0, math.inf, low_open=True)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _validate_resources(cfg: SweepConfig) -> None:
    resources = cfg.resources
    _check_positive("resources.num_workers", resources.num_workers)
    check_range(
        "resources.cpus_per_worker", resources.cpus_per_worker, 0.0, math.inf, low_open=True
    )
    check_range("resources.driver_cpus", resources.driver_cpus, 0.0, math.inf, low_open=True)
    check_range("resources.driver_gpus", resources.driver_gpus, 0.0, math.inf)
    for name, amount in resources.worker_resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ConfigError(
                f"resources.worker_resources.{name}: set CPUs and GPUs with cpus_per_worker / use_gpu"
            )
        check_range(f"resources.worker_resources.{name}", amount, 0.0, math.inf, low_open=True)
    check_choice("resources.placement_strategy", resources.placement_strategy, PLACEMENT_STRATEGIES)
    _check_positive("resources.max_concurrent_trials", resources.max_concurrent_trials, True)
    _check_positive("resources.num_cpus", resources.num_cpus, optional=True)
    _check_positive("resources.torch_threads", resources.torch_threads, optional=True)
    check_range("resources.max_failures", resources.max_failures, -1, math.inf)
    check_range("resources.max_trial_failures", resources.max_trial_failures, -1, math.inf)
    check_range(
        "resources.placement_timeout_s", resources.placement_timeout_s, 0.0, math.inf, low_open=True
    )
    check_range("resources.checkpoint_every", resources.checkpoint_every, 0, math.inf)
    if cfg.train.batch_size % resources.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} must be divisible by "
            f"resources.num_workers={resources.num_workers}"
        )


def _check_t_split(key: str, t_split: float | str | None) -> None:
    if isinstance(t_split, str) and t_split != AUTO_T_SPLIT:
        raise ConfigError(
            f"{key}: {t_split!r} is not allowed; allowed: a number in [0, 1], {AUTO_T_SPLIT}, null"
        )
    if isinstance(t_split, float):
        check_range(key, t_split, 0.0, 1.0)


def _validate_coarse_to_fine(cfg: SweepConfig) -> None:
    """The seam fine-tuning options: a weight >= 0, positive steps, uniform t, embedded data."""
    section = cfg.coarse_to_fine
    check_range("coarse_to_fine.seam_weight", section.seam_weight, 0.0, math.inf)
    _check_positive("coarse_to_fine.seam_steps", section.seam_steps, optional=True)
    if not section.seam:
        return
    if cfg.train.t_sampling != "uniform":
        raise ConfigError(
            f"train.t_sampling: {cfg.train.t_sampling!r} with coarse_to_fine.seam=true; allowed: "
            "uniform (seam fine-tuning rescales t to [0, t_split))"
        )
    if cfg.data.name == "folder" or cfg.data.hflip:
        raise ConfigError(
            "coarse_to_fine.seam: needs embedded data without data.hflip (seam states are cached "
            "per training latent, unflipped, in one tensor)"
        )


def _validate_search(cfg: SweepConfig) -> None:
    if not cfg.search:
        raise ConfigError(
            f"search: at least one study is needed, e.g. search.main.criterion=[random]; axes: {', '.join(AXES)}"
        )
    for study, grid in cfg.search.items():
        if not _NAME.fullmatch(study):
            raise ConfigError(
                f"search.{study}: study names must be letters, digits, '_', '.' or '-'"
            )
        prefix = f"search.{study}"
        for axis in AXES:
            if not getattr(grid, axis):
                raise ConfigError(f"{prefix}.{axis}: must list at least one value")
        for fraction in grid.data_fraction:
            check_range(f"{prefix}.data_fraction", fraction, 0.0, 1.0, low_open=True)
        for criterion in grid.criterion:
            check_choice(f"{prefix}.criterion", criterion, CRITERIA)
        for width in grid.width:
            _check_model(prefix, cfg.model.name, width)
        for t_split in grid.t_split:
            _check_t_split(f"{prefix}.t_split", t_split)
        for seed in grid.seed:
            check_range(f"{prefix}.seed", seed, 0, math.inf)


def check_local_paths(cfg: SweepConfig) -> None:
    """Check the paths a run on this machine reads (not part of `validate`, so a file meant for a
    cluster still passes --dry-run here).

    Raises:
        ConfigError: data.root, a pretrained autoencoder folder or an extractor path that is
            given as a local path but does not exist.
    """
    paths = {
        "data.root": cfg.data.root,
        "data.heldout_root": cfg.data.heldout_root,
        "autoencoder.pretrained": cfg.autoencoder.pretrained,
        "features.fid_stats": cfg.features.fid_stats,
    }
    for role in ("clustering", "fid", "stability"):
        paths[f"features.{role}.path"] = getattr(cfg.features, role).path
    for key, value in paths.items():
        # Hub ids ("org/name") are checked when loaded; only local-looking paths are checked here.
        if value is None or value.startswith("s3://"):
            continue
        if not (
            key in ("data.root", "data.heldout_root", "features.fid_stats")
            or value.startswith(LOCAL_PATH_PREFIXES)
        ):
            continue
        if not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: {value!r} does not exist on this machine")


@dataclass(frozen=True)
class Locations:
    """Where a sweep's files and runs go.

    Attributes:
        storage: the storage root, an absolute path or s3://bucket/prefix.
        tracking_uri: the MLflow tracking URI.
        local_dir: a local folder for what needs one (the default sqlite database, reports):
            the storage root when it is local, else ./results made absolute.
    """

    storage: str
    tracking_uri: str
    local_dir: Path


def resolve_locations(storage: str | None = None, tracking_uri: str | None = None) -> Locations:
    """The storage and tracking defaults, resolved in this one place.

    Storage: `storage`, else $LFM_STORAGE, else ./results; local paths made absolute, since
    relative ones would land inside Ray's copy of the working dir under `ray job submit`.
    Tracking: $MLFLOW_TRACKING_URI, else `tracking_uri`, else sqlite `mlflow.db` in `local_dir`.

    Raises:
        ConfigError: the storage root is neither a path nor s3://bucket[/prefix].
    """
    root = storage or os.environ.get(STORAGE_ENV) or DEFAULT_RESULTS_DIR
    if not root.startswith(S3_SCHEME):
        root = str(Path(root).expanduser().resolve())
    root = check_storage_uri(root)
    local = Path(DEFAULT_RESULTS_DIR if root.startswith(S3_SCHEME) else root).resolve()
    uri = os.environ.get(TRACKING_ENV) or tracking_uri or f"{SQLITE_PREFIX}{local}/mlflow.db"
    return Locations(root, uri, local)


def _resolve(cfg: SweepConfig) -> SweepConfig:
    """Fill the defaults that depend on the environment: absolute storage, tracking URI."""
    where = resolve_locations(cfg.storage, cfg.tracking.uri)
    artifacts = cfg.tracking.artifact_location or f"{where.storage}/mlflow"
    tracking = dataclasses.replace(
        cfg.tracking, uri=where.tracking_uri, artifact_location=artifacts
    )
    return dataclasses.replace(cfg, storage=where.storage, tracking=tracking)


def load_sweep(
    path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> SweepConfig:
    """Load, merge, validate and resolve a sweep file.

    Args:
        path: the YAML sweep file.
        overrides: `key=value` strings (OmegaConf dot-list), applied last.

    Returns:
        The frozen, validated SweepConfig with absolute storage and a tracking URI.

    Raises:
        ConfigError: one line naming the bad key (or file) and the allowed values.
    """
    base, profile, cli = _read_layers(Path(path), list(overrides))
    try:
        merged = OmegaConf.merge(_schema(), base, profile, cli)
    except OmegaConfBaseException as err:
        raise _one_line(err) from None
    if not isinstance(merged, DictConfig):
        raise ConfigError(f"sweep file {path} must hold a mapping of sections")
    cfg = _to_object(merged)
    validate(cfg)
    return _resolve(cfg)
