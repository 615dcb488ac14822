"""The metric math on its own: closed forms, unbiasedness, known overlaps (no networks)."""

import numpy as np
import pytest
from scipy import linalg

from dit_bench.metrics.distances import (
    fd_from_features,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    precision_recall,
)

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_closed_form_diagonal_gaussians():
    # Commuting covariances: W2^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_closed_form_general_gaussians():
    # Non-commuting covariances against the textbook formula with scipy's sqrtm.
    rng = np.random.default_rng(0)
    for d in (2, 7, 32):
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        ref = (
            ((mu1 - mu2) ** 2).sum()
            + np.trace(s1)
            + np.trace(s2)
            - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        )
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_fd_of_samples_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert fd_from_features(x, y) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)


def test_fd_of_a_set_with_itself_is_zero_even_rank_deficient():
    rng = np.random.default_rng(2)
    for n, d in ((500, 16), (50, 128)):  # the second has a singular covariance (N < D)
        f = rng.standard_normal((n, d)) ** 2
        assert 0.0 <= fd_from_features(f, f) < 1e-8 * np.trace(gaussian_stats(f)[1])


def test_kid_is_unbiased_on_identical_distributions():
    # Mean of many independent KID estimates between two sets from one distribution -> 0,
    # whereas the biased (diagonal-kept) estimate stays clearly positive.
    rng = np.random.default_rng(3)
    d, n, draws = 8, 60, 300
    unbiased, biased = [], []
    for _ in range(draws):
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        unbiased.append(kid(x, y, num_subsets=1, subset_size=n, seed=0)[0])
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    unbiased = np.array(unbiased)
    se = unbiased.std() / np.sqrt(draws)
    assert abs(unbiased.mean()) < 3 * se
    assert np.mean(biased) > 10 * se
    # and it separates two different distributions
    x, y = rng.standard_normal((400, d)), rng.standard_normal((400, d)) + 0.5
    mean, std = kid(x, y, num_subsets=20, subset_size=200)
    assert mean > 5 * std > 0


def test_kid_matches_clean_fid_estimator():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((300, 16)), rng.standard_normal((300, 16)) * 1.2
    # a subset as large as the set is the whole set (in some order): both are deterministic
    ours = kid(x, y, num_subsets=1, subset_size=300)[0]
    assert ours == pytest.approx(
        kernel_distance(x, y, num_subsets=1, max_subset_size=300), rel=1e-9
    )


def test_precision_recall_known_overlap():
    # Real: uniform on [0, 1]^2. Fake: uniform on [0.5, 1.5] x [0, 1]. Half of each lies in the
    # other's support, so precision = recall = 0.5 (plus the k-NN balls' thin overshoot).
    rng = np.random.default_rng(5)
    real = rng.uniform(0, 1, (3000, 2))
    fake = rng.uniform(0, 1, (3000, 2)) + np.array([0.5, 0.0])
    p, r = precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5, abs=0.04) and r == pytest.approx(0.5, abs=0.04)
    # A fake set covering only a quarter of the real support: precision 1, recall 1/4.
    quarter = rng.uniform(0, 0.5, (3000, 2))
    p, r = precision_recall(real, quarter, k=3)
    assert p > 0.97 and r == pytest.approx(0.25, abs=0.04)
    # Disjoint supports: nothing overlaps.
    assert precision_recall(real, real + 5.0, k=3) == (0.0, 0.0)


def test_inception_score_bounds():
    n, c = 1000, 10
    assert inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0)  # no confidence
    confident = np.full((n, c), -1e4)
    confident[np.arange(n), np.arange(n) % c] = 0.0  # sure, and balanced over classes
    assert inception_score(confident)[0] == pytest.approx(c, rel=1e-6)
    with pytest.raises(ValueError, match="needs at least 10 samples, got 9"):
        inception_score(confident[:9])  # an empty split would make it NaN


def test_knn_radii_in_chunks_equal_the_full_matrix():
    from dit_bench.metrics.distances import _knn_radii

    x = np.random.default_rng(0).normal(size=(50, 6))
    full = np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, 3]  # k = 3
    np.testing.assert_allclose(_knn_radii(x, 3, chunk=7), full, rtol=1e-12)
    np.testing.assert_allclose(_knn_radii(x, 3), full, rtol=1e-12)


def test_kid_mean_and_std_over_subsets_match_a_loop_reference():
    # Each subset: the unbiased MMD^2 written out pair by pair (Binkowski et al. 2018, eq. 4)
    # on the subsets the seeded generator draws (x then y); the reported std is over subsets
    # with ddof 0, as torch-fidelity's kid_subset_std
    rng = np.random.default_rng(6)
    d, m = 3, 5
    real, fake = rng.standard_normal((9, d)), rng.standard_normal((7, d)) + 0.3
    draw = np.random.default_rng(11)

    def k(a, b):  # the cubic polynomial kernel
        return (a @ b / d + 1) ** 3

    values = []
    for _ in range(4):
        x = real[draw.choice(len(real), m, replace=False)]
        y = fake[draw.choice(len(fake), m, replace=False)]
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
        values.append((xx + yy) / (m * (m - 1)) - 2 * xy / m**2)
    mean, std = kid(real, fake, num_subsets=4, subset_size=m, seed=11)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-10)


def test_precision_recall_count_a_point_on_a_balls_boundary_as_inside():
    # Points on a line at integer spacing: k-NN radii and distances are exact, so a fake point
    # exactly at a real point's radius is on the ball (Kynkaanniemi et al.: d <= radius)
    real = np.arange(5.0)[:, None]  # radii (k = 3): 3, 2, 2, 2, 3
    fake = np.array([[7.0], [20.0], [21.0], [22.0], [23.0]])  # 7 = 4 + 3: on point 4's ball
    assert precision_recall(real, fake, k=3)[0] == pytest.approx(1 / 5)


def test_fd_of_few_samples_uses_the_unbiased_covariance():
    # pytorch-fid and clean-fid fit np.cov (N - 1 denominator): with N = 6 the biased one
    # would shrink both covariances by 5/6, which the large-N convergence test cannot see
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 3)), 2.0 * rng.standard_normal((6, 3)) + 1.0
    mu, sigma = gaussian_stats(x)
    c = x - x.mean(axis=0)
    np.testing.assert_allclose(sigma, c.T @ c / 5, rtol=1e-12)
    ref = [(f.mean(axis=0), (f - f.mean(axis=0)).T @ (f - f.mean(axis=0)) / 5) for f in (x, y)]
    (m1, s1), (m2, s2) = ref
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fd_from_features(x, y) == pytest.approx(expected, rel=1e-9)


def test_precision_recall_with_k_samples_says_it_needs_more():
    # k samples leave each point only k - 1 neighbours: no k-th neighbour radius exists
    x = np.random.default_rng(8).normal(size=(3, 2))
    with pytest.raises(ValueError, match="needs more than 3 samples per set"):
        precision_recall(x, np.vstack([x, x]), k=3)
