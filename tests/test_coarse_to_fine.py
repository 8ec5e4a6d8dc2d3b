"""Coarse-to-fine sampling: exact identities, NFE split, FLOP bound, t_split choice, seam loss."""

import pytest
import torch

from lfm_core.coarse_to_fine import (
    CoarseToFine,
    choose_t_split,
    sample_coarse_to_fine,
    seam_states,
    seam_time,
    uses_coarse,
)
from lfm_core.errors import ConfigError
from lfm_core.flops import flop_speedup_bound, forward_flops
from lfm_core.paths import SeamLoss
from lfm_core.solvers import sample, seeded_noise, time_grid, uniform_grid
from lfm_core.train import TrainConfig, seam_finetune
from lfm_core.velocity import VelocityConfig, build_velocity


def _model(width, seed):
    torch.manual_seed(seed)
    model = build_velocity(VelocityConfig(name="dit-xs", in_channels=2, sample_size=4, width=width))
    for p in model.parameters():  # leave adaLN-Zero's all-zero start so outputs differ
        p.data.add_(0.02 * torch.randn_like(p))
    return model.eval()


NOISE = seeded_noise(range(6), (2, 4, 4))


def test_identical_models_give_single_model_samples_bit_exactly():
    model = _model(32, 0)
    single = sample(model, NOISE, uniform_grid(20), "euler")
    for t_split in (0.0, 0.35, 0.7, 1.0):
        out = sample_coarse_to_fine(model, model, NOISE, t_split, steps=20)
        assert torch.equal(out.samples, single)


def test_t_split_ends_are_fine_only_and_coarse_only():
    coarse, fine = _model(16, 1), _model(32, 2)
    for method in ("euler", "heun"):
        fine_only = sample(fine, NOISE, uniform_grid(10), method)
        coarse_only = sample(coarse, NOISE, uniform_grid(10), method)
        assert torch.equal(
            sample_coarse_to_fine(coarse, fine, NOISE, 0.0, steps=10, method=method).samples,
            fine_only,
        )
        assert torch.equal(
            sample_coarse_to_fine(coarse, fine, NOISE, 1.0, steps=10, method=method).samples,
            coarse_only,
        )
    mixed = sample_coarse_to_fine(coarse, fine, NOISE, 0.5, steps=10).samples
    assert not torch.equal(mixed, fine_only) and not torch.equal(mixed, coarse_only)


def test_nfe_split_follows_step_start_times():
    out = sample_coarse_to_fine(_model(16, 1), _model(32, 2), NOISE, 0.7, steps=60)
    assert (out.nfe_coarse, out.nfe_fine) == (42, 18)
    assert out.seconds > 0


def test_paper_grid_switches_at_step_42_of_59():
    """linspace(0, 1, 60): t_i = i / 59; the first step starting at t >= 0.7 is i = 42, so the
    fine model takes 17 of 59 steps (0.288 of them, against 18 of 60 on the uniform grid)."""
    coarse, fine = _model(16, 1), _model(32, 2)
    grid = time_grid(60, "paper")
    switch = int(uses_coarse(grid[:-1], 0.7).sum())
    assert switch == 42 and grid[41] < 0.7 <= grid[42]
    out = sample_coarse_to_fine(coarse, fine, NOISE, 0.7, steps=60, grid="paper")
    assert (out.nfe_coarse, out.nfe_fine) == (42, 17)
    expected = sample(fine, sample(coarse, NOISE, grid[:43]), grid[42:])
    assert torch.equal(out.samples, expected)
    uniform = sample_coarse_to_fine(coarse, fine, NOISE, 0.7, steps=60)
    assert torch.equal(
        uniform.samples,
        sample_coarse_to_fine(coarse, fine, NOISE, 0.7, steps=60, grid="uniform").samples,
    )


def test_mixed_batch_routes_rows_to_their_model():
    calls = []

    def coarse(x, t):
        calls.append(("coarse", len(x)))
        return torch.zeros_like(x)

    def fine(x, t):
        calls.append(("fine", len(x)))
        return torch.ones_like(x)

    out = CoarseToFine(coarse, fine, 0.5)(torch.zeros(3, 2), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert calls == [("coarse", 1), ("fine", 2)]


def test_bad_t_split():
    with pytest.raises(
        ConfigError, match=r"t_split: 1.5 is outside the allowed range \[0.0, 1.0\]"
    ):
        CoarseToFine(_model(16, 1), _model(16, 1), 1.5)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 8)

    def forward(self, x, t):
        return self.linear(x)


def test_flop_bound():
    assert forward_flops(_Linear(), torch.zeros(3, 4)) == 2 * 3 * 4 * 8  # a (3, 4) @ (4, 8) matmul
    small, large = forward_flops(_model(16, 0), NOISE), forward_flops(_model(64, 0), NOISE)
    assert 0 < small < large
    assert flop_speedup_bound(small, large, 0, 60) == 1.0
    assert flop_speedup_bound(1, 8, 42, 18) == pytest.approx(8 * 60 / (42 + 8 * 18))
    assert flop_speedup_bound(large, large, 42, 18) == 1.0


