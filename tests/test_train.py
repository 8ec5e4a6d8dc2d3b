"""The training loop: it learns, checkpoints, and resumes exactly."""

import torch

from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig, build_velocity


def _model(seed):
    torch.manual_seed(seed)
    return build_velocity(
        VelocityConfig(name="dit-xs", in_channels=2, sample_size=4, width=32, num_classes=3)
    )


def test_loss_decreases_on_a_two_point_data_set():
    latents = torch.stack([torch.ones(2, 4, 4), -torch.ones(2, 4, 4)]).repeat(32, 1, 1, 1)
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, log_every=25)
    result = train_velocity(_model(0), latents, cfg, progress=False)
    assert result.world_size == 1 and result.steps == 150
    assert result.losses[-1][1] < 0.6 * result.losses[0][1]


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    latents = torch.randn(64, 2, 4, 4)
    labels = torch.randint(0, 3, (64,))
    cfg = TrainConfig(steps=12, batch_size=8, log_every=4, checkpoint_every=6)
    reports = []
    full = train_velocity(
        _model(0),
        latents,
        cfg,
        labels=labels,
        out_dir=tmp_path,
        report=lambda step, m, ckpt: reports.append((step, ckpt)),
        progress=False,
    )
    assert [s for s, _ in reports] == [4, 6, 8, 12] and reports[1][1].endswith("checkpoint-0000006")
    resumed = train_velocity(
        _model(1),
        latents,
        cfg,
        labels=labels,
        resume_from=tmp_path / "checkpoint-0000006",
        progress=False,
    )
    assert [s for s, _ in resumed.losses] == [8, 12]
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
