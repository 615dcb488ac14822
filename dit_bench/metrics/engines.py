"""The FD through the two standard libraries, with any of our feature networks.

- clean-fid (Parmar et al. 2022) for images on disk: folder vs folder, folder vs cached
  reference statistics. It reads each file, converts it to RGB, resizes it (its "clean" PIL
  bicubic to 299 for Inception; for the small nets, to their input side) and hands (B, 3, H, W)
  pixels in [0, 255] to the feature extractor.
- torchmetrics for images in memory (its FrechetInceptionDistance takes a custom nn.Module).

Both run the same FeatureNet (through `PixelFeatures`), so they must agree with each other and
with `distances.fd_from_features` (tests/test_features.py checks 1e-3 relative).
clean-fid and torchmetrics are imported inside the functions: training never needs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dit_bench.metrics.distances import frechet_distance, gaussian_stats
from dit_bench.metrics.features import FeatureNet, PixelFeatures, quantize
from dit_bench.metrics.reference import RefStats


def _cleanfid_resize(net: FeatureNet):
    """clean-fid's resize step for `net`: its own clean resize for Inception; for the small
    nets the pixels as float32 (the net resizes to its side itself, as in memory)."""
    if net.name == "inception":
        return None  # clean-fid's mode="clean" resizer
    return lambda img: np.asarray(img, dtype=np.float32)


def folder_features(folder: str | Path, net: FeatureNet, *, batch_size: int = 128) -> np.ndarray:
    """Features of every image under `folder` (recursive), read by clean-fid, sorted by path."""
    from cleanfid.fid import get_folder_features

    feats = get_folder_features(
        str(folder),
        PixelFeatures(net),
        num_workers=0,
        batch_size=batch_size,
        device=torch.device("cpu"),
        mode="clean",
        custom_fn_resize=_cleanfid_resize(net),
        verbose=False,
    )
    return np.asarray(feats, dtype=np.float64)


def fd_folders(a: str | Path, b: str | Path, net: FeatureNet, *, batch_size: int = 128) -> float:
    """FD (FID with Inception) between two image folders, through clean-fid."""
    from cleanfid.fid import frechet_distance as cleanfid_fd

    fa, fb = (
        folder_features(a, net, batch_size=batch_size),
        folder_features(b, net, batch_size=batch_size),
    )
    return float(cleanfid_fd(*gaussian_stats(fa), *gaussian_stats(fb)))


def fd_folder_stats(folder: str | Path, ref: RefStats, net: FeatureNet) -> float:
    """FD of an image folder against cached reference statistics (same feature net)."""
    if ref.meta.get("feature_net_sha256") not in (None, net.sha256):
        raise ValueError(f"reference statistics {ref.id} were made with other feature weights")
    return frechet_distance(*gaussian_stats(folder_features(folder, net)), ref.mu, ref.sigma)


def fd_torchmetrics(real: Tensor, fake: Tensor, net: FeatureNet, *, batch_size: int = 256) -> float:
    """FD of two in-memory image sets in [-1, 1], through torchmetrics' FrechetInceptionDistance
    with `net` as its custom feature extractor (8-bit pixels, as the PNGs clean-fid reads)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PixelFeatures(net), normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            pixels = quantize(images[i : i + batch_size])
            metric.update(pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels, is_real)
    return float(metric.compute())


def save_pngs(images: Tensor, folder: str | Path) -> Path:
    """Write images in [-1, 1] as 8-bit PNGs 000000.png, ... (grey for one channel)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = quantize(images).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, p in enumerate(pixels):
        Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).save(folder / f"{i:06d}.png")
    return folder
