"""Sample-quality metrics with their protocol: FD / FID, KID, precision/recall, IS.

    from dit_bench.metrics import evaluate_run, EvalRequest, load_feature_net
    record = evaluate_run("runs/default/<run>", EvalRequest(metrics=("fd", "kid")))

Layers: `distances` (pure numpy math on feature arrays), `features` (feature networks and the
user cache), `reference` (cached reference statistics), `engines` (the same FD through clean-fid
and torchmetrics), `evaluate` (sampling a run under a recorded protocol). clean-fid and
torchmetrics are imported only where they are used, so training never needs them.
"""

from dit_bench.metrics.distances import (
    fd_from_features,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    precision_recall,
)
from dit_bench.metrics.evaluate import (
    METRICS,
    EvalRequest,
    NoCheckpointError,
    evaluate_run,
    generate,
    sample_seed,
)
from dit_bench.metrics.features import (
    FEATURE_NETS,
    FeatureNet,
    FeatureWeightsError,
    cache_dir,
    default_features,
    load_feature_net,
)
from dit_bench.metrics.reference import RefStats, reference_stats

__all__ = [
    "FEATURE_NETS",
    "METRICS",
    "EvalRequest",
    "FeatureNet",
    "FeatureWeightsError",
    "NoCheckpointError",
    "RefStats",
    "cache_dir",
    "default_features",
    "evaluate_run",
    "fd_from_features",
    "frechet_distance",
    "gaussian_stats",
    "generate",
    "inception_score",
    "kid",
    "load_feature_net",
    "precision_recall",
    "reference_stats",
    "sample_seed",
]
