"""Shared plumbing of the benchmarks: command lines (`key=value` overrides of frozen configs), the
stage graph every benchmark builds its artefacts through, the machine's description and one
result recorder.

Every artefact (autoencoder, latents, feature extractors and features, subsets, scores, trained
models, samples) is a stage of `orchestrator.stages.StageGraph`, keyed by `orchestrator.stage_keys`
on a SweepConfig: `benchmarks/embedded.yaml` (data, autoencoder, extractors, scoring) plus the
benchmark's `Stages.overrides`, with the benchmark's own nested sections (its `TrainConfig`,
its sampling settings) put in place. Models train in this process (`InProcessTrainer`); the
cache lives under `Stages.storage` (benchmarks/results/.cache, git-ignored), so benchmarks
that need the same model (the coarse model of coarse-to-fine is the full-data model of data
reduction) share one build, and a rerun builds nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from lfm_core.autoencoder import decode
from lfm_core.checkpoint import load_velocity
from lfm_core.errors import ConfigError
from lfm_core.features import FeatureExtractor
from lfm_core.metrics import ReferenceStats, fid
from lfm_core.sampling import sample_seeds
from lfm_core.velocity import VelocityModel
from orchestrator import stage_keys
from orchestrator.cache import StageRef
from orchestrator.config import SweepConfig, apply_overrides, load_sweep, validate
from orchestrator.stage_builders import FEATURES_FILE, INDICES_FILE, LATENTS_FILE
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for
from orchestrator.trainers import InProcessTrainer

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / ".cache"
BASE_SWEEP = BENCH_DIR / "embedded.yaml"
BYTES_PER_GIB = 2**30
# The embedded data at toy size: 256 / 128 digits, a small autoencoder trained one epoch.
TINY_OVERRIDES = (
    "data.limit=256",
    "data.heldout_limit=128",
    "autoencoder.block_out_channels=[8,16,16]",
    "autoencoder.mid_block_attention=false",
    "autoencoder.epochs=1",
)

C = TypeVar("C")


@dataclass(frozen=True)
class Stages:
    """Where a benchmark's artefacts come from.

    Attributes:
        file: the base sweep file (data, autoencoder, feature extractors, scoring).
        overrides: `key=value` overrides of it (orchestrator.config.load_sweep).
        storage: the stage cache's storage root.
    """

    file: str = str(BASE_SWEEP)
    overrides: tuple[str, ...] = ()
    storage: str = str(CACHE_DIR)


TINY_STAGES = Stages(overrides=TINY_OVERRIDES)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average (runnable processes): above the core count means contention."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, accelerator, software versions."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / BYTES_PER_GIB
    cores = usable_cores()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "usable_cores": cores,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": load_average(),
        "accelerator": None,
    }
    if torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(0)
        info["description"] = f"1x {info['accelerator']} GPU ({cores}-core CPU host)"
    else:
        info["description"] = f"a {cores}-core CPU machine ({info['cpu']})"
    return info


def _clean(value: Any) -> Any:
    """JSON-safe copy: dataclasses and tuples become dicts and lists; NaN and inf become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _clean(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: Any) -> Path:
    """Write value as indented JSON (NaN and inf as null), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(value), indent=2, allow_nan=False) + "\n")
    return path


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    """A number for Markdown; `missing` for None (a NaN or inf reads back from JSON as None)."""
    return missing if value is None else format(value, spec)


def goal(value: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
    """A measured value next to its goal: {"value", "goal", "met"} (met is None when unmeasured)."""
    if value is None or not math.isfinite(value):
        return {"value": None, "goal": target, "met": None}
    met = value >= target if higher_is_better else value <= target
    return {"value": value, "goal": target, "met": bool(met)}


@dataclass(frozen=True)
class Clock:
    """When a benchmark started: wall-clock and 1-minute load average."""

    started: float
    load_start: float

    @classmethod
    def start(cls) -> Clock:
        return cls(time.perf_counter(), load_average())


def record_result(
    name: str, cfg: Any, clock: Clock, body: dict[str, Any], goals: dict[str, Any]
) -> dict[str, Any]:
    """Write `<cfg.out>/<name>.json`: the benchmark's name, resolved config, the machine, its
    measurements (`body`), its goals, the load average and its seconds; returns what it wrote
    (as read back from JSON, so a result in memory and one on disk look alike)."""
    result = {
        "benchmark": name,
        "config": cfg,
        "machine": machine(),
        **body,
        "goals": goals,
        "load_average": {"start": clock.load_start, "end": load_average()},
        "seconds": time.perf_counter() - clock.started,
    }
    path = write_json(Path(cfg.out) / f"{name}.json", result)
    return json.loads(path.read_text())


# ---- the stage graph ------------------------------------------------------------------------


class Embedded:
    """A benchmark's view of the stage graph of one SweepConfig.

    Args:
        stages: the base sweep file, its overrides and the storage root.
        sections: SweepConfig sections replaced by the benchmark's own (e.g. {"train":
            TrainConfig(...), "sampling": SamplingSection(...)}); validated like a sweep file.
        progress: show progress bars while building.
        device: where models, the autoencoder and extractors run (None: the graph's default).
    """

    def __init__(
        self,
        stages: Stages,
        sections: dict[str, Any],
        progress: bool = True,
        device: str | None = None,
    ) -> None:
        loaded = load_sweep(stages.file, [*stages.overrides, f"storage={stages.storage}"])
        self.cfg: SweepConfig = dataclasses.replace(loaded, **sections)
        validate(self.cfg)
        self.cache = cache_for(self.cfg)
        self.graph = StageGraph(self.cfg, self.cache, InProcessTrainer(progress), progress, device)

    # ---- refs ------------------------------------------------------------------------------

    def full_subset(self) -> StageRef:
        """All training latents (one shared subset whatever the criterion)."""
        return stage_keys.subset(self.cfg, 1.0, stage_keys.FULL_SUBSET, self.cfg.train.seed)

    def model_ref(
        self,
        subset: StageRef,
        name: str,
        width: int | None,
        steps: int | None = None,
        seed: int | None = None,
        snapshot_every: int | None = None,
    ) -> StageRef:
        """An fm_model stage trained with the config's TrainConfig (steps / seed replaced)."""
        train = self.cfg.train
        return stage_keys.fm_model(
            self.cfg,
            subset,
            name,
            width,
            train.steps if steps is None else steps,
            train.seed if seed is None else seed,
            snapshot_every,
        )

    # ---- artefacts -------------------------------------------------------------------------

    @cached_property
    def latents(self) -> Tensor:
        """Scaled train latents (N, C, h, w), on the CPU."""
        return self.graph.tensors(stage_keys.latents(self.cfg), LATENTS_FILE)["latents"]

    @property
    def latents_file(self) -> Path:
        return self.graph.get(stage_keys.latents(self.cfg)) / LATENTS_FILE

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.latents.shape[1:]
        return int(c), int(h), int(w)

    @cached_property
    def vae(self) -> Any:
        return self.graph.load_autoencoder(stage_keys.autoencoder(self.cfg))

    @cached_property
    def extractor(self) -> FeatureExtractor:
        """The FID feature extractor (features.fid)."""
        return self.graph.load_extractor(stage_keys.extractor(self.cfg, "fid"))

    def data_features(self, split: str) -> Tensor:
        """FID-extractor features (N, D) of a split's real images."""
        ref = stage_keys.data_features(self.cfg, "fid", split)
        return self.graph.tensors(ref, FEATURES_FILE)["features"]

    @cached_property
    def reference(self) -> ReferenceStats:
        """Statistics of the held-out split's features: the FID reference."""
        return ReferenceStats.from_features(self.data_features("heldout"))

    def indices(self, subset: StageRef) -> Tensor:
        """The kept indices (n,) of a subset stage."""
        return self.graph.tensors(subset, INDICES_FILE)["indices"]

    def trained(self, ref: StageRef) -> tuple[VelocityModel, dict[str, Any]]:
        """(EMA model on the CPU, {train_seconds, cached}) of an fm_model stage."""
        cached = self.cache.is_complete(ref)
        model = load_velocity(self.graph.get(ref))
        return model, {"train_seconds": self.graph.info(ref)["train_elapsed_s"], "cached": cached}

    def info(self) -> dict[str, Any]:
        """Facts about the embedded data: the cache, the autoencoder's, the FID extractor's."""
        return {
            "storage": self.cfg.storage_uri,
            "autoencoder": self.graph.info(stage_keys.autoencoder(self.cfg)),
            "fid_extractor": self.graph.info(stage_keys.extractor(self.cfg, "fid")),
        }

    # ---- what the benchmarks measure with ------------------------------------------------------

    def sample(self, model: VelocityModel, seeds: Sequence[int]) -> Tensor:
        """Latents (N, C, h, w) of model's ODE from the noise of `seeds`, with the config's
        sampling settings (lfm_core.sampling.sample_seeds)."""
        settings = self.graph.sampler(dataclasses.asdict(self.cfg.sampling))
        model = model.to(settings.device)
        return sample_seeds(model, model, seeds, 1.0, settings).latents

    def images(self, latents: Tensor) -> Tensor:
        """Decoded images (N, 1, 32, 32) in [-1, 1] of scaled latents (N, C, h, w)."""
        return decode(self.vae, latents, progress=False)

    def fid(self, latents: Tensor) -> float:
        """FID of the images decoded from latents (N >= 2) against the held-out split."""
        return fid(self.extractor(self.images(latents)), self.reference)


# ---- command lines ----------------------------------------------------------------------------


def parse_config(
    default: C, tiny: C, argv: list[str] | None, prog: str, description: str
) -> tuple[C, bool]:
    """A config from the command line: `key=value` overrides (orchestrator.config's parser:
    dotted keys into nested sections, YAML values) of the full-scale default or, with
    --tiny, of the tiny preset.

    Returns:
        (config, dry_run).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--tiny", action="store_true", help="start from the tiny smoke-test scale")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. train.steps=800 pairs=[64:256]"
    )
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(tiny if args.tiny else default, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    return cfg, bool(args.dry_run)


def print_config(cfg: Any) -> None:
    """The resolved config as JSON (what --dry-run shows and every result file records)."""
    print(json.dumps(_clean(cfg), indent=2))


def benchmark_main(
    default: Any,
    tiny: Any,
    argv: list[str] | None,
    name: str,
    doc: str,
    run: Callable[[Any], dict],
    markdown: Callable[[dict], str],
) -> None:
    """The command line of one benchmark: parse flags, print the config, run, print Markdown."""
    cfg, dry_run = parse_config(
        default, tiny, argv, f"python -m benchmarks.{name}", doc.split("\n")[0]
    )
    print_config(cfg)
    if dry_run:
        return
    print(markdown(run(cfg)))
