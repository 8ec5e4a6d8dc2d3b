"""ODE solvers for d x / dt = v(x, t) from t = 0 (noise) to t = 1 (data), and thin wrappers.

Solvers are stateless: `sample(velocity_fn, x_init, time_grid, method)` with velocity_fn(x, t),
x of shape (B, ...) and t of shape (B,). State is accumulated in float32 (or the input's dtype
if wider). Guidance and NFE counting wrap the velocity function, so solvers know nothing of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lfm_core.errors import ConfigError, check_choice

VelocityFn = Callable[[Tensor, Tensor], Tensor]
METHODS = ("euler", "midpoint", "heun")
# Time grids by name: "uniform" takes `steps` equal intervals (steps + 1 points); "paper" is the
# paper's torch.linspace(0, 1, steps), i.e. steps - 1 intervals (its 60 "steps" are 59 Euler
# steps; briqr/explo-r-it-ing_lfm_stability src/transport/integrators.py, ode.__init__).
GRIDS = ("uniform", "paper")


def seeded_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise, shape (len(seeds), *shape); row i depends on seeds[i] alone.

    Each row comes from its own CPU generator, so a sample is the same whatever the batch size,
    its position in the batch or the number of workers.
    """
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


def uniform_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> Tensor:
    """A time grid of `steps` equal intervals from t_start to t_end, shape (steps + 1,)."""
    if steps < 1:
        raise ConfigError(f"steps: {steps} must be a positive integer")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def time_grid(steps: int, grid: str = "uniform") -> Tensor:
    """The time grid from t = 0 to 1 named by `grid` (one of GRIDS), float64.

    "uniform": `uniform_grid(steps)`, shape (steps + 1,). "paper": linspace(0, 1, steps) as the
    paper's sampler builds it, shape (steps,), so steps - 1 intervals (steps >= 2).
    """
    check_choice("grid", grid, GRIDS)
    if grid == "uniform":
        return uniform_grid(steps)
    if steps < 2:
        raise ConfigError(f"steps: {steps} must be >= 2 for the paper grid (steps - 1 intervals)")
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def _step(velocity_fn: VelocityFn, x: Tensor, t0: float, t1: float, method: str) -> Tensor:
    """One step of the chosen method from t0 to t1 for state x (B, ...).

    The times are Python floats and each update is one fused add (x + h v as `add(alpha=h)`),
    so the loop itself costs a few small kernels per step next to the network's forward.
    """
    batch, h = x.shape[0], t1 - t0

    def v(state: Tensor, t: float) -> Tensor:
        time = torch.full((batch,), t, dtype=torch.float32, device=state.device)
        return velocity_fn(state.to(torch.float32), time).to(state.dtype)

    if method == "euler":
        return x.add(v(x, t0), alpha=h)
    if method == "midpoint":
        return x.add(v(x.add(v(x, t0), alpha=h / 2), t0 + h / 2), alpha=h)
    k1 = v(x, t0)
    k2 = v(x.add(k1, alpha=h), t1)
    return x.add(k1 + k2, alpha=h / 2)


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn, x_init: Tensor, time_grid: Tensor, method: str = "euler"
) -> Tensor:
    """Integrate from time_grid[0] to time_grid[-1].

    Args:
        velocity_fn: v(x, t) with x (B, ...) and t (B,), returning (B, ...).
        x_init: the state at time_grid[0], shape (B, ...); noise when starting at t = 0.
        time_grid: times, shape (K + 1,) for K steps: increasing integrates forward (noise to
            data), decreasing backward (data to t, as `coarse_to_fine.seam_states` does).
        method: "euler" (1 NFE per step), "midpoint" or "heun" (2 NFE per step).

    Returns:
        The state at time_grid[-1], shape (B, ...), float32 (or x_init's dtype if wider).
    """
    check_choice("solver", method, METHODS)
    dtype = torch.promote_types(x_init.dtype, torch.float32)
    x = x_init.to(dtype)
    grid = time_grid.to(torch.float64).cpu().tolist()
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        x = _step(velocity_fn, x, t0, t1, method)
    return x


class NFECounter:
    """Wraps a velocity function and counts its calls (number of function evaluations)."""

    def __init__(self, velocity_fn: VelocityFn):
        self.velocity_fn = velocity_fn
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.velocity_fn(x, t)


class CFG:
    """Classifier-free guidance around a class-conditional model.

    v = v(x, t, null) + scale * (v(x, t, y) - v(x, t, null)); scale = 1 is the conditional model.
    With `channels` = k only the first k channels are guided and the rest are the conditional
    prediction v(x, t, y) as it is: the paper's ImageNet setting guides 3 of 8 latent channels
    (briqr/explo-r-it-ing_lfm_stability src/models.py, DiT.forward_with_cfg). None guides all.
    Conditional and unconditional passes run as one batch of 2B.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        labels: Tensor,
        scale: float,
        null_label: int,
        channels: int | None = None,
    ):
        if channels is not None and channels < 1:
            raise ConfigError(f"cfg_channels: {channels} must be a positive integer or None")
        self.model = model
        self.labels = labels
        self.scale = scale
        self.null_label = null_label
        self.channels = channels

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, class_labels=self.labels)
        null = torch.full_like(self.labels, self.null_label)
        both = self.model(
            torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([self.labels, null])
        )
        cond, uncond = both.chunk(2)
        if self.channels is None:
            return uncond + self.scale * (cond - uncond)
        k = self.channels
        guided = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)
