"""The paper's tables from trial runs: grouping, aggregation over seeds, Markdown / LaTeX / CSV.

Plain Python over `TrialRecord`s (no MLflow here; names from `orchestrator.schema`), so the arithmetic is testable on its own.

Which runs go where is decided by their params, not their study's name, because a point listed
by two studies is tracked once (under the first):
- Table 1, data reduction: unconditional trials without t_split at the main width (the width of
  the reduced-data trials), one row per (data_fraction, criterion). Fraction 1 is the full-data
  reference row whatever the criterion: every criterion keeps everything there.
- Table 2, capacity: unconditional trials without t_split on the full data, one row per width.
- Table 3, coarse-to-fine: trials with a t_split, one row per (coarse model, its data, fine
  model, t_split).
- Table 4, conditional: conditional trials without t_split, one row per (data_fraction, criterion).

A cell is the mean and sample standard deviation (ddof 1) over seeds. Runs of the same row and
seed (the full-data trials of several criteria share one model; aggregating several sweep
invocations repeats trials) count as one seed: the mean of their values. Only FINISHED runs with
a finite value enter a mean; a row whose every run failed shows "failed", a metric absent or
NaN in every finished run shows "missing", never a number.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator import schema

# Also read from here by code not yet moved to orchestrator.schema.
from orchestrator.schema import CHOSEN_T_SPLIT
from orchestrator.trials import Trial

FINISHED = "FINISHED"
FAILED = "failed"
MISSING = "missing"
NOT_APPLICABLE = "–"
OK = "ok"
FULL_DATA = "full data"
CONDITIONAL_STUDY = "conditional"
PLUS_MINUS = {"markdown": " ± ", "latex": r" $\pm$ "}
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"}
LATEX_SPECIALS.update({"$": r"\$", "{": r"\{", "}": r"\}"})


@dataclass(frozen=True)
class TrialRecord:
    """One trial run: the Trial its params describe, with the run's status and metrics.

    Attributes:
        run_id, name, status: the MLflow run's (status e.g. "FINISHED", "FAILED", "KILLED").
        trial: rebuilt from the run's params by `orchestrator.schema.trial_from_params` (its
            width is the resolved one the run logged; None: the size's base width).
        params: all of the run's params (the sweep's settings: model, reference model, ...).
        metrics: name -> last logged value.
    """

    run_id: str
    name: str
    status: str
    trial: Trial
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_run(
        cls,
        run_id: str,
        name: str,
        status: str,
        params: Mapping[str, str],
        metrics: Mapping[str, float],
    ) -> TrialRecord:
        """A run's record (params as `orchestrator.tracking` logs them).

        Raises:
            ValueError: a trial param is absent or does not parse (a run of no trial).
        """
        trial = schema.trial_from_params(params)
        # Subset facts are params of the run; the tables read them as numbers beside metrics.
        facts = {k: float(params[k]) for k in schema.SUBSET_PARAMS if k in params}
        return cls(run_id, name, status, trial, dict(params), {**facts, **metrics})

    @property
    def width(self) -> str:
        """The trial's width as logged ("8", or "base" for the size's base width)."""
        return schema.width_text(self.trial.width)

    @property
    def model(self) -> str:
        """The (coarse) velocity model's size name."""
        return self.params.get(schema.MODEL, "")

    @property
    def reference_model(self) -> str:
        """The reference (fine) model's size name."""
        return self.params.get(schema.REFERENCE_MODEL, "")

    @property
    def conditional(self) -> bool:
        """Class-conditional: the run's `conditional` param, or a trial of the conditional study."""
        logged = self.params.get(schema.CONDITIONAL, "").lower() == "true"
        return logged or self.trial.study == CONDITIONAL_STUDY

    @property
    def finished(self) -> bool:
        """The run ended normally."""
        return self.status == FINISHED

    def value(self, key: str) -> float | None:
        """A metric's value, None when absent or not finite."""
        value = self.metrics.get(key)
        return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Column:
    """A metric column: MLflow key, header, format spec of its numbers, and what a cell says
    when finished runs have no finite value (`absent`; default MISSING)."""

    key: str
    title: str
    fmt: str
    absent: str = ""


@dataclass(frozen=True)
class Cell:
    """One metric of one row over seeds.

    Attributes:
        mean: mean over the seeds that have a value (None: none has).
        std: sample standard deviation over them (None: fewer than two).
        n: seeds that have a value.
        status: OK, FAILED (no run of the row finished), MISSING (finished, no value; or the
            column's `absent` text) or NOT_APPLICABLE (a floor row's non-FID cells).
    """

    mean: float | None
    std: float | None
    n: int
    status: str


