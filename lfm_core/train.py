"""The flow-matching training loop (plumbing only: the loss lives in lfm_core.paths).

Runs on `accelerate`: the device, mixed precision on GPU, and DDP whenever a torch.distributed
process group exists (under Ray Train or `accelerate launch`). AdamW with linear warm-up, gradient
clipping, an EMA of the weights, periodic checkpoints and exact resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lfm_core.checkpoint import (
    load_config,
    load_extra_state,
    load_into,
    load_state,
    save_checkpoint,
)
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.paths import T_SAMPLING, fm_loss, sample_t
from lfm_core.velocity import VelocityModel

ReportFn = Callable[[int, dict[str, float], str | None], None]
LossFn = Callable[..., Tensor]
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one flow-matching model. batch_size is the global batch."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_sampling: str = "uniform"
    class_dropout: float = 0.1
    checkpoint_every: int = 0
    log_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be a positive integer")
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("class_dropout", self.class_dropout, 0.0, 1.0, high_open=True)
        check_choice("t_sampling", self.t_sampling, T_SAMPLING)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)


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


def train_velocity(
    model: VelocityModel,
    latents: Tensor,
    cfg: TrainConfig,
    *,
    labels: Tensor | None = None,
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    report: ReportFn | None = None,
    loss_fn: LossFn = fm_loss,
    progress: bool = True,
) -> TrainResult:
    """Train `model` by flow matching on `latents`.

    Args:
        model: a velocity network called as model(x, t, class_labels=None).
        latents: the (scaled) training latents, shape (N, C, H, W); each rank draws its own
            batches of batch_size // world_size from all of them.
        cfg: the optimisation settings.
        labels: (N,) class labels for a class-conditional model, dropped to the null label with
            probability cfg.class_dropout (classifier-free guidance).
        out_dir: where checkpoints go (`checkpoint-<step>`, every cfg.checkpoint_every steps and
            at the end); None keeps nothing on disk.
        resume_from: a checkpoint folder written by this function to continue from.
        report: called on every rank as report(step, metrics, checkpoint_dir_or_None) every
            cfg.log_every steps and at each checkpoint (the directory only on rank 0).
        loss_fn: loss_fn(model, x1, x0, t, **cond) -> scalar; the flow-matching loss by default
            (coarse_to_fine.SeamLoss for seam fine-tuning).
        progress: show a tqdm bar on rank 0.
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by {world} workers")
    local_batch = cfg.batch_size // world
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume_from is not None:
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)), last_epoch=start - 1
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    data = latents.to(accelerator.device)
    label_data = None
    if labels is not None and model.config.num_classes > 0:
        label_data = labels.to(accelerator.device)

    def save(step: int) -> str | None:
        if out_dir is None or not accelerator.is_main_process:
            return None
        directory = Path(out_dir) / f"checkpoint-{step:07d}"
        state = {"train": asdict(cfg), "velocity": model.config.to_dict()}
        save_checkpoint(
            directory,
            {"model": accelerator.unwrap_model(wrapped), "ema": ema.module},
            {**state, "train_state": {"step": step, "world_size": world}},
            extra_state={"optimizer": optimizer.state_dict()},
        )
        return str(directory)

    losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="train FM",
        disable=not (progress and accelerator.is_main_process),
    )
    wrapped.train()
    for step in bar:
        gen = _batch_generator(cfg.seed, rank, step)
        idx = torch.randint(0, data.shape[0], (local_batch,), generator=gen).to(data.device)
        cond = {}
        if label_data is not None:
            drop = torch.rand(local_batch, generator=gen).to(data.device) < cfg.class_dropout
            y = label_data[idx]
            cond["class_labels"] = torch.where(drop, torch.full_like(y, model.null_label), y)
        x0 = torch.randn(data[idx].shape, generator=gen).to(data.device)
        t = sample_t(local_batch, cfg.t_sampling, generator=gen).to(data.device)
        loss = loss_fn(wrapped, data[idx], x0, t, **cond)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update_parameters(accelerator.unwrap_model(wrapped))
        done = step + 1
        is_log = done % cfg.log_every == 0 or done == cfg.steps
        is_ckpt = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        if is_log or is_ckpt:
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            losses.append((done, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            ckpt = save(done) if is_ckpt else None
            if report is not None:
                metrics = {"loss": mean_loss, "step": float(done), "world_size": float(world)}
                report(done, metrics, ckpt)
    seconds = time.perf_counter() - started
    trained = cast(VelocityModel, accelerator.unwrap_model(wrapped).cpu().eval())
    return TrainResult(
        model=trained,
        ema=cast(VelocityModel, ema.module.cpu().eval()),
        steps=cfg.steps,
        seconds=seconds,
        world_size=world,
        losses=losses,
    )
