"""The flow-matching training loop (plumbing only: the losses live in lfm_core.paths).

Runs on `accelerate`: the device, mixed precision on GPU, and DDP whenever a torch.distributed
process group exists (under Ray Train or `accelerate launch`). AdamW with linear warm-up, gradient
clipping, an EMA of the weights, periodic checkpoints and exact resume. `seam_finetune` runs the
same loop with `lfm_core.paths.SeamLoss` (coarse-to-fine's optional fine-tuning).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, cast

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lfm_core.checkpoint import (
    load_config,
    load_extra_state,
    load_into,
    load_state,
    save_checkpoint,
)
from lfm_core.configs import TrainConfig
from lfm_core.errors import ConfigError
from lfm_core.paths import PAPER_SEAM_WEIGHT, SeamLoss, fm_loss, sample_t
from lfm_core.velocity import VelocityModel

ReportFn = Callable[[int, dict[str, float], str | None], None]
LossFn = Callable[..., Tensor]


class LatentSource(Protocol):
    """Training latents drawn by index: what the loop needs of its data.

    `train_velocity` wraps a latents tensor in `TensorLatents`; a streaming source (shards on
    disk, read row by row) implements the same two methods, so the loop draws the same
    indices from the same generator whatever holds the rows.
    """

    def __len__(self) -> int:
        """The number of rows N that indices in [0, N) address."""
        ...

    def take(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Rows (B, C, H, W) and labels (B,) (or None) at `index` (B,); `generator` only for
        a source's own randomness (flips)."""
        ...