NOT_APPLICABLE_CELL = Cell(None, None, 0, NOT_APPLICABLE)


@dataclass(frozen=True)
class Row:
    """A table row.

    Attributes:
        values: the row's key values (numbers where they are numbers), for sorting and plots.
        labels: the same as text, as printed.
        seeds: distinct seeds with a run. failed_seeds: of those, seeds with no finished run.
        cells: one per metric column.
    """

    values: tuple[Any, ...]
    labels: tuple[str, ...]
    seeds: int
    failed_seeds: int
    cells: tuple[Cell, ...]

    @property
    def finished_seeds(self) -> int:
        """Seeds with at least one finished run."""
        return self.seeds - self.failed_seeds


@dataclass(frozen=True)
class Table:
    """A paper table.

    Attributes:
        name: file stem, e.g. "table1_data_reduction". title: e.g. "Table 1: data reduction".
        caption: what the numbers are. keys: headers of the key columns.
        columns: the metric columns. rows: sorted rows.
    """

    name: str
    title: str
    caption: str
    keys: tuple[str, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]

    def has(self, key: str) -> bool:
        """The table has a column of metric `key`."""
        return any(c.key == key for c in self.columns)

    def cell(self, row: Row, key: str) -> Cell:
        """The row's cell of metric `key`."""
        return row.cells[[c.key for c in self.columns].index(key)]


@dataclass(frozen=True)
class Studies:
    """Trial records by table (a full-data trial at the main width is in both 1 and 2).

    Attributes:
        data_reduction, capacity, coarse_to_fine, conditional: the records of tables 1-4.
        unused: records in no table (reduced data at a width other than the main one).
        main_width: the width of table 1.
    """

    data_reduction: tuple[TrialRecord, ...]
    capacity: tuple[TrialRecord, ...]
    coarse_to_fine: tuple[TrialRecord, ...]
    conditional: tuple[TrialRecord, ...]
    unused: tuple[TrialRecord, ...]
    main_width: str | None


def width_order(width: str) -> tuple[int, float, str]:
    """Sort key of logged widths: numbers by value, then names ("base")."""
    try:
        return (0, float(width), "")
    except ValueError:
        return (1, 0.0, width)


def widest_first(width: str) -> tuple[int, float, str]:
    """Sort key of logged widths, widest first: a named width (the size's default, "base", which
    the reference usually is) before numbers, numbers from large to small."""
    group, value, name = width_order(width)
    return (1 - group, -value, name)


def data_label(fraction: float, criterion: str) -> str:
    """The criterion, or FULL_DATA at fraction 1 (where every criterion keeps everything)."""
    return FULL_DATA if fraction == 1.0 else criterion


def _main_width(plain: Sequence[TrialRecord]) -> str | None:
    """The width of the reduced-data trials (most frequent; ties: the widest)."""
    reduced = [r.width for r in plain if r.trial.data_fraction < 1.0] or [r.width for r in plain]
    if not reduced:
        return None
    counts = Counter(reduced)
    return min(counts, key=lambda w: (-counts[w], widest_first(w)))


def classify(records: Iterable[TrialRecord]) -> Studies:
    """Split trial records by table (see the module docstring)."""
    records = sorted(records, key=lambda r: (r.name, r.run_id))
    c2f = tuple(r for r in records if r.trial.t_split is not None)
    conditional = tuple(r for r in records if r.trial.t_split is None and r.conditional)
    plain = [r for r in records if r.trial.t_split is None and not r.conditional]
    main = _main_width(plain)
    reduction = tuple(r for r in plain if r.width == main)
    capacity = tuple(r for r in plain if r.trial.data_fraction == 1.0)
    unused = tuple(r for r in plain if r.width != main and r.trial.data_fraction != 1.0)
    return Studies(reduction, capacity, c2f, conditional, unused, main)


