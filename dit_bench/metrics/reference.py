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

import functools
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
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


class HeldOutImages:
    """A data set's images in [-1, 1], read (and, `decode`: a latents data set's VAE, decoded)
    a chunk at a time, never whole: the gpu profiles' 10,000 held-out 256x256 images are 7.9 GB
    of float32, and were held through the whole eval."""

    def __init__(self, dataset, decode=None):
        self.dataset, self.decode = dataset, decode

    def __len__(self) -> int:
        return len(self.dataset)

    @functools.cached_property
    def shape(self) -> tuple[int, ...]:
        """(N, C, H, W) of the images (a latents data set's as decoded: its first one is)."""
        x = self.dataset[0][0][None]  # (1, C, h, w) as stored
        return (len(self), *(self.decode(x) if self.decode else x).shape[1:])

    def stored(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(items as stored (B, C, h, w), latents undecoded; labels (B,)), chunk by chunk."""
        for start in range(0, len(self), batch_size):
            yield stack_items(self.dataset, range(start, min(start + batch_size, len(self))))

    def chunks(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images (B, C, H, W) in [-1, 1], labels (B,)), chunk by chunk."""
        for x, y in self.stored(batch_size):
            yield (self.decode(x) if self.decode else x), y


def image_chunks(images: Tensor | HeldOutImages, batch_size: int) -> Iterator[Tensor]:
    """`images` (N, C, H, W) in [-1, 1], `batch_size` at a time."""
    if isinstance(images, HeldOutImages):
        return (x for x, _ in images.chunks(batch_size))
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def pixel_bytes(images: Tensor) -> bytes:
    """The 8-bit pixels of images in [-1, 1], as `content_hash` hashes them."""
    return quantize(images).to(torch.uint8).contiguous().numpy().tobytes()


def pixels_hasher(shape: Sequence[int]):
    """The sha256 `content_hash` starts from, the images' shape; their `pixel_bytes` go next."""
    return hashlib.sha256(str(tuple(shape)).encode())


def content_hash(
    images: Tensor | HeldOutImages, labels: Tensor | None = None, batch_size: int = 256
) -> str:
    """sha256 of the content: 8-bit pixels of images in [-1, 1] (plus shape and labels)."""
    h = pixels_hasher(images.shape)
    # the bytes of the whole, `batch_size` at a time: a fixed 256 held 3.3 GiB at its peak for
    # 512x512 images whatever eval's --batch-size asked
    for x in image_chunks(images, batch_size):
        h.update(pixel_bytes(x))
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
    images: Tensor | HeldOutImages,
    net: FeatureNet,
    *,
    description: dict | None = None,
    data_hash: str | None = None,
    batch_size: int = 256,
    cache: bool = True,
) -> RefStats:
    """Features of real `images` (N, C, H, W) in [-1, 1] under `net`, from the cache if there;
    `batch_size` images at a time (a HeldOutImages: read and decoded so, never held whole).

    `data_hash` overrides the content hash (a `latents` data set hashes its latents, not the
    decoded images); `description` is stored beside the cache entry for people reading it.
    """
    hashed = data_hash is None and isinstance(images, HeldOutImages)  # read again below
    data_hash = data_hash or content_hash(images, batch_size=batch_size)
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
    # chunks of batch_size: the net's own batches, so the features of the whole tensor
    chunks = image_chunks(images, batch_size)
    # a data set is read twice, for its hash and for its features: a folder rewritten in between
    # (a sync or an export still running) cached the features of other images under this id
    again = pixels_hasher(images.shape) if hashed else None

    def features_of(x: Tensor) -> np.ndarray:
        if again is not None:
            again.update(pixel_bytes(x))
        return net.features(x, batch_size=batch_size)[0]

    feats = np.concatenate([features_of(x) for x in chunks])
    feats = feats.astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    if again is not None and again.hexdigest() != data_hash:
        print(
            "[dit-bench] the held-out images changed while they were read (files rewritten "
            "meanwhile?): these reference statistics are not cached",
            file=sys.stderr,
        )
        cache = False
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
    return stack_items(dataset, range(n))


def stack_items(dataset, indices) -> tuple[Tensor, Tensor]:
    """(images (B, C, H, W), labels (B,)) of the data set's items `indices`."""
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
