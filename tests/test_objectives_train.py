"""Training through config alone with every objective and prediction (`--set objective...`),
sampling with every sampler from the trained module, `dit-bench sample` on a trained run
(eager and, slow, compiled), and (slow) a tiny CPU training of each objective lowering its
validation loss."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from dit_bench.config import ConfigError, build_config
from dit_bench.train.run import load_module, sample_images, train

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "experiment=tiny",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.batch_size=8",
    "train.log_every=2",
    "train.threads=1",
    "optim.lr=1e-3",
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=4",
]

OBJECTIVES = {
    "ddpm-eps": ["objective.name=ddpm", "objective.prediction=eps"],
    "ddpm-v-cosine": ["objective.prediction=v", "objective.schedule=cosine"],
    "ddpm-learned-sigma": ["backbone.learn_sigma=true"],
    "flow-velocity": ["objective.name=flow"],
    "flow-x0-uniform": [
        "objective.name=flow",
        "objective.prediction=x0",
        "objective.density=uniform",
    ],
    "flow-mode-shift": ["objective.name=flow", "objective.density=mode", "objective.shift=2.0"],
}
SAMPLER_SETS = {
    "ddpm-eps": ["eval.sampler=ddim", "eval.eta=0.5"],
    "flow-velocity": ["eval.sampler=heun", "eval.cfg_interval=[0,500]"],
    "flow-x0-uniform": ["eval.sampler=euler_maruyama", "eval.sde_scale=0.5"],
    "ddpm-learned-sigma": ["eval.cfg_channels=1", "eval.clip_x0=true"],
}


@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_every_objective_trains_and_samples_through_config(key, tmp_path):
    sets = TINY + ["train.steps=2", "train.val_every=2", "train.checkpoint_every=2"]
    cfg = build_config(None, sets + OBJECTIVES[key] + SAMPLER_SETS.get(key, []))
    run = train(cfg, tmp_path, progress=False)
    s = json.loads((run / "summary.json").read_text())
    assert s["objective"] == cfg.objective.name and torch.isfinite(torch.tensor(s["val_loss"]))
    assert (run / "samples" / "step-0000002.png").exists()
    module = load_module(run)
    assert repr(module.objective).startswith(cfg.objective.name.upper()[:1])
    labels = torch.tensor([0, 1])
    for sampler in ("ddpm", "ddim", "euler", "heun", "euler_maruyama"):
        x = sample_images(module, labels, sampler=sampler, steps=3, cfg_scale=2.0, seed=0)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    a = sample_images(module, labels, sampler="ddpm", steps=3, cfg_scale=2.0, seed=0,
                      seeds=[5, 6])  # fmt: skip
    b = sample_images(module, labels[1:], sampler="ddpm", steps=3, cfg_scale=2.0, seed=0,
                      seeds=[6])  # fmt: skip
    torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-5)  # per-sample seeds


def test_flow_refuses_learned_sigma_in_the_config():
    # in the config, so show-config and `ablate --dry-run` refuse it too, before any run dir
    with pytest.raises(ConfigError, match="backbone.learn_sigma=true needs objective.name=ddpm"):
        build_config(None, TINY + ["objective.name=flow", "backbone.learn_sigma=true"])


def test_objective_config_errors_name_key_and_allowed_values():
    def error(sets):
        with pytest.raises(ConfigError) as e:
            build_config(None, sets)
        return str(e.value)

    assert "objective.name must be one of 'ddpm', 'flow'" in error(["objective.name=edm"])
    msg = error(["objective.name=flow", "objective.schedule=linear"])
    assert "objective.schedule: unknown key" in msg and "density" in msg and "shift" in msg
    msg = error(["objective.name=flow", "objective.density=beta"])
    assert "objective.density" in msg and "logit_normal" in msg and "mode" in msg
    assert "velocity" in error(["objective.name=flow", "objective.prediction=eps"])
    assert "objective.mode_scale" in error(["objective.name=flow", "objective.mode_scale=0.5"])
    assert "objective.shift" in error(["objective.name=flow", "objective.shift=0"])
    assert "eval.eta applies to eval.sampler=ddim" in error(["eval.eta=0.3"])
    assert "eval.sde_scale" in error(["eval.sampler=euler", "eval.sde_scale=2"])
    assert "eval.cfg_interval" in error(["eval.cfg_interval=[600,100]"])
    assert "euler_maruyama" in error(["eval.sampler=dpm"])
    cfg = build_config(None, ["objective.name=flow", "objective.shift=3"])
    assert cfg.objective.density == "logit_normal" and cfg.objective.shift == 3.0
    assert build_config(None, ["objective.schedule=cosine"]).objective.name == "ddpm"
    assert type(cfg).model_validate(cfg.to_dict()).hash == cfg.hash


def _val_losses(run):
    with (run / "metrics.csv").open(newline="") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_tiny_training_lowers_validation_loss(key, tmp_path):
    sets = TINY + ["train.steps=150", "train.val_every=10", "train.checkpoint_every=150"]
    run = train(build_config(None, sets + OBJECTIVES[key]), tmp_path, progress=False)
    losses = _val_losses(run)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    sets = TINY + ["train.steps=4", "train.val_every=4", "train.checkpoint_every=4"]
    return train(build_config(None, sets), tmp_path_factory.mktemp("runs"), progress=False)


def _grid(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.int16))


def test_cli_sample_writes_a_grid_of_the_asked_labels(tiny_run, tmp_path, capsys):
    from dit_bench.cli import main

    out = tmp_path / "grid.png"
    args = ["sample", str(tiny_run), "--n", "4", "--labels", "1,2", "--steps", "3", "--ncol", "2"]
    assert main([*args, "-o", str(out)]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main([*args, "-o", str(again)]) == 0
    assert torch.equal(_grid(out), _grid(again))  # seeded
    assert main([*args, "--seed", "1", "-o", str(again)]) == 0
    assert not torch.equal(_grid(out), _grid(again))
    # without -o: into the run's samples/, named by how it was sampled (not ./grid.png)
    assert main(args) == 0
    default = tiny_run / "samples" / "sample-ddpm-3steps-cfg1.5-seed0-n4-labels1-2.png"
    assert f"wrote 4 samples to {default}" in capsys.readouterr().out
    assert torch.equal(_grid(out), _grid(default))
    # by default a column a label given (they repeat down the rows), not one a class of the run
    assert main([*args[:-2], "-o", str(again)]) == 0
    assert torch.equal(_grid(out), _grid(again))
    # more labels than a grid's 32 columns: a square-ish grid, not one row of them all
    many = ",".join(str(i % 10) for i in range(33))
    assert main(["sample", str(tiny_run), "--n", "36", "--labels", many, "--steps", "3",
                 "-o", str(again)]) == 0  # fmt: skip
    assert _grid(again).shape[0] == _grid(again).shape[1]  # 6 x 6
    # the raw weights go to a file of their own (they overwrote the EMA grid)
    assert main([*args, "--no-ema"]) == 0
    assert default.with_name(default.stem + "-raw.png").is_file() and default.is_file()
    # sample i does not depend on how many are drawn: the first two of four are the two
    two = ["sample", str(tiny_run), "--labels", "1,2", "--steps", "3", "--ncol", "2"]
    assert main([*two, "--n", "2", "-o", str(again)]) == 0
    assert torch.equal(_grid(out)[: _grid(again).shape[0]], _grid(again))
    # nor on the chunks of the run's batch (8) that more samples are drawn in
    assert main([*two, "--n", "12", "-o", str(again)]) == 0
    assert "sampled 8/12" in capsys.readouterr().err
    assert torch.equal(_grid(again)[: _grid(out).shape[0]], _grid(out))
    assert main(["sample", str(tiny_run), "--labels", "99", "-o", str(again)]) == 2
    assert (
        "--labels: values must be in 0..9 (the classes) or 10 (the null class"
        in capsys.readouterr().err
    )
    assert main(["sample", str(tiny_run), "--labels", "-1", "-o", str(again)]) == 2
    assert "--labels: values must be in 0..9" in capsys.readouterr().err
    # the bounds themselves: the last class, and the null class label dropout trained
    labels = ["--labels", "0,9,10", "--n", "3", "--steps", "3"]
    assert main(["sample", str(tiny_run), *labels, "-o", str(again)]) == 0
    assert main(["sample", str(tiny_run), "--labels", "a", "-o", str(again)]) == 2
    assert "expected class indices" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: usage and the reason, exit status 2
        main(["sample", str(tiny_run), "--n", "0", "-o", str(again)])
    assert "--n/--num-samples: expected a positive integer, got '0'" in capsys.readouterr().err


def test_cli_sample_no_ema_draws_the_trained_weights(tiny_run, tmp_path, capsys):
    """--no-ema samples the trained net, not the EMA copy (after training they differ); a
    sample that fits in one batch of the run's (8) prints no progress."""
    from dit_bench.cli import main

    args = ["sample", str(tiny_run), "--n", "4", "--labels", "1,2", "--steps", "3", "--ncol", "2"]
    ema, raw = tmp_path / "ema.png", tmp_path / "raw.png"
    assert main([*args, "-o", str(ema)]) == 0
    assert main([*args, "--no-ema", "-o", str(raw)]) == 0
    assert "sampled" not in capsys.readouterr().err
    assert not torch.equal(_grid(ema), _grid(raw))
    assert main([*args, "--ema", "-o", str(tmp_path / "asked.png")]) == 0
    assert torch.equal(_grid(ema), _grid(tmp_path / "asked.png"))


