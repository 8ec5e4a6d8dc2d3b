"""The image autoencoder (diffusers' AutoencoderKL): build, train, load, encode and decode.

Latents handed to the rest of the package are *scaled*: z = (mode(q(z | x)) - shift) * scale with
scale = `vae.config.scaling_factor` and shift = `vae.config.shift_factor` (None means 0; only some
hub autoencoders set it). `train_autoencoder` measures the scale on its training images as
1 / std of the unscaled posterior-mode latents, so scaled latents have unit standard deviation
there, and stores it in the model's config; `save_pretrained` / `load_autoencoder` keep it.
Encoding uses the posterior mode, so it is deterministic.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import Tensor
from tqdm.auto import tqdm

from lfm_core.configs import AutoencoderConfig
from lfm_core.errors import ConfigError, check_choice, check_range

logger = logging.getLogger(__name__)

PerceptualFn = Callable[[Tensor], Tensor]

DEFAULT_BATCH_SIZE = 256
# Autocast settings of encode / decode: "no" runs in the model's own dtype.
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Images live in [-1, 1], so the peak-to-peak signal in the PSNR is 2.
PEAK_TO_PEAK = 2.0
# An untrained autoencoder has no measured scale; 1 leaves its latents unscaled.
UNMEASURED_SCALING_FACTOR = 1.0
# huggingface_hub's spelling of a true environment flag.
_TRUE_ENV_VALUES = ("1", "ON", "YES", "TRUE")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def block_kwargs(cfg: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers constructor arguments of an encoder-decoder of cfg's blocks (shared by
    AutoencoderKL and VQModel)."""
    n = len(cfg.block_out_channels)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL; its weights depend on cfg.seed alone.

    Its scaling factor is 1 until `train_autoencoder` measures one.
    """
    # A private RNG state, so building neither depends on nor disturbs the global one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKL(
            **block_kwargs(cfg),
            scaling_factor=UNMEASURED_SCALING_FACTOR,
        )


def _reconstruction_loss(
    vae: AutoencoderKL,
    x: Tensor,
    cfg: AutoencoderConfig,
    generator: torch.Generator,
    perceptual_fn: PerceptualFn | None,
) -> Tensor:
    """MSE (+ l1_weight L1 + perceptual_weight feature MSE) + kl_weight KL, for images x (B, C, H, W)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
    if cfg.l1_weight:
        loss = loss + cfg.l1_weight * F.l1_loss(recon, x)
    if cfg.perceptual_weight and perceptual_fn is not None:
        with torch.no_grad():
            target_features = perceptual_fn(x)
        loss = loss + cfg.perceptual_weight * F.mse_loss(perceptual_fn(recon), target_features)
    return loss


@dataclass
class _AutoencoderTraining:
    """One autoencoder run: the model, what its steps update and the settings they read."""

    vae: AutoencoderKL
    cfg: AutoencoderConfig
    device: torch.device
    perceptual_fn: PerceptualFn | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    steps_per_epoch: int


def _check_training_inputs(
    images: Tensor, cfg: AutoencoderConfig, perceptual_fn: PerceptualFn | None
) -> None:
    if images.ndim != 4 or images.shape[1] != cfg.in_channels or images.shape[0] == 0:
        raise ConfigError(
            f"images: shape {tuple(images.shape)} must be (N > 0, in_channels={cfg.in_channels}, H, W)"
        )
    if cfg.perceptual_weight and perceptual_fn is None:
        raise ConfigError(
            f"perceptual_weight: {cfg.perceptual_weight} > 0 needs perceptual_fn (a frozen feature net)"
        )


def _start_training(
    num_images: int,
    cfg: AutoencoderConfig,
    perceptual_fn: PerceptualFn | None,
    device: torch.device,
) -> _AutoencoderTraining:
    """A fresh autoencoder on `device`, AdamW with the (cosine) schedule, the seeded generator."""
    vae = build_autoencoder(cfg)
    vae.to(device)  # type: ignore[arg-type]  # diffusers types `to` as a functools.wraps copy
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(num_images / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)) if cfg.cosine_lr else 1.0,
    )
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU: the same stream on every device
    return _AutoencoderTraining(
        vae, cfg, device, perceptual_fn, optimizer, schedule, generator, steps_per_epoch
    )


