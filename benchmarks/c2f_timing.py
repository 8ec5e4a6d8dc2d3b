"""Coarse-to-fine timing alone, on random-initialised weights at the paper's shapes.

The timing half of benchmarks.coarse_to_fine (same interleaved rounds, same median speedup per
round against the fine model alone, same FLOP bound and profile) without training or FID: the
speed of a forward pass does not depend on what the weights learned, so DiT-S/2 -> DiT-XL/2 on
the paper's 4x32x32 latents can be timed in minutes on one GPU (bf16 autocast, torch.compile
with CUDA graphs). Every weight is drawn from N(0, 0.02), the adaLN-Zero layers included, so
no block is skipped as the identity. Writes `<out>/c2f_timing.json`.

    python -m benchmarks.c2f_timing [--tiny] [--dry-run] [coarse=dit-s] [fine=dit-xl]
        [device=cuda] [precision=bf16] [t_splits=[0.5,0.7,0.8,0.9]] [sampling.batch_size=256]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.coarse_to_fine import (
    LARGE,
    C2FConfig,
    autocast,
    model_facts,
    prepare_models,
    sample_interleaved,
    samplers_of,
)
from benchmarks.common import RESULTS_DIR, Clock, benchmark_main, median, record_result
from lfm_core.configs import VELOCITY_SIZES, VelocityConfig
from lfm_core.errors import check_choice, check_range
from lfm_core.flops import flop_speedup_bound, forward_flops
from lfm_core.solvers import seeded_noise
from lfm_core.velocity import VelocityModel, build_velocity
from orchestrator.config import SamplingSection

NAME = "c2f_timing"
INIT_STD = 0.02


@dataclass(frozen=True)
class TimingConfig:
    """What is timed: two VELOCITY_SIZES models on random latents of one shape.

    Attributes:
        out: results folder.
        coarse, fine: the models (VELOCITY_SIZES names; the paper: dit-s and dit-xl, patch 2).
        coarse_width, fine_width: widths replacing the sizes' base widths (None: the size's).
        channels, size: the latent shape (channels, size, size); the paper's ImageNet 4x32x32.
        timing: the benchmark's sampling, rounds, device, precision and compile settings
            (benchmarks.coarse_to_fine.C2FConfig; its models and stages are unused).
    """

    out: str = str(RESULTS_DIR / "gpu")
    coarse: str = "dit-s"
    fine: str = "dit-xl"
    coarse_width: int | None = None
    fine_width: int | None = None
    channels: int = 4
    size: int = 32
    timing: C2FConfig = field(
        default_factory=lambda: C2FConfig(
            sampling=SamplingSection(steps=60, num_samples=1024, batch_size=256),
            seed_sets=1,
            device="cuda" if torch.cuda.is_available() else "cpu",
            precision="bf16" if torch.cuda.is_available() else "fp32",
            t_splits=(0.5, 0.7, 0.8, 0.9),
            progress=False,
        )
    )

    def __post_init__(self) -> None:
        check_choice("coarse", self.coarse, VELOCITY_SIZES)
        check_choice("fine", self.fine, VELOCITY_SIZES)
        for key in ("channels", "size"):
            check_range(key, getattr(self, key), 1, math.inf)


TINY = TimingConfig(
    coarse="dit-xs",
    fine="dit-s",
    size=8,
    timing=C2FConfig(
        sampling=SamplingSection(steps=3, num_samples=8, batch_size=4),
        seed_sets=1,
        t_splits=(0.5,),
        profile_repeats=1,
        compile=False,
        threads=1,
        progress=False,
    ),
)


def random_model(name: str, channels: int, size: int, width: int | None = None) -> VelocityModel:
    """An unconditional model with every weight and bias drawn from N(0, INIT_STD), seed 0."""
    torch.manual_seed(0)
    config = VelocityConfig(name=name, in_channels=channels, sample_size=size, width=width)
    model = build_velocity(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, INIT_STD)
    return model.eval()


def run(cfg: TimingConfig) -> dict[str, Any]:
    """Time the pair; returns what it writes to `<out>/c2f_timing.json`."""
    timing = dataclasses.replace(cfg.timing, out=cfg.out)
    torch.set_num_threads(timing.threads)
    if timing.device == "cuda":
        torch.set_float32_matmul_precision("high")
    clock = Clock.start()
    shape = (cfg.channels, cfg.size, cfg.size)
    models = {
        role: random_model(getattr(cfg, role), *shape[:2], getattr(cfg, f"{role}_width"))
        for role in ("coarse", "fine")
    }
    flops = {role: forward_flops(m, seeded_noise([0], shape)) for role, m in models.items()}
    seeds = list(range(timing.sampling.num_samples))
    prepared, compile_s = prepare_models(
        {(0, role): m for role, m in models.items()}, seeds, shape, timing
    )
    coarse, fine = prepared[0, "coarse"], prepared[0, "fine"]
    samplers = samplers_of(coarse, timing.t_splits)
    probe = seeded_noise(seeds[: timing.sampling.batch_size], shape, device=timing.device)
    with autocast(timing):
        sampled = sample_interleaved(fine, samplers, seeds, timing)
        facts = {role: model_facts(prepared[0, role], flops[role], probe, timing) for role in flops}
    rows = []
    for name, (t_split, _) in samplers.items():
        nfe_coarse, nfe_fine = sampled.nfe[name]
        ratios = [a / b for a, b in zip(sampled.seconds[LARGE], sampled.seconds[name], strict=True)]
        bound = flop_speedup_bound(flops["coarse"], flops["fine"], nfe_coarse, nfe_fine)
        speedup = median(ratios)
        rows.append(
            {
                "t_split": t_split,
                "speedup_rounds": ratios,
                "speedup": speedup,
                "flop_bound": bound,
                "bound_ratio": speedup / bound,
                "seconds_median": median(sampled.seconds[name]),
            }
        )
    body = {"models": facts, "compile_seconds": compile_s, "rows": rows}
    return record_result(NAME, cfg, clock, body, {})


def markdown(result: dict[str, Any]) -> str:
    """The timing table."""
    cfg, facts = result["config"], result["models"]
    lines = [
        f"## Coarse-to-fine timing ({cfg['coarse']} -> {cfg['fine']}, random weights, "
        f"{result['machine']['description']}, {cfg['timing']['precision']})",
        "",
        f"GFLOP/s at the round batch: coarse {facts['coarse']['gflops_per_s']:.1f}, fine "
        f"{facts['fine']['gflops_per_s']:.1f}.",
        "",
        "| t_split | speedup | FLOP bound | measured / bound |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['t_split']:g} | {row['speedup']:.2f}x | {row['flop_bound']:.2f}x "
            f"| {row['bound_ratio']:.2f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    benchmark_main(TimingConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
