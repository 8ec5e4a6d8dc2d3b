"""Sweep files: loading, merging, profiles, trials, and one-line errors before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lfm_core.autoencoder import AutoencoderConfig
from lfm_core.errors import ConfigError
from lfm_core.train import TrainConfig
from orchestrator import cli, cluster_fit
from orchestrator.config import (
    GridSection,
    apply_overrides,
    check_local_paths,
    format_override,
    load_sweep,
    parse_overrides,
    resolve_locations,
)
from orchestrator.trials import expand_trials

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
PROFILED = [path for path in SWEEPS if "\n  paper:" in path.read_text()]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
data: {name: digits}
search:
  main:
    data_fraction: [0.5, 1.0]
    criterion: [random]
"""


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    return _write(tmp_path, BASE)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LFM_STORAGE", raising=False)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_loads(path: Path, tmp_path: Path) -> None:
    cfg = load_sweep(path, [f"storage={tmp_path}"])
    assert expand_trials(cfg)
    assert isinstance(cfg.train, TrainConfig)
    assert type(cfg.autoencoder.core()) is AutoencoderConfig


@pytest.mark.parametrize("path", PROFILED, ids=lambda p: p.name)
def test_paper_profile_passes_dry_run(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", str(path), "profile=paper", f"storage={tmp_path}", "--dry-run"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "profile: paper" in out and "trials (" in out and "to build" in out


def test_main_sweep_files_have_a_paper_profile() -> None:
    names = {path.name for path in PROFILED}
    expected = {
        "quickstart.yaml",
        "data_reduction.yaml",
        "capacity.yaml",
        "coarse_to_fine.yaml",
        "conditional.yaml",
    }
    assert expected <= names


def test_layers_merge_in_order_and_resolve(sweep_file: Path, tmp_path: Path) -> None:
    text = BASE + "train: {steps: 7}\nprofiles:\n  big: {train: {steps: 70, batch_size: 64}}\n"
    path = _write(tmp_path, text)
    assert load_sweep(path).train.steps == 7
    cfg = load_sweep(path, ["profile=big", "train.steps=700", "storage=rel/dir"])
    assert (cfg.profile, cfg.train.steps, cfg.train.batch_size) == ("big", 700, 64)
    assert cfg.storage == str(Path("rel/dir").resolve())
    assert cfg.tracking.uri == f"sqlite:///{cfg.storage}/mlflow.db"
    assert cfg.tracking.artifact_location == f"{cfg.storage}/mlflow"


def test_environment_wins_for_tracking_and_storage_default(
    sweep_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("LFM_STORAGE", str(tmp_path))
    cfg = load_sweep(sweep_file, ["tracking.uri=sqlite:////elsewhere.db"])
    assert cfg.tracking.uri == "http://127.0.0.1:5999"
    assert cfg.storage == str(tmp_path)


def test_axes_accept_lists_grid_search_and_scalars(sweep_file: Path) -> None:
    cfg = load_sweep(
        sweep_file,
        [
            "search.main.criterion={grid_search: [random, kcenter]}",
            "search.main.seed=3",
            "search.main.t_split=[null, 0.7]",
        ],
    )
    grid = cfg.search["main"]
    assert grid == GridSection([0.5, 1.0], ["random", "kcenter"], [None], [None, 0.7], [3])
    assert len(expand_trials(cfg)) == 2 * 2 * 2


def test_trials_are_the_union_of_studies_each_point_once(sweep_file: Path) -> None:
    cfg = load_sweep(sweep_file, ["search.other.data_fraction=[1.0, 0.25]"])
    trials = expand_trials(cfg)
    assert [(t.study, t.data_fraction) for t in trials] == [
        ("main", 0.5),
        ("main", 1.0),
        ("other", 0.25),
    ]


@pytest.mark.parametrize(
    "value", [None, 0.5, 3, "random", [None, 0.7], [1.0], ("random", "loss"), True]
)
def test_format_override_is_read_back_by_parse_overrides(value: object) -> None:
    layer = parse_overrides([format_override("a.b", value)])
    expected = list(value) if isinstance(value, list | tuple) else value
    assert layer.a.b == expected


@dataclass(frozen=True)
class _Inner:
    steps: int = 3
    widths: tuple[int, ...] = (8, 16)
    t_split: float | None = None


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"


def test_apply_overrides_types_nested_fields_and_names_bad_keys() -> None:
    base = _Outer(_Inner(steps=5))
    got = apply_overrides(base, ["inner.widths=[4, 2]", "inner.t_split=0.5", "name=y"])
    assert got == _Outer(_Inner(steps=5, widths=(4, 2), t_split=0.5), "y")
    assert apply_overrides(base, []) == base
    with pytest.raises(ConfigError, match=r"^inner\.stepz: unknown key; allowed: steps, widths"):
        apply_overrides(base, ["inner.stepz=1"])
    with pytest.raises(ConfigError, match=r"^inner\.steps: Value 'many' .* Integer$"):
        apply_overrides(base, ["inner.steps=many"])
    with pytest.raises(ConfigError, match=r"^override 'inner': expected key=value$"):
        apply_overrides(base, ["inner"])


def test_locations_of_s3_storage_keep_local_files_under_results(
    sweep_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    where = resolve_locations("s3://bucket/prefix/")
    assert (where.storage, where.local_dir) == ("s3://bucket/prefix", tmp_path / "results")
    assert where.tracking_uri == f"sqlite:///{tmp_path}/results/mlflow.db"
    # The report's default and a sweep's report folder come from the same place.
    monkeypatch.setenv("LFM_STORAGE", "s3://bucket/prefix")
    assert resolve_locations() == where
    cfg = load_sweep(sweep_file)
    assert (cfg.storage, cfg.tracking_uri) == (where.storage, where.tracking_uri)
    assert cli._report_dir(cfg) == tmp_path / "results" / "report" / cfg.experiment


BAD_INPUTS = [
    (["train.stepz=3"], "train.stepz: unknown key; allowed: steps, batch_size"),
    (["nmae=x"], "nmae: unknown key; allowed: name, profile"),
    (
        ["search.main.fraction=[0.5]"],
        "search.main.fraction: unknown key; allowed: data_fraction, criterion",
    ),
    (
        ["train.steps=many"],
        "train.steps: Value 'many' of type 'str' could not be converted to Integer",
    ),
    (["data.conditional=perhaps"], "data.conditional:"),
    (
        ["search.main.data_fraction=[1.5]"],
        "search.main.data_fraction: 1.5 is outside the allowed range (0.0, 1.0]",
    ),
    (
        ["search.main.data_fraction=[0]"],
        "search.main.data_fraction: 0.0 is outside the allowed range (0.0, 1.0]",
    ),
    (
        ["search.main.t_split=[1.2]"],
        "search.main.t_split: 1.2 is outside the allowed range [0.0, 1.0]",
    ),
    (["train.steps=0"], "train.steps: 0 must be a positive integer"),
    (["sampling.num_samples=-4"], "sampling.num_samples: -4 must be a positive integer"),
    (
        ["search.main.criterion=[kmeans]"],
        "search.main.criterion: unknown value 'kmeans'; allowed: random, cluster_nearest",
    ),
    (["model.name=unet-xxl"], "model.name: unknown value 'unet-xxl'; allowed: unet-xs, unet-s"),
    (["reference.name=dit-q"], "reference.name: unknown value 'dit-q'; allowed:"),
    (["data.name=imagenet"], "data.name: unknown value 'imagenet'; allowed: mnist5k, digits"),
    (
        ["sampling.solver=rk45"],
        "sampling.solver: unknown value 'rk45'; allowed: euler, midpoint, heun",
    ),
    (
        ["features.fid.name=vgg"],
        "features.fid.name: unknown value 'vgg'; allowed: mnist_classifier",
    ),
    (["profile=huge"], "profile: unknown value 'huge'; allowed: embedded"),
    (["search.main.width=[2]"], "search.main.width: 2 must be an integer >= 4"),
    (
        ["resources.num_workers=3"],
        "train.batch_size: 128 must be divisible by resources.num_workers=3",
    ),
    (["storage=s3://"], "storage: 's3://' names no bucket"),
    (
        ["resources.placement_strategy=RANDOM"],
        "resources.placement_strategy: unknown value 'RANDOM'; allowed: PACK, SPREAD, "
        "STRICT_PACK, STRICT_SPREAD",
    ),
    (
        ["resources.worker_resources={GPU: 1}"],
        "resources.worker_resources.GPU: set CPUs and GPUs with cpus_per_worker / use_gpu",
    ),
    (["resources.placement_timeout_s=0"], "resources.placement_timeout_s"),
    (["resources.cpus_per_worker=0"], "resources.cpus_per_worker"),
    (["resources.max_trial_failures=-2"], "resources.max_trial_failures"),
    (["search.main.seed={grid: [1]}"], "search.main.seed: search axis"),
    (["train"], "override 'train': expected key=value"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_is_one_line_naming_the_key(
    sweep_file: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_sweep(sweep_file, overrides)
    text = str(info.value)
    assert "\n" not in text
    assert message in text


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^sweep file not found: .*nope\.yaml$"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        load_sweep(_write(tmp_path, "name: [unclosed\n"))
    assert "\n" not in str(info.value)


def test_local_paths_are_checked_for_local_runs_only(sweep_file: Path, tmp_path: Path) -> None:
    cfg = load_sweep(sweep_file, [f"data.root={tmp_path}/missing", "features.fid.path=org/hub-id"])
    with pytest.raises(
        ConfigError, match=r"^data.root: '.*missing' does not exist on this machine$"
    ):
        check_local_paths(cfg)


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "MISSING.yaml"],
        ["sweep", "SWEEP", "train.stepz=1"],
        ["sweep", "SWEEP", "search.main.criterion=[kmeans]"],
        ["train", "SWEEP", "--criterion", "kmeans"],
        ["sample", "SWEEP", "--t-split", "3", "--out", "x.png"],
        ["validate", "SWEEP", "model.name=big"],
    ],
)
def test_cli_reports_bad_input_in_one_line_before_ray_starts(
    argv: list[str], sweep_file: Path, capsys: pytest.CaptureFixture
) -> None:
    import ray

    argv = [str(sweep_file) if a == "SWEEP" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lfm {argv[0]}: error: ") and "\n" not in err
    assert not ray.is_initialized()


def test_dry_run_lists_trials_and_stages(
    sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", str(sweep_file), f"storage={tmp_path}", "--dry-run"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "trials (2):" in out and "main-f0.5-random-wbase-tnone-s0" in out
    # Fraction 1 needs no subset selection: both trials share the reference model.
    assert "0 cached" in out and "fm_model" in out


@pytest.mark.parametrize(
    ("overrides", "cluster", "expected"),
    [
        ([], {"CPU": 2.0}, 1),  # 1 driver + 1 worker CPU: one trial at a time
        ([], {"CPU": 9.0}, 4),
        (["resources.num_workers=2", "resources.cpus_per_worker=2"], {"CPU": 16.0}, 3),
        (["resources.max_concurrent_trials=2"], {"CPU": 64.0}, 2),
        (["resources.use_gpu=true", "resources.num_workers=4"], {"CPU": 64.0, "GPU": 8.0}, 2),
        (["resources.num_workers=4"], {"CPU": 2.0}, 1),
        # Fractional CPUs: 0.5 driver + 2 x 0.5 workers = 1.5 per trial.
        (
            [
                "resources.driver_cpus=0.5",
                "resources.cpus_per_worker=0.5",
                "resources.num_workers=2",
            ],
            {"CPU": 4.0},
            2,
        ),
    ],
)
def test_max_concurrent_trials_fit_the_cluster(
    sweep_file: Path, overrides: list[str], cluster: dict, expected: int
) -> None:
    res = load_sweep(sweep_file, overrides).resources
    nodes = [cluster_fit.NodeType("one", cluster, 1)]
    demand = cluster_fit.trial_demand(res)
    assert cluster_fit.max_concurrent(demand, nodes, res.max_concurrent_trials) == expected
