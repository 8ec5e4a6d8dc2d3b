"""Exact tests of the path, the loss and the ODE solvers."""

import math

import pytest
import torch

from lfm_core.errors import ConfigError
from lfm_core.paths import fm_loss, interpolate, sample_t, sigma_to_t, t_to_sigma
from lfm_core.solvers import CFG, NFECounter, sample, seeded_noise, time_grid, uniform_grid


def test_interpolate_endpoints_and_sigma_adapter():
    x0, x1 = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(t_to_sigma(t), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(sigma_to_t(t_to_sigma(t)), t)


class TrueVelocity(torch.nn.Module):
    """The exact marginal velocity for a data set of one point x1: (x1 - x_t) / (1 - t)."""

    def __init__(self, x1):
        super().__init__()
        self.x1 = x1

    def forward(self, x, t):
        return (self.x1 - x) / (1 - t).reshape(-1, 1)


def test_fm_loss_zero_for_true_velocity_of_single_point():
    x1 = torch.tensor([[1.5, -2.0, 0.5]]).expand(16, 3)
    loss = fm_loss(TrueVelocity(x1), x1, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_fm_loss_of_zero_velocity_is_the_mean_squared_target():
    """v = 0 leaves loss = mean (x1 - x0)^2, with x0 the generator's first draw."""
    x1 = torch.ones(8, 3)
    loss = fm_loss(lambda x, t: torch.zeros_like(x), x1, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx((x1 - x0).pow(2).mean().item(), rel=1e-6)


def test_sample_t_kinds_and_bad_name():
    gen = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = sample_t(1000, kind, generator=gen)
        assert t.shape == (1000,) and t.min() > 0 and t.max() < 1
    with pytest.raises(ConfigError, match="t_sampling: unknown value 'cosine'; allowed: uniform"):
        sample_t(4, "cosine")


def test_seeded_noise_row_depends_on_its_seed_only():
    a = seeded_noise([3, 7, 11], (2, 4, 4))
    b = seeded_noise([11], (2, 4, 4))
    c = seeded_noise([5, 11, 3, 9], (2, 4, 4))
    assert a.shape == (3, 2, 4, 4)
    assert torch.equal(a[2], b[0]) and torch.equal(a[2], c[1]) and torch.equal(a[0], c[2])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_solvers_exact_on_constant_field(method):
    """v = c integrates to x0 + c exactly for every method, in one step."""
    c = torch.tensor([[2.0, -1.0]])
    x = sample(lambda x, t: c.expand_as(x), torch.zeros(1, 2), uniform_grid(1), method)
    assert torch.equal(x, c)


def test_midpoint_and_heun_exact_on_linear_in_time_field():
    """v = t integrates to x0 + 1/2: second-order methods are exact for fields linear in t."""
    for method in ("midpoint", "heun"):
        x = sample(
            lambda x, t: t.reshape(-1, 1).expand_as(x), torch.zeros(2, 1), uniform_grid(3), method
        )
        assert torch.allclose(x, torch.full((2, 1), 0.5), atol=1e-7)


def test_euler_on_linear_in_time_field_matches_riemann_sum():
    steps = 4
    x = sample(lambda x, t: t.reshape(-1, 1), torch.zeros(1, 1), uniform_grid(steps), "euler")
    assert x.item() == pytest.approx(sum(k / steps for k in range(steps)) / steps, abs=1e-7)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_solver_convergence_order_on_exponential(method, order):
    """dx/dt = x: error shrinks by 2**order when the step halves, towards x0 * e."""
    errors = []
    for steps in (16, 32):
        x = sample(
            lambda x, t: x, torch.ones(1, 1, dtype=torch.float64), uniform_grid(steps), method
        )
        errors.append(abs(x.item() - math.e))
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_nfe_counter_and_unknown_solver():
    counter = NFECounter(lambda x, t: torch.zeros_like(x))
    sample(counter, torch.zeros(2, 3), uniform_grid(5), "heun")
    assert counter.nfe == 10
    with pytest.raises(
        ConfigError, match="solver: unknown value 'rk4'; allowed: euler, midpoint, heun"
    ):
        sample(counter, torch.zeros(2, 3), uniform_grid(5), "rk4")


def test_cfg_combines_conditional_and_unconditional():
    def model(x, t, class_labels):
        return class_labels.float().reshape(-1, 1).expand_as(x)

    labels = torch.tensor([2, 4])
    guided = CFG(model, labels, scale=3.0, null_label=10)(torch.zeros(2, 1), torch.zeros(2))
    assert torch.equal(guided, (10 + 3.0 * (labels - 10)).float().reshape(-1, 1))
    plain = CFG(model, labels, scale=1.0, null_label=10)(torch.zeros(2, 1), torch.zeros(2))
    assert torch.equal(plain, labels.float().reshape(-1, 1))


def test_cfg_on_a_channel_subset_leaves_the_other_channels_conditional():
    """The paper's ImageNet CFG: 3 of 8 channels guided, the other 5 the conditional output."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(11, 8, generator=generator)

    def model(x, t, class_labels):
        return x * weights[class_labels].reshape(-1, 8, 1, 1) + t.reshape(-1, 1, 1, 1)

    labels, x, t = torch.tensor([1, 7]), torch.randn(2, 8, 3, 3), torch.full((2,), 0.3)
    cond = model(x, t, labels)
    uncond = model(x, t, torch.full_like(labels, 10))
    subset = CFG(model, labels, scale=4.0, null_label=10, channels=3)(x, t)
    assert torch.equal(subset[:, 3:], cond[:, 3:])
    full = CFG(model, labels, scale=4.0, null_label=10)(x, t)
    assert torch.equal(subset[:, :3], full[:, :3])
    torch.testing.assert_close(full, uncond + 4.0 * (cond - uncond))
    with pytest.raises(ConfigError, match="cfg_channels: 0"):
        CFG(model, labels, scale=4.0, null_label=10, channels=0)


def test_paper_grid_is_linspace_with_one_step_fewer():
    paper = time_grid(60, "paper")
    assert torch.equal(paper, torch.linspace(0, 1, 60, dtype=torch.float64))
    assert len(paper) - 1 == 59
    assert torch.equal(time_grid(60, "uniform"), uniform_grid(60))
    counter = NFECounter(lambda x, t: torch.zeros_like(x))
    sample(counter, torch.zeros(1, 2), paper)
    assert counter.nfe == 59
    with pytest.raises(ConfigError, match="grid: unknown value 'cosine'"):
        time_grid(60, "cosine")
    with pytest.raises(ConfigError, match="steps: 1 must be >= 2"):
        time_grid(1, "paper")
