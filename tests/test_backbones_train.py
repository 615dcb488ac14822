"""Every family trains through the config alone (`--set backbone.name=...`), and the config
validates backbone geometry per family, naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from dit_bench.config import ConfigError, build_config
from dit_bench.train.run import train

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "experiment=tiny",
    "data.name=digits",
    "train.steps=2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "train.threads=1",
    "optim.lr=1e-3",
    "eval.val_images=8",
    "eval.val_levels=2",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]


@pytest.mark.parametrize(
    "name,conditioning",
    [
        ("unet-xs", "adagn"),
        ("mmdit-d2/2", "joint_attn"),
        ("uvit-xs/2", "in_context"),
        ("dit-xs/4", "cross_attn"),
    ],
)
def test_each_family_trains_two_steps(tmp_path, name, conditioning):
    sets = [f"backbone.name={name}"]
    if name.startswith("dit"):
        sets.append(f"backbone.conditioning={conditioning}")
    cfg = build_config(None, TINY + sets)
    assert cfg.backbone.conditioning == conditioning  # the family's own when left out
    run = train(cfg, tmp_path, progress=False)
    s = json.loads((run / "summary.json").read_text())
    assert s["backbone"] == name and s["conditioning"] == conditioning
    assert s["params"] > 0 and s["macs"] > 0
    assert s["val_loss"] == s["val_loss"]  # finite, not NaN


def error(sets):
    with pytest.raises(ConfigError) as e:
        build_config(None, sets)
    return str(e.value)


def test_config_validates_geometry_per_family():
    assert build_config(None, ["backbone.name=unet-xs"]).backbone.conditioning == "adagn"
    assert build_config(None, ["backbone.name=uvit-xs/2"]).backbone.conditioning == "in_context"
    assert "backbone.patch_size=2 does not apply to 'unet'" in error(
        ["backbone.name=unet-xs", "backbone.patch_size=2"]
    )
    assert "backbone.hidden_size=48 must be a multiple of 32" in error(
        ["backbone.name=unet-xs", "backbone.hidden_size=48"]
    )
    msg = error(["backbone.name=unet-xs", "backbone.conditioning=adaln_zero"])
    assert "backbone.conditioning" in msg and "adagn" in msg
    assert "backbone.depth=6 must be odd" in error(["backbone.name=uvit-xs/2", "backbone.depth=6"])
    msg = error(["data.name=digits", "backbone.name=mmdit-d2/2", "backbone.patch_size=3"])
    assert "backbone.patch_size=3" in msg and "image size 8" in msg
    assert "not divisible by 32" in error(["data.name=digits", "backbone.name=unet-adm256"])


@pytest.mark.parametrize(
    "train",
    [
        {"activation_checkpointing": True},
        {"precision": "bf16-mixed", "bf16_stream": True},
    ],
    ids=["activation_checkpointing", "bf16_stream"],
)
def test_a_one_block_uvit_trains_with_the_per_block_fast_paths(tmp_path, train, one_thread):
    # depth 1 passes the U-ViT check (odd), but its in- and out-block lists are empty and
    # fast.blocks_of found no blocks: "checkpoint_blocks needs a net made of blocks (block
    # lists); UViT has none" (bf16_stream: the same) when the run started
    from dit_bench.fast import blocks_of
    from dit_bench.train.run import load_module
    from dit_bench.train.run import train as train_run

    raw = {
        "data": {"name": "digits"},
        "backbone": {"name": "uvit-xs/2", "depth": 1},
        "train": {"steps": 1, "batch_size": 2, "threads": 1, **train},
        "eval": {"val_images": 2, "sample_steps": 2, "samples_per_class": 1},
    }
    run = train_run(build_config(raw), tmp_path, progress=False)
    module = load_module(run)
    assert blocks_of(module.net) == [module.net.mid_block]


def test_a_width_one_uvit_trains(tmp_path, one_thread):
    # U-ViT has no width rule (learned positions), so hidden_size 1 passes validation; its time
    # token, the sinusoid of width 1, came out of width 0 and the first step raised "Sizes of
    # tensors must match except in dimension 1"
    from dit_bench.backbones.layers import timestep_embedding
    from dit_bench.train.run import train as train_run

    assert timestep_embedding(torch.tensor([0.0, 500.0]), 1).shape == (2, 1)
    raw = {
        "data": {"name": "digits"},
        "backbone": {"name": "uvit-xs/4", "depth": 1, "hidden_size": 1, "num_heads": 1},
        "train": {"steps": 1, "batch_size": 2, "threads": 1},
        "eval": {"val_images": 2, "sample_steps": 2, "samples_per_class": 1},
    }
    run = train_run(build_config(raw), tmp_path, progress=False)
    assert (run / "checkpoints" / "last.ckpt").is_file()
