"""The order a sweep's trials run in, and the stages a local sweep builds before them.

With several trials at once, a trial that waits for another's build leaves its slot idle. Two
choices keep the slots training:
- `run_order`: each next trial is the first that trains a velocity model no earlier trial
  trains, fewest models first, so the reference (a trial of its own at fraction 1) trains beside
  another trial's model instead of after it; trials whose models are all taken follow in file
  order (their models are cached by the time they run).
- `shared_stages`: the stages every trial needs that depend on no trained velocity model (the
  autoencoder, latents, feature extractors, reference statistics, floors). A local sweep builds
  them before its trials, in its own process with every core, instead of in one trial while the
  others wait for it with a fraction of the machine each.
Neither changes what any stage writes: only who builds it and when.
"""

from __future__ import annotations

from orchestrator import stage_keys
from orchestrator.cache import StageRef
from orchestrator.config import SweepConfig
from orchestrator.trials import Trial

TRAINED_STAGES = frozenset({"fm_model", "seam_model"})


def trained_models(cfg: SweepConfig, trial: Trial) -> frozenset[str]:
    """Keys of the velocity models a trial's stages train (an "auto" trial's up to its choice)."""
    return frozenset(
        ref.key for ref in stage_keys.stages_of(cfg, trial) if ref.stage in TRAINED_STAGES
    )


def run_order(cfg: SweepConfig, trials: list[Trial]) -> list[Trial]:
    """The trials, each next one the first that trains a model no earlier one trains (fewest
    models first), then the rest in their given order."""
    models = {trial: trained_models(cfg, trial) for trial in trials}
    remaining, order, taken = list(trials), list[Trial](), set[str]()
    while remaining:
        fresh = [trial for trial in remaining if not models[trial] <= taken]
        pick = min(fresh, key=lambda trial: len(models[trial])) if fresh else remaining[0]
        remaining.remove(pick)
        order.append(pick)
        taken |= models[pick]
    return order


def shared_stages(cfg: SweepConfig, trials: list[Trial]) -> list[StageRef]:
    """The stages every trial needs that no trained velocity model is upstream of, upstream
    first. "auto" trials count only when there is no other kind (their stages are listed up
    to their t_split_choice; past it they need the same evaluation stages as the others)."""
    chosen = [trial for trial in trials if not trial.auto] or trials
    if not chosen:
        return []
    lists = [stage_keys.stages_of(cfg, trial) for trial in chosen]
    common = set.intersection(*({ref.key for ref in refs} for refs in lists))
    return [
        ref
        for ref in lists[0]
        if ref.key in common
        and not any(up.stage in TRAINED_STAGES for up in ref.closure().values())
    ]