@dataclass(frozen=True)
class TensorLatents:
    """Latents held as one tensor, with optional labels and horizontally flipped copies.

    Attributes:
        latents: (N, C, H, W). labels: (N,) or None. flipped: (N, C, H, W) latents of the
            flipped images, or None; when given, each drawn row is the flipped one with
            probability 1/2 (one `torch.rand` per batch from the step's generator).
        extras: per-row tensors (N, ...) passed to the loss as keyword arguments, the drawn
            rows only (e.g. SeamLoss's `seam_state`); not flipped, so not with `flipped`.
    """

    latents: Tensor
    labels: Tensor | None = None
    flipped: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.extras and self.flipped is not None:
            raise ConfigError("data.hflip: per-row loss inputs (seam states) are not flipped")

    def extras_at(self, index: Tensor) -> dict[str, Tensor]:
        """The extras' rows at `index` (B,)."""
        return {name: rows[index.to(rows.device)] for name, rows in self.extras.items()}

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def take(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        index = index.to(self.latents.device)
        rows = self.latents[index]
        if self.flipped is not None:
            flip = torch.rand(index.shape[0], generator=generator).to(rows.device) < 0.5
            rows = torch.where(flip[:, None, None, None], self.flipped[index], rows)
        return rows, None if self.labels is None else self.labels[index]


@dataclass
class TrainResult:
    """What a training run returns: the trained and EMA models (unwrapped, on CPU)."""

    model: VelocityModel
    ema: VelocityModel
    steps: int
    seconds: float
    world_size: int
    losses: list[tuple[int, float]] = field(default_factory=list)


def _batch_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The data/noise generator of one step on one rank: resume replays the same stream."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63)


@dataclass
class _Loop:
    """One run's state: what every step updates and every checkpoint saves.

    `model` is the network as given (its config and null label); `wrapped` is the same network
    as accelerate prepared it (DDP when a process group exists), the one the loss calls.
    """

    cfg: TrainConfig
    accelerator: Accelerator
    model: VelocityModel
    wrapped: nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: LatentSource
    local_batch: int
    start: int
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def _resume(
    resume_from: str | Path,
    model: VelocityModel,
    ema: AveragedModel,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Load model, EMA and optimizer state from a checkpoint of train_velocity; its step."""
    state = load_config(resume_from).get("train_state")
    if not isinstance(state, dict) or "step" not in state:
        raise ConfigError(
            f"checkpoint {resume_from}: not a training checkpoint (config.json has no "
            "train_state.step); resume only from checkpoints written by train_velocity"
        )
    start = int(state["step"])
    load_into(model, load_state(resume_from, "model"), resume_from)
    load_into(ema.module, load_state(resume_from, "ema"), resume_from)
    optimizer.load_state_dict(load_extra_state(resume_from, "optimizer"))
    ema.n_averaged.fill_(start)
    return start


def _on_device(
    latents: Tensor | LatentSource,
    labels: Tensor | None,
    model: VelocityModel,
    device: torch.device,
) -> LatentSource:
    """A tensor (and its labels, for a conditional model) on `device`; a source as it is."""
    if not isinstance(latents, Tensor):
        return latents
    use_labels = labels is not None and model.config.num_classes > 0
    on_device = labels.to(device) if labels is not None and use_labels else None
    return TensorLatents(latents.to(device), on_device)


def _setup(
    model: VelocityModel,
    latents: Tensor | LatentSource,
    cfg: TrainConfig,
    labels: Tensor | None,
    resume_from: str | Path | None,
    compile_model: bool = False,
) -> _Loop:
    """Accelerator, EMA, AdamW with linear warm-up (resumed if asked) and the data on device;
    the prepared network compiled in place (`nn.Module.compile`: same parameters, same state
    dict) when asked."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision
    )
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by {world} workers")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0 if resume_from is None else _resume(resume_from, model, ema, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)), last_epoch=start - 1
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if compile_model:
        wrapped.compile()
    ema.to(accelerator.device)
    data = _on_device(latents, labels, model, accelerator.device)
    return _Loop(
        cfg,
        accelerator,
        model,
        wrapped,
        ema,
        optimizer,
        scheduler,
        data,
        cfg.batch_size // world,
        start,
    )


def _batch_loss(loop: _Loop, loss_fn: LossFn, step: int) -> Tensor:
    """The loss on `step`'s batch: indices, label dropout, noise and times from its generator."""
    gen = _batch_generator(loop.cfg.seed, loop.accelerator.process_index, step)
    batch, device = loop.local_batch, loop.accelerator.device
    idx = torch.randint(0, len(loop.data), (batch,), generator=gen)
    x1, y = loop.data.take(idx, gen)
    x1 = x1.to(device)
    cond = {}
    if y is not None and loop.model.config.num_classes > 0:
        drop = torch.rand(batch, generator=gen).to(device) < loop.cfg.class_dropout
        y = y.to(device)
        cond["class_labels"] = torch.where(drop, torch.full_like(y, loop.model.null_label), y)
    if isinstance(loop.data, TensorLatents):
        cond.update({k: v.to(device) for k, v in loop.data.extras_at(idx).items()})
    x0 = torch.randn(x1.shape, generator=gen).to(device)
    t = sample_t(batch, loop.cfg.t_sampling, generator=gen).to(device)
    return loss_fn(loop.wrapped, x1, x0, t, **cond)


def _optimizer_step(loop: _Loop, loss: Tensor) -> None:
    """Backward, clip, AdamW and schedule step, then the EMA update."""
    loop.optimizer.zero_grad(set_to_none=True)
    loop.accelerator.backward(loss)
    if loop.cfg.grad_clip > 0:
        loop.accelerator.clip_grad_norm_(loop.wrapped.parameters(), loop.cfg.grad_clip)
    loop.optimizer.step()
    loop.scheduler.step()
    loop.ema.update_parameters(loop.accelerator.unwrap_model(loop.wrapped))


def _save(loop: _Loop, out_dir: str | Path | None, step: int) -> str | None:
    """Checkpoint `checkpoint-<step>` on rank 0 (model, EMA, optimizer, train_state); its path."""
    if out_dir is None or not loop.accelerator.is_main_process:
        return None
    directory = Path(out_dir) / f"checkpoint-{step:07d}"
    state = {"train": asdict(loop.cfg), "velocity": loop.model.config.to_dict()}
    save_checkpoint(
        directory,
        {"model": loop.accelerator.unwrap_model(loop.wrapped), "ema": loop.ema.module},
        {**state, "train_state": {"step": step, "world_size": loop.world}},
        extra_state={"optimizer": loop.optimizer.state_dict()},
    )
    return str(directory)


def _record(
    loop: _Loop,
    done: int,
    loss: Tensor,
    bar: tqdm,
    out_dir: str | Path | None,
    report: ReportFn | None,
) -> None:
    """Every log_every steps and at checkpoints: the mean loss over ranks, saved and reported."""
    cfg = loop.cfg
    is_log = done % cfg.log_every == 0 or done == cfg.steps
    is_ckpt = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
    if not (is_log or is_ckpt):
        return
    mean_loss = loop.accelerator.reduce(loss.detach(), reduction="mean").item()
    loop.losses.append((done, mean_loss))
    bar.set_postfix(loss=f"{mean_loss:.4f}")
    ckpt = _save(loop, out_dir, done) if is_ckpt else None
    if report is not None:
        metrics = {"loss": mean_loss, "step": float(done), "world_size": float(loop.world)}
        report(done, metrics, ckpt)


def train_velocity(
    model: VelocityModel,
    latents: Tensor | LatentSource,
    cfg: TrainConfig,
    *,
    labels: Tensor | None = None,
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    report: ReportFn | None = None,
    loss_fn: LossFn = fm_loss,
    progress: bool = True,
    compile_model: bool = False,
) -> TrainResult:
    """Train `model` by flow matching on `latents`.

    Args:
        model: a velocity network called as model(x, t, class_labels=None).
        latents: the (scaled) training latents, shape (N, C, H, W), or a `LatentSource`
            (e.g. this rank's shards on disk, with its own labels and flips); each rank draws
            its own batches of batch_size // world_size from all the rows it is given.
        cfg: the optimisation settings.
        labels: (N,) class labels of a latents tensor, for a class-conditional model, dropped to the null label with
            probability cfg.class_dropout (classifier-free guidance).
        out_dir: where checkpoints go (`checkpoint-<step>`, every cfg.checkpoint_every steps and
            at the end); None keeps nothing on disk.
        resume_from: a checkpoint folder written by this function to continue from.
        report: called on every rank as report(step, metrics, checkpoint_dir_or_None) every
            cfg.log_every steps and at each checkpoint (the directory only on rank 0).
        loss_fn: loss_fn(model, x1, x0, t, **cond) -> scalar; the flow-matching loss by default
            (paths.SeamLoss in seam_finetune).
        progress: show a tqdm bar on rank 0.
        compile_model: run the network through `torch.compile` (GPU throughput; off by default
            so CPU runs stay bit-identical). Not a TrainConfig field: it changes how the model
            trains, not what it learns, so it is in no stage key.
    """
    loop = _setup(model, latents, cfg, labels, resume_from, compile_model)
    started = time.perf_counter()
    bar = tqdm(
        range(loop.start, cfg.steps),
        initial=loop.start,
        total=cfg.steps,
        desc="train FM",
        disable=not (progress and loop.accelerator.is_main_process),
    )
    loop.wrapped.train()
    for step in bar:
        loss = _batch_loss(loop, loss_fn, step)
        _optimizer_step(loop, loss)
        _record(loop, step + 1, loss, bar, out_dir, report)
    seconds = time.perf_counter() - started
    trained = cast(VelocityModel, loop.accelerator.unwrap_model(loop.wrapped).cpu().eval())
    return TrainResult(
        model=trained,
        ema=cast(VelocityModel, loop.ema.module.cpu().eval()),
        steps=cfg.steps,
        seconds=seconds,
        world_size=loop.world,
        losses=loop.losses,
    )


def seam_loss(fine: nn.Module, t_split: float, weight: float, cfg: TrainConfig) -> SeamLoss:
    """The SeamLoss of a fine-tuning run, after checking that cfg samples t uniformly."""
    if cfg.t_sampling != "uniform":
        raise ConfigError(
            "t_sampling: seam fine-tuning needs 'uniform' (t is rescaled to [0, t_split))"
        )
    return SeamLoss(fine, t_split, weight)


def seam_finetune(
    coarse: VelocityModel,
    fine: nn.Module,
    latents: Tensor,
    states: Tensor,
    t_split: float,
    cfg: TrainConfig,
    *,
    weight: float = PAPER_SEAM_WEIGHT,
    labels: Tensor | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `coarse` on [0, t_split) of `latents` (N, C, H, W) with SeamLoss against `fine`.

    `states` (N, C, H, W) are the latents' seam states at t_split
    (`lfm_core.coarse_to_fine.seam_states` of `fine`); row i goes with latents[i].
    """
    loss = seam_loss(fine, t_split, weight, cfg)
    use_labels = labels if labels is not None and coarse.config.num_classes > 0 else None
    data = TensorLatents(latents, use_labels, extras={"seam_state": states})
    return train_velocity(coarse, data, cfg, loss_fn=loss, progress=progress)
