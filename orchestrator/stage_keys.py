"""Stage keys: pure functions of the sweep config that name every stage instance.

    dataset --> autoencoder --> latents ------------------------+--> fm_model --> samples --> metrics
       |                                                        |    (subset,     (fixed      ^
       +--> extractor --> data_features --+                     |     width,       seeds)     |
                                          +--> subset ----------+     seed)    timing -------+
            probe fm_model --> scores ----+    (fraction, criterion, seed)

A `StageRef` holds a stage's own config values and the refs it reads, and nothing else: its
builder (`orchestrator.stage_builders`) reads only these, so a config value outside a ref
never changes what the stage writes, and a value inside it always changes its key. Values that
change how fast a stage runs but not what it writes (devices, batch sizes of feature
extraction, sampling and scoring, threads, the trainer) live in `orchestrator.stages.Execution`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lfm_core.configs import (  # names only: no torch
    CLUSTER_CRITERIA,
    FEATURE_CRITERIA,
    KMEANS_KINDS,
    LABEL_CRITERIA,
    NORMALISATIONS,
    SCORE_CRITERIA,
    T_SPLIT_CANDIDATES,
)
from lfm_core.files import file_sha256
from orchestrator.cache import StageRef
from orchestrator.config import SweepConfig
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
    "seam_state": "1",
    "seam_model": "1",
    "reference_stats": "1",
    "floors": "1",
    "fid_curve": "1",
    "timing": "1",
    "metrics": "1",
}
# Stages read from their source rather than stored in the cache.
SOURCE_STAGES = ("dataset",)
FOLDER_DATA = "folder"  # the data set read from an image folder as a stream
FULL_SUBSET = "all"
HALF_SUBSET = "halves"
HALVES = ("A", "B")
DEFAULT_KMEANS, DEFAULT_NORMALISE = KMEANS_KINDS[0], NORMALISATIONS[0]
# Probe models (for "loss" / "grad" scores) are trained with this seed whatever the trial's.
PROBE_SEED = 0
# The train images behind the FID floors are a permutation of the split with this seed.
FLOOR_SEED = 0


def _ref(
    stage: str, inputs: dict[str, Any], upstream: dict[str, StageRef] | None = None
) -> StageRef:
    return StageRef(stage, VERSIONS[stage], inputs, upstream or {})


def dataset(cfg: SweepConfig) -> StageRef:
    """The data set and its splits (a source stage: read from lfm_core.data, never copied)."""
    data = cfg.data
    inputs = {
        "name": data.name,
        "root": _location(data.root),
        "image_size": data.image_size,
        "limit": data.limit,
        "heldout_limit": data.heldout_limit,
    }
    if data.heldout_root is not None:  # only when set, so existing keys stay the same
        inputs["heldout_root"] = _location(data.heldout_root)
    return _ref("dataset", inputs)


def _location(path: str | None) -> str | None:
    """A data location as a key holds it: an s3:// URI as given, a local path absolute."""
    if path is None or path.startswith("s3://"):
        return path
    return str(Path(path).expanduser().resolve())


def autoencoder(cfg: SweepConfig) -> StageRef:
    """A pretrained autoencoder, or one trained on the train split; its held-out PSNR.

    `kind` enters the key only when it is not the default "kl", so KL keys stay as they were.
    """
    section = cfg.autoencoder
    if section.pretrained is not None:
        inputs: dict[str, Any] = {"pretrained": section.pretrained, "subfolder": section.subfolder}
    else:
        inputs = {"config": asdict(section.core())}
    if section.kind != "kl":
        inputs["kind"] = section.kind
    # Only when set, so existing keys stay the same; they change the held-out PSNR.
    if section.psnr_images is not None:
        inputs["psnr_images"] = section.psnr_images
    if section.train_images is not None and section.pretrained is None:
        inputs["train_images"] = section.train_images  # the training subset's size
    if section.autocast != "no":
        inputs["autocast"] = section.autocast
    return _ref("autoencoder", inputs, {"dataset": dataset(cfg)})


