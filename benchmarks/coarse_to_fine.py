"""Coarse-to-fine sampling: measured speedup next to its FLOP-count bound, and the FID of each.

For each (coarse, fine) pair of velocity widths, both trained on the embedded mnist5k latents
(fm_model stages of the benchmarks' stage graph, see benchmarks.common), the same noise seeds are sampled by the large (fine) model alone, by coarse-to-fine at every
t_split, and by the small (coarse) model alone. Sampling is interleaved: the seeds are cut into
rounds of `sampling.batch_size`; in each round every sampler integrates the same noise, in an order
rotated from round to round, so load drift hits all samplers alike. Each round is one timing
repeat: the speedup is the median over rounds of (large-alone time / coarse-to-fine time). All
the samples of a sampler make its FID (decoded, FID-extractor features, against the held-out
split's features), per seed set (`sampling.num_samples` / `seed_sets` seeds), so the spread
between sets shows FID noise. The samples are the timed ones, so they are not a cached stage.

With `coarse_to_fine.seam=true` every t_split also runs with the coarse model fine-tuned by
SeamLoss against the fine model at that t_split (a seam_model stage of the graph, trained by
its trainer; the paper's train_coarse_to_fine_loop), in rows marked `c2f+seam` beside the
plain ones, on the same noise and in the same rounds.

With `compile` (the default) every model goes through torch.compile before any timing, so every
sampler and the profile time the compiled forwards; FLOPs are counted on the eager copies.

The FLOP bound is lfm_core.flops.flop_speedup_bound of forward_flops. The profile
splits the gap to it in two: the forward-time bound (the same formula with each model's
measured forward time in place of its FLOPs; below the FLOP bound when the small model runs at
fewer FLOP/s) and solver/dispatch overhead (measured time beyond the forwards' time).

    python -m benchmarks.coarse_to_fine [--tiny] [--dry-run] [pairs=[64:256,96:256]]
        [t_splits=[0.7,0.8]] [train.steps=800] [sampling.steps=60]
        ["stages.overrides=['autoencoder.epochs=2']"]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.common import (
    RESULTS_DIR,
    TINY_STAGES,
    Clock,
    Embedded,
    Stages,
    benchmark_main,
    fmt,
    goal,
    median,
    record_result,
    usable_cores,
)
from lfm_core.coarse_to_fine import sample_coarse_to_fine
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.flops import flop_speedup_bound, forward_flops
from lfm_core.solvers import seeded_noise
from lfm_core.train import TrainConfig
from lfm_core.velocity import VELOCITY_SIZES, VelocityModel, count_parameters
from orchestrator import stage_keys
from orchestrator.cache import StageRef
from orchestrator.config import CoarseToFineSection, SamplingSection

NAME = "coarse_to_fine"
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
LARGE, SMALL = "large_only", "small_only"
SEAM_PREFIX = "c2f+seam@"
COARSE_FINE = ("coarse", "fine")
TOP_OPS = 6
MS_PER_S = 1e3
GIGA = 1e9


# The quickstart's recipe (lr 2e-3, warm-up 30, EMA 0.99). Fine models: 2,000 steps, at the
# knee of their curve (unet-s width 64, FID at 20 Euler steps 96.3 / 56.1 / 40.9 / 36.7 at
# 500 / 1,000 / 1,500 / 2,000 steps: decrements 40, 15, 4, so the plateau is ~35); the coarse
# ones train longer (`coarse_steps`).
TRAIN = TrainConfig(steps=2000, batch_size=128, lr=2e-3, warmup_steps=30, ema_decay=0.99)
SAMPLING = SamplingSection(steps=60, solver="euler", num_samples=2000, batch_size=500)


@dataclass(frozen=True)
class C2FConfig:
    """What the coarse-to-fine benchmark trains, samples and measures.

    Attributes:
        out: results folder (`coarse_to_fine.json` goes there).
        stages: the embedded data, autoencoder and extractors (benchmarks.common.Stages).
        model: the velocity family (a VELOCITY_SIZES name); pairs differ in width. unet-s, not
            a DiT: on this CPU budget the DiTs do not train well enough (dit-xs width 64 at lr
            3e-3 has FID 206 at 1,600 steps where unet-s width 16 has 84 at 1,500; width 256
            had 176 at 800 steps), and the DiT the issue names would leave the large model far
            above FID 100.
        pairs: "coarse:fine" widths, e.g. "64:256"; each unique (width, steps) is trained once.
        train: training of every model (lfm_core's TrainConfig; its steps are the fine models').
        coarse_steps: training steps of the coarse models (None: train.steps). A small
            model is cheap to train longer: 3,000 steps of width 16 (~0.1 s each) take less
            wall-clock time than 2,000 of width 64 (~0.35 s); its FID still falls (83.6 /
            73.4 / 62.6 / 57.0 at 1,500 / 2,000 / 2,500 / 3,000 steps).
        snapshot_every: every model keeps EMA snapshots this often, so the coarse model is the
            same stage as benchmarks.data_reduction's full-data model (None: none).
        t_splits: switch times tried with each pair.
        sampling: the ODE (steps, solver; the paper: 60 Euler steps), the seeds (num_samples
            from first_seed) and the timing round (batch_size samples, dividing each set).
        seed_sets: FID is measured per set of num_samples / seed_sets seeds.
        threads: torch threads for training and sampling.
        coarse_to_fine: seam fine-tuning (the sweep file's section): with `seam`, each t_split
            also samples with a seam_model stage of the coarse model (`seam_steps` steps of the
            `train` settings, None: a quarter of train.steps; `seam_weight`, the paper's 0.1).
        fid_tolerance: coarse-to-fine FID may exceed the large model's by this fraction.
        min_speedup, min_bound_ratio: the goals.
        profile_repeats: timed forward passes per model in the profile (median kept).
        compile: run both models through `torch.compile` (static shapes: every call is at the
            round batch), compiled before any timing; the seconds it took are recorded. On a
            2-core CPU it lifted the width-64 DiT from ~21 to ~31 GFLOP/s and width 256 by
            ~1% (interleaved A/B, batch 500, 1 thread, loaded machine). On CUDA the mode is
            "reduce-overhead" (CUDA graphs: one launch per forward).
        precision: "fp32" or "bf16" (CUDA only: sampling, profile and decoding under bf16
            autocast).
        device: "cpu" or "cuda" (training, sampling, decoding; on CUDA float32 matmuls use
            TF32 and every timing is bracketed by a device synchronisation).
        progress: show progress bars.
    """

    out: str = str(RESULTS_DIR)
    stages: Stages = field(default_factory=Stages)
    model: str = "unet-s"
    pairs: tuple[str, ...] = ("16:64",)
    train: TrainConfig = TRAIN
    coarse_steps: int | None = 3000
    snapshot_every: int | None = 500
    t_splits: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9)
    sampling: SamplingSection = SAMPLING
    seed_sets: int = 2
    threads: int = field(default_factory=usable_cores)
    coarse_to_fine: CoarseToFineSection = field(default_factory=CoarseToFineSection)
    fid_tolerance: float = 0.05
    min_speedup: float = 2.5
    min_bound_ratio: float = 0.9
    profile_repeats: int = 5
    compile: bool = True
    precision: str = "fp32"
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, VELOCITY_SIZES)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "bf16" and self.device != "cuda":
            raise ConfigError("precision: 'bf16' is for device 'cuda'; use fp32 on the CPU")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' asked for but torch sees no CUDA device; use cpu")
        if not self.pairs or not self.t_splits:
            raise ConfigError("pairs, t_splits: each needs at least one value")
        self.width_pairs()
        for key in ("coarse_steps", "snapshot_every"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), 1, math.inf)
        for t_split in self.t_splits:
            check_range("t_splits", t_split, 0.0, 1.0, low_open=True, high_open=True)
        for key in ("seed_sets", "threads", "profile_repeats"):
            check_range(key, getattr(self, key), 1, math.inf)
        if self.samples_per_set * self.seed_sets != self.sampling.num_samples:
            raise ConfigError(
                f"seed_sets: {self.seed_sets} must divide sampling.num_samples="
                f"{self.sampling.num_samples}"
            )
        if self.samples_per_set % self.sampling.batch_size:
            raise ConfigError(
                f"sampling.batch_size: {self.sampling.batch_size} (the timing round) must divide "
                f"each seed set of {self.samples_per_set}"
            )
        if self.samples_per_set < 2:
            raise ConfigError(f"sampling.num_samples: {self.samples_per_set} per set, need >= 2")

    @property
    def samples_per_set(self) -> int:
        return self.sampling.num_samples // self.seed_sets

    def width_pairs(self) -> list[tuple[int, int]]:
        """The pairs as (coarse width, fine width)."""
        pairs = []
        for pair in self.pairs:
            parts = pair.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ConfigError(f"pairs: {pair!r} must be 'coarse:fine' widths, e.g. '64:256'")
            pairs.append((int(parts[0]), int(parts[1])))
        return pairs


TINY = C2FConfig(
    stages=TINY_STAGES,
    model="dit-xs",
    # Identical coarse and fine models (one stage): every bound and FID ratio is exactly 1.
    pairs=("16:16", "16:32"),
    train=TrainConfig(steps=6, batch_size=16, warmup_steps=1, log_every=2),
    coarse_steps=None,
    snapshot_every=2,
    t_splits=(0.5, 0.8),
    sampling=SamplingSection(steps=4, num_samples=32, batch_size=8),
    profile_repeats=1,
    compile=False,
    # One thread: tiny tensors gain nothing from two, and lose much on a busy machine.
    threads=1,
    progress=False,
)


def model_refs(embedded: Embedded, cfg: C2FConfig) -> dict[tuple[int, str], StageRef]:
    """(width, "coarse" / "fine") -> its fm_model stage, trained on all the data."""
    full = embedded.full_subset()
    return {
        (width, role): embedded.model_ref(
            full,
            cfg.model,
            width,
            cfg.coarse_steps if role == "coarse" else None,
            snapshot_every=cfg.snapshot_every,
        )
        for pair in cfg.width_pairs()
        for width, role in zip(pair, COARSE_FINE, strict=True)
    }


def seam_refs(
    embedded: Embedded, cfg: C2FConfig, refs: dict[tuple[int, str], StageRef]
) -> dict[tuple[int, int, float], StageRef]:
    """(coarse width, fine width, t_split) -> the seam_model stage of the pair at t_split (the
    coarse model fine-tuned on all the data against the fine one); {} without seam."""
    if not cfg.coarse_to_fine.seam:
        return {}
    full = embedded.full_subset()
    return {
        (c, f, t): stage_keys.seam_model(embedded.cfg, refs[c, "coarse"], refs[f, "fine"], full, t)
        for c, f in cfg.width_pairs()
        for t in cfg.t_splits
    }


def sampler_times(t_splits: tuple[float, ...]) -> dict[str, float]:
    """Sampler name -> t_split: the large model alone (0), coarse-to-fine, the small alone (1)."""
    return {LARGE: 0.0, **{f"c2f@{t:g}": t for t in sorted(t_splits)}, SMALL: 1.0}


def seam_role(fine_width: int, t_split: float) -> str:
    """The role of a seam-fine-tuned coarse model among a run's models (keyed (width, role))."""
    return f"seam to {fine_width} at {t_split:g}"


# A sampler: its t_split and the coarse model it integrates [0, t_split) with.
Sampler = tuple[float, VelocityModel]


def samplers_of(
    coarse: VelocityModel,
    t_splits: tuple[float, ...],
    seam: dict[float, VelocityModel] | None = None,
) -> dict[str, Sampler]:
    """Every sampler of a pair (sampler_times with `coarse`), then one `c2f+seam@t` per seam
    model (t_split -> the coarse model fine-tuned for it)."""
    samplers = {name: (t, coarse) for name, t in sampler_times(t_splits).items()}
    for t, model in sorted((seam or {}).items()):
        samplers[f"{SEAM_PREFIX}{t:g}"] = (t, model)
    return samplers


@dataclass
class _Sampled:
    latents: dict[str, list[Tensor]]
    seconds: dict[str, list[float]]
    nfe: dict[str, tuple[int, int]]


def sample_interleaved(
    fine: VelocityModel,
    samplers: dict[str, Sampler],
    seeds: list[int],
    cfg: C2FConfig,
) -> _Sampled:
    """Every sampler on the same noise, round by round, in a rotating order."""
    shape = (fine.config.in_channels, fine.config.sample_size, fine.config.sample_size)
    device = next(fine.parameters()).device
    out = _Sampled({n: [] for n in samplers}, {n: [] for n in samplers}, {})
    size = cfg.sampling.batch_size
    rounds = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    names = list(samplers)
    # One untimed pass of each model first: the first call of a model pays for allocations.
    models = {id(m): m for m in (fine, *(coarse for _, coarse in samplers.values()))}
    with torch.no_grad():
        warm = seeded_noise(rounds[0], shape, device=device)
        for model in models.values():
            model(warm, torch.full((warm.shape[0],), 0.5, device=device))
    bar = tqdm(total=len(rounds) * len(names), desc="c2f sampling", disable=not cfg.progress)
    for index, chunk in enumerate(rounds):
        noise = seeded_noise(chunk, shape, device=device)
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            # Timed here, between synchronisations: on a GPU the call returns before the work ends.
            _synchronize(device)
            started = time.perf_counter()
            t_split, coarse = samplers[name]
            result = sample_coarse_to_fine(
                coarse,
                fine,
                noise,
                t_split,
                steps=cfg.sampling.steps,
                method=cfg.sampling.solver,
            )
            _synchronize(device)
            out.seconds[name].append(time.perf_counter() - started)
            out.latents[name].append(result.samples.cpu())
            out.nfe[name] = (result.nfe_coarse, result.nfe_fine)
            bar.update()
    bar.close()
    return out


def autocast(cfg: C2FConfig) -> torch.autocast:
    """bf16 autocast on CUDA when cfg.precision is "bf16"; otherwise a disabled context."""
    return torch.autocast(cfg.device, torch.bfloat16, enabled=cfg.precision == "bf16")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_seconds(model: VelocityModel, x: Tensor, repeats: int) -> float:
    """Median wall-clock seconds of one forward pass on x (after one warm-up pass)."""
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    model(x, t)
    times = []
    for _ in range(repeats):
        _synchronize(x.device)
        started = time.perf_counter()
        model(x, t)
        _synchronize(x.device)
        times.append(time.perf_counter() - started)
    return median(times)


@torch.no_grad()
def _top_ops(model: VelocityModel, x: Tensor) -> list[dict[str, Any]]:
    """The operators that take the most time in one forward pass (torch.profiler): CPU time on
    a CPU, device (kernel) time on a GPU."""
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        model(x, t)
        _synchronize(x.device)

    def self_us(event: Any) -> float:
        return (
            event.self_device_time_total if x.device.type == "cuda" else event.self_cpu_time_total
        )

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": self_us(e) / MS_PER_S,
            "share": self_us(e) / total,
            "calls": e.count,
        }
        for e in events[:TOP_OPS]
    ]