def _train_epoch(
    run: _AutoencoderTraining,
    images: Tensor,
    epoch: int,
    heldout: Tensor | None,
    progress: bool,
) -> dict[str, float]:
    """One shuffled pass over images; its mean loss, seconds and (if given) held-out PSNR."""
    cfg, vae = run.cfg, run.vae
    vae.train()
    start, loss_sum = time.perf_counter(), 0.0
    order = torch.randperm(images.shape[0], generator=run.generator)
    with tqdm(
        total=run.steps_per_epoch,
        desc=f"autoencoder epoch {epoch + 1}/{cfg.epochs}",
        disable=not progress,
    ) as bar:
        for step, index in enumerate(order.split(cfg.batch_size), start=1):
            loss = _reconstruction_loss(
                vae, images[index].to(run.device), cfg, run.generator, run.perceptual_fn
            )
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.schedule.step()
            loss_sum += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / step:.4g}")
        summary = {"loss": loss_sum / run.steps_per_epoch, "seconds": time.perf_counter() - start}
        if heldout is not None:
            summary["heldout_psnr"] = reconstruction_psnr(vae, heldout)
            bar.set_postfix(loss=f"{summary['loss']:.4g}", psnr=f"{summary['heldout_psnr']:.2f}")
    return summary


def train_autoencoder(
    images: Tensor,
    cfg: AutoencoderConfig,
    progress: bool = True,
    heldout: Tensor | None = None,
    perceptual_fn: PerceptualFn | None = None,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """Train an AutoencoderKL on images and store its measured latent scaling factor.

    Loss per batch: mean (x_hat - x)^2 + l1_weight mean |x_hat - x| + kl_weight KL(q(z|x) || N(0, I))
    (+ perceptual_weight mean (f(x_hat) - f(x))^2), with x_hat decoded from a posterior sample.
    After training, scaling_factor = 1 / std(posterior-mode latents of `images`) is written
    with `vae.register_to_config`.

    Args:
        images: (N, C, H, W) float32 in [-1, 1], C == cfg.in_channels.
        cfg: architecture and training settings.
        progress: show a tqdm bar per epoch (running loss; held-out PSNR at its end).
        heldout: optional (M, C, H, W) images whose reconstruction PSNR is logged per epoch.
        perceptual_fn: frozen feature net f(x) -> features, required when perceptual_weight > 0.
        device: where to train; default CUDA when available, else CPU.

    Returns:
        The trained AutoencoderKL, in eval mode, on `device`.
    """
    _check_training_inputs(images, cfg, perceptual_fn)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _start_training(images.shape[0], cfg, perceptual_fn, device)
    for epoch in range(cfg.epochs):
        summary = _train_epoch(run, images, epoch, heldout, progress)
        logger.info("autoencoder epoch %d/%d: %s", epoch + 1, cfg.epochs, summary)
    vae = run.vae
    std = _posterior_mode(vae, images, DEFAULT_BATCH_SIZE, progress).double().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.eval()


def load_autoencoder(
    path_or_hub_id: str | os.PathLike[str], subfolder: str | None = None
) -> AutoencoderKL:
    """Load an AutoencoderKL saved with `save_pretrained`, from a local folder or the hub.

    Args:
        path_or_hub_id: a local folder, or a Hugging Face hub id such as
            "stabilityai/sd-vae-ft-mse" (needs internet unless already in the local hub cache;
            with HF_HUB_OFFLINE=1 only the cache is tried).
        subfolder: the autoencoder's folder inside the repo, e.g. "vae" for a full pipeline.

    Returns:
        The AutoencoderKL in eval mode, with the scaling factor of its saved config.

    Raises:
        ConfigError: a missing local folder or one without config.json, or a hub id that cannot
            be loaded.
    """
    name = os.fspath(path_or_hub_id)
    path = Path(name).expanduser()
    if path.exists():
        config = path / (subfolder or "") / "config.json"
        if not config.is_file():
            raise ConfigError(
                f"autoencoder: {str(config)!r} is missing (save with save_pretrained)"
            )
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder).eval()
    if _HUB_ID.fullmatch(name) is None or name.startswith("."):
        raise ConfigError(f"autoencoder: local path {name!r} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_ENV_VALUES
    try:
        vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, local_files_only=offline)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"autoencoder {name!r}: no local folder of that name, and loading it as a hub id "
            f"needs internet (or pass a local folder saved with save_pretrained); {reason}"
        ) from None
    return vae.eval()


