"""Sample-quality metrics as pure functions of feature arrays (numpy, float64).

Every function takes features already extracted by a feature network (see `features.py`), so
the same arrays give FD, KID, precision/recall and IS, and the math is tested on its own against
closed forms (tests/test_metrics_math.py).

References
- Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (arXiv:1706.08500): the Frechet distance between Gaussians fitted to features,
  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). With Inception features it is "FID"; with any
  other network we call it "FD-<network>".
- Binkowski et al. 2018, "Demystifying MMD GANs" (arXiv:1801.01401): KID, the unbiased MMD^2 with
  the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
- Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models" (arXiv:1904.06991): k-NN balls around each real (fake) feature approximate the
  manifold; precision = share of fakes inside the real manifold, recall = the converse.
- Salimans et al. 2016, "Improved Techniques for Training GANs" (arXiv:1606.03498): IS =
  exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, float64; covariance with the N - 1 denominator."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix with the same eigenvalues as S1 S2: symmetric
    eigendecompositions never return the complex parts that scipy.linalg.sqrtm of the
    non-symmetric product can (rank-deficient covariances, N < D), so no epsilon is added.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    w, v = linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    m = root1 @ s2 @ root1
    eig = linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))  # rounding can leave -1e-12 for identical sets


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def kid(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: (mean, std) over `num_subsets` random subsets of the unbiased MMD^2 estimate.

    Each subset draws m = min(subset_size, len(real), len(fake)) samples without replacement
    from each set (numpy Generator seeded with `seed`). The unbiased estimate drops the
    diagonal of the within-set kernel matrices: its expectation is exactly 0 when both sets
    come from one distribution, so it can be negative.
    """
    x_all, y_all = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[s] = within - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def _knn_radii(feats: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded).

    In row chunks: the full N x N matrix of the 50K-sample protocol would be 20 GB."""
    out = np.empty(len(feats))
    for i in range(0, len(feats), chunk):
        d = _pairwise_dist(feats[i : i + chunk], feats)
        # column 0 of the sorted row is the point itself (distance 0)
        out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048):
    out = np.zeros(len(points), dtype=bool)
    for i in range(0, len(points), chunk):
        d = _pairwise_dist(points[i : i + chunk], centres)
        out[i : i + chunk] = (d <= radii[None, :]).any(axis=1)
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in the paper."""
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _inside(f, r, _knn_radii(r, k)).mean()
    recall = _inside(r, f, _knn_radii(f, k)).mean()
    return float(precision), float(recall)


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """IS from classifier logits (N, classes): (mean, std) over `splits` consecutive splits."""
    z = np.asarray(logits, np.float64)
    if len(z) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} samples, got {len(z)}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log p(y|x), stable
    scores = []
    for part in np.array_split(log_p, splits):
        log_py = np.log(np.exp(part).mean(axis=0))  # log p(y) of this split
        kl = (np.exp(part) * (part - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