def aggregate(
    runs: Sequence[TrialRecord], columns: Sequence[Column]
) -> tuple[int, int, tuple[Cell, ...]]:
    """(seeds, failed seeds, cells) of one row's runs (see the module docstring)."""
    by_seed: dict[int, list[TrialRecord]] = defaultdict(list)
    for run in runs:
        by_seed[run.trial.seed].append(run)
    done = {s: [r for r in rs if r.finished] for s, rs in sorted(by_seed.items())}
    done = {s: rs for s, rs in done.items() if rs}
    cells = []
    for column in columns:
        per_seed = []
        for seed_runs in done.values():
            values = [v for r in seed_runs if (v := r.value(column.key)) is not None]
            if values:
                per_seed.append(statistics.fmean(values))
        if per_seed:
            std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
            cells.append(Cell(statistics.fmean(per_seed), std, len(per_seed), OK))
        else:
            cells.append(Cell(None, None, 0, (column.absent or MISSING) if done else FAILED))
    return len(by_seed), len(by_seed) - len(done), tuple(cells)


def _table(
    name: str,
    title: str,
    caption: str,
    keys: tuple[str, ...],
    columns: tuple[Column, ...],
    records: Sequence[TrialRecord],
    key_of: Callable[[TrialRecord], tuple[Any, ...]],
    label_of: Callable[[tuple[Any, ...]], tuple[str, ...]],
    sort_of: Callable[[tuple[Any, ...]], Any],
) -> Table:
    groups: dict[tuple[Any, ...], list[TrialRecord]] = defaultdict(list)
    for record in records:
        groups[key_of(record)].append(record)
    rows = []
    for key in sorted(groups, key=sort_of):
        seeds, failed, cells = aggregate(groups[key], columns)
        rows.append(Row(key, label_of(key), seeds, failed, cells))
    return Table(name, title, caption, keys, columns, tuple(rows))


def _fraction_key(record: TrialRecord) -> tuple[float, str]:
    return (
        record.trial.data_fraction,
        data_label(record.trial.data_fraction, record.trial.criterion),
    )


def _fraction_labels(key: tuple[Any, ...]) -> tuple[str, ...]:
    return (f"{key[0]:g}", key[1])


def _fraction_sort(key: tuple[Any, ...]) -> tuple[float, str]:
    # The full-data reference first, then smaller and smaller subsets.
    return (-key[0], key[1])


SIMILARITY = Column(schema.STABILITY_SIMILARITY, "similarity", ".3f")
UNRELATED = Column(schema.STABILITY_UNRELATED, "unrelated", ".3f")
FID = Column(schema.FID, "FID", ".2f")
TRAIN_TIME = Column(schema.TRAIN_TIME_S, "train time (s)", ".1f")
SPEEDUP = Column(schema.SPEEDUP_VS_REFERENCE, "speedup", ".2f")
CELL_NOTE = (
    "Cells: mean ± sample std over seeds (`seeds` counts them); (n=k): only k seeds have the "
    "value; failed: no run of the row finished; missing: finished runs did not log it."
)


TO_QUALITY = (
    Column(schema.STEPS_TO_QUALITY, "steps to 5%", ".0f", absent="not reached"),
    Column(schema.SECONDS_TO_QUALITY, "seconds to 5%", ".0f", absent="not reached"),
)
FLOOR = "floor"
FLOORS = (
    (schema.FID_FLOOR_DATA, "train images"),
    (schema.FID_FLOOR_AUTOENCODER, "autoencoder reconstructions"),
)


def floor_rows(records: Sequence[TrialRecord], columns: Sequence[Column]) -> tuple[Row, ...]:
    """Table 1's floor rows: the FID of train images and of their reconstructions (the best a
    model of the data, or of its latents, can do), other cells NOT_APPLICABLE."""
    rows = []
    for key, label in FLOORS:
        seeds, failed, (cell,) = aggregate(records, (Column(key, label, FID.fmt),))
        if cell.mean is None:
            continue
        cells = tuple(cell if c.key == FID.key else NOT_APPLICABLE_CELL for c in columns)
        rows.append(Row((FLOOR, label), (FLOOR, label), seeds, failed, cells))
    return tuple(rows)