def latents(cfg: SweepConfig) -> StageRef:
    """Scaled latents (N, c, h, w) and labels (N,) of the train split (with hflip, also of
    the mirrored images; with autocast, encoded under it)."""
    inputs: dict[str, Any] = {}
    if cfg.data.hflip:
        inputs["hflip"] = True
    if cfg.autoencoder.autocast != "no":
        inputs["autocast"] = cfg.autoencoder.autocast
    upstream = {"dataset": dataset(cfg), "autoencoder": autoencoder(cfg)}
    return _ref("latents", inputs, upstream)


def extractor(cfg: SweepConfig, role: str) -> StageRef:
    """The feature extractor of a role ("clustering", "fid", "stability")."""
    section = getattr(cfg.features, role)
    return _ref("extractor", {"name": section.name, "path": section.path})


def data_features(cfg: SweepConfig, role: str, split: str) -> StageRef:
    """Features (N, D) of one split's images by the extractor of `role`."""
    upstream = {"dataset": dataset(cfg), "extractor": extractor(cfg, role)}
    return _ref("data_features", {"split": split}, upstream)


def subset(cfg: SweepConfig, fraction: float, criterion: str, seed: int) -> StageRef:
    """Indices of the train latents kept by `criterion` at `fraction`."""
    upstream: dict[str, StageRef] = {"latents": latents(cfg)}
    if fraction == 1.0:
        # Every criterion keeps everything: one shared subset, so one shared model.
        return _ref("subset", {"fraction": 1.0, "criterion": FULL_SUBSET}, upstream)
    inputs: dict[str, Any] = {"fraction": fraction, "criterion": criterion}
    scoring = cfg.scoring
    if criterion in SCORE_CRITERIA:
        # "loss" and "loss_lowest" keep opposite ends of one scores stage.
        upstream["scores"] = scores(cfg, criterion.removesuffix("_lowest"))
    else:
        inputs["seed"] = seed  # score criteria are deterministic: no seed in their key
    if criterion in FEATURE_CRITERIA:
        upstream["features"] = data_features(cfg, "clustering", "train")
    if criterion in CLUSTER_CRITERIA:
        inputs["num_clusters"] = scoring.num_clusters
        if scoring.kmeans != DEFAULT_KMEANS:  # keys of the default k-means stay as they were
            inputs["kmeans"] = scoring.kmeans
    if criterion in LABEL_CRITERIA:
        inputs.update(skew=scoring.skew, skew_class=scoring.skew_class)
    if criterion == "cluster_mix":
        inputs["mix_nearest"] = scoring.mix_nearest
    return _ref("subset", inputs, upstream)


def half(cfg: SweepConfig, which: str, seed: int) -> StageRef:
    """Half "A" or "B" of the train latents: two disjoint sets of N // 2 indices of a seeded
    permutation (the stability-across-data experiment trains one model on each)."""
    if which not in HALVES:
        raise ValueError(f"half: {which!r} is not one of {', '.join(HALVES)}")
    inputs = {"fraction": 0.5, "criterion": HALF_SUBSET, "half": which, "seed": seed}
    return _ref("subset", inputs, {"latents": latents(cfg)})


def fm_model(
    cfg: SweepConfig,
    subset_ref: StageRef,
    name: str,
    width: int | None,
    steps: int,
    seed: int,
    snapshot_every: int | None = None,
) -> StageRef:
    """A velocity model trained on a subset (its EMA weights; with `snapshot_every`, also
    the EMA weights every that many steps and the training time to each)."""
    train = replace(cfg.train, steps=steps, seed=seed)
    inputs: dict[str, Any] = {
        "name": name,
        "width": width,
        "conditional": cfg.data.conditional,
        "train": asdict(train),
        # Each rank draws its own batches, so the world size changes the model.
        "num_workers": cfg.resources.num_workers,
    }
    if snapshot_every:
        inputs["snapshot_every"] = snapshot_every
    return _ref("fm_model", inputs, {"latents": latents(cfg), "subset": subset_ref})