def solver_loop_seconds(noise: Tensor, cfg: C2FConfig) -> float:
    """Median seconds of the sampler's own loop on noise (B, C, H, W): sample_coarse_to_fine
    with a velocity that costs nothing (it returns one precomputed tensor), so what is timed
    is the solver's updates, time tensors and NFE counting of cfg.sampling.steps steps."""
    zero = torch.zeros_like(noise)

    def free(x: Tensor, t: Tensor) -> Tensor:
        return zero

    times = []
    for _ in range(cfg.profile_repeats):
        _synchronize(noise.device)
        started = time.perf_counter()
        sample_coarse_to_fine(
            free, free, noise, 0.5, steps=cfg.sampling.steps, method=cfg.sampling.solver
        )
        _synchronize(noise.device)
        times.append(time.perf_counter() - started)
    return median(times)


def model_facts(model: VelocityModel, flops: int, x: Tensor, cfg: C2FConfig) -> dict[str, Any]:
    """FLOPs per sample, measured forward time at the round batch, achieved GFLOP/s, top ops."""
    seconds = _forward_seconds(model, x, cfg.profile_repeats)
    return {
        "width": model.config.width,
        "params": count_parameters(model),
        "flops_per_sample": flops,
        "forward_ms": seconds * MS_PER_S,
        "gflops_per_s": flops * x.shape[0] / seconds / GIGA,
        "top_ops": _top_ops(model, x),
    }


