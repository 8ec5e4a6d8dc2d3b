"""Shared plumbing of the benchmarks: command lines from frozen configs, the machine's
description, JSON output and goal bookkeeping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from lfm_core.errors import ConfigError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS_DIR / ".cache"
NONE_WORDS = ("none", "null")
BYTES_PER_GIB = 2**30

C = TypeVar("C")


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


def goal(value: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
    """A measured value next to its goal: {"value", "goal", "met"} (met is None when unmeasured)."""
    if value is None or not math.isfinite(value):
        return {"value": None, "goal": target, "met": None}
    met = value >= target if higher_is_better else value <= target
    return {"value": value, "goal": target, "met": bool(met)}


# ---- command lines from frozen dataclasses ----------------------------------------------------


def _optional_of(hint: Any) -> Any | None:
    """X for a hint `X | None`, else None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _optional_parser(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in NONE_WORDS else kind(text)

    parse.__name__ = f"{kind.__name__} or none"
    return parse


def _add_fields(parser: argparse.ArgumentParser, obj: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint, dest = getattr(obj, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(value):
            _add_fields(parser, value, f"{dest}_")
            continue
        flag = "--" + dest.replace("_", "-")
        if hint is bool:
            parser.add_argument(
                flag, dest=dest, default=value, action=argparse.BooleanOptionalAction
            )
        elif typing.get_origin(hint) is tuple:
            kind = typing.get_args(hint)[0]
            parser.add_argument(flag, dest=dest, default=value, type=kind, nargs="*")
        elif (inner := _optional_of(hint)) is not None:
            parser.add_argument(flag, dest=dest, default=value, type=_optional_parser(inner))
        else:
            parser.add_argument(flag, dest=dest, default=value, type=hint)


def _build(obj: C, args: dict[str, Any], prefix: str) -> C:
    values = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            values[f.name] = _build(value, args, f"{prefix}{f.name}_")
        else:
            given = args[prefix + f.name]
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return dataclasses.replace(obj, **values)  # type: ignore[type-var]


def parse_config(
    default: C, tiny: C, argv: list[str] | None, prog: str, description: str
) -> tuple[C, bool]:
    """A config from the command line: every field is a flag (nested ones prefixed), starting from
    the full-scale default or, with --tiny, from the tiny preset.

    Returns:
        (config, dry_run).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tiny", action="store_true")
    known, _ = pre.parse_known_args(argv)
    base = tiny if known.tiny else default
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--tiny", action="store_true", help="start from the tiny smoke-test scale")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    _add_fields(parser, base, "")
    args = vars(parser.parse_args(argv))
    try:
        return _build(base, args, ""), bool(args["dry_run"])
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
        raise  # unreachable: parser.exit raises SystemExit


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
