"""Shared test fixtures."""

import json

import pytest
import torch


@pytest.fixture
def latents_root(tmp_path):
    """An empty latent data set: a manifest as `encode-latents` writes it (ImageNet-256 shape,
    1000 classes), enough for configs that name `data.name: latents` to validate."""
    manifest = {
        "format": "dit-bench-latents/1",
        "num_items": 0,
        "num_images": 0,
        "shard_size": 1,
        "latent_shape": [4, 32, 32],
        "class_names": [str(i) for i in range(1000)],
        "shards": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, then restore the count. Tiny models and samplers take
    hundreds of small elementwise steps: on shared cores OpenMP barriers cost far more than a
    second thread saves (measured 1 s vs 12 s for 250 sampling steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
