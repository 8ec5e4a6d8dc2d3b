"""Stability across data: two FM models trained on disjoint halves of the data, same noise seeds.

The 4,000 embedded training latents are split by a seeded permutation into two disjoint halves
A and B of 2,000 (two subset stages of the benchmarks' stage graph). Model A and model B are
trained alike (same initial weights, same stream of batch positions, t and noise: the same
training seed), each on its own half. Both then sample the same noise seeds (samples stages),
and same-seed similarity (lfm_core.metrics.stability: mean cosine of paired features, plain and
mean-centred) is set against the "unrelated" baseline (one side permuted). A control model B'
is trained on half B with another training seed (other initial weights and noise stream), to
show how much of the similarity survives without shared seeds. Features: the FID extractor's
(the samples stages' `features_fid`) and raw pixels. The FID of each model and a same-seed grid
(rows A, B, B') are written too.

    python -m benchmarks.stability_halves [--tiny] [--dry-run] [train.steps=2000] [model.name=unet-s]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    TINY_STAGES,
    Clock,
    Embedded,
    Stages,
    benchmark_main,
    record_result,
    usable_cores,
)
from lfm_core.errors import check_range
from lfm_core.images import save_comparison
from lfm_core.metrics import fid, stability
from lfm_core.train import TrainConfig
from orchestrator import stage_keys
from orchestrator.cache import StageRef
from orchestrator.config import ModelSection, SamplingSection
from orchestrator.stage_keys import HALVES

NAME = "stability_halves"
GRID_COLUMNS = 16
PAIRS = {"A_vs_B": ("A", "B"), "A_vs_B_other_seed": ("A", "B_other_seed")}
# The half subsets: a stage of its own criterion, which orchestrator.stage_keys does not name.


@dataclass(frozen=True)
class HalvesConfig:
    """What the halves experiment trains and samples.

    Attributes:
        out: results folder (`stability_halves.json` and the grid PNG go there).
        stages: the embedded data, autoencoder and extractors (benchmarks.common.Stages).
        model: the velocity network (width None: the size's default).
        train: training of every model; A and B use train.seed, the control B' seed + 1.
        split_seed: seed of the permutation that splits the data into halves.
        sampling: the shared noise seeds (num_samples from first_seed) and the ODE.
        unrelated_seed: seed of the permutation behind the unrelated baseline.
        threads: torch threads. progress: show bars.
    """

    out: str = str(RESULTS_DIR)
    stages: Stages = field(default_factory=Stages)
    model: ModelSection = ModelSection(name="unet-s")
    train: TrainConfig = TrainConfig(steps=2000, batch_size=128, lr=1e-3)
    split_seed: int = 0
    sampling: SamplingSection = SamplingSection(steps=60, num_samples=1000, batch_size=500)
    unrelated_seed: int = 0
    threads: int = field(default_factory=usable_cores)
    progress: bool = True

    def __post_init__(self) -> None:
        check_range("threads", self.threads, 1, math.inf)


TINY = HalvesConfig(
    stages=TINY_STAGES,
    model=ModelSection(name="unet-s", width=8),
    train=TrainConfig(steps=4, batch_size=16, warmup_steps=1, log_every=2),
    sampling=SamplingSection(steps=4, num_samples=16, batch_size=16),
    threads=1,
    progress=False,
)


def _model(
    embedded: Embedded, subset: StageRef, seed: int, cfg: HalvesConfig
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    """Train and sample one model: (its facts, its features by space, its grid row)."""
    ref = embedded.model_ref(subset, cfg.model.name, cfg.model.width, seed=seed)
    _, facts = embedded.trained(ref)
    samples = embedded.graph.load_samples(stage_keys.samples(embedded.cfg, ref))
    images = embedded.images(samples["latents"])
    features = {"classifier": samples["features_fid"], "pixels": images.flatten(1)}
    row = {
        "train_images": int(embedded.indices(subset).numel()),
        "training_seed": seed,
        **facts,
        "fid": fid(samples["features_fid"], embedded.reference),
    }
    return row, features, images[:GRID_COLUMNS]


def run(cfg: HalvesConfig) -> dict[str, Any]:
    """Run the experiment; returns what it writes to `<out>/stability_halves.json`."""
    torch.set_num_threads(cfg.threads)
    clock = Clock.start()
    sections = {"model": cfg.model, "train": cfg.train, "sampling": cfg.sampling}
    embedded = Embedded(cfg.stages, sections, progress=cfg.progress)
    half = {which: stage_keys.half(embedded.cfg, which, cfg.split_seed) for which in HALVES}
    plan = {
        "A": (half["A"], cfg.train.seed),
        "B": (half["B"], cfg.train.seed),
        "B_other_seed": (half["B"], cfg.train.seed + 1),
    }
    models, features, grids = {}, {}, []
    for name, (subset, seed) in plan.items():
        models[name], features[name], grid = _model(embedded, subset, seed, cfg)
        grids.append(grid)
    grid_path = save_comparison(grids, Path(cfg.out) / f"{NAME}_grid.png")
    similarity = {
        pair: {
            space: asdict(
                stability(features[left][space], features[right][space], cfg.unrelated_seed)
            )
            for space in ("classifier", "pixels")
        }
        for pair, (left, right) in PAIRS.items()
    }
    a, b = (embedded.indices(half[which]) for which in "AB")
    body = {
        "data": embedded.info(),
        "halves": {
            "size": int(a.numel()),
            "disjoint": not set(a.tolist()) & set(b.tolist()),
        },
        "models": models,
        "similarity": similarity,
        "grid": str(grid_path),
    }
    return record_result(NAME, cfg, clock, body, {})


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown."""
    cfg, models = result["config"], result["models"]
    lines = [
        f"### Stability across disjoint halves ({result['halves']['size']} images each)",
        "",
        f"{cfg['model']['name']} (width {cfg['model']['width'] or 'default'}), "
        f"{cfg['train']['steps']} steps; {cfg['sampling']['num_samples']} shared noise seeds, "
        f"{cfg['sampling']['steps']} {cfg['sampling']['solver']} steps.",
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
