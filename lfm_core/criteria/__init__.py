"""Scoring criteria for data reduction: pure functions from features / scores to kept indices.

Definitions follow the paper's released code (briqr/explo-r-it-ing_lfm_stability, src/scoring
and src/fm_training/pruning.py); each function names the file it follows.
- Clustering criteria run k-means on L2-normalised features (the paper clusters unit-norm CLIP
  features, k = 24) and rank the points of each cluster by Euclidean distance to its centre.
  `kmeans="euclidean"` (default) is scikit-learn k-means++; `kmeans="spherical"` is the paper's
  (cosine assignment, renormalised centres, 100 iterations). One `Clustering` can serve every
  cluster criterion of the same features, k, seed and kind (`select(..., clustering=...)`).
- "cluster_*" (proportional) keeps the same fraction of every cluster, "balanced_*" the same
  number per cluster. Quotas: the paper's equal_cluster computes one per-cluster share in a
  single pass and undershoots the target when clusters are too small for it; here
  `balanced_counts` moves the deficit of small clusters to the larger ones, so the subset has
  exactly the asked size (a deliberate difference). The paper's kernel and k-center balanced
  baselines (allocate_balanced_counts) fill exactly too.
- "cluster_mid", "cluster_mix", "drop_cluster": the middle of each cluster, its nearest
  NEAREST_MIX share plus its furthest points, whole clusters dropped (clustering.py).
- "loss" / "grad" keep the top-k scores, i.e. the hardest examples (pruning.py's
  score_based_ind, largest=True); "loss_lowest" / "grad_lowest" the bottom-k (its --inverse).
  Scores come from `per_sample_scores` (10 interior times, a seeded noise bank).
- "kcenter" is greedy farthest-first traversal (Sener & Savarese, 2018) on unit-norm features;
  "herding" RFF kernel herding; "balanced_kcenter" / "balanced_herding" the same inside each
  cluster with balanced quotas (coreset.py, kernel_selection.py).
- "class_skew" draws a seeded random subset of which a share `skew` comes from class
  `skew_class` (the paper's gender-skewed subsets, pruning.py "female" / "male", with labels).
Every criterion keeps exactly round(fraction * N) unique indices, returned sorted ascending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lfm_core.configs import CLUSTER_CRITERIA, FEATURE_CRITERIA, LABEL_CRITERIA
from lfm_core.criteria.clustering import (
    KMEANS_KINDS,
    KMEANS_N_INIT,
    Clustering,
    balanced_counts,
    clusters,
    compute_clustering,
    drop_select,
    ends_select,
    mid_select,
    mix_select,
    proportional_counts,
    spherical_kmeans,
)
from lfm_core.criteria.coreset import (
    balanced_herding,
    balanced_kcenter,
    kcenter_greedy,
    kernel_herding,
)
from lfm_core.criteria.scores import (
    NORMALISATIONS,
    NUM_SCORE_NOISE,
    NUM_SCORE_T,
    SCORE_KINDS,
    interior_t_grid,
    normalise_scores,
    per_sample_scores,
)
from lfm_core.errors import ConfigError, check_choice, check_range

__all__ = [
    "CLUSTER_CRITERIA",
    "CRITERIA",
    "DEFAULT_CLASS_SKEW",
    "DEFAULT_NUM_CLUSTERS",
    "DEFAULT_SKEW_CLASS",
    "FEATURE_CRITERIA",
    "KMEANS_KINDS",
    "KMEANS_N_INIT",
    "LABEL_CRITERIA",
    "NEAREST_MIX",
    "NORMALISATIONS",
    "NUM_SCORE_NOISE",
    "NUM_SCORE_T",
    "SCORE_CRITERIA",
    "SCORE_KINDS",
    "Clustering",
    "balanced_counts",
    "class_counts",
    "class_skew",
    "clusters",
    "compute_clustering",
    "interior_t_grid",
    "kcenter_greedy",
    "labels_needed",
    "normalise_scores",
    "per_sample_scores",
    "proportional_counts",
    "score_kind",
    "select",
    "spherical_kmeans",
    "subset_size",
]

DEFAULT_NUM_CLUSTERS = 24  # the paper's cluster_features.py default k
NEAREST_MIX = 0.2  # clustering.py furthestnearest_cluster: rat, the nearest share of a cluster
DEFAULT_CLASS_SKEW = 1.0  # the paper's gender subsets hold one gender only
DEFAULT_SKEW_CLASS = 0


def subset_size(fraction: float, n: int) -> int:
    """Number of kept samples, round(fraction * n); fraction in (0, 1] and at least one kept."""
    check_range("fraction", fraction, 0.0, 1.0, low_open=True)
    total = round(fraction * n)
    if total < 1:
        raise ConfigError(f"fraction: {fraction} of {n} samples keeps none")
    return total


def _dataset_size(**given: Tensor | int | None) -> int:
    """N, from whichever of features (N, D), scores (N,), num_samples, labels (N,) and
    clustering are given (all must agree)."""
    sizes = {
        key: value if isinstance(value, int) else len(value)
        for key, value in given.items()
        if value is not None
    }
    if not sizes or len(set(sizes.values())) > 1:
        raise ConfigError(
            f"select: need features, scores or num_samples of one length N, got {sizes}"
        )
    return next(iter(sizes.values()))


def _required(criterion: str, key: str, value: Tensor | None, ndim: int) -> Tensor:
    """value, detached, or a ConfigError when a criterion's input is missing or misshapen."""
    if value is None or value.dim() != ndim:
        shape = "(N,)" if ndim == 1 else "(N, D)"
        raise ConfigError(f"criterion {criterion!r} needs {key} of shape {shape}")
    return value.detach()


