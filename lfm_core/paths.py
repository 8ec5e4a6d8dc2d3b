"""The linear (rectified-flow) probability path and the flow-matching loss.

x_t = (1 - t) x0 + t x1, x0 ~ N(0, I) noise, x1 data; target velocity u = x1 - x0.
diffusers' flow-matching schedulers use sigma = 1 - t (sigma = 1 is noise).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_core.errors import ConfigError, check_choice, check_range

T_SAMPLING = ("uniform", "logit_normal")


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """Reshape t (B,) to broadcast against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t x1 for x0, x1 of shape (B, ...) and t of shape (B,)."""
    t = _expand(t, x1)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """The conditional velocity d x_t / dt = x1 - x0, shape (B, ...)."""
    return x1 - x0


def sample_t(
    n: int,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw n training times in (0, 1): uniform, or logit-normal (SD3's sigmoid of a normal)."""
    check_choice("t_sampling", kind, T_SAMPLING)
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(logit_mean + logit_std * z)


def per_sample_fm_loss(model: nn.Module, x1: Tensor, x0: Tensor, t: Tensor, **cond) -> Tensor:
    """Per-sample flow-matching loss, shape (B,).

    loss_i = mean over non-batch dims of (model(x_t, t) - (x1 - x0))^2.
    """
    prediction = model(interpolate(x0, x1, t), t, **cond)
    return (prediction.float() - target_velocity(x0, x1).float()).pow(2).flatten(1).mean(1)


def fm_loss(
    model: nn.Module,
    x1: Tensor,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    *,
    t_sampling: str = "uniform",
    generator: torch.Generator | None = None,
    **cond,
) -> Tensor:
    """Scalar mean flow-matching loss; x0 ~ N(0, I) and t ~ t_sampling when not given."""
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if t is None:
        t = sample_t(x1.shape[0], t_sampling, generator=generator, device=x1.device)
    return per_sample_fm_loss(model, x1, x0, t, **cond).mean()


# The paper's weight of the seam term (its train_fm.py --seam-weight default).
PAPER_SEAM_WEIGHT = 0.1


class SeamLoss:
    """Fine-tuning loss for the coarse model on [0, t_split) that also matches the fine model.

    loss = FM loss of the coarse model at t ~ U[0, t_split)
           + weight * mean || coarse(x_s, s) - fine(x_s, s) ||^2 at s = t_split,
    where x_s is each training latent x1's seam state: the fine model's ODE run backwards from
    x1 at t = 1 to s (`lfm_core.coarse_to_fine.seam_states`, cached per sample by the caller),
    so the coarse model's velocity joins the fine model's where sampling switches (the paper's
    train_coarse_to_fine_loop). Called as loss(model, x1, x0, t, seam_state=x_s, **cond) with
    x1, x0, x_s of shape (B, C, H, W) and t (B,) drawn on [0, 1) and rescaled here. The fine
    model follows the trained model's device and dtype on every call.
    """

    def __init__(self, fine: nn.Module, t_split: float, weight: float = PAPER_SEAM_WEIGHT):
        check_range("t_split", t_split, 0.0, 1.0, low_open=True)
        check_range("seam_weight", weight, 0.0, float("inf"))
        self.fine = fine.eval().requires_grad_(False)
        self.t_split, self.weight = t_split, weight

    def _fine_like(self, model: nn.Module) -> nn.Module:
        """The fine model on the device and in the dtype of `model`'s parameters."""
        reference = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        if reference is not None and isinstance(self.fine, nn.Module):
            self.fine.to(device=reference.device, dtype=reference.dtype)
        return self.fine

    def __call__(
        self, model: nn.Module, x1: Tensor, x0: Tensor, t: Tensor, *, seam_state: Tensor, **cond
    ) -> Tensor:
        if t.max() >= 1.0:
            raise ConfigError("t: SeamLoss expects t in [0, 1)")
        fm = per_sample_fm_loss(model, x1, x0, t * self.t_split, **cond).mean()
        fine = self._fine_like(model)
        seam_t = torch.full_like(t, self.t_split)
        x_seam = seam_state.to(device=x1.device, dtype=x1.dtype)
        with torch.no_grad():
            target = fine(x_seam, seam_t, **cond)
        seam = (model(x_seam, seam_t, **cond).float() - target.float()).pow(2).mean()
        return fm + self.weight * seam


def t_to_sigma(t: Tensor) -> Tensor:
    """This package's time (t = 1 data) -> diffusers' flow-matching sigma (sigma = 0 data)."""
    return 1 - t


def sigma_to_t(sigma: Tensor) -> Tensor:
    """diffusers' flow-matching sigma -> this package's time."""
    return 1 - sigma
