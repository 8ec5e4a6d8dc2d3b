"""The stage graph of a sweep: what each stage reads, how its key is formed, how it is built.

    dataset --> autoencoder --> latents ------------------------+--> fm_model --> samples --> metrics
       |                                                        |    (subset,     (fixed
       +--> extractor --> data_features --+                     |     width,       seeds)
                                          +--> subset ----------+     seed)
            probe fm_model --> scores ----+    (fraction, criterion, seed)

Every stage is a `StageRef` (see `orchestrator.cache`) built by a function of the ref and the
folders of its upstream stages, which writes the stage's files: tensors as safetensors, small
facts as JSON, models through lfm_core (diffusers `save_pretrained` for the autoencoder,
`lfm_core.checkpoint` for velocity networks). The dataset is the source: its ref takes part in
every key but is read from lfm_core.data, never copied. All maths is lfm_core's; this module
only wires it.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lfm_core.autoencoder import (
    decode,
    encode,
    load_autoencoder,
    reconstruction_psnr,
    train_autoencoder,
)
from lfm_core.checkpoint import load_velocity, save_velocity
from lfm_core.coarse_to_fine import (
    T_SPLIT_CANDIDATES,
    choose_t_split,
    flop_speedup_bound,
    forward_flops,
    sample_coarse_to_fine,
)
from lfm_core.criteria import SCORE_CRITERIA, labels_needed, per_sample_scores, select
from lfm_core.data import ImageDataset, load_dataset
from lfm_core.features import FeatureExtractor, build_feature_extractor
from lfm_core.metrics import ReferenceStats, fid, precision_recall, stability
from lfm_core.solvers import CFG, seeded_noise
from lfm_core.train import TrainConfig
from lfm_core.velocity import VelocityConfig, VelocityModel
from orchestrator.cache import StageCache, StageRef
from orchestrator.config import SweepConfig
from orchestrator.ray_train import fit_velocity
from orchestrator.report_tables import CHOSEN_T_SPLIT
from orchestrator.trials import Trial

# Bump a stage's version when its code would write different files for the same inputs.
VERSIONS = {
    "dataset": "1",
    "autoencoder": "1",
    "latents": "1",
    "extractor": "1",
    "data_features": "1",
    "subset": "1",
    "scores": "1",
    "fm_model": "1",
    "samples": "1",
    "t_split_choice": "1",
    "metrics": "1",
}
# Stages read from their source rather than stored in the cache.
SOURCE_STAGES = ("dataset",)
FULL_SUBSET = "all"
# The one criterion that reads neither features nor scores.
RANDOM = "random"
GRID_IMAGES = 64
# Probe models (for "loss" / "grad" scores) are trained with this seed whatever the trial's.
PROBE_SEED = 0
# Same-seed pairs shuffled with this seed give the "unrelated" stability baseline.
UNRELATED_SEED = 0
# Files of the stages (each tensor file holds the named tensors).
LATENTS_FILE = "latents.safetensors"  # latents (N, c, h, w), labels (N,)
FEATURES_FILE = "features.safetensors"  # features (N, D)
INDICES_FILE = "indices.safetensors"  # indices (n,)
SCORES_FILE = "scores.safetensors"  # scores (N,)
SAMPLES_FILE = "samples.safetensors"  # latents, grid, features_fid, features_stability[, labels]
METRICS_FILE = "metrics.json"
# What the metrics stage writes for every trial (the same keys everywhere, for MLflow's Compare).
METRIC_KEYS = (
    "fid",
    "fid_model",
    "fid_reference",
    "precision",
    "recall",
    "stability_similarity",
    "stability_unrelated",
    "stability_similarity_centred",
    "stability_unrelated_centred",
    "speedup",
    "flop_speedup",
    "train_time_s",
    "sample_time_s",
    "subset_size",
    "labels_used",
)
# Coarse-to-fine trials also log CHOSEN_T_SPLIT, their pair's automatically chosen t_split.
INFO_FILE = "info.json"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def read_info(folder: Path) -> dict[str, Any]:
    """The `info.json` facts of a stage folder."""
    return json.loads((folder / INFO_FILE).read_text())


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_training_data(
    cache: StageCache, latents: StageRef, subset: StageRef, conditional: bool
) -> tuple[Tensor, Tensor | None]:
    """(latents (n, C, H, W), labels (n,) or None) of a subset; runs on Ray Train workers."""
    tensors = load_file(str(cache.local_dir(latents) / LATENTS_FILE))
    indices = load_file(str(cache.local_dir(subset) / INDICES_FILE))["indices"]
    labels = tensors["labels"][indices] if conditional else None
    return tensors["latents"][indices], labels


def _labels(model: VelocityModel, seeds: list[int]) -> Tensor | None:
    """Class labels (N,) of the samples of `seeds` (seed mod num_classes); None: unconditional."""
    if not model.config.num_classes:
        return None
    return torch.tensor(seeds, device=_device()) % model.config.num_classes


@dataclass(frozen=True)
class Sampled:
    """Samples of some seeds: latents (N, c, h, w), labels (N,) or None, the ODE time in
    seconds, and the function evaluations of the coarse and fine model."""

    latents: Tensor
    labels: Tensor | None
    seconds: float
    nfe_coarse: int
    nfe_fine: int


@dataclass(frozen=True)
class Timing:
    """Median sampling seconds of the reference alone and of a trial's sampler on one batch,
    with the trial sampler's function evaluations per model."""

    reference_s: float
    trial_s: float
    nfe_coarse: int
    nfe_fine: int