def data_reduction_table(records: Sequence[TrialRecord], width: str | None) -> Table:
    """Table 1: FID, precision / recall, same-seed similarity and time to quality per data
    fraction x criterion, then the FID floors."""
    timed = any(schema.STEPS_TO_QUALITY in r.metrics for r in records)
    columns = (
        FID,
        Column(schema.PRECISION, "precision", ".3f"),
        Column(schema.RECALL, "recall", ".3f"),
        SIMILARITY,
        UNRELATED,
        TRAIN_TIME,
        *(TO_QUALITY if timed else ()),
    )
    caption = (
        f"Data reduction at width {width}: FID against the held-out split, precision / recall, "
        "same-seed cosine similarity to the full-data reference model and the unrelated "
        "(shuffled-pairs) baseline, training time. The full-data row is the reference."
    )
    if timed:
        caption += (
            " Steps / seconds to 5%: the first EMA snapshot whose FID is within 5% of the "
            "full-data model's final FID (not reached: none is)."
        )
    if any(schema.FID_FLOOR_DATA in r.metrics for r in records):
        caption += (
            " Floors: the FID of as many train images as a model's samples, and of their "
            "autoencoder reconstructions, against the same held-out statistics."
        )
    table = _table(
        "table1_data_reduction",
        "Table 1: data reduction",
        caption,
        ("fraction", "criterion"),
        columns,
        records,
        _fraction_key,
        _fraction_labels,
        _fraction_sort,
    )
    return replace(table, rows=(*table.rows, *floor_rows(records, columns)))


def capacity_table(records: Sequence[TrialRecord]) -> Table:
    """Table 2: similarity to the reference (widest) model and FID per width, full data."""
    references = ", ".join(sorted({r.reference_model for r in records}))
    caption = (
        f"Capacity on the full data: same-seed similarity of each width to the reference model "
        f"({references}), the unrelated baseline, FID, and the sampling speedup over the "
        "reference (its sampling time / this model's)."
    )
    return _table(
        "table2_capacity",
        "Table 2: capacity",
        caption,
        ("model", "width"),
        (SIMILARITY, UNRELATED, FID, SPEEDUP, TRAIN_TIME),
        records,
        lambda r: (r.model, r.width),
        lambda key: (key[0], key[1]),
        lambda key: (key[0], widest_first(key[1])),
    )


def _coarse_key(record: TrialRecord) -> tuple[Any, ...]:
    data = data_label(record.trial.data_fraction, record.trial.criterion)
    return (
        record.model,
        record.width,
        record.trial.data_fraction,
        data,
        record.reference_model,
        record.trial.t_split,
    )


def _t_split_order(t_split: float | str) -> tuple[int, float]:
    """Explicit t_splits by value, then "auto"."""
    return (1, 0.0) if isinstance(t_split, str) else (0, t_split)


def _auto_label(table: Table, row: Row) -> Row:
    """An "auto" row's t_split label with its mean chosen value, e.g. "auto (0.30)"."""
    if not isinstance(row.values[5], str):
        return row
    chosen = table.cell(row, CHOSEN_T_SPLIT).mean
    text = row.values[5] if chosen is None else f"{row.values[5]} ({chosen:.2f})"
    return dataclasses.replace(row, labels=(*row.labels[:3], text))


def coarse_to_fine_table(records: Sequence[TrialRecord]) -> Table:
    """Table 3: FID, measured and FLOP-bound speedup per t_split and model pair, without and
    (coarse_to_fine.seam) with seam fine-tuning of the coarse model at the same t_split."""
    columns: tuple[Column, ...] = (
        FID,
        Column(schema.FID_COARSE_ALONE, "FID coarse alone", ".2f"),
        Column(schema.FID_REFERENCE, "FID fine alone", ".2f"),
        Column(schema.SPEEDUP_VS_FINE, "speedup", ".2f"),
        Column(schema.FLOP_SPEEDUP_VS_FINE, "FLOP bound", ".2f"),
        Column(CHOSEN_T_SPLIT, "chosen t_split", ".2f"),
    )
    caption = (
        "Coarse-to-fine sampling: the coarse model integrates t < t_split, the fine model the "
        "rest. FID of the result and of each model alone, measured wall-clock speedup over the "
        "fine model alone, its FLOP-count bound, and the t_split chosen automatically; the "
        "auto row samples at the chosen t_split (its mean in brackets)."
    )
    if any(schema.FID_SEAM in r.metrics for r in records):  # sweeps with coarse_to_fine.seam
        columns += (
            Column(schema.FID_SEAM, "FID with seam", ".2f"),
            Column(schema.SPEEDUP_VS_FINE_SEAM, "speedup with seam", ".2f"),
        )
        caption += (
            " With seam: the coarse model fine-tuned with the seam loss (weight "
            "coarse_to_fine.seam_weight) at the same t_split."
        )
    table = _table(
        "table3_coarse_to_fine",
        "Table 3: coarse-to-fine",
        caption,
        ("coarse model", "coarse data", "fine model", "t_split"),
        columns,
        records,
        _coarse_key,
        lambda key: (
            f"{key[0]} (width {key[1]})",
            key[3] if key[2] == 1.0 else f"{key[2]:g} {key[3]}",
            key[4],
            key[5] if isinstance(key[5], str) else f"{key[5]:g}",
        ),
        lambda key: (
            key[0],
            width_order(key[1]),
            -key[2],
            key[3],
            key[4],
            _t_split_order(key[5]),
        ),
    )
    return dataclasses.replace(table, rows=tuple(_auto_label(table, row) for row in table.rows))


