"""The `lfm` command.

    lfm sweep FILE.yaml [key=value ...] [--dry-run] [--resume] [--address ADDR]
    lfm validate FILE.yaml [key=value ...]
    lfm train FILE.yaml [key=value ...] [--fraction F --criterion C --width W --seed S]
    lfm sample FILE.yaml [key=value ...] [--fraction ... --t-split T] --out grid.png
    lfm report --experiment NAME --out DIR

Sweep files are validated before Ray starts; a bad key, type, value or file is one line on
stderr and exit status 2. Ray: --address or $RAY_ADDRESS to use a running cluster, else a local
one. `--dry-run` prints the resolved config, the trials and the stages they need (and which are
cached already) without starting anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from lfm_core.errors import ConfigError
from orchestrator import schema
from orchestrator.cache import StageRef
from orchestrator.config import (
    AXES,
    EXIT_BAD_INPUT,
    OneLineParser,
    SweepConfig,
    format_override,
    load_sweep,
    resolve_locations,
)
from orchestrator.report import build_report
from orchestrator.report import main as report_main
from orchestrator.trials import Trial, expand_trials

if TYPE_CHECKING:
    from orchestrator.stages import StageGraph

EXIT_TRIALS_FAILED = 1
HEADLINE = (
    schema.FID,
    schema.STABILITY_SIMILARITY,
    schema.STABILITY_UNRELATED,
    schema.SPEEDUP,
    schema.TRAIN_TIME_S,
)
POINT_STUDY = "cli"


def _add_sweep_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sweep file (YAML)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray address (default $RAY_ADDRESS, else local)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")


def _add_point(parser: argparse.ArgumentParser, t_split: bool) -> None:
    parser.add_argument("--fraction", type=float, default=1.0, help="data fraction (default 1)")
    parser.add_argument("--criterion", default="random", help="scoring criterion (default random)")
    parser.add_argument("--width", type=int, default=None, help="model width (default model.width)")
    parser.add_argument("--seed", type=int, default=0, help="subset and training seed (default 0)")
    if t_split:
        parser.add_argument(
            "--t-split", type=float, default=None, help="coarse-to-fine switch time"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `lfm`."""
    parser = OneLineParser(prog="lfm", description="Latent flow-matching stability sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a sweep file on Ray Tune, tracked in MLflow")
    _add_sweep_file(sweep)
    _add_address(sweep)
    sweep.add_argument(
        "--resume", action="store_true", help="finish the unfinished trials of the last run"
    )

    validate = sub.add_parser("validate", help="check a sweep file and print the resolved config")
    _add_sweep_file(validate)

    train = sub.add_parser(
        "train", help="train (or reuse) one FM model of a sweep file on Ray Train"
    )
    _add_sweep_file(train)
    _add_point(train, t_split=False)
    _add_address(train)

    sample = sub.add_parser(
        "sample", help="sample one model (or coarse-to-fine pair) into a PNG grid"
    )
    _add_sweep_file(sample)
    _add_point(sample, t_split=True)
    _add_address(sample)
    sample.add_argument("--out", required=True, help="PNG file for the sample grid")

    # Listed for --help; `main` hands everything after `report` to orchestrator.report.
    sub.add_parser(
        "report",
        help="paper tables and plots from an MLflow experiment (--experiment NAME --out DIR)",
    )
    return parser


def _point_config(args: argparse.Namespace) -> tuple[SweepConfig, Trial]:
    """The sweep config with its search space replaced by the command line's one point.

    The point goes through the same validation as a grid of a sweep file.
    """

    t_split = getattr(args, "t_split", None)
    trial = Trial(POINT_STUDY, float(args.fraction), args.criterion, args.width, t_split, args.seed)
    point = [
        format_override(f"search.{POINT_STUDY}.{axis}", [value])
        for axis, value in zip(AXES, trial.point, strict=True)
    ]
    return load_sweep(args.file, [*args.overrides, *point]), trial


def print_plan(cfg: SweepConfig, trials: Sequence[Trial]) -> None:
    """The resolved config, the trials and their stages, marking those already cached."""
    from orchestrator.stages import StageGraph
    from orchestrator.sweep import cache_for

    print(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())), end="")
    cache = cache_for(cfg)
    graph = StageGraph(cfg, cache)
    refs: dict[str, StageRef] = {}
    users: dict[str, int] = {}
    print(f"\ntrials ({len(trials)}):")
    for number, trial in enumerate(trials, 1):
        stages = graph.stages_of(trial)
        for ref in stages:
            refs.setdefault(ref.key, ref)
            users[ref.key] = users.get(ref.key, 0) + 1
        print(f"  {number:3d}. {trial.name}  ({len(stages)} stages)")
    cached = {key for key, ref in refs.items() if cache.is_complete(ref)}
    print(f"\nstages: {len(refs)} distinct, {len(cached)} cached, under {cfg.storage_uri}/cache")
    for key, ref in refs.items():
        status = "cached" if key in cached else "to build"
        print(f"  {ref.stage:<14} {key[:12]}  {status:<8}  used by {users[key]} trial(s)")