@dataclass(frozen=True)
class TrialRefs:
    """The stages behind one trial's metrics.

    Attributes:
        subset: the training subset. model: the trial's FM model. reference: the reference
        model. samples: the trial's samples (coarse-to-fine when t_split is set).
        model_samples: the trial model's own samples. reference_samples: the reference's.
        metrics: the trial's metrics.
    """

    subset: StageRef
    model: StageRef
    reference: StageRef
    samples: StageRef
    model_samples: StageRef
    reference_samples: StageRef
    metrics: StageRef


class StageGraph:
    """Refs and builders of every stage of one sweep config.

    Args:
        cfg: the validated sweep config.
        cache: the stage cache (its storage holds Ray Train runs too).
        progress: show tqdm bars while building.
    """

    def __init__(self, cfg: SweepConfig, cache: StageCache, progress: bool = True) -> None:
        self.cfg = cfg
        self.cache = cache
        self.progress = progress
        self._builders: dict[str, Callable[[StageRef, Path], None]] = {
            "autoencoder": self._build_autoencoder,
            "latents": self._build_latents,
            "extractor": self._build_extractor,
            "data_features": self._build_data_features,
            "subset": self._build_subset,
            "scores": self._build_scores,
            "fm_model": self._build_fm_model,
            "samples": self._build_samples,
            "t_split_choice": self._build_t_split_choice,
            "metrics": self._build_metrics,
        }

    # ---- refs: pure functions of the config ---------------------------------------------------

    def dataset(self) -> StageRef:
        data = self.cfg.data
        inputs = {
            "name": data.name,
            "root": None if data.root is None else str(Path(data.root).expanduser().resolve()),
            "image_size": data.image_size,
            "limit": data.limit,
            "heldout_limit": data.heldout_limit,
        }
        return StageRef("dataset", VERSIONS["dataset"], inputs)

    def autoencoder(self) -> StageRef:
        section = self.cfg.autoencoder
        if section.pretrained is not None:
            inputs = {"pretrained": section.pretrained, "subfolder": section.subfolder}
            return StageRef("autoencoder", VERSIONS["autoencoder"], inputs)
        return StageRef(
            "autoencoder",
            VERSIONS["autoencoder"],
            {"config": asdict(section.core())},
            {"dataset": self.dataset()},
        )

    def latents(self) -> StageRef:
        upstream = {"dataset": self.dataset(), "autoencoder": self.autoencoder()}
        return StageRef("latents", VERSIONS["latents"], {}, upstream)

    def extractor(self, role: str) -> StageRef:
        section = getattr(self.cfg.features, role)
        inputs = {"name": section.name, "path": section.path}
        return StageRef("extractor", VERSIONS["extractor"], inputs)

    def data_features(self, role: str, split: str) -> StageRef:
        upstream = {"dataset": self.dataset(), "extractor": self.extractor(role)}
        return StageRef("data_features", VERSIONS["data_features"], {"split": split}, upstream)

    def subset(self, fraction: float, criterion: str, seed: int) -> StageRef:
        upstream: dict[str, StageRef] = {"latents": self.latents()}
        if fraction == 1.0:
            # Every criterion keeps everything: one shared subset, so one shared model.
            inputs: dict[str, Any] = {"fraction": 1.0, "criterion": FULL_SUBSET}
            return StageRef("subset", VERSIONS["subset"], inputs, upstream)
        inputs = {"fraction": fraction, "criterion": criterion}
        if criterion in SCORE_CRITERIA:
            upstream["scores"] = self.scores(criterion)
        else:
            inputs["seed"] = seed  # score criteria are deterministic: no seed in their key
        if criterion not in (RANDOM, *SCORE_CRITERIA):
            upstream["features"] = self.data_features("clustering", "train")
        if criterion.startswith(("cluster_", "balanced_")):
            inputs["num_clusters"] = self.cfg.scoring.num_clusters
        return StageRef("subset", VERSIONS["subset"], inputs, upstream)

    def fm_model(
        self, subset: StageRef, name: str, width: int | None, steps: int, seed: int
    ) -> StageRef:
        train = replace(self.cfg.train, steps=steps, seed=seed)
        inputs = {
            "name": name,
            "width": width,
            "conditional": self.cfg.data.conditional,
            "train": asdict(train),
            # Each rank draws its own batches, so the world size changes the model.
            "num_workers": self.cfg.resources.num_workers,
        }
        upstream = {"latents": self.latents(), "subset": subset}
        return StageRef("fm_model", VERSIONS["fm_model"], inputs, upstream)

    def probe(self) -> StageRef:
        full = self.subset(1.0, FULL_SUBSET, PROBE_SEED)
        model, steps = self.cfg.model, self.cfg.scoring.probe_steps
        return self.fm_model(full, model.name, model.width, steps, PROBE_SEED)

    def scores(self, kind: str) -> StageRef:
        inputs = {"kind": kind, "num_noise": self.cfg.scoring.num_noise, "seed": PROBE_SEED}
        upstream = {"latents": self.latents(), "probe": self.probe()}
        return StageRef("scores", VERSIONS["scores"], inputs, upstream)

    def reference(self, seed: int) -> StageRef:
        ref = self.cfg.reference
        steps = ref.steps or self.cfg.train.steps
        return self.fm_model(self.subset(1.0, FULL_SUBSET, seed), ref.name, ref.width, steps, seed)

    def samples(
        self, model: StageRef, fine: StageRef | None = None, t_split: float | None = None
    ) -> StageRef:
        sampling = self.cfg.sampling
        inputs = {
            "steps": sampling.steps,
            "solver": sampling.solver,
            "num_samples": sampling.num_samples,
            "first_seed": sampling.first_seed,
            "guidance_scale": sampling.guidance_scale,
            "t_split": t_split,
        }
        upstream = {
            "model": model,
            "autoencoder": self.autoencoder(),
            "fid_extractor": self.extractor("fid"),
            "stability_extractor": self.extractor("stability"),
        }
        if fine is not None:
            upstream["fine"] = fine
        return StageRef("samples", VERSIONS["samples"], inputs, upstream)

    def t_split_choice(self, coarse: StageRef, fine: StageRef) -> StageRef:
        """The largest t_split of a pair within the similarity budget (lfm_core.choose_t_split)."""
        sampling = self.cfg.sampling
        inputs = {
            "budget": sampling.t_split_budget,
            "calibration": sampling.t_split_calibration,
            "candidates": list(T_SPLIT_CANDIDATES),
            "steps": sampling.steps,
            "solver": sampling.solver,
            "first_seed": sampling.first_seed,
            "guidance_scale": sampling.guidance_scale,
        }
        upstream = {
            "model": coarse,
            "fine": fine,
            "autoencoder": self.autoencoder(),
            "stability_extractor": self.extractor("stability"),
        }
        return StageRef("t_split_choice", VERSIONS["t_split_choice"], inputs, upstream)

    def trial(self, trial: Trial) -> TrialRefs:
        """Every stage a trial's metrics depend on."""
        subset = self.subset(trial.data_fraction, trial.criterion, trial.seed)
        width = self.cfg.model.width if trial.width is None else trial.width
        model = self.fm_model(subset, self.cfg.model.name, width, self.cfg.train.steps, trial.seed)
        reference = self.reference(trial.seed)
        model_samples = self.samples(model)
        reference_samples = self.samples(reference)
        samples = (
            model_samples
            if trial.t_split is None
            else self.samples(model, reference, trial.t_split)
        )
        inputs = {"t_split": trial.t_split, "timing_repeats": self.cfg.sampling.timing_repeats}
        upstream = {
            "subset": subset,
            "model": model,
            "reference": reference,
            "samples": samples,
            "model_samples": model_samples,
            "reference_samples": reference_samples,
            "heldout_features": self.data_features("fid", "heldout"),
            "latents": self.latents(),
        }
        if trial.t_split is not None:
            upstream["t_split_choice"] = self.t_split_choice(model, reference)
        metrics = StageRef("metrics", VERSIONS["metrics"], inputs, upstream)
        return TrialRefs(
            subset, model, reference, samples, model_samples, reference_samples, metrics
        )

    def stages_of(self, trial: Trial) -> list[StageRef]:
        """The cached stages a trial needs (source stages excluded), upstream first."""
        found = self.trial(trial).metrics.closure()
        order = list(self._builders)
        refs = [ref for ref in found.values() if ref.stage not in SOURCE_STAGES]
        return sorted(refs, key=lambda ref: order.index(ref.stage))

    # ---- building -----------------------------------------------------------------------------

    def get(self, ref: StageRef) -> Path:
        """The local folder of a stage, built (once, cluster-wide) when missing.

        Upstream stages are fetched first, so a build record times its own stage only.
        """
        for upstream in ref.upstream.values():
            if upstream.stage not in SOURCE_STAGES:
                self.get(upstream)
        return self.cache.get(ref, functools.partial(self._builders[ref.stage], ref))

    def tensors(self, ref: StageRef, filename: str) -> dict[str, Tensor]:
        """The tensors of one file of a stage (built first when missing)."""
        return load_file(str(self.get(ref) / filename))

    def _split(self, split: str) -> ImageDataset:
        data = self.cfg.data
        dataset = load_dataset(data.name, split, data.root, data.image_size)
        limit = data.limit if split == "train" else data.heldout_limit
        if limit is None or limit >= len(dataset):
            return dataset
        return ImageDataset(
            dataset.images[:limit],
            dataset.labels[:limit],
            dataset.num_classes,
            dataset.name,
            None if dataset.indices is None else dataset.indices[:limit],
        )

    def load_autoencoder(self) -> AutoencoderKL:
        """The sweep's AutoencoderKL (diffusers), on the stage device."""
        vae = load_autoencoder(self.get(self.autoencoder()) / "vae")
        # nn.Module.to moves in place (diffusers' own `to` wrapper confuses type checkers).
        nn.Module.to(vae, _device())
        return vae

    def load_extractor(self, role: str) -> FeatureExtractor:
        """The feature extractor of a role ("clustering", "fid", "stability")."""
        return self._extractor(self.extractor(role))

    def _extractor(self, ref: StageRef) -> FeatureExtractor:
        extractor = build_feature_extractor(ref.inputs["name"], self.get(ref), ref.inputs["path"])
        extractor.batch_size = self.cfg.features.batch_size
        return extractor.to(_device())

    def load_model(self, ref: StageRef) -> VelocityModel:
        """A trained velocity model (EMA weights) of an fm_model stage, on the stage device."""
        return load_velocity(self.get(ref)).to(_device())

    def _build_autoencoder(self, ref: StageRef, folder: Path) -> None:
        section = self.cfg.autoencoder
        if section.pretrained is not None:
            vae = load_autoencoder(section.pretrained, section.subfolder)
        else:
            vae = train_autoencoder(
                self._split("train").images,
                section.core(),
                progress=self.progress,
                device=_device(),
            )
        vae.save_pretrained(folder / "vae")
        info = {
            "heldout_psnr": reconstruction_psnr(vae, self._split("heldout").images),
            "scaling_factor": float(vae.config["scaling_factor"]),
        }
        _write_json(folder / INFO_FILE, info)

    def _build_latents(self, ref: StageRef, folder: Path) -> None:
        train = self._split("train")
        latents = encode(self.load_autoencoder(), train.images, progress=self.progress)
        save_file(
            {"latents": latents.contiguous(), "labels": train.labels.contiguous()},
            str(folder / LATENTS_FILE),
        )
        info = {"shape": list(latents.shape), "num_classes": train.num_classes}
        _write_json(folder / INFO_FILE, info)

    def _build_extractor(self, ref: StageRef, folder: Path) -> None:
        # The extractor's own weights (a trained classifier, or a hub download) land in the folder.
        extractor = build_feature_extractor(ref.inputs["name"], folder, ref.inputs["path"])
        info = {"name": extractor.name, "dim": extractor.dim}
        accuracy = getattr(extractor, "heldout_accuracy", None)  # trained extractors record it
        if accuracy is not None:
            info["heldout_accuracy"] = float(accuracy)
        _write_json(folder / INFO_FILE, info)

    def _build_data_features(self, ref: StageRef, folder: Path) -> None:
        extractor = self._extractor(ref.upstream["extractor"])
        images = self._split(ref.inputs["split"]).images
        features = extractor(images, progress=self.progress)
        save_file({"features": features.contiguous()}, str(folder / FEATURES_FILE))

    def _build_subset(self, ref: StageRef, folder: Path) -> None:
        labels = self.tensors(ref.upstream["latents"], LATENTS_FILE)["labels"]
        n = labels.shape[0]
        criterion = ref.inputs["criterion"]
        if criterion == FULL_SUBSET:
            indices = torch.arange(n)
        else:
            features = scores = None
            if "features" in ref.upstream:
                features = self.tensors(ref.upstream["features"], FEATURES_FILE)["features"]
            if "scores" in ref.upstream:
                scores = self.tensors(ref.upstream["scores"], SCORES_FILE)["scores"]
            indices = select(
                criterion,
                ref.inputs["fraction"],
                features=features,
                scores=scores,
                num_clusters=ref.inputs.get("num_clusters"),
                seed=ref.inputs.get("seed", 0),
                num_samples=n,
            )
        save_file({"indices": indices.contiguous()}, str(folder / INDICES_FILE))
        info = {"size": int(indices.numel()), "labels_used": labels_needed(labels, indices)}
        _write_json(folder / INFO_FILE, info)

    def _build_scores(self, ref: StageRef, folder: Path) -> None:
        tensors = self.tensors(ref.upstream["latents"], LATENTS_FILE)
        probe = self.load_model(ref.upstream["probe"])
        labels = tensors["labels"].to(_device()) if probe.config.num_classes else None
        scores = per_sample_scores(
            probe,
            tensors["latents"].to(_device()),
            kind=ref.inputs["kind"],
            num_noise=ref.inputs["num_noise"],
            seed=ref.inputs["seed"],
            batch_size=self.cfg.scoring.batch_size,
            labels=labels,
            progress=self.progress,
        )
        save_file({"scores": scores.contiguous()}, str(folder / SCORES_FILE))

    def _build_fm_model(self, ref: StageRef, folder: Path) -> None:
        latents_ref, subset_ref = ref.upstream["latents"], ref.upstream["subset"]
        info = read_info(self.get(latents_ref))
        channels, side = info["shape"][1], info["shape"][-1]
        conditional = ref.inputs["conditional"]
        velocity = VelocityConfig(
            name=ref.inputs["name"],
            in_channels=channels,
            sample_size=side,
            num_classes=info["num_classes"] if conditional else 0,
            width=ref.inputs["width"],
        )
        train = TrainConfig(**ref.inputs["train"])
        data_fn = functools.partial(
            load_training_data, self.cache, latents_ref, subset_ref, conditional
        )
        result = fit_velocity(
            data_fn,
            velocity,
            train,
            self.cfg.resources,
            self.cache.storage.uri,
            run_name=f"fm_model-{ref.key[:16]}",
        )
        save_velocity(folder, result.ema, {"train": asdict(train)})
        _write_json(folder / INFO_FILE, {"train_" + k: v for k, v in result.metrics.items()})

    def _sampler(self, model: VelocityModel, labels: Tensor | None) -> Callable[..., Tensor]:
        """The velocity function of a model for one batch: classifier-free guidance when labelled."""
        if labels is None:
            return model
        return CFG(model, labels, self.cfg.sampling.guidance_scale, model.null_label)

    def _sample(
        self, coarse: VelocityModel, fine: VelocityModel, seeds: list[int], t_split: float
    ) -> Sampled:
        """Coarse-to-fine sampling of `seeds` in batches (t_split = 1: the coarse model alone).

        Sample i starts from seeded_noise(seeds[i]) and, for a conditional model, has class
        label seeds[i] mod num_classes.
        """
        sampling = self.cfg.sampling
        shape = (coarse.config.in_channels, coarse.config.sample_size, coarse.config.sample_size)
        parts, label_parts, seconds, nfe_coarse, nfe_fine = [], [], 0.0, 0, 0
        for start in range(0, len(seeds), sampling.batch_size):
            batch = seeds[start : start + sampling.batch_size]
            x_init = seeded_noise(batch, shape, device=_device())
            labels = _labels(coarse, batch)
            if labels is not None:
                label_parts.append(labels.cpu())
            result = sample_coarse_to_fine(
                self._sampler(coarse, labels),
                self._sampler(fine, labels),
                x_init,
                t_split,
                steps=sampling.steps,
                method=sampling.solver,
            )
            parts.append(result.samples.cpu())
            seconds += result.seconds
            nfe_coarse += result.nfe_coarse
            nfe_fine += result.nfe_fine
        labels_all = torch.cat(label_parts) if label_parts else None
        return Sampled(torch.cat(parts), labels_all, seconds, nfe_coarse, nfe_fine)

    def _build_samples(self, ref: StageRef, folder: Path) -> None:
        sampling = self.cfg.sampling
        coarse = self.load_model(ref.upstream["model"])
        fine = self.load_model(ref.upstream["fine"]) if "fine" in ref.upstream else coarse
        t_split = ref.inputs["t_split"]
        seeds = list(range(sampling.first_seed, sampling.first_seed + sampling.num_samples))
        sampled = self._sample(coarse, fine, seeds, 1.0 if t_split is None else t_split)
        images = decode(self.load_autoencoder(), sampled.latents, progress=self.progress)
        tensors = {"latents": sampled.latents, "grid": images[:GRID_IMAGES]}
        for role in ("fid", "stability"):
            tensors[f"features_{role}"] = self.load_extractor(role)(images, progress=self.progress)
        if sampled.labels is not None:
            tensors["labels"] = sampled.labels
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAMPLES_FILE))
        info = {
            "seconds": sampled.seconds,
            "nfe_coarse": sampled.nfe_coarse,
            "nfe_fine": sampled.nfe_fine,
            "seeds": [seeds[0], seeds[-1]],
        }
        _write_json(folder / INFO_FILE, info)

    def _build_t_split_choice(self, ref: StageRef, folder: Path) -> None:
        inputs = ref.inputs
        coarse = self.load_model(ref.upstream["model"])
        fine = self.load_model(ref.upstream["fine"])
        vae = self.load_autoencoder()
        extractor = self._extractor(ref.upstream["stability_extractor"])
        seeds = list(range(inputs["first_seed"], inputs["first_seed"] + inputs["calibration"]))
        shape = (coarse.config.in_channels, coarse.config.sample_size, coarse.config.sample_size)
        labels = _labels(coarse, seeds)

        def embed(latents: Tensor) -> Tensor:
            return extractor(decode(vae, latents, progress=False), progress=False)

        choice = choose_t_split(
            self._sampler(coarse, labels),
            self._sampler(fine, labels),
            seeded_noise(seeds, shape, device=_device()),
            budget=inputs["budget"],
            candidates=inputs["candidates"],
            features=embed,
            steps=inputs["steps"],
            method=inputs["solver"],
        )
        similarity = {str(t): s for t, s in sorted(choice.similarity.items())}
        _write_json(folder / INFO_FILE, {"t_split": choice.t_split, "similarity": similarity})

    def load_samples(self, ref: StageRef) -> dict[str, Tensor]:
        """The tensors of a samples stage: latents, grid, features_fid, features_stability, labels."""
        return self.tensors(ref, SAMPLES_FILE)

    def _timing(self, model: VelocityModel, reference: VelocityModel, t_split: float) -> Timing:
        """Reference alone vs this trial's sampler on one batch, interleaved, medians kept."""
        sampling = self.cfg.sampling
        count = min(sampling.batch_size, sampling.num_samples)
        seeds = list(range(sampling.first_seed, sampling.first_seed + count))
        # One untimed pass of each first: lazy initialisation and allocator warm-up.
        self._sample(reference, reference, seeds, 0.0)
        trial = self._sample(model, reference, seeds, t_split)
        times_reference, times_trial = [], []
        for _ in range(sampling.timing_repeats):
            times_reference.append(self._sample(reference, reference, seeds, 0.0).seconds)
            times_trial.append(self._sample(model, reference, seeds, t_split).seconds)
        return Timing(
            statistics.median(times_reference),
            statistics.median(times_trial),
            trial.nfe_coarse,
            trial.nfe_fine,
        )

    def _build_metrics(self, ref: StageRef, folder: Path) -> None:
        up = ref.upstream
        samples = self.load_samples(up["samples"])
        model_samples = self.load_samples(up["model_samples"])
        reference_samples = self.load_samples(up["reference_samples"])
        heldout = self.tensors(up["heldout_features"], FEATURES_FILE)["features"]
        stats = ReferenceStats.from_features(heldout)
        precision, recall = precision_recall(heldout, samples["features_fid"])
        result = stability(
            reference_samples["features_stability"],
            samples["features_stability"],
            seed=UNRELATED_SEED,
        )
        model, reference = self.load_model(up["model"]), self.load_model(up["reference"])
        t_split = ref.inputs["t_split"]
        timing = self._timing(model, reference, 1.0 if t_split is None else t_split)
        probe = seeded_noise(
            [self.cfg.sampling.first_seed],
            (model.config.in_channels, model.config.sample_size, model.config.sample_size),
            device=_device(),
        )
        flops_model, flops_reference = forward_flops(model, probe), forward_flops(reference, probe)
        subset_info = read_info(self.get(up["subset"]))
        metrics = {
            "fid": fid(samples["features_fid"], stats),
            "fid_model": fid(model_samples["features_fid"], stats),
            "fid_reference": fid(reference_samples["features_fid"], stats),
            "precision": precision,
            "recall": recall,
            "stability_similarity": result.similarity,
            "stability_unrelated": result.unrelated,
            "stability_similarity_centred": result.centred_similarity,
            "stability_unrelated_centred": result.centred_unrelated,
            "speedup": timing.reference_s / timing.trial_s,
            "flop_speedup": flop_speedup_bound(
                flops_model, flops_reference, timing.nfe_coarse, timing.nfe_fine
            ),
            "train_time_s": float(
                read_info(self.get(up["model"])).get("train_elapsed_s", float("nan"))
            ),
            "sample_time_s": float(read_info(self.get(up["samples"]))["seconds"]),
            "subset_size": float(subset_info["size"]),
            "labels_used": float(subset_info["labels_used"] if self.cfg.data.conditional else 0),
        }
        if "t_split_choice" in up:
            metrics[CHOSEN_T_SPLIT] = float(read_info(self.get(up["t_split_choice"]))["t_split"])
        _write_json(folder / METRICS_FILE, metrics)

    def metrics(self, trial: Trial) -> dict[str, float]:
        """The trial's metrics, building every stage they need that is not cached yet."""
        return json.loads((self.get(self.trial(trial).metrics) / METRICS_FILE).read_text())