def conditional_table(records: Sequence[TrialRecord]) -> Table:
    """Table 4: FID and labels used per data fraction x criterion, class-conditional models."""
    caption = (
        "Class-conditional models: FID and the number of training labels the subset needed, "
        "per data fraction and criterion."
    )
    return _table(
        "table4_conditional",
        "Table 4: conditional",
        caption,
        ("fraction", "criterion"),
        (FID, Column(schema.LABELS_USED, "labels used", ".0f")),
        records,
        _fraction_key,
        _fraction_labels,
        _fraction_sort,
    )


def build_tables(studies: Studies) -> tuple[Table, ...]:
    """The non-empty tables among 1-4."""
    tables = (
        data_reduction_table(studies.data_reduction, studies.main_width),
        capacity_table(studies.capacity),
        coarse_to_fine_table(studies.coarse_to_fine),
        conditional_table(studies.conditional),
    )
    return tuple(t for t in tables if t.rows)


def cell_text(cell: Cell, column: Column, finished_seeds: int, style: str = "markdown") -> str:
    """A cell as printed: "12.34 ± 0.56", "12.34 (n=1)", "failed" or "missing"."""
    if cell.mean is None:
        return cell.status
    text = format(cell.mean, column.fmt)
    if cell.std is not None:
        text += PLUS_MINUS[style] + format(cell.std, column.fmt)
    if cell.n < finished_seeds:
        text += f" (n={cell.n})"
    return text


def seeds_text(row: Row) -> str:
    """The seeds cell: "2", or "2 (1 failed)"."""
    return f"{row.seeds}" + (f" ({row.failed_seeds} failed)" if row.failed_seeds else "")


def _text_rows(table: Table, style: str) -> list[list[str]]:
    header = [*table.keys, "seeds", *(c.title for c in table.columns)]
    body = [
        [
            *row.labels,
            seeds_text(row),
            *(
                cell_text(cell, col, row.finished_seeds, style)
                for cell, col in zip(row.cells, table.columns, strict=True)
            ),
        ]
        for row in table.rows
    ]
    return [header, *body]


def markdown_rows(table: Table) -> str:
    """The table's pipe table (header, rule, rows), columns padded to equal width."""
    rows = _text_rows(table, "markdown")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def to_markdown(table: Table) -> str:
    """The table as a Markdown file: title, caption, pipe table."""
    return f"**{table.title}.** {table.caption}\n\n{markdown_rows(table)}\n\n{CELL_NOTE}\n"


def latex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped."""
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """The table as a booktabs `table` environment."""
    rows = _text_rows(table, "latex")

    def line(cells: list[str], escape: bool) -> str:
        return " & ".join(latex_escape(c) if escape else c for c in cells) + r" \\"

    # Key and seed cells are plain text; metric cells already carry LaTeX ($\pm$).
    def body_line(cells: list[str]) -> str:
        plain = len(table.keys) + 1
        return line([latex_escape(c) for c in cells[:plain]] + cells[plain:], escape=False)

    spec = "l" * len(table.keys) + "r" * (1 + len(table.columns))
    label = table.name.split("_", 1)[1]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{latex_escape(table.title)}. {latex_escape(table.caption)}}}",
            rf"\label{{tab:{label}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            line(rows[0], escape=True),
            r"\midrule",
            *(body_line(r) for r in rows[1:]),
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def to_csv(table: Table) -> str:
    """The table as CSV: key labels, seeds, then per metric its mean (or status), std and n."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metric_headers = [h for c in table.columns for h in (c.key, f"{c.key}_std", f"{c.key}_n")]
    key_headers = [k.replace(" ", "_") for k in table.keys]
    writer.writerow([*key_headers, "seeds", "failed_seeds", *metric_headers])
    for row in table.rows:
        metrics = []
        for cell in row.cells:
            mean = _number(cell.mean) if cell.mean is not None else cell.status
            metrics += [mean, _number(cell.std), str(cell.n)]
        writer.writerow([*row.labels, row.seeds, row.failed_seeds, *metrics])
    return out.getvalue()
