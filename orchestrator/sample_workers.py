"""Sampling one samples stage's seeds with N workers, the same bits as one.

The unit of work is one sampling batch (`Execution.sample_batch_size` consecutive seeds): it is
integrated, decoded and embedded by the FID and stability extractors in one go, and only its
features (and, for the first GRID_IMAGES seeds, its images) are kept, so a worker holds one
batch of images at a time. Batches are dealt to workers round-robin and put back in seed
order; since a batch's result depends on its seeds alone, any number of workers gives the
same tensors. One worker runs in this process; more run as Ray tasks (GPU tasks when
`resources.use_gpu`), each loading the models once from the shared cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from lfm_core.autoencoder import decode
from lfm_core.sampling import sample_seeds
from orchestrator.cache import StageCache, StageRef
from orchestrator.config import SweepConfig

if TYPE_CHECKING:
    from orchestrator.stages import StageGraph

GRID_IMAGES = 64
# Above this many samples a samples stage keeps features only, not every latent.
MAX_KEPT_LATENTS = 10_000
ROLES = ("fid", "stability")


@dataclass(frozen=True)
class BatchResult:
    """What one sampling batch leaves behind.

    Attributes:
        index: the batch's position in seed order.
        latents: (b, c, h, w) samples, or None when the stage keeps no latents.
        grid: images (g, C, H, W) of the batch's seeds among the first GRID_IMAGES (g may be 0).
        features: role -> (b, D) features of the decoded images.
        labels: (b,) class labels, or None for an unconditional model.
        seconds, nfe_coarse, nfe_fine: ODE time and function evaluations of the batch.
    """

    index: int
    latents: Tensor | None
    grid: Tensor
    features: dict[str, Tensor]
    labels: Tensor | None
    seconds: float
    nfe_coarse: int
    nfe_fine: int


def seed_batches(inputs: Mapping[str, Any], batch_size: int) -> list[list[int]]:
    """The stage's seeds (first_seed + i, i < num_samples) cut into batches of batch_size."""
    seeds = list(range(inputs["first_seed"], inputs["first_seed"] + inputs["num_samples"]))
    return [seeds[start : start + batch_size] for start in range(0, len(seeds), batch_size)]


def sample_batches(
    graph: StageGraph, ref: StageRef, batches: list[tuple[int, list[int]]]
) -> list[BatchResult]:
    """Sample, decode and embed the given (index, seeds) batches of a samples stage."""
    up, inputs = ref.upstream, ref.inputs
    coarse = graph.load_model(up["model"], inputs.get("snapshot"))  # fid_curve: a snapshot
    fine = graph.load_model(up["fine"]) if "fine" in up else coarse
    vae = graph.load_autoencoder(up["autoencoder"])
    extractors = {role: graph.load_extractor(up[f"{role}_extractor"]) for role in ROLES}
    t_split = 1.0 if inputs["t_split"] is None else inputs["t_split"]
    settings = graph.sampler(inputs)
    keep_latents = inputs["num_samples"] <= MAX_KEPT_LATENTS
    first_seed = inputs["first_seed"]
    results = []
    for index, seeds in tqdm(batches, desc="sample", disable=not graph.execution.progress):
        sampled = sample_seeds(coarse, fine, seeds, t_split, settings)
        images = decode(vae, sampled.latents, progress=False)
        in_grid = sum(seed - first_seed < GRID_IMAGES for seed in seeds)
        features = {
            role: extractor(images, progress=False) for role, extractor in extractors.items()
        }
        results.append(
            BatchResult(
                index=index,
                latents=sampled.latents if keep_latents else None,
                grid=images[:in_grid].clone(),
                features=features,
                labels=sampled.labels,
                seconds=sampled.seconds,
                nfe_coarse=sampled.nfe_coarse,
                nfe_fine=sampled.nfe_fine,
            )
        )
    return results


def _remote_batches(
    cfg: SweepConfig, cache: StageCache, ref: StageRef, batches: list[tuple[int, list[int]]]
) -> list[BatchResult]:
    """A Ray task: a graph of its own on the shared cache (every upstream stage is built)."""
    from orchestrator.stages import StageGraph

    return sample_batches(StageGraph(cfg, cache, progress=False), ref, batches)


def sample_stage(graph: StageGraph, ref: StageRef) -> list[BatchResult]:
    """Every batch of a samples stage, in seed order, by `Execution.sample_workers` workers."""
    batches = list(enumerate(seed_batches(ref.inputs, graph.execution.sample_batch_size)))
    workers = min(graph.execution.sample_workers, len(batches))
    if workers <= 1:
        return sample_batches(graph, ref, batches)
    import ray

    gpus = 1 if graph.cfg.resources.use_gpu else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_remote_batches)
    shares = [batches[worker::workers] for worker in range(workers)]
    pending = [task.remote(graph.cfg, graph.cache, ref, share) for share in shares]
    results = [result for part in ray.get(pending) for result in part]
    return sorted(results, key=lambda result: result.index)


def stack(results: list[BatchResult]) -> dict[str, Tensor]:
    """The samples stage's tensors: grid, features_<role>, and latents / labels when kept."""
    tensors = {"grid": torch.cat([r.grid for r in results])}
    for role in ROLES:
        tensors[f"features_{role}"] = torch.cat([r.features[role] for r in results])
    if all(r.latents is not None for r in results):
        tensors["latents"] = torch.cat([r.latents for r in results if r.latents is not None])
    if all(r.labels is not None for r in results):
        tensors["labels"] = torch.cat([r.labels for r in results if r.labels is not None])
    return {key: value.contiguous() for key, value in tensors.items()}