def test_choose_t_split_takes_largest_within_budget():
    fine = _model(32, 2)
    same = choose_t_split(fine, fine, NOISE, budget=0.0, steps=10)
    assert same.t_split == 0.9 and all(
        s == pytest.approx(1.0, abs=1e-6) for s in same.similarity.values()
    )

    def drifting(x, t):  # adds a constant offset: the longer it runs, the further it drifts
        return fine(x, t) + 0.5

    choice = choose_t_split(drifting, fine, NOISE, budget=0.02, steps=10)
    sims = choice.similarity
    assert all(sims[a] >= sims[b] for a, b in zip(sorted(sims)[:-1], sorted(sims)[1:], strict=True))
    assert choice.t_split == max((t for t, s in sims.items() if s >= 0.98), default=0.0)
    assert choice.t_split < 0.9


def test_seam_state_is_the_euler_run_backwards_of_a_linear_field_in_closed_form():
    # v(x, t) = a x + b: each backward Euler step of size h maps x to (1 - a h) x - h b, so
    # after n steps from x1: x_s = (1 - a h)^n (x1 + b / a) - b / a, exactly (up to the
    # solver's float32 velocity evaluations).
    a, b, steps, t_split = 0.8, 0.25, 20, 0.3
    x1 = seeded_noise(range(3), (2, 4, 4), dtype=torch.float64)
    states = seam_states(lambda x, t: a * x + b, x1, t_split, steps=steps)
    n, h = 14, 1.0 / steps  # the 14 grid steps above t = 0.3
    expected = (1 - a * h) ** n * (x1 + b / a) - b / a
    torch.testing.assert_close(states, expected, rtol=1e-6, atol=1e-6)
    assert seam_time(t_split, steps) == pytest.approx(0.3)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_seam_state_converges_to_the_exact_backward_flow_of_a_linear_field(method):
    # dx/dt = a x + b from x1 at t = 1 back to s: x_s = e^{-a (1 - s)} (x1 + b / a) - b / a.
    a, b, t_split = -1.5, 0.5, 0.4
    x1 = seeded_noise(range(3), (2, 4, 4), dtype=torch.float64)
    states = seam_states(lambda x, t: a * x + b, x1, t_split, steps=400, method=method)
    exact = torch.exp(torch.tensor(-a * (1 - t_split))) * (x1 + b / a) - b / a
    # Euler's global error in x + b / a is first order in h = 1 / 400 (relative 1.7e-3 here),
    # the others' second order.
    tolerance = 3e-3 if method == "euler" else 1e-5
    torch.testing.assert_close(states + b / a, exact + b / a, rtol=tolerance, atol=1e-6)


def test_seam_state_runs_back_along_the_fine_models_own_forward_steps():
    # A constant field is integrated exactly by any method: the backward run from the forward
    # run's end lands on the forward run's state at the seam.
    shift = torch.randn(2, 4, 4, dtype=torch.float64)
    field = lambda x, t: shift.expand_as(x)  # noqa: E731
    start = seeded_noise(range(2), (2, 4, 4), dtype=torch.float64)
    at_seam = sample(field, start, uniform_grid(20)[:15])
    x1 = sample(field, at_seam, uniform_grid(20)[14:])
    torch.testing.assert_close(seam_states(field, x1, 0.7, steps=20), at_seam)


def test_seam_time_is_the_first_grid_time_at_or_above_t_split():
    assert seam_time(0.33, 20) == pytest.approx(0.35)
    assert seam_time(0.0, 20) == 0.0
    assert seam_time(1.0, 20) == 1.0


def test_seam_loss_zero_when_coarse_equals_true_field_and_fine():
    x1 = torch.ones(4, 2, 4, 4)

    def true_velocity(x, t):
        return (x1 - x) / (1 - t).reshape(-1, 1, 1, 1)

    loss = SeamLoss(torch.nn.Identity(), 0.6)
    loss.fine = true_velocity
    x0 = torch.randn(4, 2, 4, 4)
    value = loss(true_velocity, x1, x0, torch.rand(4), seam_state=torch.randn(4, 2, 4, 4))
    assert value.item() == pytest.approx(0.0, abs=1e-10)


def test_seam_loss_default_weight_is_the_papers():
    assert SeamLoss(torch.nn.Identity(), 0.7).weight == 0.1


class _Affine(torch.nn.Module):
    """v(x, t) = conv(x) + t: a velocity field of any dtype."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, t):
        return self.conv(x) + t.reshape(-1, 1, 1, 1)


def test_seam_loss_moves_the_fine_model_to_the_trained_models_device_and_dtype():
    coarse, loss = _Affine().double(), SeamLoss(_Affine(), 0.7)
    x1 = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    loss(coarse, x1, torch.randn_like(x1), t, seam_state=torch.randn(4, 2, 4, 4))
    assert next(loss.fine.parameters()).dtype == torch.float64
    if torch.cuda.is_available():
        coarse, x1, t = coarse.cuda(), x1.cuda(), t.cuda()
        loss(coarse, x1, torch.randn_like(x1), t, seam_state=x1)
        assert next(loss.fine.parameters()).device.type == "cuda"


def test_seam_finetune_pulls_coarse_towards_fine_at_the_seam():
    coarse, fine = _model(16, 1), _model(32, 2)
    latents = torch.randn(64, 2, 4, 4)
    states = seam_states(fine, latents, 0.7, steps=10)
    seam_t = torch.full((16,), 0.7)

    def gap():
        with torch.no_grad():
            return (coarse(states[:16], seam_t) - fine(states[:16], seam_t)).pow(2).mean().item()

    before = gap()
    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=1, ema_decay=0.0)
    tuned = seam_finetune(coarse, fine, latents, states, 0.7, cfg, weight=10.0, progress=False)
    coarse = tuned.model
    assert gap() < 0.5 * before