def _fids(embedded: Embedded, latents: list[Tensor], cfg: C2FConfig) -> list[float]:
    """FID of each seed set (rounds are consecutive seeds, so sets are consecutive rows)."""
    return [embedded.fid(part) for part in torch.cat(latents).split(cfg.samples_per_set)]


def _row(
    name: str,
    t_split: float,
    sampled: _Sampled,
    fid_sets: dict[str, list[float]],
    flops: dict[str, int],
    forward_s: dict[str, float],
    loop_s: float,
    cfg: C2FConfig,
) -> dict[str, Any]:
    """One sampler's row: its speedup per round against the large model, the FLOP and
    forward-time bounds of its function evaluations, the solver loop's share of its time
    (loop_s: solver_loop_seconds), its FID per seed set and their ratios."""
    nfe_coarse, nfe_fine = sampled.nfe[name]
    times, large_times = sampled.seconds[name], sampled.seconds[LARGE]
    ratios = [big / mine for big, mine in zip(large_times, times, strict=True)]
    flop_bound = flop_speedup_bound(flops["coarse"], flops["fine"], nfe_coarse, nfe_fine)
    # The same formula with measured forward seconds: what the forwards alone would allow.
    forward_bound = flop_speedup_bound(forward_s["coarse"], forward_s["fine"], nfe_coarse, nfe_fine)  # type: ignore[arg-type]
    forwards = nfe_coarse * forward_s["coarse"] + nfe_fine * forward_s["fine"]
    speedup = median(ratios)
    fid_ratio_sets = [a / b for a, b in zip(fid_sets[name], fid_sets[LARGE], strict=True)]
    row = {
        "t_split": t_split,
        "seam": name.startswith(SEAM_PREFIX),
        "nfe_coarse": nfe_coarse,
        "nfe_fine": nfe_fine,
        "seconds_rounds": times,
        "seconds_median": median(times),
        "samples_per_s": cfg.sampling.batch_size / median(times),
        "speedup_rounds": ratios,
        "speedup": speedup,
        "speedup_of_medians": median(large_times) / median(times),
        "flop_bound": flop_bound,
        "bound_ratio": speedup / flop_bound,
        "forward_bound": forward_bound,
        "forward_efficiency": forward_bound / flop_bound,
        "overhead_share": 1.0 - forwards / median(times),
        "solver_share": loop_s / median(times),
        "fid_sets": fid_sets[name],
        "fid": sum(fid_sets[name]) / len(fid_sets[name]),
        "fid_ratio_sets": fid_ratio_sets,
        "fid_ratio": sum(fid_ratio_sets) / len(fid_ratio_sets),
    }
    row["goals"] = _goals(row, cfg)
    return row


