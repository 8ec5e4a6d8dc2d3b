"""End to end: the tiny sweep on a local Ray (2 CPUs) with a real MLflow server on 127.0.0.1.

Checks the MLflow layout (a parent per invocation, one child per trial with finite metrics and
the artefacts) and, from the cache's own build records, that no stage is built twice: not
within the sweep, where trials share the autoencoder, extractor and reference model, and not in
a second run of the same sweep, which builds nothing.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from mlflow import MlflowClient
from ray import cloudpickle

from lfm_core.train import TrainConfig
from lfm_core.velocity import VelocityConfig
from orchestrator import cli, schema, tracking
from orchestrator.cache import StageCache, StageRef
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.locks import LEASES_DIR
from orchestrator.sample_workers import GRID_IMAGES
from orchestrator.schema import (
    FID_FLOOR_AUTOENCODER,
    FID_FLOOR_DATA,
    SINGLE_MODEL_METRICS,
    TRAIN_LOSS,
)
from orchestrator.stage_builders import load_training_data
from orchestrator.stages import StageGraph
from orchestrator.storage import Storage
from orchestrator.sweep import SweepOutcome, cache_for, can_resume, run_sweep
from orchestrator.trainers import FitJob, InProcessTrainer
from orchestrator.trials import expand_trials

pytestmark = pytest.mark.integration
# Ray workers cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
TRIAL_PARAMS = {
    "study",
    "data_fraction",
    "criterion",
    "width",
    "seed",
    "dataset",
    "model",
    "reference_model",
    "train_steps",
    "conditional",
    "subset_size",
    "labels_used",
}


@pytest.fixture(scope="module")
def swept(
    ray_local: None, mlflow_server: str, tiny_dinov2: Path, tiny_storage: Path
) -> tuple[SweepConfig, SweepOutcome]:
    """The tiny sweep, run once for the tests of this module."""
    cfg = load_sweep(TINY, tiny_overrides(tiny_storage, tiny_dinov2, mlflow_server))
    return cfg, run_sweep(cfg)


def test_tiny_sweep_tracks_every_trial_and_builds_each_stage_once(
    swept: tuple[SweepConfig, SweepOutcome], mlflow_server: str
) -> None:
    cfg, first = swept
    trials = expand_trials(cfg)
    assert len(trials) >= 4 and len({t.data_fraction for t in trials}) == 2
    assert len({t.criterion for t in trials}) == 2
    assert first.errors == [] and sorted(first.metrics) == sorted(t.name for t in trials)

    client = MlflowClient(mlflow_server)
    children = tracking.children(cfg, first.experiment_id, first.parent_run_id)
    assert sorted(run.data.tags[tracking.TRIAL_TAG] for run in children) == sorted(
        t.name for t in trials
    )
    for run in children:
        assert run.info.status == "FINISHED"
        # The floors on embedded data; no FID curve (the tiny sweep sets no sampling.fid_every).
        floors = {FID_FLOOR_DATA, FID_FLOOR_AUTOENCODER}
        assert set(run.data.metrics) == {*SINGLE_MODEL_METRICS, TRAIN_LOSS, *floors}
        assert all(math.isfinite(value) for value in run.data.metrics.values()), run.data.metrics
        assert set(run.data.params) == TRIAL_PARAMS
        artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artefacts == {"config.json", "samples.png", "comparison.png", "pipeline"}
        assert {"lfm.key.model", "lfm.key.autoencoder"} <= set(run.data.tags)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"

    cache = cache_for(cfg)
    records = cache.records()
    built = Counter((record["stage"], record["key"]) for record in records)
    assert max(built.values()) == 1, built
    graph = StageGraph(cfg, cache)
    needed = {ref.key for trial in trials for ref in graph.stages_of(trial)}
    assert {key for _, key in built} == needed
    # Fraction 1 keeps everything whatever the criterion: its trials share one model, which
    # is also the reference and the loss criterion's probe.
    assert sum(stage == "fm_model" for stage, _ in built) == 3

    second = run_sweep(cfg)
    assert second.errors == []
    assert len(cache.records()) == len(records)
    assert second.metrics == first.metrics
    assert second.parent_run_id != first.parent_run_id
    assert len(tracking.children(cfg, second.experiment_id, second.parent_run_id)) == len(trials)


def test_ray_train_and_the_in_process_trainer_train_the_same_model(
    swept: tuple[SweepConfig, SweepOutcome],
) -> None:
    cfg, _ = swept
    graph = StageGraph(cfg, cache_for(cfg))
    ref = graph.trial(expand_trials(cfg)[0]).reference
    by_ray = graph.load_model(ref).state_dict()
    data = functools.partial(
        load_training_data, graph.cache, ref.upstream["latents"], ref.upstream["subset"], False
    )
    latents_info = graph.info(ref.upstream["latents"])
    velocity = VelocityConfig(
        ref.inputs["name"],
        in_channels=latents_info["shape"][1],
        sample_size=latents_info["shape"][-1],
        width=ref.inputs["width"],
    )
    train = TrainConfig(**ref.inputs["train"])
    in_process = InProcessTrainer().fit(FitJob(data, velocity, train, 1, "check")).ema.state_dict()
    assert by_ray.keys() == in_process.keys()
    assert all(torch.equal(by_ray[name], in_process[name]) for name in by_ray)


def test_resume_of_a_finished_sweep_reruns_nothing(
    swept: tuple[SweepConfig, SweepOutcome],
) -> None:
    cfg, _ = swept
    assert can_resume(cfg)
    records = len(cache_for(cfg).records())
    parent = Storage(cfg.storage_uri).read_json(f"sweeps/{cfg.name}/parent_run.json")[
        "parent_run_id"
    ]

    outcome = run_sweep(cfg, resume=True)
    assert outcome.parent_run_id == parent and outcome.errors == []
    assert len(outcome.metrics) == len(expand_trials(cfg))
    children = tracking.children(cfg, outcome.experiment_id, parent)
    assert len(children) == len(expand_trials(cfg))
    assert {run.info.status for run in children} == {"FINISHED"}
    assert len(cache_for(cfg).records()) == records


def test_train_and_sample_commands_reuse_the_sweep_stages(
    swept: tuple[SweepConfig, SweepOutcome],
    mlflow_server: str,
    tiny_dinov2: Path,
    tiny_storage: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    overrides = tiny_overrides(tiny_storage, tiny_dinov2, mlflow_server)
    cfg = load_sweep(TINY, overrides)
    records = len(cache_for(cfg).records())
    assert records > 0
    png = tmp_path / "grid.png"
    for argv in (
        ["train", str(TINY), *overrides, "--fraction", "0.5"],
        ["sample", str(TINY), *overrides, "--fraction", "0.5", "--out", str(png)],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "checkpoint: " in out and f"samples: {png}" in out
    assert png.stat().st_size > 0
    # The sweep built both stages: the commands read them from the cache and build nothing.
    assert len(cache_for(cfg).records()) == records


def _build_slowly(root: str, start_at: float) -> str:
    """A Ray task: get one cache entry whose build takes a while (all tasks race for it)."""
    import time

    def build(folder: Path) -> None:
        time.sleep(1.0)
        (folder / "out.txt").write_text("built once")

    time.sleep(max(0.0, start_at - time.time()))
    return str(StageCache(Storage(root), poll_s=0.1).get(StageRef("race", "1", {"n": 1}), build))


def test_concurrent_drivers_build_a_stage_once_through_the_storage_lease(
    ray_local: None, tmp_path: Path
) -> None:
    import time

    import ray

    # CPU-free tasks, so all four run at once even on 2 CPUs.
    task = ray.remote(num_cpus=0)(_build_slowly)
    start_at = time.time() + 2.0
    folders = ray.get([task.remote(str(tmp_path), start_at) for _ in range(4)])
    assert len(set(folders)) == 1
    assert (Path(folders[0]) / "out.txt").read_text() == "built once"
    assert len(StageCache(Storage(str(tmp_path))).records()) == 1
    # The lease lived in the storage (a lock file beside the cache), not in the Ray cluster.
    key = StageRef("race", "1", {"n": 1}).key
    assert [p.name for p in (tmp_path / LEASES_DIR).glob("*.lock")] == [f"race-{key}.lock"]


def test_a_trial_that_raises_leaves_a_failed_child_run_with_its_error(
    swept: tuple[SweepConfig, SweepOutcome],
    mlflow_server: str,
    tiny_dinov2: Path,
    tiny_storage: Path,
    tmp_path: Path,
) -> None:
    """An image folder without images passes validation (the folder exists; `lfm sweep`'s
    preflight would list it, run_sweep does not) and fails inside the trial's first stage."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    overrides = tiny_overrides(tiny_storage, tiny_dinov2, mlflow_server)
    overrides += ["name=tiny-broken", "data.name=folder", f"data.root={empty}"]
    overrides += ["search.data_reduction.data_fraction=[1.0]"]
    overrides += ["search.data_reduction.criterion=[random]"]
    cfg = load_sweep(TINY, overrides)

    outcome = run_sweep(cfg)
    assert outcome.metrics == {}
    [name] = outcome.errors
    line = outcome.failures[name]
    assert line.startswith("ConfigError: dataset 'folder': ") and "\n" not in line
    assert outcome.log_file is not None and name in outcome.log_file.read_text()

    [run] = tracking.children(cfg, outcome.experiment_id, outcome.parent_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.ERROR_TAG] == line
    client = MlflowClient(mlflow_server)
    folder = client.download_artifacts(run.info.run_id, tracking.TRACEBACK_FILE, str(tmp_path))
    traceback = Path(folder).read_text()
    assert traceback.startswith("Traceback (most recent call last):")
    assert traceback.rstrip().endswith(line)
    assert client.get_run(outcome.parent_run_id).info.status == "FAILED"