def probe(cfg: SweepConfig) -> StageRef:
    """The early full-data model whose per-sample losses or gradients score the data."""
    full = subset(cfg, 1.0, FULL_SUBSET, PROBE_SEED)
    model = cfg.model
    return fm_model(cfg, full, model.name, model.width, cfg.scoring.probe_steps, PROBE_SEED)


def scores(cfg: SweepConfig, kind: str) -> StageRef:
    """Per-sample scores (N,) of kind "loss" or "grad" from the probe model."""
    inputs: dict[str, Any] = {"kind": kind, "num_noise": cfg.scoring.num_noise, "seed": PROBE_SEED}
    if cfg.scoring.normalise != DEFAULT_NORMALISE:
        inputs["normalise"] = cfg.scoring.normalise
    return _ref("scores", inputs, {"latents": latents(cfg), "probe": probe(cfg)})


def reference(cfg: SweepConfig, seed: int) -> StageRef:
    """The full-data reference model (the fine model of coarse-to-fine trials)."""
    ref, full = cfg.reference, subset(cfg, 1.0, FULL_SUBSET, seed)
    steps = ref.steps or cfg.train.steps
    return fm_model(cfg, full, ref.name, ref.width, steps, seed, cfg.sampling.fid_every)


def _sampling_inputs(cfg: SweepConfig) -> dict[str, Any]:
    sampling = cfg.sampling
    inputs: dict[str, Any] = {
        "steps": sampling.steps,
        "solver": sampling.solver,
        "first_seed": sampling.first_seed,
        "guidance_scale": sampling.guidance_scale,
    }
    # Only when set / not the default, so the keys of existing sweeps stay the same.
    if sampling.cfg_channels is not None:
        inputs["cfg_channels"] = sampling.cfg_channels
    if sampling.grid != "uniform":
        inputs["grid"] = sampling.grid
    return inputs


def samples(
    cfg: SweepConfig, model: StageRef, fine: StageRef | None = None, t_split: float | None = None
) -> StageRef:
    """Decoded samples of the fixed seeds with their FID and stability features."""
    inputs = {**_sampling_inputs(cfg), "num_samples": cfg.sampling.num_samples, "t_split": t_split}
    upstream = {
        "model": model,
        "autoencoder": autoencoder(cfg),
        "fid_extractor": extractor(cfg, "fid"),
        "stability_extractor": extractor(cfg, "stability"),
    }
    if fine is not None:
        upstream["fine"] = fine
    return _ref("samples", inputs, upstream)


def t_split_choice(cfg: SweepConfig, coarse: StageRef, fine: StageRef) -> StageRef:
    """The largest t_split of a pair within the similarity budget (lfm_core.choose_t_split)."""
    sampling = cfg.sampling
    inputs = {
        **_sampling_inputs(cfg),
        "budget": sampling.t_split_budget,
        "calibration": sampling.t_split_calibration,
        "candidates": list(T_SPLIT_CANDIDATES),
    }
    upstream = {
        "model": coarse,
        "fine": fine,
        "autoencoder": autoencoder(cfg),
        "stability_extractor": extractor(cfg, "stability"),
    }
    return _ref("t_split_choice", inputs, upstream)


def timing(
    cfg: SweepConfig, model: StageRef, ref_model: StageRef, t_split: float | None
) -> StageRef:
    """Sampling time of (model -> reference at t_split) against the reference alone, on one
    batch, and the FLOP bound of that speedup."""
    sampling = cfg.sampling
    inputs = {
        **_sampling_inputs(cfg),
        "t_split": t_split,
        "repeats": sampling.timing_repeats,
        "batch": min(sampling.batch_size, sampling.num_samples),
    }
    return _ref("timing", inputs, {"model": model, "reference": ref_model})


