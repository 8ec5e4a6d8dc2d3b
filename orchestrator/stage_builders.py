"""Stage builders: one function per stage, writing its files into an empty folder.

`build(graph, ref, folder)` reads its stage's own values from `ref.inputs`, its upstream
stages through `graph` (which builds them first when missing) and nothing from the sweep
config: what a stage writes is a function of its key (`orchestrator.stage_keys`), while the
graph's `Execution` settings decide only where and how fast it runs. Tensors are written as
safetensors, small facts as JSON, models through lfm_core (diffusers `save_pretrained` for the
autoencoder, `lfm_core.checkpoint` for velocity networks). All maths is lfm_core's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lfm_core.autoencoder import (
    AutoencoderConfig,
    decode,
    encode,
    load_autoencoder,
    reconstruction_psnr,
    train_autoencoder,
)
from lfm_core.checkpoint import load_velocity, save_velocity
from lfm_core.coarse_to_fine import choose_t_split, seam_states, seam_time
from lfm_core.criteria import LABEL_CRITERIA, labels_needed, per_sample_scores, select
from lfm_core.errors import ConfigError
from lfm_core.features import build_feature_extractor
from lfm_core.flops import flop_speedup_bound, forward_flops
from lfm_core.metrics import ReferenceStats, fid, precision_recall, stability
from lfm_core.sampling import guided, seed_labels, time_against_reference
from lfm_core.solvers import seeded_noise
from lfm_core.train import LatentSource, LossFn, TensorLatents, TrainConfig, seam_loss
from lfm_core.velocity import VelocityConfig
from lfm_core.vq_autoencoder import as_autoencoder, load_vq_autoencoder, train_vq_autoencoder
from orchestrator.cache import StageCache, StageRef
from orchestrator.datasets import (
    Encoding,
    ShardedLatents,
    is_sharded,
    write_features,
    write_latents,
)
from orchestrator.sample_workers import sample_stage, stack
from orchestrator.schema import CHOSEN_T_SPLIT, FID_SEAM, QUALITY_TOLERANCE
from orchestrator.stage_keys import FULL_SUBSET, HALF_SUBSET, HALVES
from orchestrator.trainers import FitJob

if TYPE_CHECKING:
    from orchestrator.stages import StageGraph

# Same-seed pairs shuffled with this seed give the "unrelated" stability baseline.
UNRELATED_SEED = 0
# Files of the stages (each tensor file holds the named tensors).
LATENTS_FILE = "latents.safetensors"  # latents (N, c, h, w), labels (N,)
FEATURES_FILE = "features.safetensors"  # features (N, D)
INDICES_FILE = "indices.safetensors"  # indices (n,)
SCORES_FILE = "scores.safetensors"  # scores (N,)
SEAM_FILE = "seam_states.safetensors"  # states (N, c, h, w), at the info's seam_time
SAMPLES_FILE = "samples.safetensors"  # grid, features_fid, features_stability[, latents, labels]
STATS_FILE = "stats.npz"  # mu (D,), sigma (D, D), n
METRICS_FILE = "metrics.json"
INFO_FILE = "info.json"
# Criterion options a subset key may hold (lfm_core.criteria.select keyword arguments).
SELECT_OPTIONS = ("kmeans", "skew", "skew_class", "mix_nearest")
SNAPSHOTS_DIR = "snapshots"
# In an fm_model stage's info.json: [[step, loss], ...], the training loss curve.
LOSS_HISTORY = "loss_history"

Builder = Callable[["StageGraph", StageRef, Path], None]


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def read_info(folder: Path) -> dict[str, Any]:
    """The `info.json` facts of a stage folder."""
    return json.loads((folder / INFO_FILE).read_text())


def load_training_data(
    cache: StageCache, latents: StageRef, subset: StageRef, conditional: bool
) -> tuple[Tensor | LatentSource, Tensor | None]:
    """The training data of a subset; runs on the training workers.

    Returns:
        (latents (n, C, H, W), labels (n,) or None) of an embedded data set, or (with flips)
        a `TensorLatents` and None; of a sharded (folder) stage, a `ShardedLatents` over the
        subset's rows and None: each worker reads its own rows (`ShardedLatents.for_rank`).
    """
    folder = cache.local_dir(latents)
    indices = load_file(str(cache.local_dir(subset) / INDICES_FILE))["indices"]
    if is_sharded(folder):
        return ShardedLatents(folder, indices.numpy(), conditional), None
    tensors = load_file(str(folder / LATENTS_FILE))
    labels = tensors["labels"][indices] if conditional else None
    if "latents_flip" in tensors:
        flipped = tensors["latents_flip"][indices]
        return TensorLatents(tensors["latents"][indices], labels, flipped), None
    return tensors["latents"][indices], labels


def build_autoencoder(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    inputs, data, execution = ref.inputs, ref.upstream["dataset"], graph.execution
    vq = inputs.get("kind", "kl") == "vq"  # lfm_core.vq_autoencoder (diffusers' VQModel)
    if "pretrained" in inputs and vq:
        vae = as_autoencoder(load_vq_autoencoder(inputs["pretrained"], inputs["subfolder"]))
    elif "pretrained" in inputs:
        vae = load_autoencoder(inputs["pretrained"], inputs["subfolder"])
    else:
        config = AutoencoderConfig(**inputs["config"])
        sample = inputs.get("train_images")
        images = graph.split(data, "train", sample=sample, seed=config.seed).images
        if vq:
            trained = train_vq_autoencoder(images, config, execution.progress, execution.device)
            vae = as_autoencoder(trained)
        else:
            vae = train_autoencoder(
                images, config, progress=execution.progress, device=execution.device
            )
    vae.save_pretrained(folder / "vae")
    nn.Module.to(vae, execution.device)
    heldout = graph.split(data, "heldout", inputs.get("psnr_images")).images
    psnr = reconstruction_psnr(
        vae,
        heldout,
        execution.encode_batch_size,
        autocast=inputs.get("autocast", "no"),
        decode_batch_size=execution.decode_batch_size,
    )
    info = {"heldout_psnr": psnr, "scaling_factor": float(vae.config["scaling_factor"])}
    write_json(folder / INFO_FILE, info)


def build_latents(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """Embedded data: one latents file. A folder: shards, encoded by a Ray Data actor pool."""
    data, hflip = ref.upstream["dataset"], ref.inputs.get("hflip", False)
    autocast = ref.inputs.get("autocast", "no")
    if graph.streams(data):
        encoding = Encoding(graph.cache, ref.upstream["autoencoder"], hflip, autocast)
        info = write_latents(
            graph.image_source(data, "train"), encoding, graph.execution.data_pool, folder
        )
        write_json(folder / INFO_FILE, info)
        return
    train = graph.split(data, "train")
    vae = graph.load_autoencoder(ref.upstream["autoencoder"])
    batch, progress = graph.execution.encode_batch_size, graph.execution.progress
    latents = encode(vae, train.images, batch, progress, autocast)
    tensors = {"latents": latents, "labels": train.labels}
    if hflip:
        tensors["latents_flip"] = encode(vae, train.images.flip(-1), batch, progress, autocast)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / LATENTS_FILE))
    write_json(folder / INFO_FILE, {"shape": list(latents.shape), "num_classes": train.num_classes})


def build_extractor(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    # The extractor's own weights (a trained classifier, or a hub download) land in the folder.
    extractor = build_feature_extractor(ref.inputs["name"], folder, ref.inputs["path"])
    info = {"name": extractor.name, "dim": extractor.dim}
    accuracy = getattr(extractor, "heldout_accuracy", None)  # trained extractors record it
    if accuracy is not None:
        info["heldout_accuracy"] = float(accuracy)
    write_json(folder / INFO_FILE, info)


def build_data_features(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """Embedded data: one features file. A folder: shards "features", by an actor pool."""
    data, split = ref.upstream["dataset"], ref.inputs["split"]
    if graph.streams(data):
        source = graph.image_source(data, split)
        pool = replace(graph.execution.data_pool, batch_size=graph.execution.feature_batch_size)
        info = write_features(source, graph.cache, ref.upstream["extractor"], pool, folder)
        write_json(folder / INFO_FILE, info)
        return
    extractor = graph.load_extractor(ref.upstream["extractor"])
    images = graph.split(data, split).images
    features = extractor(images, progress=graph.execution.progress)
    save_file({"features": features.contiguous()}, str(folder / FEATURES_FILE))


def build_subset(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    labels = graph.tensors(ref.upstream["latents"], LATENTS_FILE, ["labels"])["labels"]
    n, inputs = labels.shape[0], ref.inputs
    if inputs["criterion"] == FULL_SUBSET:
        indices = torch.arange(n)
    elif inputs["criterion"] == HALF_SUBSET:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(inputs["seed"]))
        start = (n // 2) * HALVES.index(inputs["half"])
        indices = order[start : start + n // 2].sort().values
    else:
        up = ref.upstream
        features = (
            graph.tensors(up["features"], FEATURES_FILE)["features"] if "features" in up else None
        )
        scores = graph.tensors(up["scores"], SCORES_FILE)["scores"] if "scores" in up else None
        options = {key: inputs[key] for key in SELECT_OPTIONS if key in inputs}
        indices = select(
            inputs["criterion"],
            inputs["fraction"],
            features=features,
            scores=scores,
            num_clusters=inputs.get("num_clusters"),
            seed=inputs.get("seed", 0),
            num_samples=n,
            labels=labels if inputs["criterion"] in LABEL_CRITERIA else None,
            **options,
        )
    save_file({"indices": indices.contiguous()}, str(folder / INDICES_FILE))
    info = {"size": int(indices.numel()), "labels_used": labels_needed(labels, indices)}
    write_json(folder / INFO_FILE, info)


def build_scores(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    device = graph.execution.device
    tensors = graph.tensors(ref.upstream["latents"], LATENTS_FILE)
    probe = graph.load_model(ref.upstream["probe"])
    labels = tensors["labels"].to(device) if probe.config.num_classes else None
    scores = per_sample_scores(
        probe,
        tensors["latents"].to(device),
        kind=ref.inputs["kind"],
        num_noise=ref.inputs["num_noise"],
        seed=ref.inputs["seed"],
        batch_size=graph.execution.score_batch_size,
        labels=labels,
        progress=graph.execution.progress,
        normalise=ref.inputs.get("normalise", "mean"),
    )
    save_file({"scores": scores.contiguous()}, str(folder / SCORES_FILE))


def build_fm_model(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    latents_ref, subset_ref, inputs = ref.upstream["latents"], ref.upstream["subset"], ref.inputs
    shape, num_classes = graph.info(latents_ref)["shape"], graph.info(latents_ref)["num_classes"]
    velocity = VelocityConfig(
        name=inputs["name"],
        in_channels=shape[1],
        sample_size=shape[-1],
        num_classes=num_classes if inputs["conditional"] else 0,
        width=inputs["width"],
    )
    train = TrainConfig(**inputs["train"])
    data_fn = functools.partial(
        load_training_data, graph.cache, latents_ref, subset_ref, inputs["conditional"]
    )
    job = FitJob(
        data_fn,
        velocity,
        train,
        inputs["num_workers"],
        run_name=f"fm_model-{ref.key[:16]}",
        snapshot_every=inputs.get("snapshot_every"),
    )
    result = graph.execution.trainer.fit(job)
    save_velocity(folder, result.ema, {"train": asdict(train)})
    info: dict[str, Any] = {"train_" + k: v for k, v in result.metrics.items()}
    info[LOSS_HISTORY] = [[step, loss] for step, loss in result.losses]
    for snapshot in result.snapshots:
        save_velocity(
            folder / snapshot_folder(snapshot.step), snapshot.ema, {"train": asdict(train)}
        )
    if result.snapshots:
        info["snapshots"] = {str(s.step): s.seconds for s in result.snapshots}
    write_json(folder / INFO_FILE, info)


def snapshot_folder(step: int) -> str:
    """Where an fm_model stage keeps the EMA weights at `step` (with `snapshot_every`)."""
    return f"{SNAPSHOTS_DIR}/step-{step:07d}"


def _seeds(inputs: Any, count: int) -> list[int]:
    return list(range(inputs["first_seed"], inputs["first_seed"] + count))


def build_samples(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    results = sample_stage(graph, ref)
    save_file(stack(results), str(folder / SAMPLES_FILE))
    first = ref.inputs["first_seed"]
    info = {
        "seconds": sum(r.seconds for r in results),
        "nfe_coarse": sum(r.nfe_coarse for r in results),
        "nfe_fine": sum(r.nfe_fine for r in results),
        "seeds": [first, first + ref.inputs["num_samples"] - 1],
    }
    write_json(folder / INFO_FILE, info)


def build_seam_state(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """Seam states (N, c, h, w) of every training latent, a sampling batch at a time (a
    conditional fine model integrates with each latent's own label, as the paper's)."""
    inputs, batch = ref.inputs, graph.execution.sample_batch_size
    fine = graph.load_model(ref.upstream["fine"])
    tensors = graph.tensors(ref.upstream["latents"], LATENTS_FILE)
    latents, labels, device = tensors["latents"], tensors["labels"], graph.execution.device
    grid = inputs.get("grid", "uniform")
    states = []
    for start in range(0, latents.shape[0], batch):
        rows = slice(start, start + batch)
        cond = {"class_labels": labels[rows].to(device)} if fine.config.num_classes else {}
        x_s = seam_states(
            fine,
            latents[rows].to(device),
            inputs["t_split"],
            steps=inputs["steps"],
            method=inputs["solver"],
            grid=grid,
            **cond,
        )
        states.append(x_s.float().cpu())
    save_file({"states": torch.cat(states).contiguous()}, str(folder / SEAM_FILE))
    time = seam_time(inputs["t_split"], inputs["steps"], grid)
    write_json(folder / INFO_FILE, {"seam_time": time, "n": int(latents.shape[0])})


def load_seam_data(
    cache: StageCache, latents: StageRef, subset: StageRef, states: StageRef, conditional: bool
) -> tuple[TensorLatents, None]:
    """A subset's latents with their seam states as the loss's `seam_state` rows; runs on the
    training workers."""
    rows, labels = load_training_data(cache, latents, subset, conditional)
    if not isinstance(rows, Tensor):
        raise ConfigError("coarse_to_fine.seam: needs embedded latents without data.hflip")
    indices = load_file(str(cache.local_dir(subset) / INDICES_FILE))["indices"]
    seam = load_file(str(cache.local_dir(states) / SEAM_FILE))["states"][indices]
    return TensorLatents(rows, labels, extras={"seam_state": seam}), None


def load_cached_model(cache: StageCache, model: StageRef) -> Any:
    """The EMA velocity model of an fm_model / seam_model stage, on the CPU; runs on workers."""
    return load_velocity(cache.local_dir(model))


def make_seam_loss(
    cache: StageCache, fine: StageRef, states: StageRef, weight: float, train: TrainConfig
) -> LossFn:
    """The SeamLoss of a seam_model stage (at its seam states' seam time); runs on workers."""
    time = read_info(cache.local_dir(states))["seam_time"]
    return seam_loss(load_cached_model(cache, fine), time, weight, train)


def build_seam_model(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """The coarse model fine-tuned with SeamLoss by the graph's trainer (Ray Train in sweeps)."""
    up, inputs, cache = ref.upstream, ref.inputs, graph.cache
    coarse = graph.load_model(up["coarse"])
    train = TrainConfig(**inputs["train"])
    conditional = up["coarse"].inputs["conditional"]
    job = FitJob(
        functools.partial(
            load_seam_data, cache, up["latents"], up["subset"], up["seam_state"], conditional
        ),
        coarse.config,
        train,
        inputs["num_workers"],
        run_name=f"seam_model-{ref.key[:16]}",
        start_fn=functools.partial(load_cached_model, cache, up["coarse"]),
        loss_fn=functools.partial(
            make_seam_loss, cache, up["fine"], up["seam_state"], inputs["weight"], train
        ),
    )
    result = graph.execution.trainer.fit(job)
    save_velocity(folder, result.ema, {"train": asdict(train)})
    info: dict[str, Any] = {"train_" + k: v for k, v in result.metrics.items()}
    info[LOSS_HISTORY] = [[step, loss] for step, loss in result.losses]
    write_json(folder / INFO_FILE, info)


def build_reference_stats(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    if "npz" in ref.inputs:
        stats = ReferenceStats.load_npz(ref.inputs["npz"])
    else:
        heldout = graph.tensors(ref.upstream["features"], FEATURES_FILE)["features"]
        stats = ReferenceStats.from_features(heldout)
    stats.save_npz(folder / STATS_FILE)
    write_json(folder / INFO_FILE, {"n": stats.n, "dim": int(stats.mu.numel())})


def fid_reference(graph: StageGraph, stats_ref: StageRef, features: Tensor) -> ReferenceStats:
    """The FID reference statistics of a reference_stats stage, checked against features
    (N, D) of the fid extractor.

    Raises:
        ConfigError: the statistics have another dimension (an .npz of other features).
    """
    stats = graph.reference_stats(stats_ref)
    if stats.mu.numel() != features.shape[1]:
        raise ConfigError(
            f"features.fid_stats: the reference has {stats.mu.numel()}-d features, the fid "
            f"extractor gives {features.shape[1]}-d ones"
        )
    return stats


def build_floors(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """FID of seeded train images and of their reconstructions against the FID reference."""
    up, inputs, execution = ref.upstream, ref.inputs, graph.execution
    train = graph.split(up["dataset"], "train").images
    generator = torch.Generator().manual_seed(inputs["seed"])
    images = train[torch.randperm(len(train), generator=generator)[: inputs["num_samples"]]]
    vae, autocast = (
        graph.load_autoencoder(up["autoencoder"]),
        up["autoencoder"].inputs.get("autocast", "no"),
    )
    latents = encode(vae, images.to(execution.device), execution.encode_batch_size, False, autocast)
    reconstructions = decode(vae, latents, execution.decode_batch_size, False, autocast)
    extractor = graph.load_extractor(up["fid_extractor"])
    features = extractor(images, progress=False)
    stats = fid_reference(graph, up["reference_stats"], features)
    info = {
        "fid_data": fid(features, stats),
        "fid_autoencoder": fid(extractor(reconstructions, progress=False), stats),
        "num_images": int(images.shape[0]),
    }
    write_json(folder / INFO_FILE, info)


def build_fid_curve(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    """FID of every EMA snapshot of the samples stage's model, on that stage's seeds."""
    final = ref.upstream["samples"]
    model, features = final.upstream["model"], graph.load_samples(final)["features_fid"]
    stats = fid_reference(graph, ref.upstream["reference_stats"], features)
    last_step = model.inputs["train"]["steps"]
    points = []
    for step, seconds in graph.snapshots(model):
        if step == last_step:
            continue  # the final weights: their samples stage is the curve's last point
        at_step = replace(final, inputs={**final.inputs, "snapshot": step})
        points.append(
            (step, seconds, fid(stack(sample_stage(graph, at_step))["features_fid"], stats))
        )
    train_seconds = float(graph.info(model).get("train_elapsed_s", float("nan")))
    points.append((last_step, train_seconds, fid(features, stats)))
    curve = {
        name: [point[i] for point in points] for i, name in enumerate(("steps", "seconds", "fid"))
    }
    write_json(folder / INFO_FILE, curve)


def to_quality(curve: dict[str, Any], target_fid: float) -> tuple[float, float]:
    """(step, training seconds) of a curve's first point within QUALITY_TOLERANCE of
    `target_fid`; (NaN, NaN) when none is."""
    limit = (1 + QUALITY_TOLERANCE) * target_fid
    for step, seconds, value in zip(curve["steps"], curve["seconds"], curve["fid"], strict=True):
        if value <= limit:
            return float(step), float(seconds)
    return float("nan"), float("nan")


def build_t_split_choice(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    up, inputs, device = ref.upstream, ref.inputs, graph.execution.device
    coarse, fine = graph.load_model(up["model"]), graph.load_model(up["fine"])
    vae = graph.load_autoencoder(up["autoencoder"])
    extractor = graph.load_extractor(up["stability_extractor"])
    seeds = _seeds(inputs, inputs["calibration"])
    config = coarse.config
    labels = seed_labels(coarse, seeds, device)

    def embed(latents: Tensor) -> Tensor:
        return extractor(decode(vae, latents, progress=False), progress=False)

    channels = inputs.get("cfg_channels")
    choice = choose_t_split(
        guided(coarse, labels, inputs["guidance_scale"], channels),
        guided(fine, labels, inputs["guidance_scale"], channels),
        seeded_noise(
            seeds, (config.in_channels, config.sample_size, config.sample_size), device=device
        ),
        budget=inputs["budget"],
        candidates=inputs["candidates"],
        features=embed,
        steps=inputs["steps"],
        method=inputs["solver"],
        grid=inputs.get("grid", "uniform"),
    )
    similarity = {str(t): s for t, s in sorted(choice.similarity.items())}
    write_json(folder / INFO_FILE, {"t_split": choice.t_split, "similarity": similarity})


def build_timing(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    inputs = ref.inputs
    model, reference = (
        graph.load_model(ref.upstream["model"]),
        graph.load_model(ref.upstream["reference"]),
    )
    t_split = 1.0 if inputs["t_split"] is None else inputs["t_split"]
    settings = graph.sampler(inputs)
    timing = time_against_reference(
        model, reference, _seeds(inputs, inputs["batch"]), t_split, settings, inputs["repeats"]
    )
    config = model.config
    probe = seeded_noise(
        [inputs["first_seed"]],
        (config.in_channels, config.sample_size, config.sample_size),
        device=settings.device,
    )
    flops_model, flops_reference = forward_flops(model, probe), forward_flops(reference, probe)
    info = {
        **asdict(timing),
        "flop_speedup": flop_speedup_bound(
            flops_model, flops_reference, timing.nfe_coarse, timing.nfe_fine
        ),
    }
    write_json(folder / INFO_FILE, info)


def build_metrics(graph: StageGraph, ref: StageRef, folder: Path) -> None:
    up = ref.upstream
    samples = graph.load_samples(up["samples"])
    model_samples = graph.load_samples(up["model_samples"])
    reference_samples = graph.load_samples(up["reference_samples"])
    heldout = graph.tensors(up["heldout_features"], FEATURES_FILE)["features"]
    stats = fid_reference(graph, up["reference_stats"], samples["features_fid"])
    precision, recall = precision_recall(heldout, samples["features_fid"])
    result = stability(
        reference_samples["features_stability"], samples["features_stability"], seed=UNRELATED_SEED
    )
    timing, subset_info = graph.info(up["timing"]), graph.info(up["subset"])
    conditional = up["model"].inputs["conditional"]
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
        "speedup": timing["reference_s"] / timing["trial_s"],
        "flop_speedup": timing["flop_speedup"],
        "train_time_s": float(graph.info(up["model"]).get("train_elapsed_s", float("nan"))),
        "sample_time_s": float(graph.info(up["samples"])["seconds"]),
        "subset_size": float(subset_info["size"]),
        "labels_used": float(subset_info["labels_used"] if conditional else 0),
    }
    if "t_split_choice" in up:
        metrics[CHOSEN_T_SPLIT] = float(graph.info(up["t_split_choice"])["t_split"])
    if "floors" in up:
        floors = graph.info(up["floors"])
        metrics.update(
            fid_floor_data=floors["fid_data"], fid_floor_autoencoder=floors["fid_autoencoder"]
        )
    if "fid_curve" in up:
        steps, seconds = to_quality(graph.info(up["fid_curve"]), metrics["fid_reference"])
        metrics.update(steps_to_quality=steps, seconds_to_quality=seconds)
    if "seam_samples" in up:
        metrics.update(seam_metrics(graph, up, stats))
    write_json(folder / METRICS_FILE, metrics)


def seam_metrics(
    graph: StageGraph, up: Mapping[str, StageRef], stats: ReferenceStats
) -> dict[str, float]:
    """FID and speedup of the seam-fine-tuned coarse model's coarse-to-fine samples."""
    timing = graph.info(up["seam_timing"])
    return {
        FID_SEAM: fid(graph.load_samples(up["seam_samples"])["features_fid"], stats),
        "speedup_seam": timing["reference_s"] / timing["trial_s"],
        "flop_speedup_seam": timing["flop_speedup"],
    }


BUILDERS: dict[str, Builder] = {
    "autoencoder": build_autoencoder,
    "latents": build_latents,
    "extractor": build_extractor,
    "data_features": build_data_features,
    "subset": build_subset,
    "scores": build_scores,
    "fm_model": build_fm_model,
    "samples": build_samples,
    "reference_stats": build_reference_stats,
    "floors": build_floors,
    "fid_curve": build_fid_curve,
    "t_split_choice": build_t_split_choice,
    "seam_state": build_seam_state,
    "seam_model": build_seam_model,
    "timing": build_timing,
    "metrics": build_metrics,
}
