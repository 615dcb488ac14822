"""Reference features of a run's data set: computed once, cached by content hash.

The reference set is the run's held-out split (`load_datasets(cfg.data)[1]`, fixed by
`data.split_seed`): real images the generator never trained on. Its id hashes what determines
the features: the images' content (the 8-bit pixels the feature net sees, or the latent tensors
of a `latents` data set), the feature network's weights (sha256) and its resize path. Change any
of them and the id changes; rename or move the data and it does not.

    $DIT_BENCH_CACHE/refstats/<id>.npz    features (N, D) float32, mu (D,), sigma (D, D) float64
    $DIT_BENCH_CACHE/refstats/<id>.json   what the id stands for
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dit_bench.files import replacing, write_json_atomic
from dit_bench.metrics.distances import gaussian_stats
from dit_bench.metrics.features import CACHE_ENV, FeatureNet, cache_dir, quantize

REFSTATS_VERSION = 1


@dataclass(frozen=True)
class RefStats:
    id: str
    features: np.ndarray  # (N, D)
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict

    @property
    def n(self) -> int:
        return len(self.features)


def content_hash(images: Tensor, labels: Tensor | None = None) -> str:
    """sha256 of the content: 8-bit pixels of images in [-1, 1] (plus shape and labels)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(quantize(images).to(torch.uint8).contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def stats_id(net: FeatureNet, data_hash: str) -> str:
    key = {
        "v": REFSTATS_VERSION,
        "data": data_hash,
        "net": net.name,
        "net_sha256": net.sha256,
        "resize": net.resize,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def reference_stats(
    images: Tensor,
    net: FeatureNet,
    *,
    description: dict | None = None,
    data_hash: str | None = None,
    batch_size: int = 256,
    cache: bool = True,
) -> RefStats:
    """Features of real `images` (N, C, H, W) in [-1, 1] under `net`, from the cache if there.

    `data_hash` overrides the content hash (a `latents` data set hashes its latents, not the
    decoded images); `description` is stored beside the cache entry for people reading it.
    """
    data_hash = data_hash or content_hash(images)
    sid = stats_id(net, data_hash)
    path = cache_dir() / "refstats" / f"{sid}.npz"
    meta = {
        "id": sid,
        "content_sha256": data_hash,
        "n": len(images),
        "feature_net": net.name,
        "feature_net_sha256": net.sha256,
        "resize": net.resize,
        **(description or {}),
    }
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                return RefStats(sid, z["features"], z["mu"], z["sigma"], meta | {"cached": True})
        # an empty file (a power cut, a copy cut short) is an EOFError, not a BadZipFile
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            print(f"[dit-bench] {path} is unreadable; computing it again", file=sys.stderr)
    feats, _ = net.features(images, batch_size=batch_size)
    feats = feats.astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp, tmp.open("wb") as f:  # a file: savez adds no suffix
                np.savez(f, features=feats, mu=mu, sigma=sigma)
                f.flush()  # on disk before the rename (as files.write_text_atomic)
                os.fsync(f.fileno())
            write_json_atomic(path.with_suffix(".json"), meta)
        except OSError as e:
            # a home the user cannot write (`docker run --user`, whose HOME is /; a read-only
            # home on compute nodes): the cache only saves time, and a run would otherwise fail
            # at its first FD, after its training, and again each time it is resumed
            print(
                f"[dit-bench] reference statistics not cached ({e}); set ${CACHE_ENV} to a "
                "writable folder to keep them",
                file=sys.stderr,
            )
    return RefStats(sid, feats, mu, sigma, meta | {"cached": False})


def dataset_tensors(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """(images (N, C, H, W), labels (N,)) of the first `limit` items of a data set."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