def where_to_look(cfg: SweepConfig) -> str:
    """The closing lines of a sweep: the MLflow UI command and the results folder."""
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        ui = f"open {uri} (experiment {cfg.experiment!r})"
    else:
        ui = f"mlflow ui --backend-store-uri {uri} --port 5000, then open http://127.0.0.1:5000 (experiment {cfg.experiment!r})"
    return f"MLflow: {ui}\nresults folder: {cfg.storage_uri}"


def _report_dir(cfg: SweepConfig) -> Path:
    """Where a sweep writes its report: under local storage, else under ./results."""
    return resolve_locations(cfg.storage_uri).local_dir / "report" / cfg.experiment


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep import run_sweep

    cfg = load_sweep(args.file, args.overrides)
    trials = expand_trials(cfg)
    if args.dry_run:
        print_plan(cfg, trials)
        return 0
    outcome = run_sweep(cfg, resume=args.resume, address=args.address)
    print(
        f"\nsweep {cfg.name!r}: {len(outcome.metrics)} trials finished, {len(outcome.errors)} failed, {outcome.seconds:.0f} s"
    )
    width = max((len(name) for name in outcome.metrics), default=0)
    print(f"  {'trial':<{width}}  " + "  ".join(f"{key:>20}" for key in HEADLINE))
    for name, metrics in sorted(outcome.metrics.items()):
        row = "  ".join(f"{metrics.get(key, float('nan')):>20.4g}" for key in HEADLINE)
        print(f"  {name:<{width}}  {row}")
    for name in outcome.errors:
        print(f"  FAILED: {name}")
    if outcome.metrics:
        report = build_report(cfg.experiment, _report_dir(cfg), tracking_uri=cfg.tracking_uri)
        print(f"report: {report.out_dir / 'report.md'}")
    print(where_to_look(cfg))
    return EXIT_TRIALS_FAILED if outcome.errors else 0


def _validate(args: argparse.Namespace) -> int:
    cfg = load_sweep(args.file, args.overrides)
    print(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())), end="")
    print(f"ok: {len(expand_trials(cfg))} trials")
    return 0


def _point_graph(args: argparse.Namespace) -> tuple[StageGraph, Trial] | None:
    """The stage graph and trial of `lfm train` / `lfm sample`; None after a dry run."""
    from orchestrator.stages import StageGraph
    from orchestrator.sweep import cache_for, init_ray

    cfg, trial = _point_config(args)
    if args.dry_run:
        print_plan(cfg, [trial])
        return None
    init_ray(cfg, args.address)
    return StageGraph(cfg, cache_for(cfg)), trial


def _train(args: argparse.Namespace) -> int:
    from orchestrator.stages import read_info

    point = _point_graph(args)
    if point is not None:
        graph, trial = point
        ref = graph.trial(trial).model
        folder = graph.get(ref)
        graph.load_model(ref)  # verifies shapes and the recorded hashes of a cached model
        print(json.dumps(read_info(folder), indent=2, sort_keys=True))
        print(f"checkpoint: {folder}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from lfm_core.images import save_grid
    from orchestrator.stages import read_info

    point = _point_graph(args)
    if point is not None:
        graph, trial = point
        ref = graph.trial(trial).samples
        out = save_grid(graph.load_samples(ref)["grid"], Path(args.out))
        print(json.dumps(read_info(graph.get(ref)), indent=2, sort_keys=True))
        print(f"samples: {out}")
    return 0


def _report(argv: list[str]) -> int:
    return report_main(argv) or 0


COMMANDS = {"sweep": _sweep, "validate": _validate, "train": _train, "sample": _sample}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `lfm` console script; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `lfm report` owns its arguments (the report module's parser); the rest are parsed here.
    args = None if argv[:1] == ["report"] else build_parser().parse_args(argv)
    command = "report" if args is None else args.command
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        status = _report(argv[1:]) if args is None else COMMANDS[command](args)
    except ConfigError as err:
        print(f"lfm {command}: error: {err}", file=sys.stderr)
        status = EXIT_BAD_INPUT
    sys.exit(status)
