"""`lfm report` on a real sqlite MLflow store holding a sweep with known metrics.

The expected cells are computed here from the known values (numpy mean, std with ddof 1),
grouped by hand, not by the report's code.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from PIL import Image

from lfm_core.images import save_comparison
from orchestrator import cli
from orchestrator.report import ReportError, build_report, main
from orchestrator.report_figures import read_png, split_comparison

EXPERIMENT = "sweep-under-test"
BASE = {"model": "unet-xs", "reference_model": "unet-xs", "dataset": "digits"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# name: (params, metrics or None for a FAILED run, logs comparison.png)
# fmt: off
TRIALS = {
    "dr-f1-random-s0": (
        {"study": "data_reduction", "data_fraction": "1.0", "criterion": "random", "width": "8", "seed": "0"},
        {"fid": 10.0, "precision": 0.80, "recall": 0.70, "stability_similarity": 0.95, "stability_unrelated": 0.10, "train_time_s": 5.0, "speedup_vs_reference": 1.0},
        False,
    ),
    "dr-f1-loss-s0": (  # the same full-data model as dr-f1-random-s0, timed apart
        {"study": "data_reduction", "data_fraction": "1.0", "criterion": "loss", "width": "8", "seed": "0"},
        {"fid": 10.0, "precision": 0.80, "recall": 0.70, "stability_similarity": 0.95, "stability_unrelated": 0.10, "train_time_s": 7.0, "speedup_vs_reference": 1.0},
        False,
    ),
    "dr-f0.5-random-s0": (
        {"study": "data_reduction", "data_fraction": "0.5", "criterion": "random", "width": "8", "seed": "0"},
        {"fid": 20.0, "precision": 0.60, "recall": 0.50, "stability_similarity": 0.90, "stability_unrelated": 0.20, "train_time_s": 3.0},
        True,
    ),
    "dr-f0.5-random-s1": (
        {"study": "data_reduction", "data_fraction": "0.5", "criterion": "random", "width": "8", "seed": "1"},
        {"fid": 24.0, "precision": 0.70, "recall": 0.40, "stability_similarity": 0.80, "stability_unrelated": 0.10, "train_time_s": 4.0},
        False,
    ),
    "dr-f0.5-loss-s0": (
        {"study": "data_reduction", "data_fraction": "0.5", "criterion": "loss", "width": "8", "seed": "0"},
        None,
        False,
    ),
    "dr-f0.25-random-s0": (  # no precision, recall NaN
        {"study": "data_reduction", "data_fraction": "0.25", "criterion": "random", "width": "8", "seed": "0"},
        {"fid": 30.0, "recall": NAN, "stability_similarity": 0.70, "stability_unrelated": 0.15, "train_time_s": 2.0},
        False,
    ),
    "cap-w4-s0": (
        {"study": "capacity", "data_fraction": "1.0", "criterion": "random", "width": "4", "seed": "0"},
        {"fid": 15.0, "stability_similarity": 0.85, "stability_unrelated": 0.12, "speedup_vs_reference": 2.0, "train_time_s": 1.5},
        True,
    ),
    "cap-w4-s1": (  # no training time
        {"study": "capacity", "data_fraction": "1.0", "criterion": "random", "width": "4", "seed": "1"},
        {"fid": 17.0, "stability_similarity": 0.83, "stability_unrelated": 0.10, "speedup_vs_reference": 2.2},
        False,
    ),
    "c2f-t0.5-s0": (
        {"study": "coarse_to_fine", "data_fraction": "1.0", "criterion": "random", "width": "4", "t_split": "0.5", "seed": "0"},
        {"fid": 12.0, "fid_coarse_alone": 15.0, "fid_reference": 10.0, "speedup_vs_fine": 1.5, "flop_speedup_vs_fine": 1.8, "t_split_chosen": 0.6},
        False,
    ),
    "c2f-t0.7-s0": (
        {"study": "coarse_to_fine", "data_fraction": "1.0", "criterion": "random", "width": "4", "t_split": "0.7", "seed": "0"},
        {"fid": 13.0, "fid_coarse_alone": 15.0, "fid_reference": 10.0, "speedup_vs_fine": 1.9, "flop_speedup_vs_fine": 2.4, "t_split_chosen": 0.6},
        False,
    ),
    "c2f-t0.7-s1": (
        {"study": "coarse_to_fine", "data_fraction": "1.0", "criterion": "random", "width": "4", "t_split": "0.7", "seed": "1"},
        {"fid": 14.0, "fid_coarse_alone": 17.0, "fid_reference": 11.0, "speedup_vs_fine": 2.1, "flop_speedup_vs_fine": 2.4, "t_split_chosen": 0.6},
        False,
    ),
    "cond-f0.5-random-s0": (  # conditional by its study's name
        {"study": "conditional", "data_fraction": "0.5", "criterion": "random", "width": "8", "seed": "0", "labels_used": "200"},
        {"fid": 40.0},
        False,
    ),
    "cond-f1-random-s0": (  # conditional by a `conditional` param
        {"study": "main", "conditional": "True", "data_fraction": "1.0", "criterion": "random", "width": "8", "seed": "0", "labels_used": "400"},
        {"fid": 35.0},
        False,
    ),
    "odd-f0.5-w4-s0": (  # reduced data at another width: in no table
        {"study": "extra", "data_fraction": "0.5", "criterion": "random", "width": "4", "seed": "0"},
        {"fid": 50.0},
        False,
    ),
}
# fmt: on


def _comparison(path: Path) -> None:
    """A real two-row comparison grid: reference all black, trial all white (4 seeds of 8x8)."""
    save_comparison([-torch.ones(4, 1, 8, 8), torch.ones(4, 1, 8, 8)], path)


def _child(
    client: MlflowClient, experiment_id: str, parent: str, name: str, start: int, tmp: Path
) -> None:
    params, metrics, comparison = TRIALS[name]
    run = client.create_run(
        experiment_id,
        start_time=start,
        run_name=name,
        tags={"mlflow.parentRunId": parent, "lfm.kind": "trial"},
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in {**BASE, **params}.items()])
    if metrics is None:
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        return
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    if comparison:
        path = tmp / name / "comparison.png"
        path.parent.mkdir()
        _comparison(path)
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sqlite tracking store: an older sweep run with one trial, the latest with TRIALS."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(
        EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri()
    )
    client.create_experiment("empty-one", artifact_location=(tmp / "artifacts-empty").as_uri())
    old = client.create_run(
        experiment_id, start_time=1_000, run_name="old-sweep", tags={"lfm.kind": "sweep"}
    ).info.run_id
    client.log_batch(old, params=[Param("sweep", "x")])
    old_child = client.create_run(
        experiment_id, start_time=1_001, run_name="old-trial", tags={"mlflow.parentRunId": old}
    )
    client.log_batch(
        old_child.info.run_id,
        params=[Param(k, v) for k, v in {**BASE, **TRIALS["dr-f0.5-random-s0"][0]}.items()],
        metrics=[Metric("fid", 999.0, 0, 0)],
    )
    client.set_terminated(old_child.info.run_id)
    client.set_terminated(old)
    parent = client.create_run(
        experiment_id, start_time=2_000, run_name="sweep", tags={"lfm.kind": "sweep"}
    ).info.run_id
    for i, name in enumerate(TRIALS):
        _child(client, experiment_id, parent, name, 2_001 + i, tmp)
    client.set_terminated(parent)
    out = tmp / "report"
    result = build_report(EXPERIMENT, out, uri)
    return {
        "uri": uri,
        "client": client,
        "parent": parent,
        "result": result,
        "out": out,
        "tmp": tmp,
    }


def _cell(per_seed: list[float], spec: str) -> str:
    text = format(float(np.mean(per_seed)), spec)
    if len(per_seed) > 1:
        text += " ± " + format(float(np.std(per_seed, ddof=1)), spec)
    return text


def _markdown_rows(path: Path) -> list[list[str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    return [
        [c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|-")
    ]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _check_csv_number(text: str, per_seed: list[float]) -> None:
    assert float(text) == pytest.approx(float(np.mean(per_seed)), rel=1e-12)


# Table 1 by hand: rows (fraction, criterion, seeds label) and per-seed values per column.
T1_COLUMNS = (
    ("fid", ".2f"),
    ("precision", ".3f"),
    ("recall", ".3f"),
    ("stability_similarity", ".3f"),
    ("stability_unrelated", ".3f"),
    ("train_time_s", ".1f"),
)
T1 = [
    (
        "1",
        "full data",
        "1",
        {
            "fid": [10.0],
            "precision": [0.8],
            "recall": [0.7],
            "stability_similarity": [0.95],
            "stability_unrelated": [0.10],
            "train_time_s": [6.0],
        },
    ),
    ("0.5", "loss", "1 (1 failed)", {}),
    (
        "0.5",
        "random",
        "2",
        {
            "fid": [20.0, 24.0],
            "precision": [0.6, 0.7],
            "recall": [0.5, 0.4],
            "stability_similarity": [0.9, 0.8],
            "stability_unrelated": [0.2, 0.1],
            "train_time_s": [3.0, 4.0],
        },
    ),
    (
        "0.25",
        "random",
        "1",
        {
            "fid": [30.0],
            "stability_similarity": [0.7],
            "stability_unrelated": [0.15],
            "train_time_s": [2.0],
        },
    ),
]


def _expected_text(values: dict[str, list[float]], key: str, spec: str, failed: bool) -> str:
    if key in values:
        return _cell(values[key], spec)
    return "failed" if failed else "missing"


def test_table1_every_cell_markdown_and_csv(store: dict) -> None:
    out = store["out"]
    md = _markdown_rows(out / "table1_data_reduction.md")
    assert md[0] == [
        "fraction",
        "criterion",
        "seeds",
        "FID",
        "precision",
        "recall",
        "similarity",
        "unrelated",
        "train time (s)",
    ]
    assert len(md) == 1 + len(T1)
    rows = _csv_rows(out / "table1_data_reduction.csv")
    assert len(rows) == len(T1)
    for (fraction, criterion, seeds, values), md_row, csv_row in zip(T1, md[1:], rows, strict=True):
        failed = not values
        expected = [fraction, criterion, seeds] + [
            _expected_text(values, k, s, failed) for k, s in T1_COLUMNS
        ]
        assert md_row == expected
        assert (csv_row["fraction"], csv_row["criterion"]) == (fraction, criterion)
        assert csv_row["failed_seeds"] == ("1" if failed else "0")
        for key, _ in T1_COLUMNS:
            if key in values:
                _check_csv_number(csv_row[key], values[key])
                assert csv_row[f"{key}_n"] == str(len(values[key]))
                if len(values[key]) > 1:
                    assert float(csv_row[f"{key}_std"]) == pytest.approx(
                        float(np.std(values[key], ddof=1)), rel=1e-12
                    )
                else:
                    assert csv_row[f"{key}_std"] == ""
            else:
                assert csv_row[key] == ("failed" if failed else "missing")
                assert (csv_row[f"{key}_std"], csv_row[f"{key}_n"]) == ("", "0")
    # Literal spot checks of the format: 2 seeds -> mean ± sample std; the older sweep is ignored.
    assert md[3][3] == "22.00 ± 2.83"
    assert "999" not in (out / "table1_data_reduction.md").read_text()


def test_table2_capacity_cells(store: dict) -> None:
    md = _markdown_rows(store["out"] / "table2_capacity.md")
    assert md[0] == [
        "model",
        "width",
        "seeds",
        "similarity",
        "unrelated",
        "FID",
        "speedup",
        "train time (s)",
    ]
    widest = ["unet-xs", "8", "1", "0.950", "0.100", "10.00", "1.00", _cell([6.0], ".1f")]
    narrow = [
        "unet-xs",
        "4",
        "2",
        _cell([0.85, 0.83], ".3f"),
        _cell([0.12, 0.10], ".3f"),
        _cell([15.0, 17.0], ".2f"),
        _cell([2.0, 2.2], ".2f"),
        "1.5 (n=1)",  # seed 1 finished without logging its training time
    ]
    assert md[1:] == [widest, narrow]
    rows = _csv_rows(store["out"] / "table2_capacity.csv")
    assert [r["width"] for r in rows] == ["8", "4"]
    _check_csv_number(rows[1]["stability_similarity"], [0.85, 0.83])
    _check_csv_number(rows[1]["fid"], [15.0, 17.0])
    assert (rows[1]["train_time_s"], rows[1]["train_time_s_std"], rows[1]["train_time_s_n"]) == (
        "1.5",
        "",
        "1",
    )


def test_table3_coarse_to_fine_cells(store: dict) -> None:
    md = _markdown_rows(store["out"] / "table3_coarse_to_fine.md")
    assert md[0] == [
        "coarse model",
        "coarse data",
        "fine model",
        "t_split",
        "seeds",
        "FID",
        "FID coarse alone",
        "FID fine alone",
        "speedup",
        "FLOP bound",
        "chosen t_split",
    ]
    pair = ["unet-xs (width 4)", "full data", "unet-xs"]
    t05 = [*pair, "0.5", "1", "12.00", "15.00", "10.00", "1.50", "1.80", "0.60"]
    t07 = [
        *pair,
        "0.7",
        "2",
        _cell([13.0, 14.0], ".2f"),
        _cell([15.0, 17.0], ".2f"),
        _cell([10.0, 11.0], ".2f"),
        _cell([1.9, 2.1], ".2f"),
        _cell([2.4, 2.4], ".2f"),
        _cell([0.6, 0.6], ".2f"),
    ]
    assert md[1:] == [t05, t07]
    rows = _csv_rows(store["out"] / "table3_coarse_to_fine.csv")
    _check_csv_number(rows[1]["speedup_vs_fine"], [1.9, 2.1])
    assert rows[1]["flop_speedup_vs_fine_std"] == "0.0"


def test_table4_conditional_cells(store: dict) -> None:
    md = _markdown_rows(store["out"] / "table4_conditional.md")
    assert md[1:] == [
        ["1", "full data", "1", "35.00", "400"],
        ["0.5", "random", "1", "40.00", "200"],
    ]
    rows = _csv_rows(store["out"] / "table4_conditional.csv")
    _check_csv_number(rows[1]["labels_used"], [200.0])


def test_latex_is_booktabs_and_escaped(store: dict) -> None:
    tex = (store["out"] / "table1_data_reduction.tex").read_text()
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{llrrrrrrr}"):
        assert command in tex
    assert r"22.00 $\pm$ 2.83" in tex
    assert r"train time (s)" in tex and "±" not in tex
    assert r"t\_split" in (store["out"] / "table3_coarse_to_fine.tex").read_text()


def test_figures_report_md_and_notes(store: dict) -> None:
    out, result = store["out"], store["result"]
    figures = ["fig_data_reduction.png", "fig_coarse_to_fine.png", "fig_same_seed.png"]
    for name in figures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(out / name) as image:
            image.verify()
    report = (out / "report.md").read_text()
    for table in (
        "table1_data_reduction",
        "table2_capacity",
        "table3_coarse_to_fine",
        "table4_conditional",
    ):
        for ext in ("md", "tex", "csv"):
            assert f"]({table}.{ext})" in report
    for name in figures:
        assert f"]({name})" in report
    # Of seed 0, the reduced-data grid comes from the second choice (f0.25 logged none), the
    # small model's from cap-w4-s0; no coarse-to-fine trial logged one.
    note = "same-seed grid, coarse-to-fine (finished, seed 0): none of its 2 trials logged comparison.png"
    assert [n for n in result.notes if n.startswith("same-seed grid")] == [note]
    assert note in report
    shown = [
        "reference model (unet-xs, full data), training seed 0",
        "reduced data: 0.5 random, width 8",
        "small model: unet-xs, width 4, full data",
    ]
    assert f"Rows: {'; '.join(shown)}." in report
    assert any("odd-f0.5-w4-s0 in no table" in n for n in result.notes)
    assert result.trial_runs == len(TRIALS)
    assert {p.name for p in result.files} == {p.name for p in out.iterdir()}


def test_same_seed_split_separates_reference_from_trial(tmp_path: Path) -> None:
    _comparison(tmp_path / "c.png")
    top, bottom = split_comparison(read_png(tmp_path / "c.png"))
    assert top.max() == 0  # reference row black, padding black
    assert (bottom == 255).any()


def test_artifacts_logged_to_latest_parent(store: dict) -> None:
    client, parent = store["client"], store["parent"]
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert logged == {p.name for p in store["result"].files}
    assert store["result"].parent_run_id == parent


def test_deterministic_for_the_same_runs(store: dict, tmp_path: Path) -> None:
    again = build_report(EXPERIMENT, tmp_path, store["uri"], log_to_parent=False)
    names = sorted(p.name for p in again.files)
    assert names == sorted(p.name for p in store["result"].files)
    for name in names:
        assert (tmp_path / name).read_bytes() == (store["out"] / name).read_bytes(), name


def test_all_parents_adds_the_older_sweep(store: dict, tmp_path: Path) -> None:
    result = build_report(EXPERIMENT, tmp_path, store["uri"], log_to_parent=False, all_parents=True)
    table1 = _csv_rows(tmp_path / "table1_data_reduction.csv")
    random_half = next(r for r in table1 if (r["fraction"], r["criterion"]) == ("0.5", "random"))
    # The older sweep's seed-0 trial repeats the same point: its seed counts once, as a mean.
    _check_csv_number(random_half["fid"], [float(np.mean([20.0, 999.0])), 24.0])
    assert result.trial_runs == len(TRIALS) + 1


def _one_line_error(call) -> str:
    with pytest.raises(ReportError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_unknown_and_empty_experiment(store: dict, tmp_path: Path) -> None:
    message = _one_line_error(lambda: build_report("no-such", tmp_path, store["uri"]))
    assert "no-such" in message and f"'{EXPERIMENT}'" in message and "'empty-one'" in message
    message = _one_line_error(lambda: build_report("empty-one", tmp_path, store["uri"]))
    assert "empty" in message
    message = _one_line_error(
        lambda: build_report(EXPERIMENT, tmp_path, f"sqlite:///{tmp_path}/none.db")
    )
    assert "does not exist" in message
    assert not (tmp_path / "none.db").exists()


def test_server_that_does_not_answer(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    message = _one_line_error(
        lambda: build_report(EXPERIMENT, tmp_path, f"http://127.0.0.1:{port}")
    )
    assert f"http://127.0.0.1:{port} does not answer" in message
    assert time.perf_counter() - started < 15.0


def test_cli_entry_points(
    store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "--experiment",
                EXPERIMENT,
                "--out",
                str(tmp_path / "a"),
                "--tracking-uri",
                store["uri"],
            ]
        )
        == 0
    )
    assert (tmp_path / "a" / "report.md").is_file()
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--experiment", "no-such", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'no-such'" in err[0]