# Loads an exported folder the way the README shows, in a process of its own, and saves the
# images of the sample grid's seeds.
LOAD_EXPORTED = """
import sys
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
from lfm_core.pipeline import custom_pipeline_file
folder, first_seed, count, steps, out = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(
    folder, custom_pipeline=str(custom_pipeline_file(folder)), trust_remote_code=True
)
seeds = range(int(first_seed), int(first_seed) + int(count))
save_file({"images": pipe(seeds=seeds, num_steps=int(steps)).images}, out)
"""


def test_export_then_from_pretrained_offline_gives_the_logged_samples(
    swept: tuple[SweepConfig, SweepOutcome],
    mlflow_server: str,
    tiny_dinov2: Path,
    tiny_storage: Path,
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    from lfm_core.images import save_grid

    cfg, outcome = swept
    trial = expand_trials(cfg)[0]
    overrides = tiny_overrides(tiny_storage, tiny_dinov2, mlflow_server)
    folder, images = tmp_path / "pipeline", tmp_path / "images.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # offline: nothing from the hub
    export = [sys.executable, "-m", "orchestrator", "export", str(TINY), *overrides]
    export += ["--trial", schema.run_name(trial), "--out", str(folder)]
    done = subprocess.run(export, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"exported {trial.name} as a LatentFlowPipeline" in done.stdout
    sampling = cfg.sampling
    args = [str(folder), str(sampling.first_seed), str(GRID_IMAGES), str(sampling.steps)]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_EXPORTED, *args, str(images)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    # The run's samples.png is drawn from the samples stage's grid; the pipeline's images in
    # [0, 1] are that grid's (grid + 1) / 2.
    [run] = [
        r
        for r in tracking.children(cfg, outcome.experiment_id, outcome.parent_run_id)
        if r.data.tags[tracking.TRIAL_TAG] == trial.name
    ]
    logged = MlflowClient(mlflow_server).download_artifacts(
        run.info.run_id, "samples.png", str(tmp_path / "logged")
    )
    graph = StageGraph(cfg, cache_for(cfg), progress=False)
    grid = graph.load_samples(graph.trial(trial).samples)["grid"]
    redrawn = save_grid(grid, tmp_path / "redrawn.png")
    assert Path(logged).read_bytes() == redrawn.read_bytes()
    exported = load_file(str(images))["images"]
    assert exported.shape == grid.shape
    assert torch.equal(exported, (grid + 1) / 2)