def _pair(
    embedded: Embedded,
    coarse: VelocityModel,
    fine: VelocityModel,
    flops: dict[str, int],
    seeds: list[int],
    cfg: C2FConfig,
    seam: dict[float, VelocityModel],
) -> dict[str, Any]:
    """Sample, time, score and profile one (coarse, fine) pair; flops: per sample, per model;
    seam: t_split -> the seam-fine-tuned coarse model ({} without seam)."""
    samplers = samplers_of(coarse, cfg.t_splits, seam)
    probe = seeded_noise(seeds[: cfg.sampling.batch_size], embedded.latent_shape, device=cfg.device)
    # Sampling and profile in the configured precision; the FIDs below decode in float32.
    with autocast(cfg):
        sampled = sample_interleaved(fine, samplers, seeds, cfg)
        facts = {
            "coarse": model_facts(coarse, flops["coarse"], probe, cfg),
            "fine": model_facts(fine, flops["fine"], probe, cfg),
        }
        loop_s = solver_loop_seconds(probe, cfg)
    forward_s = {k: v["forward_ms"] / MS_PER_S for k, v in facts.items()}
    fid_sets = {
        name: _fids(embedded, sampled.latents[name], cfg)
        for name in tqdm(samplers, desc="c2f FID", disable=not cfg.progress)
    }
    rows = {
        name: _row(name, t_split, sampled, fid_sets, flops, forward_s, loop_s, cfg)
        for name, (t_split, _) in samplers.items()
    }
    c2f = [v for k, v in rows.items() if k not in (LARGE, SMALL) and not v["seam"]]
    with_seam = [v for v in rows.values() if v["seam"]]
    return {
        "coarse_width": coarse.config.width,
        "fine_width": fine.config.width,
        "models": facts,
        "solver_loop_s": loop_s,
        LARGE: rows[LARGE],
        SMALL: rows[SMALL],
        "t_splits": c2f,
        "seam_t_splits": with_seam,
        "chosen": _choose(c2f + with_seam, cfg),
        "fid_noise": {
            "large_only_fid_sets": rows[LARGE]["fid_sets"],
            "large_only_relative_spread": _spread(rows[LARGE]["fid_sets"]),
        },
    }


