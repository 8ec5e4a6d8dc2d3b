"""The `lfm` command.

    lfm sweep FILE.yaml [key=value ...] [--dry-run] [--resume] [--address ADDR] [--cluster FILE]
    lfm validate FILE.yaml [key=value ...]
    lfm train FILE.yaml [key=value ...] [--fraction F --criterion C --width W --seed S]
    lfm sample FILE.yaml [key=value ...] [--fraction ... --t-split T] --out grid.png
    lfm export FILE.yaml [key=value ...] --trial NAME --out DIR
    lfm report --experiment NAME --out DIR

Sweep files are validated before Ray starts; a bad key, type, value or file is one line on
stderr and exit status 2. Ray: --address or $RAY_ADDRESS to use a running cluster, else a local
one. `--dry-run` prints the resolved config, the trials and the stages they need (and which are
cached already) without starting anything. Before Ray starts, `orchestrator.preflight` checks
the Ray address, the tracking URI and the data / model paths (one line each on failure).

Imports are lazy: this module imports no torch, ray, mlflow or diffusers, so `lfm --help`
answers at once; each command imports what it uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from lfm_core.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import SweepConfig
    from orchestrator.stages import StageGraph
    from orchestrator.trials import Trial

EXIT_BAD_INPUT = 2  # orchestrator.config.EXIT_BAD_INPUT, without importing it
EXIT_TRIALS_FAILED = 1
POINT_STUDY = "cli"
# Lines of Ray's known noise on a sweep's terminal (worker logs relayed to the driver).
NOISE = re.compile(
    r"PlacementGroupCleaner|Failed to query|Reporting training result|tensorboard --logdir"
    r"|To visualize your results with TensorBoard|\d+%\|[^|]*\| *\d+/\d+ \[|building stage "
    # Ray Train's start-up of each model's worker group (the stage's "built" line follows).
    r"|Requesting resources: |Attempting to start training worker group|Started training worker"
    r"| world_rank=\d+, local_rank=|Setting up process group for|Checkpoint successfully created"
)
# Warnings Ray itself calls safe to ignore, each followed by a traceback from the same process.
NOISE_WITH_TRACEBACK = re.compile(r"Failed to send resource request .*safe to ignore")
TRACEBACK_LINE = re.compile(r"Traceback \(most recent call last\)|\s|[\w.]+(Error|Exception)\b")
# The "(worker pid=N)" prefix Ray puts before each relayed piece of a line, colour codes and all.
RAY_PREFIX = re.compile(r"(\x1b\[[\d;]*m)*\([\w:.-]+ pid=\d+(, ip=[\d.]+)?\)(\x1b\[[\d;]*m)* ?")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, exit status 2, no usage.

    The same as orchestrator.config.OneLineParser, here so that `lfm --help` imports no torch.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class QuietStream:
    """A text stream that drops whole lines matching NOISE (Ray's relayed worker noise) and
    the traceback after a NOISE_WITH_TRACEBACK line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.pending = ""
        self.traceback_of: str | None = None  # the Ray prefix whose traceback is being dropped

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = re.split(r"(?<=[\n\r])", self.pending)
        for line in lines:
            if not self._noise(line):
                self.stream.write(line)
        return len(text)

    def _noise(self, line: str) -> bool:
        prefix = RAY_PREFIX.match(line)
        source = prefix.group(0) if prefix else ""
        body = line[len(source) :]
        if NOISE_WITH_TRACEBACK.search(body):
            self.traceback_of = source
            return True
        if self.traceback_of == source and TRACEBACK_LINE.match(body):
            return True
        self.traceback_of = None
        # A piece that is only Ray's prefix was a progress bar before Ray relayed it.
        return bool(NOISE.search(line)) or bool(source and not body.strip())

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def quiet_terminal() -> None:
    """Filter Ray's known noise from this process's stdout / stderr; Tune's classic table
    (CLIReporter, `orchestrator.sweep.progress_reporter`) instead of its new output."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard hint
    if not isinstance(sys.stdout, QuietStream):
        sys.stdout = QuietStream(sys.stdout)  # type: ignore[assignment]
        sys.stderr = QuietStream(sys.stderr)  # type: ignore[assignment]
    for name in ("ray.train", "ray.tune", "ray.air", "ray.util.state", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Without Tune's file loggers (no TensorBoard) it warns that no trial wrote result.json;
    # the trials' metrics come from their reports, which it has.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # A failed trial is one line in the closing summary; its traceback goes to the log file.
    controller = logging.getLogger("ray.tune.execution.tune_controller")
    controller.addFilter(lambda record: "Trial task failed" not in record.getMessage())


def _address(args: argparse.Namespace) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS") or None


def _preflight(cfg: SweepConfig, args: argparse.Namespace) -> None:
    from orchestrator.preflight import check_before_ray

    check_before_ray(cfg, _address(args))


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
            "--t-split",
            type=_t_split_arg,
            default=None,
            help="coarse-to-fine switch time, or auto (the chosen one)",
        )


def _t_split_arg(text: str) -> float | str:
    """--t-split: a number, or "auto"."""
    from orchestrator.config import AUTO_T_SPLIT

    if text == AUTO_T_SPLIT:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a number in [0, 1], auto") from None


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
    sweep.add_argument(
        "--cluster",
        default=None,
        help="Ray launcher or KubeRay file: check the trials fit its node types (with --dry-run: "
        "print each trial's demand)",
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

    _export_parser(sub)
    _stats_parser(sub)

    # Listed for --help; `main` hands everything after `report` to orchestrator.report.
    sub.add_parser(
        "report",
        help="paper tables and plots from an MLflow experiment (--experiment NAME --out DIR)",
    )
    return parser


def _export_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export", help="write a trial's trained model as a diffusers pipeline folder"
    )
    _add_sweep_file(export)
    export.add_argument("--trial", required=True, help="trial name (as lfm sweep lists them)")
    export.add_argument("--out", required=True, help="folder to write")


def _stats_parser(sub: Any) -> None:
    stats = sub.add_parser(
        "stats",
        help="write the FID reference statistics (mu, sigma) of a sweep's held-out images as an "
        ".npz (for features.fid_stats)",
    )
    _add_sweep_file(stats)
    stats.add_argument(
        "--folder",
        default=None,
        help="a folder of validation images to use as the held-out split (data.heldout_root; "
        "with data.name=folder)",
    )
    stats.add_argument("--out", required=True, help=".npz file to write")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> SweepConfig:
    from orchestrator.config import load_sweep

    return load_sweep(args.file, [*args.overrides, *extra])


def _point_config(args: argparse.Namespace) -> tuple[SweepConfig, Trial]:
    """The sweep config with its search space replaced by the command line's one point.

    The point goes through the same validation as a grid of a sweep file.
    """
    from orchestrator.config import AXES, format_override
    from orchestrator.trials import Trial

    t_split = getattr(args, "t_split", None)
    trial = Trial(POINT_STUDY, float(args.fraction), args.criterion, args.width, t_split, args.seed)
    point = [
        format_override(f"search.{POINT_STUDY}.{axis}", [value])
        for axis, value in zip(AXES, trial.point, strict=True)
    ]
    return _load(args, point), trial


def _yaml(cfg: SweepConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))


def print_plan(cfg: SweepConfig, trials: Sequence[Trial]) -> None:
    """The resolved config, the trials and their stages, marking those already cached."""
    # The keys and the cache only (no StageGraph): a dry run imports no torch, ray or mlflow.
    from orchestrator.cache import StageCache, StageRef
    from orchestrator.stage_keys import stages_of
    from orchestrator.storage import Storage

    print(_yaml(cfg), end="")
    cache = StageCache(Storage(cfg.storage_uri), wait_timeout_s=cfg.cache_wait_timeout_s)
    refs: dict[str, StageRef] = {}
    users: dict[str, int] = {}
    print(f"\ntrials ({len(trials)}):")
    for number, trial in enumerate(trials, 1):
        stages = stages_of(cfg, trial)
        for ref in stages:
            refs.setdefault(ref.key, ref)
            users[ref.key] = users.get(ref.key, 0) + 1
        later = ", and those of the t_split it chooses" if trial.auto else ""
        print(f"  {number:3d}. {trial.name}  ({len(stages)} stages{later})")
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
    from orchestrator.config import resolve_locations

    return resolve_locations(cfg.storage_uri).local_dir / "report" / cfg.experiment


def headline() -> tuple[str, ...]:
    """The metrics of the closing table (speedups: whichever a trial has)."""
    from orchestrator import schema

    return (
        schema.FID,
        schema.STABILITY_SIMILARITY,
        schema.STABILITY_UNRELATED,
        schema.SPEEDUP_VS_REFERENCE,
        schema.SPEEDUP_VS_FINE,
        schema.TRAIN_TIME_S,
    )


def print_outcome(cfg: SweepConfig, outcome: Any) -> None:
    """The closing summary: a row per finished trial, a line per failed one."""
    from orchestrator import schema
    from orchestrator.trials import expand_trials

    names = {t.name: schema.run_name(t) for t in expand_trials(cfg)}
    print(
        f"\nsweep {cfg.name!r}: {len(outcome.metrics)} trials finished, {len(outcome.errors)} failed, {outcome.seconds:.0f} s"
    )
    # Columns no finished trial has (speedup_vs_fine without coarse-to-fine trials) are left out.
    rows = outcome.metrics.values()
    keys = [k for k in headline() if any(math.isfinite(m.get(k, math.nan)) for m in rows)]
    width = max((len(names.get(name, name)) for name in outcome.metrics), default=5)
    print(f"  {'trial':<{width}}  " + "  ".join(f"{key:>20}" for key in keys))
    for name, metrics in sorted(outcome.metrics.items()):
        row = "  ".join(f"{metrics.get(key, float('nan')):>20.4g}" for key in keys)
        print(f"  {names.get(name, name):<{width}}  {row}")
    for name in outcome.errors:
        print(f"  FAILED {names.get(name, name)}: {outcome.failures.get(name, '')}")
    if outcome.log_file is not None:
        print(f"tracebacks: {outcome.log_file}")
    if outcome.time_budget is not None:
        print(outcome.time_budget.line())


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.trials import expand_trials

    cfg = _load(args)
    trials = expand_trials(cfg)
    if args.dry_run:
        print_plan(cfg, trials)
        if args.cluster:
            from orchestrator import cluster_fit

            nodes = cluster_fit.node_types_from_file(args.cluster)
            names = [trial.name for trial in trials]
            print("\n" + "\n".join(cluster_fit.plan_lines(cfg.resources, names, nodes)))
        return 0
    _preflight(cfg, args)
    quiet_terminal()
    from orchestrator.report import build_report
    from orchestrator.sweep import run_sweep

    outcome = run_sweep(cfg, args.resume, args.address, args.cluster)
    print_outcome(cfg, outcome)
    if outcome.metrics:
        report = build_report(cfg.experiment, _report_dir(cfg), tracking_uri=cfg.tracking_uri)
        print(f"report: {report.out_dir / 'report.md'}")
    print(where_to_look(cfg))
    return EXIT_TRIALS_FAILED if outcome.errors else 0


def _validate(args: argparse.Namespace) -> int:
    from orchestrator.config import check_model_shapes
    from orchestrator.trials import expand_trials

    cfg = _load(args)
    check_model_shapes(cfg)
    print(_yaml(cfg), end="")
    print(f"ok: {len(expand_trials(cfg))} trials")
    return 0


def _point_graph(args: argparse.Namespace) -> tuple[StageGraph, Trial] | None:
    """The stage graph and trial of `lfm train` / `lfm sample`; None after a dry run."""
    cfg, trial = _point_config(args)
    if args.dry_run:
        print_plan(cfg, [trial])
        return None
    _preflight(cfg, args)
    from orchestrator.stages import StageGraph
    from orchestrator.sweep import cache_for, init_ray

    init_ray(cfg, args.address)
    return StageGraph(cfg, cache_for(cfg)), trial


def _train(args: argparse.Namespace) -> int:
    point = _point_graph(args)
    if point is not None:
        from orchestrator.stages import read_info

        graph, trial = point
        ref = graph.trial(trial).model
        folder = graph.get(ref)
        graph.load_model(ref)  # verifies shapes and the recorded hashes of a cached model
        print(json.dumps(read_info(folder), indent=2, sort_keys=True))
        print(f"checkpoint: {folder}")
    return 0


def sample_facts(info: dict[str, Any], coarse_to_fine: bool) -> dict[str, Any]:
    """A samples stage's facts as `lfm sample` prints them: one NFE for a single model."""
    if coarse_to_fine:
        return info
    facts = {k: v for k, v in info.items() if k not in ("nfe_coarse", "nfe_fine")}
    facts["nfe"] = info.get("nfe_coarse", 0) + info.get("nfe_fine", 0)
    return facts


def _sample(args: argparse.Namespace) -> int:
    point = _point_graph(args)
    if point is not None:
        from lfm_core.images import save_grid
        from orchestrator.stages import read_info

        graph, trial = point
        ref = graph.trial(trial).samples
        out = save_grid(graph.load_samples(ref)["grid"], Path(args.out))
        facts = sample_facts(read_info(graph.get(ref)), trial.t_split is not None)
        print(json.dumps(facts, indent=2, sort_keys=True))
        print(f"samples: {out}")
    return 0


def find_trial(cfg: SweepConfig, name: str) -> Trial:
    """The sweep's trial of this name (its full name or its short run name).

    Raises:
        ConfigError: no such trial; the message lists the names.
    """
    from orchestrator import schema
    from orchestrator.trials import expand_trials

    trials = expand_trials(cfg)
    for trial in trials:
        if name in (trial.name, schema.run_name(trial), schema.run_name(trial, True)):
            return trial
    names = ", ".join(repr(t.name) for t in trials)
    raise ConfigError(f"--trial: no trial {name!r} in sweep {cfg.name!r}; trials: {names}")


def _export(args: argparse.Namespace) -> int:
    cfg = _load(args)
    trial = find_trial(cfg, args.trial)
    from lfm_core.pipeline import custom_pipeline_file
    from orchestrator.stages import StageGraph
    from orchestrator.sweep import cache_for
    from orchestrator.tracking import export_trial, trial_keys_refs

    graph = StageGraph(cfg, cache_for(cfg), progress=False)
    for role, ref in trial_keys_refs(graph, trial).items():
        if not graph.cache.is_complete(ref):
            raise ConfigError(
                f"--trial {args.trial}: its {role} ({ref.stage} {ref.key[:12]}) is not built "
                f"under {cfg.storage_uri}; run `lfm sweep {args.file}` first"
            )
    out = export_trial(graph, trial, Path(args.out))
    kind = "CoarseToFinePipeline" if trial.t_split is not None else "LatentFlowPipeline"
    print(f"exported {trial.name} as a {kind}: {out}")
    print(f"  from lfm_core.pipeline import {kind}; pipe = {kind}.from_pretrained({str(out)!r})")
    module = custom_pipeline_file(out)
    print(
        f"  or: DiffusionPipeline.from_pretrained({str(out)!r}, custom_pipeline={str(module)!r}, "
        "trust_remote_code=True)"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from orchestrator.config import format_override

    extra = ["features.fid_stats=null"]
    if args.folder is not None:
        extra.append(format_override("data.heldout_root", str(Path(args.folder).resolve())))
    cfg = _load(args, extra)
    from orchestrator import stage_keys
    from orchestrator.stage_builders import STATS_FILE
    from orchestrator.stages import StageGraph, read_info
    from orchestrator.sweep import cache_for

    graph = StageGraph(cfg, cache_for(cfg))
    folder = graph.get(stage_keys.reference_stats(cfg))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / STATS_FILE, out)
    info = read_info(folder)
    print(
        f"reference stats of {info['n']} held-out images ({info['dim']}-d "
        f"{cfg.features.fid.name} features): {out}"
    )
    return 0


def _report(argv: list[str]) -> int:
    from orchestrator.report import main as report_main

    return report_main(argv) or 0


COMMANDS = {
    "sweep": _sweep,
    "validate": _validate,
    "train": _train,
    "sample": _sample,
    "export": _export,
    "stats": _stats,
}


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
