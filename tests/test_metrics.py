"""Metrics: exact answers where the maths gives one."""

import math

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lfm_core.errors import ConfigError
from lfm_core.metrics import (
    ReferenceStats,
    derangement,
    feature_stats,
    fid,
    frechet_distance,
    paired_cosine,
    precision_recall,
    stability,
)


def _features(n: int = 200, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = feature_stats(_features())
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(6, generator=g).double(), torch.randn(6, generator=g).double()
    s1, s2 = torch.rand(6, generator=g).double() + 0.1, torch.rand(6, generator=g).double() + 0.1
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected.item(), abs=1e-8)


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    real, fake = _features(seed=2), _features(seed=3) + 0.5

    class Identity(nn.Module):
        # torchmetrics reads num_features instead of probing with a dummy 299x299 image.
        num_features = real.shape[1]

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid(fake, real) == pytest.approx(metric.compute().item(), rel=1e-6)


def test_reference_stats_roundtrip_and_cache(tmp_path):
    real, fake = _features(seed=4), _features(seed=5)
    path = tmp_path / "ref" / "heldout.safetensors"
    stats = ReferenceStats.cached(path, lambda: real)
    again = ReferenceStats.cached(path, lambda: pytest.fail("recomputed cached stats"))
    assert again.n == real.shape[0] and torch.equal(again.sigma, stats.sigma)
    assert fid(fake, again) == fid(fake, real)


def test_paired_cosine_of_identical_features_is_one():
    f = torch.relu(_features())
    mean, std = paired_cosine(f, f)
    assert mean == pytest.approx(1.0, abs=1e-12) and std < 1e-12
    unrelated, _ = paired_cosine(f, f, unrelated=True)
    assert unrelated < 0.99


def test_centering_removes_the_shared_positive_direction():
    f1, f2 = torch.relu(_features(seed=6)) + 1.0, torch.relu(_features(seed=7)) + 1.0
    plain, _ = paired_cosine(f1, f2, unrelated=True)
    centred, _ = paired_cosine(f1, f2, unrelated=True, center=True)
    assert plain > 0.5 and abs(centred) < 0.2


def test_stability_result_fields():
    f = _features()
    result = stability(f, f + 0.01 * _features(seed=8), seed=3)
    assert result.similarity > 0.99 and result.centred_similarity > 0.99
    assert result.unrelated < 0.5 and result.centred_unrelated < 0.5


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_has_no_fixed_points(n):
    for seed in range(5):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == torch.arange(n)).any()
    assert torch.equal(derangement(n, 1), derangement(n, 1))


def test_precision_recall_of_identical_sets_is_one():
    f = _features()
    assert precision_recall(f, f, k=3) == (1.0, 1.0)


def test_precision_recall_of_disjoint_sets_is_zero():
    f = _features()
    assert precision_recall(f, f + 1e3, k=3) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: fid(_features(d=8), _features(d=4)),
            "features_generated: feature dim 8 does not match 4",
        ),
        (
            lambda: paired_cosine(_features(d=8), _features(d=4)),
            "paired_cosine: f2 shape (200, 4) != f1 shape (200, 8)",
        ),
        (
            lambda: precision_recall(_features(d=8), _features(d=4)),
            "fake_features: feature dim 4 does not match 8",
        ),
        (
            lambda: feature_stats(torch.zeros(10)),
            "features: expected features of shape (N >= 2, D), got (10,)",
        ),
        (
            lambda: frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4)),
            "frechet_distance: shapes do not match: mu (3,) / (4,), sigma (3, 3) / (4, 4)",
        ),
        (
            lambda: ReferenceStats.load("/nonexistent/stats.safetensors"),
            "reference stats: file '/nonexistent/stats.safetensors' does not exist",
        ),
    ],
)
def test_bad_inputs_give_one_line_config_errors(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message


def test_inception_score_exact_cases():
    from lfm_core.metrics import inception_score

    assert inception_score(torch.zeros(6, 5)) == (pytest.approx(1.0, abs=1e-12), 0.0)
    assert inception_score(torch.randn(1, 7).expand(8, 7))[0] == pytest.approx(1.0, abs=1e-12)
    one_hot = torch.full((4, 4), -math.inf).fill_diagonal_(0.0)
    assert inception_score(one_hot)[0] == pytest.approx(4.0, abs=1e-12)
    # Two splits, each holding two distinct classes out of 4: IS 2 per split.
    mean, std = inception_score(one_hot, splits=2)
    assert (mean, std) == (pytest.approx(2.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    with pytest.raises(ConfigError, match="logits: shape"):
        inception_score(torch.zeros(3))