def fid_curve(cfg: SweepConfig, model: StageRef) -> StageRef:
    """FID of a model's EMA snapshots (`sampling.fid_every`) on the seeds of its samples stage;
    the last point is the final model's own samples."""
    upstream = {"samples": samples(cfg, model), "reference_stats": reference_stats(cfg)}
    return _ref("fid_curve", {}, upstream)


def floors(cfg: SweepConfig) -> StageRef:
    """The FID floors: `sampling.num_samples` seeded train images (the data itself) and their
    autoencoder reconstructions (a perfect latent model) against the FID reference."""
    inputs = {"num_samples": cfg.sampling.num_samples, "seed": FLOOR_SEED}
    upstream = {
        "dataset": dataset(cfg),
        "autoencoder": autoencoder(cfg),
        "fid_extractor": extractor(cfg, "fid"),
        "reference_stats": reference_stats(cfg),
    }
    return _ref("floors", inputs, upstream)


def seam_state(cfg: SweepConfig, fine: StageRef, t_split: float) -> StageRef:
    """Every training latent's seam state: the fine model's ODE run backwards from it (t = 1)
    to t_split with the sampling solver and grid (lfm_core.coarse_to_fine.seam_states).

    One per (fine model, latents, t_split, ODE settings): subsets of the same latents share it.
    """
    sampling = cfg.sampling
    inputs = {"t_split": t_split, "steps": sampling.steps, "solver": sampling.solver}
    if sampling.grid != "uniform":
        inputs["grid"] = sampling.grid
    return _ref("seam_state", inputs, {"fine": fine, "latents": latents(cfg)})


def seam_model(
    cfg: SweepConfig, coarse: StageRef, fine: StageRef, subset_ref: StageRef, t_split: float
) -> StageRef:
    """The coarse model fine-tuned on its own subset with SeamLoss against `fine` at t_split
    (`coarse_to_fine.seam_steps` steps of the `train` settings, from the coarse model's EMA
    weights; its EMA weights)."""
    section = cfg.coarse_to_fine
    train = replace(cfg.train, steps=section.steps(cfg.train.steps))
    inputs = {
        "t_split": t_split,
        "weight": section.seam_weight,
        "train": asdict(train),
        "num_workers": cfg.resources.num_workers,
    }
    upstream = {
        "coarse": coarse,
        "fine": fine,
        "seam_state": seam_state(cfg, fine, t_split),
        "latents": latents(cfg),
        "subset": subset_ref,
    }
    return _ref("seam_model", inputs, upstream)


def reference_stats(cfg: SweepConfig) -> StageRef:
    """Gaussian statistics (mu, sigma) of the FID reference features: the held-out split's,
    or those of the `features.fid_stats` .npz (its path and content hash in the key)."""
    if cfg.features.fid_stats is not None:
        path = Path(cfg.features.fid_stats).expanduser().resolve()
        return _ref("reference_stats", {"npz": str(path), "sha256": file_sha256(path)})
    return _ref("reference_stats", {}, {"features": data_features(cfg, "fid", "heldout")})


@dataclass(frozen=True)
class TrialRefs:
    """The stages behind one trial's metrics.

    Attributes:
        subset: the training subset. model: the trial's FM model. reference: the reference
        model. samples: the trial's samples (coarse-to-fine when t_split is set).
        model_samples: the trial model's own samples. reference_samples: the reference's.
        metrics: the trial's metrics. t_split: the t_split sampled at (an "auto" trial's
        chosen one; None: a single model). seam_model: the seam-fine-tuned coarse model
        (coarse_to_fine.seam; else None).
    """

    subset: StageRef
    model: StageRef
    reference: StageRef
    samples: StageRef
    model_samples: StageRef
    reference_samples: StageRef
    metrics: StageRef
    t_split: float | None = None
    seam_model: StageRef | None = None


@dataclass(frozen=True)
class PairRefs:
    """The stages a trial's t_split depends on: its subset, model, the reference and (for a
    coarse-to-fine trial) their t_split_choice stage."""

    subset: StageRef
    model: StageRef
    reference: StageRef
    choice: StageRef | None


