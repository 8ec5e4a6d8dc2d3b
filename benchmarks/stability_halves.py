"""Stability across data: two FM models trained on disjoint halves of the data, same noise seeds.

The 4,000 embedded training latents are split by a seeded permutation into two disjoint halves
A and B of 2,000. Model A and model B are trained alike (same initial weights, same stream of
batch positions, t and noise: the same training seed), each on its own half. Both then sample
the same noise seeds, and same-seed similarity (lfm_core.metrics.stability: mean cosine of
paired features, plain and mean-centred) is set against the "unrelated" baseline (one side
permuted). A control model B' is trained on half B with another training seed (other initial
weights and noise stream), to show how much of the similarity survives without shared seeds.
Features: the mnist classifier's (the FID features) and raw pixels. The FID of each model and a
same-seed grid (rows A, B, B') are written too.

    python -m benchmarks.stability_halves [--tiny] [--train-steps 2000] [--model unet-s]
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    benchmark_main,
    load_average,
    machine,
    usable_cores,
    write_json,
)
from benchmarks.embedded import TINY_DATA, DataConfig, load_embedded, train_cached
from lfm_core.errors import check_choice, check_range
from lfm_core.images import save_comparison
from lfm_core.metrics import fid, stability
from lfm_core.solvers import METHODS
from lfm_core.train import TrainConfig
from lfm_core.velocity import VELOCITY_SIZES

NAME = "stability_halves"
GRID_COLUMNS = 16
PAIRS = {"A_vs_B": ("A", "B"), "A_vs_B_other_seed": ("A", "B_other_seed")}


@dataclass(frozen=True)
class HalvesConfig:
    """What the halves experiment trains and samples.

    Attributes:
        out: results folder (`stability_halves.json` and the grid PNG go there).
        data: the embedded data and its cache.
        model, width: the velocity network (width None: the size's default).
        train_steps, batch_size, lr: training of every model.
        split_seed: seed of the permutation that splits the data into halves.
        seed: training seed of A and B; the control B' uses seed + 1.
        num_samples, steps, solver, first_seed, sample_batch: the shared noise seeds and ODE.
        unrelated_seed: seed of the permutation behind the unrelated baseline.
        threads: torch threads. progress: show bars.
    """

    out: str = str(RESULTS_DIR)
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "unet-s"
    width: int | None = None
    train_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    split_seed: int = 0
    seed: int = 0
    num_samples: int = 1000
    steps: int = 60
    solver: str = "euler"
    first_seed: int = 0
    sample_batch: int = 500
    unrelated_seed: int = 0
    threads: int = field(default_factory=usable_cores)
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, VELOCITY_SIZES)
        check_choice("solver", self.solver, METHODS)
        for key in ("train_steps", "batch_size", "steps", "sample_batch", "threads"):
            check_range(key, getattr(self, key), 1, math.inf)
        check_range("num_samples", self.num_samples, 2, math.inf)


TINY = HalvesConfig(
    data=TINY_DATA,
    width=8,
    train_steps=4,
    batch_size=16,
    num_samples=16,
    steps=4,
    sample_batch=16,
    threads=1,
)


def split_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sorted index sets (n // 2 each) of a seeded permutation of range(n)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return order[:half].sort().values, order[half : 2 * half].sort().values


def run(cfg: HalvesConfig) -> dict[str, Any]:
    """Run the experiment; returns what it writes to `<out>/stability_halves.json`."""
    torch.set_num_threads(cfg.threads)
    started, load_start = time.perf_counter(), load_average()
    data = load_embedded(cfg.data, progress=cfg.progress)
    half_a, half_b = split_halves(len(data.latents), cfg.split_seed)
    assert not set(half_a.tolist()) & set(half_b.tolist())
    velocity = data.velocity_config(cfg.model, cfg.width)

    def train(seed: int) -> TrainConfig:
        return TrainConfig(
            steps=cfg.train_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            checkpoint_every=cfg.train_steps,
        )

    plan = {
        "A": (half_a, cfg.seed),
        "B": (half_b, cfg.seed),
        "B_other_seed": (half_b, cfg.seed + 1),
    }
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.num_samples))
    models: dict[str, dict[str, Any]] = {}
    features: dict[str, dict[str, torch.Tensor]] = {}
    grids = []
    for name, (indices, seed) in plan.items():
        trained = train_cached(data, velocity, train(seed), indices, progress=cfg.progress)
        latents = data.sample(trained.model, seeds, cfg.steps, cfg.solver, cfg.sample_batch)
        images = data.images(latents, progress=cfg.progress)
        classifier = data.extractor(images)
        features[name] = {"classifier": classifier, "pixels": images.flatten(1)}
        models[name] = {
            "train_images": int(indices.numel()),
            "training_seed": seed,
            "train_seconds": trained.seconds,
            "cached": trained.cached,
            "fid": fid(classifier, data.reference),
        }
        grids.append(images[:GRID_COLUMNS])
    grid_path = save_comparison(grids, Path(cfg.out) / f"{NAME}_grid.png")

    similarity: dict[str, dict[str, Any]] = {}
    for pair, (left, right) in PAIRS.items():
        similarity[pair] = {
            space: asdict(
                stability(features[left][space], features[right][space], cfg.unrelated_seed)
            )
            for space in ("classifier", "pixels")
        }
    result = {
        "config": asdict(cfg),
        "machine": machine(),
        "data": data.info,
        "halves": {"size": int(half_a.numel()), "disjoint": True},
        "models": models,
        "similarity": similarity,
        "grid": str(grid_path),
        "seconds": time.perf_counter() - started,
        "load_average": {"start": load_start, "end": load_average()},
    }
    write_json(Path(cfg.out) / f"{NAME}.json", result)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown."""
    cfg, models = result["config"], result["models"]
    lines = [
        f"### Stability across disjoint halves ({result['halves']['size']} images each)",
        "",
        f"{cfg['model']} (width {cfg['width'] or 'default'}), {cfg['train_steps']} steps; "
        f"{cfg['num_samples']} shared noise seeds, {cfg['steps']} {cfg['solver']} steps.",
        "",
        "| model | data | training seed | FID | train s |",
        "|---|---|---|---|---|",
    ]
    for name, row in models.items():
        data = "half A" if name == "A" else "half B"
        lines.append(
            f"| {name} | {data} | {row['training_seed']} | {row['fid']:.1f} "
            f"| {row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "| pair | features | same-seed cosine | unrelated | centred same-seed | centred unrelated |",
        "|---|---|---|---|---|---|",
    ]
    for pair, spaces in result["similarity"].items():
        for space, s in spaces.items():
            lines.append(
                f"| {pair} | {space} | {s['similarity']:.3f} ± {s['similarity_std']:.3f} "
                f"| {s['unrelated']:.3f} ± {s['unrelated_std']:.3f} "
                f"| {s['centred_similarity']:.3f} | {s['centred_unrelated']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(HalvesConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
