"""Demo: train an autoencoder and a flow-matching model on mnist5k, sample, score, save a grid.

    python -m lfm_core.demo [--out results/demo] [--fm-steps 2000] [--dry-run]

Writes samples.png (64 samples), reconstructions.png (held-out digits above their
reconstructions) and demo.json (PSNR, FIDs, timings) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lfm_core.autoencoder import (
    AutoencoderConfig,
    decode,
    encode,
    reconstruction_psnr,
    train_autoencoder,
)
from lfm_core.checkpoint import save_velocity
from lfm_core.classifier import load_or_train_mnist_classifier
from lfm_core.data import load_dataset
from lfm_core.images import save_comparison, save_grid
from lfm_core.metrics import fid
from lfm_core.solvers import sample, seeded_noise, uniform_grid
from lfm_core.train import TrainConfig, train_velocity
from lfm_core.velocity import VelocityConfig, build_velocity

GRID_SIZE = 64


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, with defaults that finish in under 8 minutes on 2 cores."""

    out: str = "results/demo"
    ae_epochs: int = 4
    model: str = "unet-s"
    width: int | None = None
    fm_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    num_samples: int = 1000
    sample_steps: int = 60
    solver: str = "euler"
    seed: int = 0


def _parse(argv: list[str] | None) -> tuple[DemoConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m lfm_core.demo", description=__doc__.split("\n")[0]
    )
    for f in fields(DemoConfig):
        kind = int if f.name == "width" else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    args = vars(parser.parse_args(argv))
    dry_run = args.pop("dry_run")
    return DemoConfig(**args), dry_run


def run(cfg: DemoConfig) -> dict[str, float]:
    """Run the demo; returns the numbers also written to demo.json."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "heldout")
    results: dict[str, float] = {}

    started = time.perf_counter()
    vae = train_autoencoder(train.images, AutoencoderConfig(epochs=cfg.ae_epochs, seed=cfg.seed))
    results["autoencoder_seconds"] = time.perf_counter() - started
    vae.save_pretrained(out / "autoencoder")
    results["heldout_psnr_db"] = reconstruction_psnr(vae, heldout.images)
    results["scaling_factor"] = float(vae.config["scaling_factor"])
    latents = encode(vae, train.images)
    reconstructions = decode(vae, encode(vae, heldout.images, progress=False), progress=False)
    spread = torch.linspace(0, len(heldout.images) - 1, 16).long()  # the split is sorted by class
    save_comparison([heldout.images[spread], reconstructions[spread]], out / "reconstructions.png")

    model = build_velocity(
        VelocityConfig(
            name=cfg.model,
            in_channels=latents.shape[1],
            sample_size=latents.shape[-1],
            width=cfg.width,
        )
    )
    train_cfg = TrainConfig(steps=cfg.fm_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    trained = train_velocity(model, latents, train_cfg)
    results["fm_train_seconds"] = trained.seconds
    save_velocity(out / "velocity", trained.ema, {"train": asdict(train_cfg), "demo": asdict(cfg)})

    started = time.perf_counter()
    noise = seeded_noise(range(cfg.num_samples), latents.shape[1:])
    sampled = sample(trained.ema, noise, uniform_grid(cfg.sample_steps), cfg.solver)
    images = decode(vae, sampled)
    results["sample_seconds"] = time.perf_counter() - started
    save_grid(images[:GRID_SIZE], out / "samples.png")

    features = load_or_train_mnist_classifier(out / "features")
    reference = features(heldout.images)
    results["classifier_heldout_accuracy"] = float(features.heldout_accuracy)
    results["fid_samples"] = fid(features(images), reference)
    results["fid_reconstructions"] = fid(features(reconstructions), reference)
    results["fid_train_vs_heldout"] = fid(features(train.images), reference)
    (out / "demo.json").write_text(
        json.dumps({"config": asdict(cfg), "results": results}, indent=2)
    )
    return results


def main(argv: list[str] | None = None) -> None:
    cfg, dry_run = _parse(argv)
    print(json.dumps(asdict(cfg), indent=2))
    if dry_run:
        return
    started = time.perf_counter()
    results = run(cfg)
    for key, value in results.items():
        print(f"{key:>28}: {value:.4g}")
    print(f"{'total_seconds':>28}: {time.perf_counter() - started:.1f}")
    print(f"samples: {Path(cfg.out) / 'samples.png'}")


if __name__ == "__main__":
    main()
