"""FSDP from config alone (CUDA only; one GPU is enough to exercise the strategy's wrapping,
sharded checkpointing of the EMA copy, and resume)."""

import pytest
import torch

from dit_bench.config import build_config
from dit_bench.train.run import find_run_dir, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SETTINGS = [
    "experiment=fsdp",
    "data.name=shapes",
    "data.image_size=16",
    "data.num_samples=512",
    "backbone.name=dit-xs/4",
    "train.steps=8",
    "train.batch_size=16",
    "train.log_every=1",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "train.keep_every=4",
    "train.accelerator=gpu",
    "optim.lr=1e-3",
    "eval.val_images=32",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]


def final_state(run):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_fsdp_matches_plain_training_and_resumes(tmp_path):
    plain = train(build_config(None, SETTINGS), tmp_path / "plain", progress=False)
    cfg = build_config(None, [*SETTINGS, "train.strategy=fsdp"])
    fsdp = train(cfg, tmp_path / "fsdp", progress=False)
    a, b = final_state(plain), final_state(fsdp)
    assert a.keys() == b.keys()  # full (unsharded) state dict, EMA included
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    # Resume an FSDP run from its step-4 checkpoint: it ends where the uninterrupted one did.
    run = find_run_dir(tmp_path / "fsdp", cfg)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "last.ckpt").write_bytes(
        (run / "checkpoints" / "step=0000004.ckpt").read_bytes()
    )
    train(cfg, tmp_path / "fsdp", progress=False)
    for k, v in final_state(run).items():
        torch.testing.assert_close(v, b[k], rtol=1e-3, atol=1e-4, msg=k)