def class_skew(labels: Tensor, total: int, skew: float, skew_class: int, seed: int) -> Tensor:
    """A seeded random subset of total samples: round(skew x total) from class skew_class (as
    many as it has), the rest from the other classes in proportion to their sizes, any deficit
    filled back from skew_class. skew = 1 keeps one class only (the paper's gender subsets,
    pruning.py "female" / "male"); skew = its share of the data gives a stratified subset."""
    check_range("skew", skew, 0.0, 1.0)
    favoured = labels == skew_class
    others = torch.nonzero(~favoured)[:, 0]
    target = min(int(favoured.sum()), round(skew * total))
    from_others = min(len(others), total - target)
    if from_others:
        _, other_labels = torch.unique(labels[others], return_inverse=True)
        counts = proportional_counts(torch.bincount(other_labels), from_others)
        strata = [others[other_labels == c] for c in range(len(counts))]
    else:
        counts, strata = torch.zeros(0, dtype=torch.long), []
    strata.append(torch.nonzero(favoured)[:, 0])
    counts = torch.cat([counts, torch.tensor([total - from_others])])
    generator = torch.Generator().manual_seed(seed)
    kept = [
        s[torch.randperm(len(s), generator=generator)[:c]]
        for s, c in zip(strata, counts, strict=True)
    ]
    return torch.cat(kept)


@dataclass
class _Request:
    """One select call: its inputs, resolved lazily and shared by the criterion functions."""

    criterion: str
    fraction: float
    total: int
    n: int
    seed: int
    features: Tensor | None
    scores: Tensor | None
    labels: Tensor | None
    num_clusters: int | None
    kmeans: str
    options: dict[str, float] = field(default_factory=dict)
    clustering: Clustering | None = None

    def feats(self) -> Tensor:
        return _required(self.criterion, "features", self.features, 2)

    def score_values(self) -> Tensor:
        return _required(self.criterion, "scores", self.scores, 1).cpu()

    def clusters(self) -> Clustering:
        if self.clustering is None:
            k = DEFAULT_NUM_CLUSTERS if self.num_clusters is None else self.num_clusters
            check_range("num_clusters", k, 1, self.n)
            self.clustering = compute_clustering(self.feats(), k, self.seed, self.kmeans)
        return self.clustering


def _top(largest: bool) -> Callable[[_Request], Tensor]:
    return lambda r: torch.topk(r.score_values(), r.total, largest=largest).indices


def _ends(balanced: bool, furthest: bool) -> Callable[[_Request], Tensor]:
    return lambda r: ends_select(r.clusters(), r.total, balanced, furthest)


def _class_skew(r: _Request) -> Tensor:
    labels = _required(r.criterion, "labels", r.labels, 1).cpu()
    skew_class = int(r.options.get("skew_class", DEFAULT_SKEW_CLASS))
    return class_skew(
        labels, r.total, r.options.get("skew", DEFAULT_CLASS_SKEW), skew_class, r.seed
    )