def test_cli_sample_follows_the_runs_eval_use_ema(tmp_path):
    """A run whose own grids use the raw weights (eval.use_ema=false) samples them by
    default too, and names the file so: `sample` drew the EMA copy regardless."""
    from dit_bench.cli import main

    sets = TINY + ["train.steps=4", "train.val_every=4", "train.checkpoint_every=4"]
    run = train(build_config(None, [*sets, "eval.use_ema=false"]), tmp_path, progress=False)
    args = ["sample", str(run), "--n", "4", "--steps", "3"]
    assert main([*args, "--no-ema", "-o", str(tmp_path / "raw.png")]) == 0
    assert main(args) == 0
    (default,) = (run / "samples").glob("sample-*-raw.png")
    assert torch.equal(_grid(default), _grid(tmp_path / "raw.png"))
    assert main([*args, "--ema", "-o", str(tmp_path / "ema.png")]) == 0
    assert not torch.equal(_grid(default), _grid(tmp_path / "ema.png"))


@pytest.mark.slow
def test_cli_sample_compiled_draws_the_eager_samples(tiny_run, tmp_path):
    from dit_bench.cli import main

    args = ["sample", str(tiny_run), "--n", "4", "--steps", "3", "--sampler", "euler"]
    args += ["--cfg", "4"]  # guidance amplifies what the (barely trained) net contributes
    assert main([*args, "-o", str(tmp_path / "eager.png")]) == 0
    assert main([*args, "--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    diff = (_grid(tmp_path / "eager.png") - _grid(tmp_path / "compiled.png")).abs()
    assert diff.max() <= 1  # up to float rounding: one 8-bit level


def test_sample_and_eval_refuse_guidance_a_run_never_trained(tmp_path, capsys):
    # Without label dropout the null class is an untrained embedding: `--cfg` on such a run
    # drew (and scored) samples guided by noise, where its config refuses the same scale.
    from dit_bench.cli import main
    from dit_bench.metrics.evaluate import EvalRequest, evaluate_run

    sets = TINY + ["train.steps=2", "train.val_every=2", "train.checkpoint_every=2"]
    sets += ["train.label_dropout=0", "eval.cfg_scale=1"]
    run = train(build_config(None, sets), tmp_path, progress=False)
    out = ["-o", str(tmp_path / "g.png")]
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--cfg", "3", *out]) == 2
    assert "--cfg: cfg_scale=3.0 guides against the null class" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--labels", "10", *out]) == 2
    assert (
        "values must be in 0..9 (the classes); the run has no null class" in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="train.label_dropout=0 never trains"):
        evaluate_run(run, EvalRequest(num_samples=20, cfg_scale=3.0), progress=False)
    assert main(["sample", str(run), "--n", "2", "--steps", "2", *out]) == 0  # unguided: fine
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--labels", "9", *out]) == 0


@pytest.mark.slow  # a trained run and a compile attempt: ~9 s; bench's and train's own
# tests of the message stay in the default run
def test_cli_sample_compiled_without_a_cxx_compiler_is_one_line_not_a_traceback(
    tiny_run, tmp_path, monkeypatch, capsys
):
    # as train.compile and bench --compile say it: `sample --compile` (and eval's) on a laptop
    # without Xcode's tools ended in a hundred lines of Dynamo internals at the first forward
    from torch._inductor.exc import InvalidCxxCompiler

    from dit_bench import fast
    from dit_bench.cli import main

    def no_compiler(gm, example_inputs):
        raise InvalidCxxCompiler()

    real = fast.compile_backbone
    monkeypatch.setattr(
        fast, "compile_backbone", lambda net, mode=None: real(net, mode, backend=no_compiler)
    )
    args = ["sample", str(tiny_run), "--n", "2", "--steps", "2", "--compile"]
    assert main([*args, "-o", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"dit-bench: --compile: {fast.NO_CXX_COMPILER}, or leave out --compile\n"
    assert not (tmp_path / "grid.png").exists()
