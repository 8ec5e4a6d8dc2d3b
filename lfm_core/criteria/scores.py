"""Per-sample difficulty scores (flow-matching loss or squared gradient norm) from a checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from lfm_core.configs import NORMALISATIONS
from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.paths import per_sample_fm_loss

SCORE_KINDS = ("loss", "grad")
NUM_SCORE_T = 10  # interior t values the paper's scores average over ("10t")
NUM_SCORE_NOISE = 2  # noise draws per t in the paper's grad_loss_scoring.py
EMA_ALPHA = 0.9  # grad_loss_scoring.py --ema-alpha
EMA_EPS = 1e-8  # grad_loss_scoring.py: loss_mean / (ema + 1e-8)
GRAD_CHUNK_BYTES = 2**30  # per-sample gradients held at once (float32): bounds "grad" memory


def interior_t_grid(num: int = NUM_SCORE_T) -> Tensor:
    """num equally spaced times strictly inside (0, 1): linspace(0, 1, num + 2)[1:-1]."""
    return torch.linspace(0.0, 1.0, num + 2)[1:-1]


def default_grad_chunk(model: nn.Module) -> int:
    """Samples whose gradients fit in GRAD_CHUNK_BYTES at once (at least one)."""
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return max(1, GRAD_CHUNK_BYTES // (4 * max(1, num_params)))


def _squared_grad_norms(
    model: nn.Module, x1: Tensor, x0: Tensor, t: Tensor, cond: dict, chunk: int
) -> Tensor:
    """||d loss_i / d params||^2 for each sample i of the batch, (B,).

    torch.func.vmap over samples, chunk samples at a time, each reduced to its squared norm
    inside the vmapped function: at most chunk x P gradient entries exist at once, never B x P.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict, x1_i: Tensor, x0_i: Tensor, t_i: Tensor, cond_i: dict) -> Tensor:
        def velocity(x: Tensor, tt: Tensor, **c: Tensor) -> Tensor:
            return functional_call(model, p, (x, tt), c)

        one = {key: value[None] for key, value in cond_i.items()}
        # per_sample_fm_loss only calls its model argument, so a functional velocity fits.
        loss = per_sample_fm_loss(velocity, x1_i[None], x0_i[None], t_i[None], **one)  # type: ignore[arg-type]
        return loss[0]

    def norm_one(p: dict, x1_i: Tensor, x0_i: Tensor, t_i: Tensor, cond_i: dict) -> Tensor:
        grads = grad(loss_one)(p, x1_i, x0_i, t_i, cond_i)
        return sum(g.pow(2).sum() for g in grads.values())  # type: ignore[return-value]

    in_dims = (None, 0, 0, 0, 0)
    return vmap(norm_one, in_dims=in_dims, chunk_size=chunk)(params, x1, x0, t, cond)


def normalise_scores(per_t: Tensor, normalise: str = "mean", alpha: float = EMA_ALPHA) -> Tensor:
    """score_i = mean over t of per_t[i, t] / n_i(t), per_t (N, T) float64.

    "mean": n_i(t) = mean_j per_t[j, t], the same for every sample (this project's default).
    "ema": the paper's running EMA (grad_loss_scoring.py compute_one_sample_scores), samples
    visited in index order: n_i = e_i + 1e-8 with e_0 = 1, e_{i+1} = alpha e_i + (1 - alpha)
    per_t[i], so a score depends on the samples visited before it.
    """
    check_choice("normalise", normalise, NORMALISATIONS)
    if normalise == "mean":
        return (per_t / per_t.mean(0)).mean(1)
    check_range("ema_alpha", alpha, 0.0, 1.0)
    values = per_t.double().numpy()
    out = np.empty_like(values)
    ema = np.ones(values.shape[1])
    for i, row in enumerate(values):
        out[i] = row / (ema + EMA_EPS)
        ema = alpha * ema + (1.0 - alpha) * row
    return torch.from_numpy(out).mean(1)


def _per_t_values(
    model: nn.Module,
    x1: Tensor,
    bank: Tensor,
    t_values: Tensor,
    kind: str,
    cond: dict,
    grad_chunk: int,
) -> Tensor:
    """(B, T) float64: per t, the mean over the noise bank of the loss or squared grad norm."""
    out = torch.zeros(x1.shape[0], len(t_values), dtype=torch.float64)
    for column, t_value in enumerate(t_values.tolist()):
        t = torch.full((x1.shape[0],), t_value, device=x1.device, dtype=x1.dtype)
        for x0 in bank:
            x0 = x0.expand_as(x1)
            if kind == "loss":
                with torch.no_grad():
                    value = per_sample_fm_loss(model, x1, x0, t, **cond)
            else:
                value = _squared_grad_norms(model, x1, x0, t, cond, grad_chunk)
            out[:, column] += value.double().cpu() / len(bank)
    return out


def per_sample_scores(
    model: nn.Module,
    latents: Tensor,
    kind: str = "loss",
    t_values: Tensor | None = None,
    num_noise: int = NUM_SCORE_NOISE,
    seed: int = 0,
    batch_size: int = 64,
    labels: Tensor | None = None,
    progress: bool = True,
    *,
    normalise: str = "mean",
    ema_alpha: float = EMA_ALPHA,
    grad_chunk: int | None = None,
) -> Tensor:
    """Per-sample difficulty scores from an (early) flow-matching checkpoint.

    score_i = mean over t of L_i(t) / n_i(t), where L_i(t) averages over a fixed noise bank
    of num_noise draws x0_m (shared by all samples) either the per-sample FM loss ("loss") or
    the squared norm of its gradient w.r.t. the model parameters ("grad"); n_i(t) is the data
    set mean at t ("mean": every t weighs the same, independent of sample order) or the
    paper's running EMA ("ema", see `normalise_scores`).

    Args:
        model: velocity network model(x, t, class_labels=...); scored in eval mode (restored after).
        latents: (N, C, H, W) training latents x1.
        kind: "loss" or "grad".
        t_values: (T,) times in (0, 1); default interior_t_grid() (10 values).
        num_noise: size of the noise bank. seed: seed of the noise bank.
        batch_size: samples per forward pass.
        labels: (N,) class labels passed as class_labels, or None.
        progress: show a tqdm bar.
        normalise: "mean" or "ema". ema_alpha: the EMA's alpha (the paper's 0.9).
        grad_chunk: samples whose full gradients exist at once for "grad" (default: as many
            as fit in GRAD_CHUNK_BYTES); the scores do not depend on it.

    Returns:
        (N,) float64 scores; higher = harder.
    """
    check_choice("kind", kind, SCORE_KINDS)
    check_choice("normalise", normalise, NORMALISATIONS)
    if labels is not None and labels.shape[0] != latents.shape[0]:
        raise ConfigError(
            f"labels: length {labels.shape[0]} != number of latents {latents.shape[0]}"
        )
    t_values = interior_t_grid() if t_values is None else t_values
    chunk = default_grad_chunk(model) if grad_chunk is None else grad_chunk
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn((num_noise, *latents.shape[1:]), generator=generator).to(latents)
    was_training = model.training
    model.eval()
    per_t = torch.zeros(latents.shape[0], len(t_values), dtype=torch.float64)
    for start in tqdm(
        range(0, latents.shape[0], batch_size), desc=f"{kind} scores", disable=not progress
    ):
        rows = slice(start, start + batch_size)
        cond = {} if labels is None else {"class_labels": labels[rows]}
        per_t[rows] = _per_t_values(model, latents[rows], bank, t_values, kind, cond, chunk)
    model.train(was_training)
    return normalise_scores(per_t, normalise, ema_alpha)