_SELECTORS: dict[str, Callable[[_Request], Tensor]] = {
    "random": lambda r: torch.randperm(r.n, generator=torch.Generator().manual_seed(r.seed))[
        : r.total
    ],
    "cluster_nearest": _ends(balanced=False, furthest=False),
    "cluster_furthest": _ends(balanced=False, furthest=True),
    "balanced_nearest": _ends(balanced=True, furthest=False),
    "balanced_furthest": _ends(balanced=True, furthest=True),
    "loss": _top(largest=True),
    "grad": _top(largest=True),
    "kcenter": lambda r: kcenter_greedy(r.feats(), r.total, r.seed),
    "loss_lowest": _top(largest=False),
    "grad_lowest": _top(largest=False),
    "cluster_mid": lambda r: mid_select(r.clusters(), r.total),
    "cluster_mix": lambda r: mix_select(
        r.clusters(), r.total, r.fraction, r.options.get("mix_nearest", NEAREST_MIX)
    ),
    "drop_cluster": lambda r: drop_select(r.clusters(), r.total, r.fraction, r.seed),
    "balanced_kcenter": lambda r: balanced_kcenter(r.feats(), r.clusters(), r.total, r.seed),
    "herding": lambda r: kernel_herding(r.feats(), r.total, r.seed),
    "balanced_herding": lambda r: balanced_herding(r.feats(), r.clusters(), r.total, r.seed),
    "class_skew": _class_skew,
}
CRITERIA = tuple(_SELECTORS)
SCORE_CRITERIA = ("loss", "grad", "loss_lowest", "grad_lowest")


def score_kind(criterion: str) -> str:
    """The `per_sample_scores` kind a score criterion reads: "loss_lowest" -> "loss"."""
    check_choice("criterion", criterion, SCORE_CRITERIA)
    return criterion.removesuffix("_lowest")


def select(
    criterion: str,
    fraction: float,
    *,
    features: Tensor | None = None,
    scores: Tensor | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    kmeans: str = "euclidean",
    clustering: Clustering | None = None,
    labels: Tensor | None = None,
    skew: float = DEFAULT_CLASS_SKEW,
    skew_class: int = DEFAULT_SKEW_CLASS,
    mix_nearest: float = NEAREST_MIX,
) -> Tensor:
    """Indices of the samples kept by a criterion.

    Args:
        criterion: one of CRITERIA.
        fraction: kept fraction in (0, 1]; exactly round(fraction * N) samples are kept.
        features: (N, D) embeddings, required by the clustering and coreset criteria (not by
            the cluster criteria when clustering is given).
        scores: (N,) per-sample scores, required by SCORE_CRITERIA (higher = harder).
        num_clusters: k for the clustering criteria (default DEFAULT_NUM_CLUSTERS, at most N).
        seed: seed of k-means, of the coreset draws, of "random", "drop_cluster", "class_skew".
        num_samples: N, for "random" when neither features nor scores is given.
        kmeans: "euclidean" or "spherical" (the paper's), when clustering is not given.
        clustering: a precomputed `compute_clustering` of the same features, k, seed, kmeans.
        labels: (N,) class labels, required by "class_skew".
        skew: share of the subset from class skew_class ("class_skew").
        skew_class: the over-represented class of "class_skew".
        mix_nearest: share of each cluster kept nearest to its centre by "cluster_mix".

    Returns:
        LongTensor of kept indices, unique and sorted ascending.
    """
    check_choice("criterion", criterion, CRITERIA)
    check_choice("kmeans", kmeans, KMEANS_KINDS)
    n = _dataset_size(
        features=features,
        scores=scores,
        num_samples=num_samples,
        labels=labels,
        clustering=None if clustering is None else clustering.labels,
    )
    options = {"skew": skew, "skew_class": skew_class, "mix_nearest": mix_nearest}
    request = _Request(
        criterion, fraction, subset_size(fraction, n), n, seed, features, scores, labels,
        num_clusters, kmeans, options, clustering,
    )  # fmt: skip
    return torch.sort(_SELECTORS[criterion](request).cpu()).values


def labels_needed(labels: Tensor, indices: Tensor) -> int:
    """Labels an annotator must provide to train on the subset: one per kept sample of labels."""
    if len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < len(labels):
        raise ConfigError(f"indices: must lie in [0, {len(labels) - 1}]")
    return len(torch.unique(indices))


def class_counts(labels: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """Kept samples per class, (num_classes,) int64."""
    return torch.bincount(labels[indices], minlength=num_classes)
