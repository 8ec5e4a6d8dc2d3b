"""Memory at scale: peak RSS of the encoding actors and of a training worker, N vs 8N images.

Writes folders of N and 8N 64x64 PNGs made from the mnist5k digits (class subfolders; the 8N
folder repeats each digit 8 times under other names), encodes each through the latents stage
(a Ray Data actor pool writing shards) with a small untrained autoencoder loaded as a
pretrained one, and trains one FM model on it with Ray Train (one worker reading its rows from
the shards). Peak RSS is what those Ray processes report of themselves (ru_maxrss): the
encoding actors in the latents stage's info, the training worker in its reports. What must
hold: 8N / N at most 1.3 for both.

    python -m benchmarks.scale            # N = 5000: writes benchmarks/results/scale.json
    python -m benchmarks.scale --n 500    # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lfm_core.autoencoder import AutoencoderConfig, build_autoencoder
from lfm_core.data import load_dataset
from orchestrator import stage_keys
from orchestrator.config import load_sweep
from orchestrator.stages import StageGraph
from orchestrator.sweep import cache_for

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "scale.json"
TINY = BENCH_DIR.parent / "sweeps" / "tiny.yaml"
SIDE = 64
REPEATS = 8
MAX_RATIO = 1.3
RAY_CPUS = 2


def write_folder(root: Path, n: int) -> None:
    """n 64x64 grayscale PNGs under root/digit_<label>/ from the mnist5k digits (cycled)."""
    data = load_dataset("mnist5k")
    pixels = ((data.images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    labels = data.labels.numpy()
    for label in range(10):
        (root / f"digit_{label}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = i % len(pixels)
        image = Image.fromarray(pixels[j], mode="L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        image.save(root / f"digit_{labels[j]}" / f"{i:06d}.png", compress_level=1)


def _autoencoder(folder: Path) -> Path:
    cfg = AutoencoderConfig(block_out_channels=(8, 16, 16), mid_block_attention=False)
    build_autoencoder(cfg).save_pretrained(folder)
    return folder


def _config(work: Path, root: Path, vae: Path, steps: int) -> Any:
    overrides = [
        f"storage={work / 'storage'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "data.name=folder",
        f"data.root={root}",
        f"data.image_size={SIDE}",
        "data.limit=null",
        "data.heldout_limit=null",
        f"autoencoder.pretrained={vae}",
        f"autoencoder.sample_size={SIDE}",
        "autoencoder.psnr_images=64",
        f"train.steps={steps}",
        f"reference.steps={steps}",
    ]
    return load_sweep(TINY, overrides)


def measure(work: Path, root: Path, vae: Path, steps: int) -> dict[str, float]:
    """Encode one folder (latents stage) and train one model on it (Ray Train, 1 worker)."""
    cfg = _config(work, root, vae, steps)
    graph = StageGraph(cfg, cache_for(cfg), progress=False)
    graph.get(stage_keys.autoencoder(cfg))
    latents = stage_keys.latents(cfg)
    started = time.perf_counter()
    graph.get(latents)
    encode_s = time.perf_counter() - started
    model = stage_keys.reference(cfg, 0)
    graph.get(model.upstream["subset"])
    started = time.perf_counter()
    graph.get(model)
    train_s = time.perf_counter() - started
    latents_info, model_info = graph.info(latents), graph.info(model)
    return {
        "images": latents_info["shape"][0],
        "encode_peak_rss_mb": latents_info["encode_peak_rss_mb"],
        "train_peak_rss_mb": model_info["train_peak_rss_mb"],
        "encode_s": encode_s,
        "train_s": train_s,
        "shards": latents_info["shards"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images of the small folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps per model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lfm-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import ray

    shutil.rmtree(args.work, ignore_errors=True)
    vae = _autoencoder(args.work / "vae")
    sizes, runs = [args.n, REPEATS * args.n], []
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False)
    try:
        for n in sizes:
            started = time.perf_counter()
            write_folder(args.work / f"images-{n}", n)
            print(f"wrote {n} PNGs in {time.perf_counter() - started:.0f}s", flush=True)
            runs.append(measure(args.work, args.work / f"images-{n}", vae, args.steps))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    result = _result(sizes, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def _result(sizes: list[int], runs: list[dict[str, float]]) -> dict[str, Any]:
    def column(key: str) -> list[float]:
        return [round(float(run[key]), 1) for run in runs]

    encode, train = column("encode_peak_rss_mb"), column("train_peak_rss_mb")
    ratios = {"encode": encode[1] / encode[0], "train": train[1] / train[0]}
    return {
        "images": sizes,
        "train_images": [int(run["images"]) for run in runs],
        "encode_peak_rss_mb": encode,
        "train_peak_rss_mb": train,
        "encode_s": column("encode_s"),
        "train_s": column("train_s"),
        "latent_shards": [int(run["shards"]) for run in runs],
        "ratio_8n_over_n": {k: round(v, 3) for k, v in ratios.items()},
        "max_ratio": MAX_RATIO,
        "passed": bool(max(ratios.values()) <= MAX_RATIO),
        "machine": {"cpus_for_ray": RAY_CPUS, "platform": platform.platform()},
        "measured_in": "ru_maxrss of the encoding actors (latents stage) and the Ray Train worker",
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    main()
