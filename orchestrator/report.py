"""`lfm report`: the paper's tables and figures from a sweep's MLflow experiment.

    lfm report --experiment NAME --out DIR [--tracking-uri URI] [--all-parents]

Reads the trial (child) runs of the experiment's latest sweep (parent) run, or of all of them
with `--all-parents`, from any tracking URI, and writes into DIR, the same bytes for the same
runs: tables 1-4 (see `orchestrator.report_tables`) as Markdown, LaTeX (booktabs) and CSV, the
figures (see `orchestrator.report_figures`) as PNG, and `report.md` linking them. The files are
also logged to the sweep's parent run under `report/`.

Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else the sweeps' default (sqlite under
$LFM_STORAGE, else ./results). Errors (unknown or empty experiment, a tracking server that does
not answer, a missing database) are one-line `ReportError`s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from lfm_core.coarse_to_fine import PAPER_T_SPLIT
from lfm_core.errors import ConfigError
from orchestrator.config import SQLITE_PREFIX, OneLineParser, resolve_locations
from orchestrator.report_figures import (
    coarse_to_fine_figure,
    data_reduction_figure,
    read_png,
    same_seed_figure,
    split_comparison,
)
from orchestrator.report_tables import (
    CELL_NOTE,
    Studies,
    Table,
    TrialRecord,
    build_tables,
    classify,
    markdown_rows,
    to_csv,
    to_latex,
    to_markdown,
    widest_first,
    width_order,
)
from orchestrator.schema import CHOSEN_T_SPLIT, SAMPLED_T_SPLIT
from orchestrator.tracking import KIND_TAG, PARENT_TAG

REPORT_FILE = "report.md"
ARTIFACT_DIR = "report"
# Written by orchestrator.tracking.finish_child: reference model's samples above, the trial's below.
COMPARISON_ARTIFACT = "comparison.png"
SWEEP_KIND = "sweep"
TABLE_FORMATS = ("md", "tex", "csv")
FIGURES = {
    "data_reduction": "fig_data_reduction.png",
    "coarse_to_fine": "fig_coarse_to_fine.png",
    "same_seed": "fig_same_seed.png",
}
TABLE_NAMES = (
    "table1_data_reduction",
    "table2_capacity",
    "table3_coarse_to_fine",
    "table4_conditional",
)
GRID_KINDS = ("reduced data", "small model", "coarse-to-fine")
SEARCH_PAGE = 1000
# Bounded first contact, so a dead server is one quick error, not minutes of retries.
PROBE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
MAX_REASON = 160


class ReportError(ConfigError):
    """The report cannot be made (unknown or empty experiment, unreachable tracking). One line."""


@dataclass(frozen=True)
class ReportResult:
    """What `build_report` wrote.

    Attributes:
        out_dir: the output folder. files: the files written there, sorted.
        tables: the non-empty tables. parent_run_id: the run the files were logged to (None:
            not logged). trial_runs: trial runs read. notes: what could not be shown, and why.
    """

    out_dir: Path
    files: tuple[Path, ...]
    tables: tuple[Table, ...]
    parent_run_id: str | None
    trial_runs: int
    notes: tuple[str, ...]


@contextlib.contextmanager
def _probe_env() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in PROBE_ENV}
    os.environ.update(PROBE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_line(err: BaseException) -> str:
    """A short one-line reason: the OS error if there is one, else the message's start."""
    text = " ".join(str(err).split())
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    reason = found.group(0) if found else text
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def open_experiment(experiment: str, tracking_uri: str) -> tuple[MlflowClient, str]:
    """(client, experiment id), checking the tracking store answers and the experiment exists.

    Raises:
        ReportError: missing sqlite database, server not answering, unknown experiment.
    """
    if tracking_uri.startswith(SQLITE_PREFIX):
        path = Path(tracking_uri[len(SQLITE_PREFIX) :])
        if not path.is_file():
            raise ReportError(
                f"tracking database {path} does not exist (tracking URI {tracking_uri})"
            )
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        with _probe_env():
            found = client.get_experiment_by_name(experiment)
            names = [] if found else sorted(e.name for e in client.search_experiments())
    except (MlflowException, RequestException, OSError) as err:
        raise ReportError(
            f"tracking URI {tracking_uri} does not answer: {_one_line(err)}"
        ) from None
    if found is None or found.lifecycle_stage != "active":
        available = ", ".join(repr(n) for n in names) or "none"
        raise ReportError(
            f"--experiment: unknown experiment {experiment!r} at {tracking_uri}; available: {available}"
        )
    return client, found.experiment_id


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _latest(runs: Sequence[Run]) -> Run:
    return max(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def select_trials(
    runs: Sequence[Run], experiment: str, all_parents: bool
) -> tuple[list[Run], list[Run], Run | None]:
    """(trial runs, sweep runs used, the latest sweep run) of an experiment's runs.

    Sweep runs are those tagged `lfm.kind=sweep` or named as a parent by another run. Without
    any, every run is a trial (a flat experiment) and there is no run to log the report to.

    Raises:
        ReportError: no runs, or no trial runs under the chosen sweep run(s).
    """
    if not runs:
        raise ReportError(f"--experiment: experiment {experiment!r} is empty (no runs)")
    parent_ids = {r.data.tags[PARENT_TAG] for r in runs if PARENT_TAG in r.data.tags}
    parents = [
        r for r in runs if r.data.tags.get(KIND_TAG) == SWEEP_KIND or r.info.run_id in parent_ids
    ]
    if not parents:
        return list(runs), [], None
    latest = _latest(parents)
    chosen = parents if all_parents else [latest]
    chosen_ids = {p.info.run_id for p in chosen}
    trials = [r for r in runs if r.data.tags.get(PARENT_TAG) in chosen_ids]
    if not trials:
        raise ReportError(
            f"--experiment: experiment {experiment!r} has no trial runs under sweep run "
            f"{latest.info.run_id} ({len(parents)} sweep runs; --all-parents reads them all)"
        )
    return trials, sorted(chosen, key=lambda r: r.info.run_id), latest


def to_records(runs: Sequence[Run]) -> tuple[list[TrialRecord], list[str]]:
    """(parsed trial records, notes on runs that are no trial) of child runs."""
    records, notes = [], []
    for run in sorted(runs, key=lambda r: (r.info.run_name or "", r.info.run_id)):
        try:
            records.append(
                TrialRecord.from_run(
                    run.info.run_id,
                    run.info.run_name or run.info.run_id,
                    run.info.status,
                    run.data.params,
                    run.data.metrics,
                )
            )
        except ValueError as err:
            notes.append(f"run {run.info.run_name or run.info.run_id} ignored: {err}")
    return records, notes


def _candidates(records: Sequence[TrialRecord], seed: int, order: Any) -> list[TrialRecord]:
    return sorted((r for r in records if r.finished and r.trial.seed == seed), key=order)


def grid_candidates(studies: Studies) -> tuple[int | None, dict[str, list[TrialRecord]]]:
    """(seed, kind -> finished trials of that seed in order of preference) for the same-seed grid.

    The first candidate with a comparison grid is shown. Reduced data: the smallest fraction
    (then criterion name) at the main width; small model: the narrowest full-data width other
    than the widest; coarse-to-fine: the t_split nearest the chosen one (else the paper's 0.7).
    Seed: the smallest seed with a finished trial, so every row starts from the same noise and
    the reference row (the top half of any of the grids) is the same model.
    """
    groups = (studies.data_reduction, studies.capacity, studies.coarse_to_fine)
    finished = [r.trial.seed for group in groups for r in group if r.finished]
    if not finished:
        return None, {kind: [] for kind in GRID_KINDS}
    seed = min(finished)
    widest = min((r.width for r in studies.capacity), key=widest_first, default=None)
    small = [r for r in studies.capacity if r.width != widest]
    chosen = [v for r in studies.coarse_to_fine if (v := r.value(CHOSEN_T_SPLIT)) is not None]
    target = statistics.fmean(chosen) if chosen else PAPER_T_SPLIT
    reduced = [r for r in studies.data_reduction if r.trial.data_fraction < 1.0]
    return seed, {
        "reduced data": _candidates(
            reduced, seed, lambda r: (r.trial.data_fraction, r.trial.criterion, r.run_id)
        ),
        "small model": _candidates(small, seed, lambda r: (width_order(r.width), r.run_id)),
        "coarse-to-fine": _candidates(
            studies.coarse_to_fine,
            seed,
            lambda r: (abs(_sampled_t_split(r) - target), _sampled_t_split(r), r.name, r.run_id),
        ),
    }


def _sampled_t_split(record: TrialRecord) -> float:
    """The t_split a coarse-to-fine record sampled at (an "auto" one's chosen value)."""
    sampled = record.value(SAMPLED_T_SPLIT)
    if sampled is not None:
        return sampled
    return record.trial.t_split if isinstance(record.trial.t_split, float) else 0.0


def _describe(kind: str, record: TrialRecord) -> str:
    if kind == "reduced data":
        return f"reduced data: {record.trial.data_fraction:g} {record.trial.criterion}, width {record.width}"
    if kind == "small model":
        return f"small model: {record.model}, width {record.width}, full data"
    return f"coarse-to-fine: {record.model} (width {record.width}) -> {record.reference_model}, t_split {_sampled_t_split(record):g}"


def _download_comparison(client: MlflowClient, record: TrialRecord, folder: Path) -> Path | None:
    names = {a.path for a in client.list_artifacts(record.run_id)}
    if COMPARISON_ARTIFACT not in names:
        return None
    target = folder / record.run_id
    target.mkdir()
    return Path(client.download_artifacts(record.run_id, COMPARISON_ARTIFACT, str(target)))


def write_same_seed_grid(
    client: MlflowClient, studies: Studies, path: Path
) -> tuple[list[str], list[str]]:
    """Assemble the reference / reduced / small / coarse-to-fine rows of one seed into `path`.

    Returns:
        (labels of the rows shown, top first; notes on the rows that could not be shown: no
        such trial, or none logged a grid). No file when no row can be shown.
    """
    seed, candidates = grid_candidates(studies)
    if seed is None:
        return [], ["same-seed grid: no finished trial"]
    notes, rows = [], []
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in GRID_KINDS:
            grids = ((r, _download_comparison(client, r, Path(tmp))) for r in candidates[kind])
            record, found = next(((r, g) for r, g in grids if g is not None), (None, None))
            if record is None or found is None:
                tried = len(candidates[kind])
                reason = (
                    f"none of its {tried} trials logged {COMPARISON_ARTIFACT}"
                    if tried
                    else "no trial"
                )
                notes.append(f"same-seed grid, {kind} (finished, seed {seed}): {reason}")
                continue
            top, bottom = split_comparison(read_png(found))
            if reference is None:
                label = f"reference model ({record.reference_model}, full data), training seed {record.trial.seed}"
                reference = (label, top)
            rows.append((_describe(kind, record), bottom))
    if reference is None:
        return [], notes
    title = "Same-seed samples: every column starts from the same initial noise"
    same_seed_figure([reference, *rows], path, title)
    return [label for label, _ in (reference, *rows)], notes


def _clear_outputs(out_dir: Path) -> None:
    """Remove this report's own files from an earlier run, so the folder holds this run's only."""
    names = [
        REPORT_FILE,
        *FIGURES.values(),
        *(f"{t}.{ext}" for t in TABLE_NAMES for ext in TABLE_FORMATS),
    ]
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


def render_report_md(
    experiment: str,
    parents: Sequence[Run],
    records: Sequence[TrialRecord],
    tables: Sequence[Table],
    figures: dict[str, list[str] | None],
    notes: Sequence[str],
) -> str:
    """The text of report.md: run summary, each table inline with links, figures, notes.

    Args:
        figures: figure key (of FIGURES) -> lines to show under it (None: not drawn).
    """
    finished = sum(r.finished for r in records)
    lines = [f"# Report: experiment `{experiment}`", ""]
    if parents:
        ids = ", ".join(f"`{p.info.run_id}`" for p in parents)
        lines.append(f"Sweep run{'s' if len(parents) > 1 else ''}: {ids}.")
    lines += [
        f"Trial runs: {len(records)} ({finished} finished, {len(records) - finished} failed or unfinished).",
        "",
        CELL_NOTE,
        "",
    ]
    for table in tables:
        links = " · ".join(f"[{ext}]({table.name}.{ext})" for ext in TABLE_FORMATS)
        lines += [
            f"## {table.title}",
            "",
            table.caption,
            "",
            markdown_rows(table),
            "",
            f"Files: {links}",
            "",
        ]
    if not tables:
        lines += ["No trial run could be tabulated.", ""]
    captions = {
        "data_reduction": "FID and same-seed similarity against data fraction",
        "coarse_to_fine": "FID and speedup against t_split",
        "same_seed": "Same-seed grids: reference vs reduced data vs small model vs coarse-to-fine",
    }
    lines += ["## Figures", ""]
    for key, name in FIGURES.items():
        lines += [f"### {captions[key]}", ""]
        extra = figures.get(key)
        if extra is None:
            lines += ["Not drawn: no run has the values it needs.", ""]
        else:
            lines += [f"![{captions[key]}]({name})", "", *(f"{line}\n" for line in extra)]
    if notes:
        lines += ["## Not shown", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def _read_records(
    client: MlflowClient, experiment_id: str, experiment: str, all_parents: bool
) -> tuple[list[Run], Run | None, list[TrialRecord], list[str]]:
    """(sweep runs used, the latest sweep run, trial records, notes) of an experiment."""
    try:
        runs = _all_runs(client, experiment_id)
    except (MlflowException, RequestException, OSError) as err:
        raise ReportError(f"reading the runs of {experiment!r} failed: {_one_line(err)}") from None
    trials, parents, latest = select_trials(runs, experiment, all_parents)
    records, notes = to_records(trials)
    return parents, latest, records, notes


def _write_tables(tables: Sequence[Table], out_dir: Path) -> list[Path]:
    """Each table as Markdown, LaTeX and CSV files in `out_dir`."""
    files = []
    for table in tables:
        for ext, text in zip(
            TABLE_FORMATS, (to_markdown(table), to_latex(table), to_csv(table)), strict=True
        ):
            path = out_dir / f"{table.name}.{ext}"
            path.write_text(text)
            files.append(path)
    return files


def _write_figures(
    client: MlflowClient, studies: Studies, tables: Sequence[Table], out_dir: Path
) -> tuple[dict[str, list[str] | None], list[str]]:
    """(figure key -> lines shown under it in report.md, None: not drawn; notes) of the figures."""
    by_name = {t.name: t for t in tables}
    figures: dict[str, list[str] | None] = dict.fromkeys(FIGURES)
    drawers = {"data_reduction": data_reduction_figure, "coarse_to_fine": coarse_to_fine_figure}
    for key, table_name in (("data_reduction", TABLE_NAMES[0]), ("coarse_to_fine", TABLE_NAMES[2])):
        if table_name in by_name and drawers[key](by_name[table_name], out_dir / FIGURES[key]):
            figures[key] = []
    shown, notes = write_same_seed_grid(client, studies, out_dir / FIGURES["same_seed"])
    if shown:
        figures["same_seed"] = [f"Rows: {'; '.join(shown)}."]
    return figures, notes


def _log_files(client: MlflowClient, run_id: str, files: Sequence[Path]) -> None:
    """Log the report's files to the sweep run under ARTIFACT_DIR."""
    try:
        for path in files:
            client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    except (MlflowException, RequestException, OSError) as err:
        raise ReportError(f"could not log the report to run {run_id}: {_one_line(err)}") from None


def build_report(
    experiment: str,
    out_dir: Path,
    tracking_uri: str | None = None,
    log_to_parent: bool = True,
    all_parents: bool = False,
) -> ReportResult:
    """Write the report of an MLflow experiment into `out_dir` and log it to the sweep run.

    Args:
        experiment: MLflow experiment name (one per sweep).
        out_dir: output folder (created; this report's own earlier files are replaced).
        tracking_uri: None: `orchestrator.config.resolve_locations()`'s.
        log_to_parent: log the files to the latest sweep run under `report/`.
        all_parents: aggregate the trials of every sweep run, not only the latest's.

    Raises:
        ReportError: one line (see the module docstring).
    """
    uri = tracking_uri or resolve_locations().tracking_uri
    client, experiment_id = open_experiment(experiment, uri)
    parents, latest, records, notes = _read_records(client, experiment_id, experiment, all_parents)
    studies = classify(records)
    notes += [
        f"run {r.name} in no table: reduced data at width {r.width}, not the main width {studies.main_width}"
        for r in studies.unused
    ]
    tables = build_tables(studies)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    files = _write_tables(tables, out_dir)
    figures, grid_notes = _write_figures(client, studies, tables, out_dir)
    notes += grid_notes
    files += [out_dir / FIGURES[k] for k, lines in figures.items() if lines is not None]
    report = out_dir / REPORT_FILE
    report.write_text(render_report_md(experiment, parents, records, tables, figures, notes))
    files.append(report)
    logged_to = None
    if log_to_parent and latest is not None:
        _log_files(client, latest.info.run_id, files)
        logged_to = latest.info.run_id
    elif log_to_parent:
        notes.append("not logged to MLflow: the experiment has no sweep run")
    return ReportResult(
        out_dir, tuple(sorted(files)), tables, logged_to, len(records), tuple(notes)
    )


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `lfm report`."""
    parser = OneLineParser(
        prog="lfm report", description="Paper tables and figures from an MLflow experiment."
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (the sweep's)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default $MLFLOW_TRACKING_URI, else sqlite under $LFM_STORAGE or ./results",
    )
    parser.add_argument(
        "--all-parents",
        action="store_true",
        help="aggregate every sweep run of the experiment, not only the latest",
    )
    return parser


def main(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """`lfm report`: args as a parsed namespace (.experiment, .out, optional .tracking_uri and
    .all_parents) or the command line after `report`. Raises ReportError (one line)."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    result = build_report(
        args.experiment,
        Path(args.out),
        getattr(args, "tracking_uri", None),
        all_parents=getattr(args, "all_parents", False),
    )
    print(
        f"report of {args.experiment!r}: {result.trial_runs} trial runs, {len(result.tables)} tables, {len(result.files)} files in {result.out_dir}"
    )
    for note in result.notes:
        print(f"  note: {note}")
    if result.parent_run_id:
        print(f"logged to run {result.parent_run_id} under {ARTIFACT_DIR}/")
    print(f"open {result.out_dir / REPORT_FILE}")
    return 0
