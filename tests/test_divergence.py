"""A run that diverges: what it stops with, what it leaves on disk, what reads it afterwards.

Divergence is made on purpose where a real one starts: the weights of one optimiser step go
non-finite while the loss of that step (computed from the weights before it) was still finite.
"""

import math

import lightning as L
import pytest
import torch
from test_train import tiny

from dit_bench.train.run import find_run_dir, train

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode"),
    pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)"),
]


class PoisonAt(L.Callback):
    """One weight set to NaN after the optimiser step of `step`, as a step whose gradient
    overflowed leaves it; it comes before the run's checkpoint callbacks, as that update did."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = math.nan


def finite_weights(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed_and_the_run_resumes_from_the_last_good(
    tmp_path,
):
    cfg = tiny("train.steps=8", "train.log_every=2", "train.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match="non-finite weights at step 6"):
        train(cfg, tmp_path, progress=False, callbacks=[PoisonAt(6)])
    last = find_run_dir(tmp_path, cfg) / "checkpoints" / "last.ckpt"
    # the step-4 checkpoint stays the resume point: NaN weights over it would resume into the
    # same NaN (and the NaN loss window) at every rerun, with nothing left to go back to
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert finite_weights(last)
    run = train(cfg, tmp_path, progress=False)
    assert finite_weights(run / "checkpoints" / "last.ckpt")
    assert (run / "summary.json").exists()


def saved_run(tmp_path, diverged: bool):
    """A run directory with config.yaml and a last.ckpt of untrained weights (NaN EMA weights
    where `diverged`), saved by hand: nothing trains."""
    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule

    cfg = tiny()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    state = DiffusionModule(cfg, data_info(cfg.data)).state_dict()
    for k in state:
        if diverged and k.startswith("ema."):
            state[k] = torch.full_like(state[k], math.nan)
    ckpt = {"state_dict": state, "global_step": 12, "pytorch-lightning_version": "2.5"}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def test_sample_and_eval_refuse_non_finite_weights_before_sampling(tmp_path, capsys):
    # sample saved their NaN samples as a black grid ("wrote 4 samples"); eval drew all its
    # samples (half an hour for a GPU profile's 10,000) before refusing them
    from dit_bench.cli import main
    from dit_bench.train.run import load_module

    run = saved_run(tmp_path, diverged=True)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "-o", str(grid)]) == 2
    assert "weight tensors are not finite (e.g. ema." in capsys.readouterr().err
    assert not grid.exists()
    # eval's module, read before its first sample
    with pytest.raises(ValueError, match="the run diverged by step 12; nothing is sampled"):
        load_module(run)


def test_sample_refuses_to_draw_a_grid_of_non_finite_samples(tmp_path, capsys, monkeypatch):
    # finite weights can still sample NaN (huge weights that overflow): eval refuses those,
    # and sample saved them as a black grid
    from dit_bench.cli import main
    from dit_bench.metrics import evaluate

    run = saved_run(tmp_path, diverged=False)
    draw = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **kw: draw(*a, **kw) * math.inf)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "-o", str(grid)]) == 2
    assert "4 of 4 samples of" in capsys.readouterr().err
    assert not grid.exists()
