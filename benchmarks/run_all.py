"""Run every benchmark in turn and write `summary.json` and `summary.md` next to their results.

Order: coarse-to-fine (trains the full-data coarse model), data reduction (reuses it: the same
stage of the benchmarks' stage graph), training throughput, sweep efficiency. A benchmark that fails is recorded with its error and the others
still run; the exit status is then 1.

    python -m benchmarks.run_all [--tiny] [--out DIR] [--cache-dir DIR] [--only NAME ...]
        [--overrides key=value ...]   (sweep-file overrides given to every benchmark)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import coarse_to_fine, data_reduction, sweep_efficiency, train_throughput
from benchmarks.common import CACHE_DIR, RESULTS_DIR, goal, machine, print_config, write_json

# name -> (module, full-scale config, tiny config); run in this order.
BENCHMARKS: dict[str, tuple[Any, Any, Any]] = {
    coarse_to_fine.NAME: (coarse_to_fine, coarse_to_fine.C2FConfig(), coarse_to_fine.TINY),
    data_reduction.NAME: (
        data_reduction,
        data_reduction.DataReductionConfig(),
        data_reduction.TINY,
    ),
    train_throughput.NAME: (
        train_throughput,
        train_throughput.ThroughputConfig(),
        train_throughput.TINY,
    ),
    sweep_efficiency.NAME: (
        sweep_efficiency,
        sweep_efficiency.SweepBenchConfig(),
        sweep_efficiency.TINY,
    ),
}
SUMMARY_KEYS = (
    "c2f_speedup",
    "c2f_fid_ratio",
    "c2f_bound_ratio",
    "c2f_t_split",
    "ray_train_throughput_ratio",
    "sweep_wall_ratio",
    "duplicate_stages",
)


def configs_for(
    tiny: bool,
    out: str,
    cache_dir: str,
    only: tuple[str, ...] = (),
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Each benchmark's config (full scale or tiny) writing to `out`, its stages cached under
    `cache_dir`, with `overrides` (sweep-file `key=value`) added to every benchmark's own."""
    configs = {}
    for name, (_, full, small) in BENCHMARKS.items():
        if only and name not in only:
            continue
        cfg = dataclasses.replace(small if tiny else full, out=out)
        if hasattr(cfg, "stages"):
            stages = cfg.stages
            stages = dataclasses.replace(
                stages, storage=cache_dir, overrides=(*stages.overrides, *overrides)
            )
            cfg = dataclasses.replace(cfg, stages=stages)
        elif overrides:
            cfg = dataclasses.replace(cfg, overrides=(*cfg.overrides, *overrides))
        configs[name] = cfg
    return configs


def _goals(configs: dict[str, Any], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every headline number next to its goal (taken from the configs that ran)."""
    goals = {}
    if (c2f := configs.get(coarse_to_fine.NAME)) is not None:
        goals["c2f_speedup"] = goal(values["c2f_speedup"], c2f.min_speedup, True)
        goals["c2f_fid_ratio"] = goal(values["c2f_fid_ratio"], 1 + c2f.fid_tolerance, False)
        goals["c2f_bound_ratio"] = goal(values["c2f_bound_ratio"], c2f.min_bound_ratio, True)
    if (tp := configs.get(train_throughput.NAME)) is not None:
        goals["ray_train_throughput_ratio"] = goal(
            values["ray_train_throughput_ratio"], tp.min_ratio, True
        )
    if (sw := configs.get(sweep_efficiency.NAME)) is not None:
        goals["sweep_wall_ratio"] = goal(values["sweep_wall_ratio"], sw.max_ratio, False)
        goals["duplicate_stages"] = goal(values["duplicate_stages"], 0, False)
    return goals


def summarize(
    configs: dict[str, Any],
    results: dict[str, dict[str, Any]],
    errors: dict[str, str],
    seconds: dict[str, float],
    tiny: bool,
) -> dict[str, Any]:
    """The top-level numbers of every benchmark, their goals, the machine and the timings."""
    values: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    for result in results.values():
        values.update(result["summary"])
    about = machine()
    return {
        **values,
        "machine": about,
        "measured_on": about["description"],
        "scale": "tiny (smoke test: the numbers mean nothing)" if tiny else "full",
        "goals": _goals(configs, values),
        "errors": errors,
        "benchmark_seconds": seconds,
        "total_seconds": sum(seconds.values()),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(summary: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """summary.md: the goals table, then each benchmark's own section."""
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {summary['measured_on']} ({summary['scale']} scale); "
        f"total {summary['total_seconds'] / 60:.1f} min. Load average at the end: "
        f"{summary['machine']['load_average_1m']:.1f}.",
        "",
        "| number | value | goal | met |",
        "|---|---|---|---|",
    ]
    for key, row in summary["goals"].items():
        met = {True: "yes", False: "no", None: "n/a"}[row["met"]]
        comparison = (
            "<=" if key in ("c2f_fid_ratio", "sweep_wall_ratio", "duplicate_stages") else ">="
        )
        lines.append(f"| {key} | {_cell(row['value'])} | {comparison} {row['goal']:g} | {met} |")
    lines += ["", f"c2f_t_split: {_cell(summary['c2f_t_split'])}", ""]
    for name, error in summary["errors"].items():
        lines += [f"**{name} failed**: `{error}`", ""]
    modules: dict[str, Callable[[dict[str, Any]], str]] = {
        name: module.markdown for name, (module, _, _) in BENCHMARKS.items()
    }
    for name, result in results.items():
        lines.append(modules[name](result))
    return "\n".join(lines)


def run(configs: dict[str, Any], out: Path, tiny: bool = False) -> dict[str, Any]:
    """Run the configured benchmarks in order; write summary.json and summary.md under out."""
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name, (module, _, _) in BENCHMARKS.items():
        if name not in configs:
            continue
        started = time.perf_counter()
        print(f"==> {name}", flush=True)
        try:
            results[name] = module.run(configs[name])
        except Exception as err:  # one failing benchmark must not discard the others' numbers
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {' '.join(str(err).split())}"
        seconds[name] = time.perf_counter() - started
        print(f"<== {name}: {seconds[name]:.0f} s", flush=True)
    summary = summarize(configs, results, errors, seconds, tiny)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary, results))
    return summary


def summarize_saved(configs: dict[str, Any], out: Path) -> dict[str, Any]:
    """Rebuild summary.json and summary.md from the result files already under out (after one
    benchmark was rerun alone); each benchmark's seconds are those its own file records."""
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in configs}
    seconds = {name: float(result["seconds"]) for name, result in results.items()}
    summary = summarize(configs, results, {}, seconds, tiny=False)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary, results))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--tiny", action="store_true", help="every benchmark at its smoke-test scale"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="the benchmarks' stage cache")
    parser.add_argument(
        "--overrides", nargs="*", default=(), help="sweep-file key=value for every benchmark"
    )
    parser.add_argument(
        "--only", nargs="*", default=(), choices=list(BENCHMARKS), help="run only these"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved configs and stop"
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="run nothing: rebuild the summary from the result files under --out",
    )
    args = parser.parse_args(argv)
    configs = configs_for(
        args.tiny, args.out, args.cache_dir, tuple(args.only), tuple(args.overrides)
    )
    if args.dry_run:
        for name, cfg in configs.items():
            print(f"# {name}")
            print_config(cfg)
        return
    if args.summarize:
        summary = summarize_saved(configs, Path(args.out))
    else:
        summary = run(configs, Path(args.out), args.tiny)
    print(Path(args.out) / "summary.md")
    print("\n".join(f"{key}: {summary[key]}" for key in SUMMARY_KEYS))
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
