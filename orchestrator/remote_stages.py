"""GPU stages built where the GPUs are, so that trial drivers hold no GPU.

With `resources.use_gpu` and `resources.driver_gpus: 0` (the paper profiles), a trial's driver
runs on a CPU node. The stages that need a GPU and would otherwise run inside the driver
(latents and data_features of in-memory data, samples with one sampling worker, scores,
t_split_choice, timing, seam_state) are built by a Ray task holding one GPU and `cpus_per_worker` CPUs: the
task makes its own `StageGraph` over the same storage, builds the stage through the cache (whose
lease makes one builder per key, cluster-wide), and returns; the driver then reads the finished
entry. Stages that already fan out to GPU actors or tasks (streamed folder data, several
sampling workers) and CPU stages stay where they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.cache import StageCache, StageRef
from orchestrator.config import SweepConfig

if TYPE_CHECKING:
    from orchestrator.stages import StageGraph

GPU_STAGES = (
    "latents",
    "data_features",
    "samples",
    "scores",
    "t_split_choice",
    "timing",
    "seam_state",
)
STREAMED_STAGES = ("latents", "data_features")
GPUS_PER_TASK = 1
# True inside a stage task: its own graph builds there rather than sending the stage on again.
_inside_task = False


def runs_remotely(graph: StageGraph, ref: StageRef) -> bool:
    """True when `ref` is a GPU stage that a GPU task should build instead of this process."""
    res = graph.cfg.resources
    if _inside_task or ref.stage not in GPU_STAGES or not res.use_gpu or res.driver_gpus > 0:
        return False
    if ref.stage in STREAMED_STAGES and graph.streams(ref.upstream["dataset"]):
        return False  # a Ray Data actor pool with GPUs builds it already
    if ref.stage == "samples" and graph.execution.sample_workers > 1:
        return False  # sampling tasks with GPUs build it already
    import ray

    return ray.is_initialized() and not graph.cache.is_complete(ref)


def build_remotely(graph: StageGraph, ref: StageRef) -> None:
    """Build `ref` in a Ray task with one GPU and wait for it (its upstream stages are built)."""
    import ray

    task = ray.remote(_build_stage).options(
        num_gpus=GPUS_PER_TASK,
        num_cpus=graph.cfg.resources.cpus_per_worker,
        name=f"lfm-stage-{ref.stage}-{ref.key[:12]}",
    )
    ray.get(task.remote(graph.cfg, graph.cache, ref))


def _build_stage(cfg: SweepConfig, cache: StageCache, ref: StageRef) -> str:
    """The task: a graph of its own on the same storage builds the stage; its key."""
    global _inside_task
    from orchestrator.stages import StageGraph

    _inside_task = True
    try:
        StageGraph(cfg, cache, progress=False).get(ref)
    finally:
        _inside_task = False
    return ref.key