def _spread(values: list[float]) -> float:
    """(max - min) / mean: how far apart the seed sets' values are."""
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / mean if mean else math.nan


def _goals(row: dict[str, Any], cfg: C2FConfig) -> dict[str, Any]:
    return {
        "speedup": goal(row["speedup"], cfg.min_speedup, higher_is_better=True),
        "fid_ratio": goal(row["fid_ratio"], 1.0 + cfg.fid_tolerance, higher_is_better=False),
        "bound_ratio": goal(row["bound_ratio"], cfg.min_bound_ratio, higher_is_better=True),
    }


def _choose(rows: list[dict[str, Any]], cfg: C2FConfig) -> dict[str, Any]:
    """The fastest t_split (with or without seam) that meets every goal; else the fastest
    within the FID tolerance; else the one with the lowest FID ratio."""
    every = [r for r in rows if all(g["met"] for g in r["goals"].values())]
    passing = [r for r in rows if r["goals"]["fid_ratio"]["met"]]
    if every:
        best, reason = max(every, key=lambda r: r["speedup"]), "fastest that meets every goal"
    elif passing:
        best, reason = max(passing, key=lambda r: r["speedup"]), "fastest within the FID tolerance"
    else:
        best = min(rows, key=lambda r: r["fid_ratio"])
        reason = "no t_split within the FID tolerance: lowest FID ratio"
    return {"t_split": best["t_split"], "seam": best.get("seam", False), "reason": reason}


