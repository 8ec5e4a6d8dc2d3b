"""Criteria at scale: spherical k-means (k = 1000) and greedy k-center at 25% on 200,000 random
512-d features, on this machine's CPU (or the GPU when one is given with --device cuda).

One clustering is computed and shared by the cluster criteria (`compute_clustering`, then
`select(..., clustering=...)`); each subset is checked for its exact size and, for the
balanced criterion, for per-cluster counts that differ by at most one where clusters are large
enough. scikit-learn's Euclidean k-means (the project default, float64, 4 restarts of up to
300 iterations) is not timed here: at this size it would take hours on two cores; the paper's
spherical k-means is the scale path. Writes benchmarks/results/criteria_scale.json.

    python -m benchmarks.criteria_scale [--n 200000] [--dim 512] [--k 1000] [--iterations 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from lfm_core.criteria import balanced_counts, compute_clustering, kcenter_greedy, select
from lfm_core.criteria.clustering import SPHERICAL_TOL

RESULTS = Path(__file__).resolve().parent / "results" / "criteria_scale.json"
FRACTION = 0.25  # the paper's ImageNet setting: 75% pruned


class _Timer:
    """Wall-clock and CPU seconds of a block (CPU time: the cores are shared with others)."""

    def __enter__(self) -> _Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def record(self) -> dict[str, float]:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _balance_ok(kept: torch.Tensor, labels: torch.Tensor, k: int) -> bool:
    """Per-cluster counts equal balanced_counts' quotas (which differ by at most one)."""
    sizes = torch.bincount(labels, minlength=k)
    counts = torch.bincount(labels[kept], minlength=k)
    return torch.equal(counts, balanced_counts(sizes, len(kept)))


def run(n: int, dim: int, k: int, iterations: int, device: str) -> dict:
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(0)).to(device)
    total = round(FRACTION * n)
    with _Timer() as kmeans_time:
        clustering = compute_clustering(features, k, 0, "spherical", max_iter=iterations)
    done = clustering.iterations
    selections = {}
    for criterion in ("cluster_nearest", "balanced_nearest"):
        with _Timer() as select_time:
            kept = select(criterion, FRACTION, clustering=clustering)
        selections[criterion] = {
            **select_time.record(),
            "size": len(kept),
            "exact_size": len(kept) == total and len(torch.unique(kept)) == total,
        }
    selections["balanced_nearest"]["balanced"] = _balance_ok(
        select("balanced_nearest", FRACTION, clustering=clustering), clustering.labels, k
    )
    with _Timer() as kcenter_time:
        chosen = kcenter_greedy(features, total, seed=0)
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "fraction": FRACTION,
        "device": device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "spherical_kmeans": {
            **kmeans_time.record(),
            "iterations": done,
            "max_iterations": iterations,
            "tol": SPHERICAL_TOL,
            "seconds_per_iteration": kmeans_time.wall / done,
        },
        "selections_from_shared_clustering": selections,
        "kcenter": {
            **kcenter_time.record(),
            "size": len(chosen),
            "unique": len(torch.unique(chosen)) == total,
        },
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.n, args.dim, args.k, args.iterations, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
