"""Shared test fixtures."""

import json

import pytest


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