def pair(cfg: SweepConfig, point: Trial) -> PairRefs:
    """A trial's model, the reference and their t_split choice: what an "auto" trial builds
    before it knows its t_split."""
    subset_ref = subset(cfg, point.data_fraction, point.criterion, point.seed)
    width = cfg.model.width if point.width is None else point.width
    every = cfg.sampling.fid_every
    model = fm_model(cfg, subset_ref, cfg.model.name, width, cfg.train.steps, point.seed, every)
    ref_model = reference(cfg, point.seed)
    choice = None if point.t_split is None else t_split_choice(cfg, model, ref_model)
    return PairRefs(subset_ref, model, ref_model, choice)


def _seam_upstream(
    cfg: SweepConfig, refs: PairRefs, t_split: float
) -> tuple[StageRef, dict[str, StageRef]]:
    """The seam model of a coarse-to-fine trial and the metrics' extra inputs it brings."""
    tuned = seam_model(cfg, refs.model, refs.reference, refs.subset, t_split)
    return tuned, {
        "seam_samples": samples(cfg, tuned, refs.reference, t_split),
        "seam_timing": timing(cfg, tuned, refs.reference, t_split),
    }


def trial(cfg: SweepConfig, point: Trial, chosen: float | None = None) -> TrialRefs:
    """Every stage a trial's metrics depend on.

    An "auto" trial needs `chosen`, the t_split its t_split_choice stage (`pair(...).choice`)
    chose: it then has the very stages of an explicit trial at that t_split (samples, timing,
    metrics), so the two share them.

    Raises:
        ValueError: an "auto" trial without `chosen`.
    """
    refs = pair(cfg, point)
    t_split = point.t_split
    if point.auto:
        if chosen is None:
            raise ValueError(f"trial {point.name}: t_split auto needs the chosen t_split")
        t_split = chosen
    assert not isinstance(t_split, str)
    model, ref_model = refs.model, refs.reference
    model_samples, reference_samples = samples(cfg, model), samples(cfg, ref_model)
    trial_samples = model_samples if t_split is None else samples(cfg, model, ref_model, t_split)
    upstream = {
        "subset": refs.subset,
        "model": model,
        "samples": trial_samples,
        "model_samples": model_samples,
        "reference_samples": reference_samples,
        "heldout_features": data_features(cfg, "fid", "heldout"),
        "reference_stats": reference_stats(cfg),
        "timing": timing(cfg, model, ref_model, t_split),
    }
    tuned = None
    if refs.choice is not None:
        upstream["t_split_choice"] = refs.choice
    if not streams(cfg):
        upstream["floors"] = floors(cfg)
    if cfg.sampling.fid_every is not None and t_split is None:
        upstream["fid_curve"] = fid_curve(cfg, model)
    if t_split is not None and cfg.coarse_to_fine.seam:
        tuned, extra = _seam_upstream(cfg, refs, t_split)
        upstream.update(extra)
    metrics = _ref("metrics", {"t_split": t_split}, upstream)
    return TrialRefs(
        refs.subset,
        model,
        ref_model,
        trial_samples,
        model_samples,
        reference_samples,
        metrics,
        t_split,
        tuned,
    )


def streams(cfg: SweepConfig) -> bool:
    """The data set is an image folder read as a stream (not an embedded set held in memory)."""
    return cfg.data.name == FOLDER_DATA


def stages_of(cfg: SweepConfig, point: Trial, chosen: float | None = None) -> list[StageRef]:
    """The cached stages a trial needs (source stages excluded), upstream first.

    An "auto" trial without `chosen` lists the stages up to its t_split_choice (the rest
    depends on the choice).
    """
    if point.auto and chosen is None:
        choice = pair(cfg, point).choice
        assert choice is not None
        found = choice.closure()
    else:
        found = trial(cfg, point, chosen).metrics.closure()
    order = list(VERSIONS)
    refs = [ref for ref in found.values() if ref.stage not in SOURCE_STAGES]
    return sorted(refs, key=lambda ref: order.index(ref.stage))
