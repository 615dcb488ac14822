"""Every shipped experiment config under configs/ loads and validates (no training)."""

from pathlib import Path

import pytest

from dit_bench.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, latents_root):
    cfg = load_config(path, [f"data.root={latents_root}"])
    assert cfg.experiment


def test_dit_b4_imagenet_is_the_paper_setting(latents_root):
    cfg = load_config(
        Path(__file__).parent.parent / "configs" / "dit-b4-imagenet256.yaml",
        [f"data.root={latents_root}"],
    )
    assert (cfg.backbone.name, cfg.train.batch_size, cfg.train.steps) == ("dit-b/4", 256, 400_000)
    assert (cfg.optim.lr, cfg.optim.ema_decay, cfg.optim.weight_decay) == (1e-4, 0.9999, 0.0)
    assert cfg.data.name == "latents" and cfg.backbone.learn_sigma
