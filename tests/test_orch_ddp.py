"""DDP on Ray Train with 2 CPU workers (gloo): world size 2, gradients averaged across ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file, save_file

from lfm_core.checkpoint import load_velocity
from lfm_core.paths import fm_loss
from lfm_core.train import TrainConfig
from lfm_core.velocity import VelocityConfig
from orchestrator.ray_train import train_worker
from orchestrator.trainers import seeded_velocity

pytestmark = pytest.mark.integration
# Ray workers cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

VELOCITY = VelocityConfig(name="unet-xs", in_channels=4, sample_size=8, width=8)
PER_RANK = 4
LR = 0.5


def _union_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    shape = (2 * PER_RANK, 4, 8, 8)
    return {
        "x1": torch.randn(shape, generator=generator),
        "x0": torch.randn(shape, generator=generator),
        "t": torch.rand(2 * PER_RANK, generator=generator),
    }


def _step_then_train(config: dict[str, Any]) -> None:
    """Per worker: (1) one SGD step through accelerate (as lfm_core.train does) on this rank's
    half of a fixed batch, saved for the test; (2) the production per-worker function."""
    import ray.train
    from accelerate import Accelerator

    context = ray.train.get_context()
    rank = context.get_world_rank()
    accelerator = Accelerator(cpu=True)
    model = seeded_velocity(VELOCITY, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batch = config["batch"]
    loss = fm_loss(wrapped, batch["x1"][mine], batch["x0"][mine], batch["t"][mine])
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    out = Path(config["out"])
    state = accelerator.unwrap_model(wrapped).state_dict()
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors")
    )
    facts = {
        "world_size": context.get_world_size(),
        "accelerate_processes": accelerator.num_processes,
        "loss": loss.item(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    train_worker(config)


def test_two_workers_average_gradients_and_train(ray_local: None, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    batch = _union_batch()
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = {
        "batch": batch,
        "out": str(tmp_path),
        "data_fn": lambda: (latents, None),
        "velocity": VELOCITY,
        "train": TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1),
        "threads": 1,
    }
    result = TorchTrainer(
        _step_then_train,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "runs")),
    ).fit()

    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["world_size"] for f in facts] == [2, 2]
    assert [f["accelerate_processes"] for f in facts] == [2, 2]
    assert facts[0]["loss"] != facts[1]["loss"]  # each rank saw its own half of the batch
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))

    # The single-process step on the union batch: the mean loss over 2B samples has the
    # gradient (g_rank0 + g_rank1) / 2, which is what DDP's all-reduce averages to.
    model = seeded_velocity(VELOCITY, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    fm_loss(model, batch["x1"], batch["x0"], batch["t"]).backward()
    optimizer.step()
    initial = seeded_velocity(VELOCITY, seed=0).state_dict()
    changed = 0
    for key, expected in model.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], expected, rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(expected, initial[key]))
    assert changed > 0

    # lfm_core's training loop on the same worker group: it ran as DDP over both workers.
    assert result.metrics["world_size"] == 2.0 and result.metrics["step"] == 3.0
    with result.checkpoint.as_directory() as directory:
        assert load_velocity(directory, name="ema").config == VELOCITY