def _recommend(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across pairs: FID goal met first, then the highest speedup at the chosen t_split."""

    def chosen_row(pair: dict[str, Any]) -> dict[str, Any]:
        chosen = pair["chosen"]
        rows = pair["seam_t_splits"] if chosen["seam"] else pair["t_splits"]
        return next(r for r in rows if r["t_split"] == chosen["t_split"])

    best = max(
        pairs,
        key=lambda p: (bool(chosen_row(p)["goals"]["fid_ratio"]["met"]), chosen_row(p)["speedup"]),
    )
    row = chosen_row(best)
    return {
        "pair": f"{best['coarse_width']}:{best['fine_width']}",
        "t_split": row["t_split"],
        "seam": row["seam"],
        "speedup": row["speedup"],
        "fid_ratio": row["fid_ratio"],
        "bound_ratio": row["bound_ratio"],
        "flop_bound": row["flop_bound"],
        "goals": row["goals"],
        "reason": best["chosen"]["reason"],
    }


def run(cfg: C2FConfig) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to `<out>/coarse_to_fine.json`."""
    torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda":
        torch.set_float32_matmul_precision("high")
    clock = Clock.start()
    sections = {"train": cfg.train, "sampling": cfg.sampling, "coarse_to_fine": cfg.coarse_to_fine}
    embedded = Embedded(cfg.stages, sections, progress=cfg.progress, device=cfg.device)
    refs: dict[tuple[int, str], StageRef] = model_refs(embedded, cfg)
    for (c, f, t), ref in seam_refs(embedded, cfg, refs).items():
        refs[c, seam_role(f, t)] = ref
    trained = {key: embedded.trained(ref) for key, ref in refs.items()}
    # FLOPs do not depend on the device: counted on the CPU copies, then the models move.
    one = seeded_noise([cfg.sampling.first_seed], embedded.latent_shape)
    flops = {
        key: forward_flops(model, one)
        for key, (model, _) in trained.items()
        if key[1] in COARSE_FINE
    }
    first = cfg.sampling.first_seed
    seeds = list(range(first, first + cfg.sampling.num_samples))
    models, compile_s = prepare_models(
        {key: model for key, (model, _) in trained.items()}, seeds, embedded.latent_shape, cfg
    )
    pairs = []
    for c, f in cfg.width_pairs():
        coarse, fine = (c, "coarse"), (f, "fine")
        pair_flops = {"coarse": flops[coarse], "fine": flops[fine]}
        seam = {
            t: models[c, seam_role(f, t)] for t in cfg.t_splits if (c, seam_role(f, t)) in models
        }
        pairs.append(_pair(embedded, models[coarse], models[fine], pair_flops, seeds, cfg, seam))
    recommended = _recommend(pairs)
    body = {
        "data": embedded.info(),
        "training": {
            (f"{role} {w}" if role in COARSE_FINE else f"coarse {w} {role}"): {
                **facts,
                "steps": refs[w, role].inputs["train"]["steps"],
            }
            for (w, role), (_, facts) in trained.items()
        },
        "compile_seconds": compile_s,
        "pairs": pairs,
        "recommended": recommended,
        "summary": {
            "c2f_speedup": recommended["speedup"],
            "c2f_fid_ratio": recommended["fid_ratio"],
            "c2f_bound_ratio": recommended["bound_ratio"],
            "c2f_t_split": recommended["t_split"],
            "c2f_pair": recommended["pair"],
            "c2f_seam": recommended["seam"],
        },
    }
    return record_result(NAME, cfg, clock, body, recommended["goals"])


def prepare_models(
    models: dict[tuple[int, str], VelocityModel],
    seeds: list[int],
    shape: tuple[int, int, int],
    cfg: C2FConfig,
) -> tuple[dict[tuple[int, str], VelocityModel], float | None]:
    """The models on cfg.device, compiled when cfg.compile and run once at the round batch
    (noise (batch_size, *shape)) so that no timed call pays for compilation; with the seconds
    compiling took (None without compile)."""
    moved = {key: model.to(cfg.device).eval() for key, model in models.items()}
    if not cfg.compile:
        return moved, None
    started = time.perf_counter()
    noise = seeded_noise(seeds[: cfg.sampling.batch_size], shape, device=cfg.device)
    t = torch.full((noise.shape[0],), 0.5, device=cfg.device)
    compiled = {}
    for key, model in moved.items():
        mode = "reduce-overhead" if cfg.device == "cuda" else None
        compiled[key] = torch.compile(model, dynamic=False, mode=mode)
        with torch.no_grad(), autocast(cfg):
            compiled[key](noise, t)
    _synchronize(torch.device(cfg.device))
    return compiled, time.perf_counter() - started  # type: ignore[return-value]


def _kind(row: dict[str, Any]) -> str:
    if row.get("seam"):
        return "c2f+seam"
    t_split = row["t_split"]
    return "large" if t_split == 0 else ("small" if t_split == 1 else "c2f")


def _top(ops: list[dict[str, Any]], count: int = 3) -> str:
    return ", ".join(f"{op['op']} {op['share']:.0%}" for op in ops[:count])


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables (one per pair) for summary.md."""
    cfg = result["config"]
    sampling = cfg["sampling"]
    lines = [
        f"## Coarse-to-fine ({cfg['model']}, {sampling['steps']} {sampling['solver']} steps)",
        "",
    ]
    per_set = sampling["num_samples"] // cfg["seed_sets"]
    for pair in result["pairs"]:
        coarse, fine = pair["models"]["coarse"], pair["models"]["fine"]
        spread = pair["fid_noise"]["large_only_relative_spread"]
        lines += [
            f"Pair coarse width {pair['coarse_width']} / fine width {pair['fine_width']}: one "
            f"forward pass on {sampling['batch_size']} samples takes {coarse['forward_ms']:.1f} / "
            f"{fine['forward_ms']:.1f} ms ({coarse['gflops_per_s']:.1f} / "
            f"{fine['gflops_per_s']:.1f} GFLOP/s; FLOPs ratio "
            f"{fine['flops_per_sample'] / coarse['flops_per_sample']:.1f}, time ratio "
            f"{fine['forward_ms'] / coarse['forward_ms']:.1f}). Top ops: coarse {_top(coarse['top_ops'])}; "
            f"fine {_top(fine['top_ops'])}. FID of the large model differs by {fmt(spread, '.1%')} "
            f"between its {cfg['seed_sets']} seed sets of {per_set}.",
            "",
            "| sampler | t_split | speedup | FLOP bound | measured / bound | forward-time bound "
            "| time beyond forwards | solver loop | FID (per set) | FID / large (per set) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in [pair[LARGE], *pair["t_splits"], pair[SMALL], *pair.get("seam_t_splits", [])]:
            sets = " / ".join(f"{f:.2f}" for f in row["fid_sets"])
            ratio_sets = " / ".join(f"{r:.3f}" for r in row["fid_ratio_sets"])
            lines.append(
                f"| {_kind(row)} | {row['t_split']:g} | {row['speedup']:.2f}x "
                f"| {row['flop_bound']:.2f}x | {row['bound_ratio']:.2f} | {row['forward_bound']:.2f}x "
                f"| {row['overhead_share']:.1%} | {row.get('solver_share', math.nan):.1%} "
                f"| {row['fid']:.2f} ({sets}) "
                f"| {row['fid_ratio']:.3f} ({ratio_sets}) |"
            )
        lines.append("")
    rec = result["recommended"]
    lines += [
        f"Recommended: pair {rec['pair']} at t_split {rec['t_split']:g}"
        f"{' with seam' if rec.get('seam') else ''} ({rec['reason']}).",
        "",
    ]
    if result.get("compile_seconds") is not None:
        lines += [
            f"Models compiled (torch.compile) in {result['compile_seconds']:.0f} s, untimed.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(C2FConfig(), TINY, argv, NAME, __doc__ or "", run, markdown)


if __name__ == "__main__":
    main()