def _device_and_dtype(vae: AutoencoderKL) -> tuple[torch.device, torch.dtype]:
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


def _check_batch(key: str, tensor: Tensor, batch_size: int) -> None:
    if tensor.ndim != 4 or tensor.shape[0] == 0:
        raise ConfigError(f"{key}: shape {tuple(tensor.shape)} must be (N > 0, C, H, W)")
    check_range("batch_size", batch_size, 1, math.inf)


def _autocast(device: torch.device, autocast: str) -> contextlib.AbstractContextManager[object]:
    """torch.autocast to the dtype `autocast` names on `device`; a no-op for "no"."""
    check_choice("autocast", autocast, tuple(AUTOCAST))
    dtype = AUTOCAST[autocast]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _posterior_mode(
    vae: AutoencoderKL, images: Tensor, batch_size: int, progress: bool, autocast: str = "no"
) -> Tensor:
    """Unscaled posterior-mode latents (N, c, h, w) float32 on the CPU of images (N, C, H, W)."""
    _check_batch("images", images, batch_size)
    vae.eval()
    device, dtype = _device_and_dtype(vae)
    with _autocast(device, autocast):
        chunks = [
            vae.encode(batch.to(device, dtype)).latent_dist.mode().float().cpu()
            for batch in tqdm(images.split(batch_size), desc="encode", disable=not progress)
        ]
    return torch.cat(chunks)


def _scale_and_shift(vae: AutoencoderKL) -> tuple[float, float]:
    shift = vae.config.get("shift_factor")
    return float(vae.config["scaling_factor"]), float(shift) if shift is not None else 0.0


def encode(
    vae: AutoencoderKL,
    images: Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    autocast: str = "no",
) -> Tensor:
    """Scaled posterior-mode latents of images.

    Args:
        vae: the autoencoder (any device; set to eval mode); images move to its device.
        images: (N, C, H, W) in [-1, 1].
        batch_size: images per forward pass; the result does not depend on it.
        progress: show a tqdm bar.
        autocast: "no", "bf16" or "fp16": run the forward passes under torch.autocast.

    Returns:
        (N, c, h, w) float32 on the CPU: (mode - shift_factor) * scaling_factor.
    """
    scale, shift = _scale_and_shift(vae)
    return (_posterior_mode(vae, images, batch_size, progress, autocast) - shift) * scale


@torch.no_grad()
def decode(
    vae: AutoencoderKL,
    latents: Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    autocast: str = "no",
) -> Tensor:
    """Images from scaled latents (the inverse of `encode`'s scaling), clamped to [-1, 1].

    Args:
        vae: the autoencoder (any device; set to eval mode); latents move to its device.
        latents: (N, c, h, w) scaled latents.
        batch_size: latents per forward pass.
        progress: show a tqdm bar.
        autocast: "no", "bf16" or "fp16": run the forward passes under torch.autocast.

    Returns:
        (N, C, H, W) float32 on the CPU, in [-1, 1].
    """
    _check_batch("latents", latents, batch_size)
    vae.eval()
    device, dtype = _device_and_dtype(vae)
    scale, shift = _scale_and_shift(vae)
    with _autocast(device, autocast):
        chunks = [
            vae.decode(batch.to(device, dtype) / scale + shift).sample.float().clamp(-1, 1).cpu()
            for batch in tqdm(latents.split(batch_size), desc="decode", disable=not progress)
        ]
    return torch.cat(chunks)


def reconstruction_psnr(
    vae: AutoencoderKL,
    images: Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    autocast: str = "no",
    decode_batch_size: int | None = None,
) -> float:
    """PSNR in dB of decode(encode(images)) against images, over the [-1, 1] range.

    PSNR = 10 log10(PEAK_TO_PEAK^2 / MSE), the MSE taken over every pixel of the whole set
    (not an average of per-image PSNRs). Infinite for a perfect reconstruction. batch_size
    encodes (and decodes, unless decode_batch_size is given); autocast as in `encode`.
    """
    latents = encode(vae, images, batch_size, progress, autocast)
    recon = decode(vae, latents, decode_batch_size or batch_size, progress, autocast)
    mse = (recon.double() - images.detach().cpu().double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(PEAK_TO_PEAK**2 / mse)
