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


# ImageNet-1k's training set (ILSVRC 2012), the images `encode-latents` reads for the DiT setting
IMAGENET_TRAIN_IMAGES = 1_281_167


def test_dit_b4_imagenet_validates_on_as_many_images_as_it_asks(latents_root):
    # the held-out split is a share of the images, not of the flipped items (load_datasets keeps
    # a mirror with its original, in training): at 0.001 it held 1,281 images, below the 2,048
    # of eval.val_images, and every validation of the run said so
    cfg = load_config(
        Path(__file__).parent.parent / "configs" / "dit-b4-imagenet256.yaml",
        [f"data.root={latents_root}"],
    )
    assert round(cfg.data.val_fraction * IMAGENET_TRAIN_IMAGES) >= cfg.eval.val_images


ABLATIONS = Path(__file__).parent.parent / "ablations"


@pytest.mark.parametrize("name", ["conditioning", "objectives", "backbones", "precision"])
def test_gpu_profiles_train_and_score_as_dit(name, latents_root):
    from dit_bench.ablate import load_ablation

    ab = load_ablation(ABLATIONS / f"{name}.yaml", "gpu", overrides=[f"data.root={latents_root}"])
    for run in ab.runs:
        o, t, e = run.cfg.optim, run.cfg.train, run.cfg.eval
        # facebookresearch/DiT train.py: AdamW(lr=1e-4, weight_decay=0), default betas, then
        # loss.backward(); opt.step(): no warm-up and no gradient clipping (the default clips at 1)
        assert (o.lr, o.betas, o.weight_decay, o.warmup_steps) == (1e-4, (0.9, 0.999), 0.0, 0)
        assert o.grad_clip is None, run.variant
        # train.py: --global-batch-size 256, --ema-decay 0.9999; models.py class_dropout_prob 0.1
        assert (t.batch_size, o.ema_decay, t.label_dropout) == (256, 0.9999, 0.1)
        # DiT Table 4 and Fig. 5, SiT's tables at 400K steps: FID-50K without guidance
        assert e.cfg_scale == 1.0, run.variant
        assert e.sample_steps == 250
        if run.cfg.objective.name == "ddpm":  # DiT's create_diffusion: linear, 1000 steps
            assert (run.cfg.objective.schedule, run.cfg.objective.num_timesteps) == ("linear", 1000)
