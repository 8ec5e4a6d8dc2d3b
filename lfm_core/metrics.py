"""Metrics over feature embeddings: Frechet distance (FID), k-NN precision / recall, and the
paired cosine similarity that measures stability.

Everything here is a pure formula over features (N, D); turning images into features is
`lfm_core.features`. The one FID path of the system is `feature_stats` + `frechet_distance`
(float64): reference statistics of the held-out split are computed once and cached as a
`ReferenceStats` safetensors file. Covariances use the unbiased (N - 1) estimator, as
torchmetrics' FrechetInceptionDistance does, so the two agree on the same features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from lfm_core.errors import ConfigError

# Rows per torch.cdist block in precision / recall: bounds memory at (block x N) distances.
DISTANCE_BLOCK = 1024


def _check_features(key: str, features: Tensor, dim: int | None = None) -> None:
    """Raise ConfigError unless features is (N, D) with N >= 2 (and D == dim when given)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ConfigError(
            f"{key}: expected features of shape (N >= 2, D), got {tuple(features.shape)}"
        )
    if dim is not None and features.shape[1] != dim:
        raise ConfigError(f"{key}: feature dim {features.shape[1]} does not match {dim}")


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; round-off negatives are clamped to 0."""
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
    tr((sigma1 sigma2)^(1/2)) = sum sqrt(eig(S sigma2 S)) with S = sigma1^(1/2): S sigma2 S is
    symmetric PSD, so its eigenvalues are real (no imaginary round-off as with sqrtm).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D).
    """
    m1, m2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ConfigError(
            f"frechet_distance: shapes do not match: mu {m1.shape} / {m2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D)."""
    _check_features("features", features)
    x = features.detach().double().cpu()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of a reference feature set (e.g. the held-out split).

    Attributes:
        mu: mean, (D,) float64. sigma: covariance, (D, D) float64. n: number of features.
    """

    mu: Tensor
    sigma: Tensor
    n: int

    @classmethod
    def from_features(cls, features: Tensor) -> ReferenceStats:
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, features.shape[0])

    def save(self, path: str | Path) -> None:
        save_file({"mu": self.mu, "sigma": self.sigma, "n": torch.tensor(self.n)}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        if not Path(path).is_file():
            raise ConfigError(f"reference stats: file {str(path)!r} does not exist")
        tensors = load_file(str(path))
        return cls(tensors["mu"], tensors["sigma"], int(tensors["n"]))

    def save_npz(self, path: str | Path) -> None:
        """Write mu and sigma as an .npz (the layout of ADM's and torch-fidelity's files)."""
        np.savez(str(path), mu=self.mu.numpy(), sigma=self.sigma.numpy(), n=np.int64(self.n))

    @classmethod
    def load_npz(cls, path: str | Path) -> ReferenceStats:
        """Read an .npz holding `mu` (D,) and `sigma` (D, D); `n` when present, else 0.

        Raises:
            ConfigError: a missing file, missing keys or shapes that do not match.
        """
        if not Path(path).is_file():
            raise ConfigError(f"reference stats: file {str(path)!r} does not exist")
        with np.load(str(path), allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise ConfigError(
                    f"reference stats {str(path)!r}: no {' or '.join(missing)} array "
                    f"(it holds {', '.join(data.files) or 'nothing'})"
                )
            mu = torch.from_numpy(np.asarray(data["mu"], dtype=np.float64)).reshape(-1)
            sigma = torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64))
            n = int(data["n"]) if "n" in data.files else 0
        if sigma.shape != (mu.numel(), mu.numel()):
            raise ConfigError(
                f"reference stats {str(path)!r}: sigma {tuple(sigma.shape)} does not match mu "
                f"({mu.numel()},)"
            )
        return cls(mu, sigma, n)

    @classmethod
    def cached(cls, path: str | Path, compute_features: Callable[[], Tensor]) -> ReferenceStats:
        """Load the stats from ``path``, or compute them from ``compute_features()`` and save."""
        if Path(path).is_file():
            return cls.load(path)
        stats = cls.from_features(compute_features())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        return stats


def fid(features_generated: Tensor, reference: Tensor | ReferenceStats) -> float:
    """FID between generated features (N, D) and reference features (M, D) or cached stats."""
    if not isinstance(reference, ReferenceStats):
        reference = ReferenceStats.from_features(reference)
    _check_features("features_generated", features_generated, reference.mu.shape[0])
    mu, sigma = feature_stats(features_generated)
    return frechet_distance(mu, sigma, reference.mu, reference.sigma)


def _kth_neighbour_radius(features: Tensor, k: int) -> Tensor:
    """Distance of each row to its k-th nearest other row, shape (N,)."""
    radii = [
        # k + 1 smallest: the row itself sits at distance 0.
        torch.cdist(block, features).kthvalue(k + 1, dim=1).values
        for block in features.split(DISTANCE_BLOCK)
    ]
    return torch.cat(radii)


def _fraction_covered(queries: Tensor, support: Tensor, radii: Tensor) -> float:
    """Fraction of queries inside at least one ball (support_j, radii_j)."""
    covered = [
        (torch.cdist(block, support) <= radii).any(dim=1) for block in queries.split(DISTANCE_BLOCK)
    ]
    return torch.cat(covered).double().mean().item()


def precision_recall(
    real_features: Tensor, fake_features: Tensor, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds.

    precision: fraction of fakes inside the real manifold (union of balls around each real with
    radius = distance to its k-th nearest real); recall: fraction of reals inside the fake one.

    Args:
        real_features: (N, D). fake_features: (M, D). k: neighbourhood size, 1 <= k < min(N, M).
    """
    _check_features("real_features", real_features)
    _check_features("fake_features", fake_features, real_features.shape[1])
    if not 1 <= k < min(real_features.shape[0], fake_features.shape[0]):
        raise ConfigError(f"precision_recall: k={k} must be in [1, min(N, M) - 1]")
    real, fake = real_features.float(), fake_features.float()
    precision = _fraction_covered(fake, real, _kth_neighbour_radius(real, k))
    recall = _fraction_covered(real, fake, _kth_neighbour_radius(fake, k))
    return precision, recall


def derangement(n: int, seed: int = 0) -> Tensor:
    """A seeded random permutation of range(n) with no fixed points (n >= 2).

    Each element maps to its successor along one random cycle through all n elements.
    """
    if n < 2:
        raise ConfigError(f"derangement: n={n} must be >= 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


def paired_cosine(
    f1: Tensor, f2: Tensor, unrelated: bool = False, seed: int = 0, center: bool = False
) -> tuple[float, float]:
    """Mean and (population) std of cos(f1[i], f2[i]) over rows, in float64.

    Args:
        f1, f2: features (N, D) of same-seed pairs (row i of both from the same noise).
        unrelated: pair row i of f1 with row perm[i] of f2, perm a seeded derangement: the
            baseline similarity of samples that share no seed.
        seed: seed of the derangement.
        center: subtract the mean feature of both sets first. Non-negative (post-ReLU)
            features share a large mean direction that puts even unrelated cosines near 0.75.
    """
    _check_features("f1", f1)
    if f2.shape != f1.shape:
        raise ConfigError(
            f"paired_cosine: f2 shape {tuple(f2.shape)} != f1 shape {tuple(f1.shape)}"
        )
    a, b = f1.detach().double().cpu(), f2.detach().double().cpu()
    if unrelated:
        b = b[derangement(b.shape[0], seed)]
    if center:
        mean = torch.cat([a, b]).mean(0)
        a, b = a - mean, b - mean
    sims = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
    return sims.mean().item(), sims.std(correction=0).item()


@dataclass(frozen=True)
class StabilityResult:
    """Same-seed similarity of two models' samples next to the unrelated-pair baseline."""

    similarity: float
    similarity_std: float
    unrelated: float
    unrelated_std: float
    centred_similarity: float
    centred_unrelated: float


def stability(f_ref: Tensor, f_other: Tensor, seed: int = 0) -> StabilityResult:
    """Paired cosine of features (N, D) of the reference and another model, plain and centred."""
    similarity, similarity_std = paired_cosine(f_ref, f_other)
    unrelated, unrelated_std = paired_cosine(f_ref, f_other, unrelated=True, seed=seed)
    centred, _ = paired_cosine(f_ref, f_other, center=True)
    centred_unrelated, _ = paired_cosine(f_ref, f_other, unrelated=True, seed=seed, center=True)
    return StabilityResult(
        similarity, similarity_std, unrelated, unrelated_std, centred, centred_unrelated
    )


def inception_score(logits: Tensor, splits: int = 1) -> tuple[float, float]:
    """Inception Score of class logits (N, K) of a classifier (Inception-v3 in the IS paper).

    IS = exp(E_x KL(p(y | x) || p(y))), p(y | x) = softmax(logits), p(y) the mean of p(y | x)
    over the split; computed in float64 on each of `splits` equal consecutive parts (the usual
    protocol uses 10) and returned as (mean, std) over the parts (std 0 for one split).
    Uniform predictions give 1; confident, evenly spread predictions over K classes give K.
    """
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ConfigError(
            f"logits: shape {tuple(logits.shape)} must be (N >= splits={splits}, K), splits >= 1"
        )
    scores = []
    for part in logits.double().chunk(splits):
        log_p = torch.log_softmax(part, dim=1)
        p = log_p.exp()
        log_marginal = torch.log(p.mean(0, keepdim=True))
        # 0 log 0 = 0: classes a row gives no mass add nothing (exact one-hot rows stay finite).
        kl = torch.where(p > 0, p * (log_p - log_marginal), torch.zeros_like(p)).sum(1)
        scores.append(kl.mean().exp().item())
    values = torch.tensor(scores, dtype=torch.float64)
    return values.mean().item(), values.std(correction=0).item()
