"""`dit-bench eval`: per-sample seeds, clear errors, and an end-to-end evaluation of a tiny run."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from dit_bench.cli import main
from dit_bench.config import ConfigError, build_config, read_yaml
from dit_bench.data import data_info
from dit_bench.metrics.evaluate import (
    EVAL_SEEDS,
    EvalRequest,
    NoCheckpointError,
    evaluate_run,
    generate,
    sample_seed,
)
from dit_bench.metrics.features import INCEPTION_ENV, FeatureWeightsError
from dit_bench.train.module import DiffusionModule
from dit_bench.train.run import load_run_config

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "experiment=tiny-eval",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.steps=12",
    "train.batch_size=8",
    "train.log_every=4",
    "train.val_every=6",
    "train.checkpoint_every=6",
    "train.threads=1",
    "optim.lr=1e-3",
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=4",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    return tmp_path / "cache"


class ToyDenoiser(torch.nn.Module):
    """eps_hat ~ x_t (data near 0), perturbed by a conv and a label embedding: samples stay in
    range (an untrained DiT predicts eps = 0 and every sample saturates at +-1)."""

    def __init__(self, channels, num_classes):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g))
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)

    def forward(self, x, t, cond):
        shift = self.emb[cond.labels][:, :, None, None]  # (B, C, 1, 1)
        return x * (1 + 0.2 * torch.tanh(self.conv(x))) + 0.1 * shift * (
            t[:, None, None, None] / 1000
        )


def tiny_module(*extra):
    cfg = build_config(None, TINY + list(extra))
    info = data_info(cfg.data)
    module = DiffusionModule(cfg, info).eval()
    module.ema = ToyDenoiser(info.channels, info.num_classes)
    return module


def test_sample_seed_is_distinct_per_seed_and_index():
    assert sample_seed(0, 5) == 5 and sample_seed(1, 0) == 1_000_003
    assert len({sample_seed(s, i) for s in range(3) for i in range(100)}) == 300
    assert all(sample_seed(2**30, i) < 2**32 for i in range(10))  # torch keeps 32 bits only
    with pytest.raises(ValueError):
        sample_seed(0, -1)


def test_eval_seeds_own_disjoint_sample_seeds():
    # Blocks of the largest eval seed and of seed 0 (1e6 samples each) share no sample seed;
    # one seed further, the block wraps past 2^32 onto seed 0's, and eval refuses it.
    last = EVAL_SEEDS - 1
    block = {sample_seed(last, i) for i in range(10**6)}
    assert not block & set(range(10**6)) and len(block) == 10**6
    assert {sample_seed(EVAL_SEEDS + 1, i) for i in range(10**6)} & set(range(10**6))
    EvalRequest(seed=last)
    for bad in (EVAL_SEEDS, -1):
        with pytest.raises(ValueError, match=rf"--seed {bad}: must be in \[0, {last}\]"):
            EvalRequest(seed=bad)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_maruyama"])  # both draw noise every step
def test_samples_do_not_depend_on_batch_size_or_split(sampler):
    module = tiny_module()
    kw = dict(seed=3, sampler=sampler, steps=4, cfg_scale=1.5, use_ema=True)
    whole = generate(module, range(10), batch_size=10, **kw)
    small = generate(module, range(10), batch_size=3, **kw)
    split = torch.cat([generate(module, range(0, 4), batch_size=4, **kw),
                       generate(module, range(4, 10), batch_size=6, **kw)])  # fmt: skip
    alone = generate(module, [7], batch_size=1, **kw)
    # Same noise for every sample; only float summation order may differ between batch shapes.
    torch.testing.assert_close(small, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], whole[7], atol=1e-5, rtol=0)
    other_seed = generate(module, range(10), batch_size=10, **{**kw, "seed": 4})
    assert (other_seed - whole).abs().max() > 0.1


def _run_dir(tmp_path, with_checkpoint: bool):
    cfg = build_config(None, TINY)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    if with_checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"not read before the feature net")
    return run


def test_eval_of_a_run_without_checkpoints_says_so(tmp_path, cache, capsys):
    run = _run_dir(tmp_path, with_checkpoint=False)
    with pytest.raises(NoCheckpointError, match="has no checkpoints"):
        evaluate_run(run, EvalRequest())
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoints" in err and "train it first" in err


def test_eval_with_missing_inception_file_fails_fast_with_one_error(tmp_path, cache, capsys):
    run = _run_dir(tmp_path, with_checkpoint=True)
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FeatureWeightsError, match="inception-2015-12-05.pt"):
        evaluate_run(run, EvalRequest(features="inception", inception_path=str(missing)))
    assert main(["eval", str(run), "--features", "inception", "--inception", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("dit-bench:") == 1 and str(missing) in err and "never downloads" in err


def test_bad_metric_name_is_an_error():
    with pytest.raises(ValueError, match="choose from fd, kid, pr, is"):
        EvalRequest(metrics=("fid",))


def test_too_few_samples_for_a_metric_is_an_error_before_sampling():
    with pytest.raises(ValueError, match="--metrics is needs at least 10 samples"):
        EvalRequest(num_samples=9, metrics=("fd", "is"))
    # all metrics: IS is left out for Inception, so evaluate_run checks it once features are
    # known (test_eval_of_all_metrics_checks_is_s_sample_count_once_the_net_is_known)
    EvalRequest(num_samples=9)
    with pytest.raises(ValueError, match="--metrics pr needs at least 4 samples"):
        EvalRequest(num_samples=3, metrics=("fd", "pr"))
    EvalRequest(num_samples=3, metrics=("fd", "kid"))  # FD and KID take any n >= 2
    from dit_bench.metrics.evaluate import check_sample_count

    # a held-out split of one image (was a KeyError)
    with pytest.raises(ValueError, match="held-out: --metrics fd needs at least 2 samples"):
        check_sample_count(("fd",), 1, "held-out")


def test_train_with_fd_callback_then_eval(tmp_path, cache, capsys, monkeypatch):
    from dit_bench.train import callbacks
    from dit_bench.train.run import train

    written = []  # metrics.csv written whole: its FD column was named up front
    whole = callbacks.write_text_atomic
    monkeypatch.setattr(
        callbacks, "write_text_atomic", lambda path, text: written.append(1) or whole(path, text)
    )
    cfg = build_config(None, TINY + ["eval.fd_every=6", "eval.fd_samples=20", "train.keep_every=6"])
    run = train(cfg, tmp_path / "runs", progress=False)
    assert written == [1]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fd_rows = {int(r["step"]): r for r in rows if r.get("val/FD-digits-net")}
    assert set(fd_rows) == {6, 12}
    assert all(r["val/loss"] for r in fd_rows.values())  # beside the val loss, same row
    assert all(float(r["val/FD-digits-net"]) > 0 for r in fd_rows.values())
    # killed after the final checkpoint, before summary.json: the rerun's summary keeps the FD
    # (it is carried in the checkpoint; the rerun evaluates nothing again)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_FD-digits-net"] == float(fd_rows[12]["val/FD-digits-net"])
    (run / "summary.json").unlink()
    assert train(cfg, tmp_path / "runs", progress=False) == run
    again = json.loads((run / "summary.json").read_text())
    assert again["val_FD-digits-net"] == summary["val_FD-digits-net"]

    capsys.readouterr()
    record = evaluate_run(run, EvalRequest(num_samples=30, steps=4, batch_size=16), progress=False)
    record_err = capsys.readouterr().err
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["metrics"] == record["metrics"]
    m = record["metrics"]
    for key in ("FD-digits-net", "KID-digits-net", "precision-digits-net", "recall-digits-net",
                "IS-digits-net", "adherence-digits-net"):  # fmt: skip
        assert key in m and m[key] == m[key]  # present, not NaN
    assert not any(k.startswith("FID") for k in m)
    p = record["protocol"]
    assert p["num_samples"] == 30 and p["steps"] == 4 and p["sampler"] == "ddpm"
    assert not {"eta", "sde_scale"} & set(p["sampler_settings"])  # ddpm takes neither
    assert p["cfg_scale"] == 1.5 and "cfg_interval" in p["sampler_settings"]  # guided
    assert p["weights"] == "ema" and p["checkpoint"]["global_step"] == 12
    assert len(p["feature_net"]["sha256"]) == 64 and p["reference"]["n"] == 180
    assert {"torch", "clean-fid", "torchmetrics"} <= set(record["versions"])
    anchors = record["anchors"]
    real = next(v for k, v in anchors.items() if "real(train" in k)
    noise = next(v for k, v in anchors.items() if "noise" in k)
    assert real < m["FD-digits-net"] < noise  # an untrained-ish model sits between the anchors
    # unguided, the guidance's interval and channels played no part: not recorded as settings
    unguided = EvalRequest(num_samples=20, steps=4, batch_size=16, cfg_scale=1.0, metrics=("fd",))
    p = evaluate_run(run, unguided, output=tmp_path / "u.json", progress=False)["protocol"]
    assert p["cfg_scale"] == 1 and not {"cfg_interval", "cfg_channels"} & set(p["sampler_settings"])
    # an earlier checkpoint's numbers are not the run's: the command says so
    from dit_bench.cli import main

    quick = ["--metrics", "fd", "--num-samples", "20", "--steps", "2", "--no-anchors", "--quiet"]
    out = tmp_path / "e.json"
    assert (
        main(["eval", str(run), *quick, "--checkpoint", "step=0000006.ckpt", "-o", str(out)]) == 0
    )
    assert "numbers are of step 6 of the run's 12" in capsys.readouterr().err
    assert "IS over 30 samples in 10 splits is at most 3 (of 10 classes)" in record_err
    # batch size is not part of the result
    again = evaluate_run(
        run, EvalRequest(num_samples=30, steps=4, batch_size=7), output=tmp_path / "e2.json",
        progress=False,
    )  # fmt: skip
    assert again["metrics"]["FD-digits-net"] == pytest.approx(m["FD-digits-net"], rel=1e-4)
    with pytest.raises(ValueError, match="a folder; give a file name"):  # before sampling
        evaluate_run(run, EvalRequest(num_samples=30), output=tmp_path, progress=False)
    # another protocol into the default eval.json keeps the earlier one beside it
    evaluate_run(run, EvalRequest(num_samples=30, steps=2, metrics=("fd",)), progress=False)
    (kept,) = run.glob("eval-*.json")
    assert json.loads(kept.read_text())["metrics"] == record["metrics"]
    assert json.loads((run / "eval.json").read_text())["protocol"]["steps"] == 2
    # so does an -o naming an earlier record (it replaced it)
    first = json.loads(out.read_text())
    assert main(["eval", str(run), *quick, "-o", str(out)]) == 0
    (kept,) = tmp_path.glob("e-*.json")
    assert json.loads(kept.read_text()) == first

    # a diverged run: its in-training FD is NaN (the run goes on), summary.json has null for
    # it (valid JSON), and eval refuses to score non-finite samples
    cfg = build_config(
        None,
        TINY + ["eval.fd_every=6", "eval.fd_samples=20", "optim.lr=1e6", "optim.grad_clip=1e9"],
    )
    run = train(cfg, tmp_path / "runs", progress=False)
    summary = json.loads((run / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["val_FD-digits-net"] is None and summary["steps"] == 12
    with pytest.raises(ValueError, match="samples of .* are not finite"):
        evaluate_run(run, EvalRequest(num_samples=4, steps=2, metrics=("fd",)), progress=False)


@pytest.mark.slow  # compiles the backbone
def test_eval_with_a_compiled_backbone_scores_the_same_samples(tmp_path, cache):
    from dit_bench.train.run import train

    run = train(build_config(None, TINY), tmp_path / "runs", progress=False)
    request = EvalRequest(num_samples=30, steps=4, batch_size=16, metrics=("fd",))
    eager = evaluate_run(run, request, output=tmp_path / "eager.json", progress=False)
    compiled = evaluate_run(
        run, request, output=tmp_path / "compiled.json", progress=False, compile=True
    )
    for record in (eager, compiled):  # the second eval reads the reference stats from cache
        assert record["protocol"]["reference"].pop("cached") is (record is compiled)
    assert compiled["protocol"] == eager["protocol"]  # how it ran is not what it measured
    fd = eager["metrics"]["FD-digits-net"]
    assert compiled["metrics"]["FD-digits-net"] == pytest.approx(fd, rel=1e-3)


@pytest.mark.slow  # two short trainings and a VAE (about 15 s)
def test_eval_of_folder_and_latents_runs(tmp_path, cache, vae_dir, image_folder, capsys):
    """Image folders and VAE latents: reference statistics keyed by content, images decoded."""
    from dit_bench.data.latents import encode_latents
    from dit_bench.train.run import train

    folder = ["data.name=folder", f"data.root={image_folder}", "data.image_size=32"]
    folder += ["data.val_fraction=0.2"]
    encode_latents(vae_dir, build_config(None, folder).data, tmp_path / "lat", progress=False)
    latents = ["data.name=latents", f"data.root={tmp_path / 'lat'}", f"data.vae={vae_dir}"]
    latents += ["data.val_fraction=0.2"]
    common = ["backbone.name=dit-xs/2", "train.steps=2", "train.batch_size=4", "train.val_every=2"]
    common += ["train.log_every=1", "eval.val_images=4", "eval.samples_per_class=1"]
    common += ["eval.sample_steps=2", "train.threads=1"]
    request = EvalRequest(num_samples=6, steps=2, features="digits-net", metrics=("fd", "kid"))
    ids = []
    for data in (folder, latents):
        cfg = build_config(None, data + common)
        run = train(cfg, tmp_path / "runs", progress=False)
        record = evaluate_run(run, request, progress=False)
        assert record["protocol"]["reference"]["n"] == 4
        assert record["metrics"]["FD-digits-net"] >= 0
        assert "adherence-digits-net" not in record["metrics"]  # digit classes != cat/dog
        # latents: the images they were encoded from (the folder)
        assert "digits-net was trained on digits, this run's data is folder" in (
            capsys.readouterr().err
        )
        ids.append(record["protocol"]["reference"]["id"])
    assert ids[0] != ids[1]  # latents are hashed as latents


def test_eval_of_a_run_with_one_held_out_image_says_so(tmp_path, cache):
    from dit_bench.train.run import train

    sets = ["data.name=shapes", "data.num_samples=8", "data.val_fraction=0.125"]
    cfg = build_config(None, TINY + sets + ["train.steps=2", "train.checkpoint_every=2"])
    run = train(cfg, tmp_path / "runs", progress=False)
    # it was "need (N >= 2, D) features, got shape (1, 128)", after loading everything
    with pytest.raises(ValueError, match="held-out split has 1 images .* needs at least 2"):
        evaluate_run(run, EvalRequest(num_samples=20, metrics=("fd",)), progress=False)


def _saved_run(tmp_path, step: int, *sets: str):
    """A run directory as an interrupted training leaves it: config.yaml and a last.ckpt at
    `step` of TINY's 12 (an untrained module saved by hand: nothing trains)."""
    cfg = build_config(None, TINY + list(sets))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    module = DiffusionModule(cfg, data_info(cfg.data))
    ckpt = {"state_dict": module.state_dict(), "global_step": step}
    torch.save(ckpt | {"pytorch-lightning_version": "2.5"}, run / "checkpoints" / "last.ckpt")
    return run


def test_eval_record_says_when_its_weights_are_not_the_runs_final_ones(tmp_path, cache):
    # the stderr note alone was lost to whoever reads eval.json later: step 6 of what?
    run = _saved_run(tmp_path, 6)
    request = EvalRequest(num_samples=20, steps=2, metrics=("fd",), anchors=False)
    p = evaluate_run(run, request, progress=False)["protocol"]
    assert p["checkpoint"] == {
        "file": "last.ckpt",
        "global_step": 6,
        "run_steps": 12,
        "final": False,
    }
    run = _saved_run(tmp_path, 12)
    p = evaluate_run(run, request, progress=False)["protocol"]
    assert p["checkpoint"]["final"] is True


@pytest.mark.parametrize(
    "request_, error",
    [
        (dict(sampler="dpm"), "unknown sampler 'dpm'"),
        (dict(steps=1001), "--steps 1001: .*objective.num_timesteps=1000"),
        (dict(steps=1), "--steps 1: .*2 or more"),
    ],
)
def test_eval_refuses_a_bad_sampler_or_step_count_before_the_reference(
    tmp_path, cache, request_, error
):
    # they failed at the first sampling batch, after the reference features: minutes of
    # Inception over a large held-out split, for a typo
    run = _run_dir(tmp_path, with_checkpoint=True)
    with pytest.raises(ValueError, match=error):
        evaluate_run(run, EvalRequest(num_samples=20, **request_), progress=False)
    assert not (cache / "refstats").exists()


def test_eval_and_sample_refuse_steps_whose_grid_misses_the_guidance_interval(
    tmp_path, cache, capsys
):
    # the run's [333, 333] is a level of its 4 DDPM steps (0, 333, 666, 999), not of 3 steps
    # (0, 500, 999): `--steps 3` sampled unguided, recorded as cfg 1.5 with the interval
    run = _saved_run(tmp_path, 12, "eval.cfg_interval=[333,333]")
    with pytest.raises(ValueError, match=r"--steps 3: eval.cfg_interval=\[333, 333\] holds none"):
        evaluate_run(run, EvalRequest(num_samples=20, steps=3), progress=False)
    assert not (cache / "refstats").exists()  # before the reference's features
    assert main(["sample", str(run), "--n", "2", "--steps", "3"]) == 2
    assert "nearest: 0, 500" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--cfg", "1"]) == 0


def test_a_run_made_before_the_interval_refusal_still_samples_and_evaluates(
    tmp_path, cache, capsys
):
    # a run trained before the config refused an interval between its grid's levels: its
    # config.yaml no longer loaded, so `sample --cfg 1` and `eval` of it, and any report,
    # failed on the file the user had, naming a setting they could no longer change
    run = _saved_run(tmp_path, 12, "eval.cfg_interval=[333,333]")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("- 333.0\n  - 333.0", "- 500.0\n  - 500.0"))
    assert load_run_config(run).eval.cfg_interval == (500, 500)  # missed by 0, 333, 666, 999
    assert main(["sample", str(run), "--n", "2", "--cfg", "1"]) == 0
    assert main(["sample", str(run), "--n", "2"]) == 2  # a guided request is refused ...
    assert "--cfg 1 draws the same samples" in capsys.readouterr().err  # ... saying what to do
    request = EvalRequest(metrics=("fd",), num_samples=20, steps=4, cfg_scale=1.0, anchors=False)
    assert "FD-digits-net" in evaluate_run(run, request, progress=False)["metrics"]
    with pytest.raises(ConfigError, match="holds none of the 4 sampling levels"):
        build_config(read_yaml(run / "config.yaml"))  # a new run of it is still refused


def test_cli_sample_of_an_unfinished_run_names_its_step(tmp_path, capsys):
    # an interrupted run's last.ckpt moves on when it resumes: grids drawn with the same
    # settings at two of its steps overwrote each other under one name
    args = ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2"]
    grids = []
    for step in (4, 8, 12):
        _saved_run(tmp_path, step)
        assert main(args) == 0
        grids.append(capsys.readouterr().out.split(" to ")[-1].strip())
    assert grids[0].endswith("-n2-step4.png") and grids[1].endswith("-n2-step8.png")
    assert grids[2].endswith("-n2.png")  # a finished run's last.ckpt changes no more
    assert len(set(grids)) == 3 and all(map(os.path.isfile, grids))


def test_cli_sample_to_a_named_file_says_when_the_run_is_not_finished(tmp_path, capsys):
    # -o grid.png of a run still training (or interrupted) drew step 4 of 12 without a word:
    # the file name carries no step then, and the grid passed for the run's samples
    grid = tmp_path / "grid.png"
    args = ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2", "-o", str(grid)]
    _saved_run(tmp_path, 4)
    assert main(args) == 0
    assert "step 4 of the run's 12, not its final weights" in capsys.readouterr().err
    _saved_run(tmp_path, 12)
    assert main(args) == 0
    assert "not its final weights" not in capsys.readouterr().err


def test_cli_sample_of_fewer_samples_than_columns_draws_no_empty_columns(tmp_path, capsys):
    # `sample --n 1` of a 10-class run wrote a grid 10 tiles wide, 9 of them blank
    from PIL import Image

    _saved_run(tmp_path, 12)
    grid = tmp_path / "grid.png"
    base = ["sample", str(tmp_path / "run"), "--steps", "2", "-o", str(grid)]
    for extra, tiles in [(["--n", "1"], 1), (["--n", "3", "--labels", "1,2,3,4"], 3)]:
        assert main(base + extra) == 0
        assert Image.open(grid).size == (tiles * (8 + 2) + 2, 8 + 2 + 2)  # digits are 8 x 8
    assert main(base + ["--n", "1", "--ncol", "4"]) == 0  # an explicit --ncol is kept
    assert Image.open(grid).size == (4 * (8 + 2) + 2, 8 + 2 + 2)


def test_an_interrupted_eval_writes_nothing_and_does_not_promise_a_resume(
    tmp_path, cache, capsys, monkeypatch
):
    # Ctrl-C while sampling the first chunk: eval.json stays as it was, and the command must
    # not say it will resume (no sample's features were kept: it starts over)
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    (run / "eval.json").write_text('{"finished_at": "2026-01-01T00:00:00+00:00"}\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "generate", interrupted)
    assert main(["eval", str(run), "--num-samples", "20", "--metrics", "fd", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no record was written" in err and "resume" not in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "eval.json"]
    assert "2026-01-01" in (run / "eval.json").read_text()


def test_a_checkpoint_of_another_family_is_refused_in_a_few_words(tmp_path, capsys):
    # torch's message named every key of both models: 16 KB on one line for a U-Net-XS
    run = _saved_run(tmp_path, 12)
    cfg = build_config(None, TINY + ["backbone.name=unet-xs"])
    other = DiffusionModule(cfg, data_info(cfg.data)).state_dict()
    ckpt = {"state_dict": other, "global_step": 12, "pytorch-lightning_version": "2.5"}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    assert main(["sample", str(run), "--n", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "another run's checkpoint" in err and len(err) < 1000


def test_two_earlier_records_finished_in_one_second_are_both_kept(tmp_path):
    # Two evals of one run finishing in the same second (run side by side on two GPUs, or a
    # quick scripted loop): each kept record was named by its finish time to the second, so
    # the second one kept replaced the first, the loss _keep_earlier exists to prevent.
    from dit_bench.metrics.evaluate import _keep_earlier

    out = tmp_path / "eval.json"
    for steps in (2, 4):
        out.write_text(json.dumps({"finished_at": "2026-01-01T00:00:00+00:00", "steps": steps}))
        _keep_earlier(out)
    kept = sorted(tmp_path.glob("eval-*.json"))
    assert sorted(json.loads(p.read_text())["steps"] for p in kept) == [2, 4]
    assert not out.exists()


def test_two_evals_of_one_run_side_by_side_keep_every_record(tmp_path, cache, monkeypatch):
    # Two evals of one run at once (two GPUs, a scripted loop with `&`): between one's look
    # at eval.json and its write, the other moved the earlier record aside and had not yet
    # written its own, so the first saw no record, wrote, and was replaced without a word
    # (both printed "wrote eval.json"), or both moved the same earlier record and one failed
    # after all its sampling.
    import threading
    from dataclasses import replace

    from dit_bench.metrics import evaluate
    from dit_bench.train import run as run_module

    run = _saved_run(tmp_path, 12)
    request = EvalRequest(num_samples=20, steps=2, metrics=("fd",), anchors=False)
    # the reference statistics cached first: threads of one process share the pid that
    # names their temporary files (processes, as the command runs, do not)
    evaluate_run(run, request, output=tmp_path / "warm.json", progress=False)
    earlier = {"finished_at": "2026-01-01T00:00:00+00:00", "request": {"seed": 9}}
    (run / "eval.json").write_text(json.dumps(earlier))
    both_scored = threading.Barrier(2, timeout=60)
    wrote_one = threading.Event()
    commit = run_module.git_commit
    write = evaluate.write_json_atomic

    def scored():  # built into each record just before it is written
        both_scored.wait()
        return commit()

    def slow_write(path, record):  # the first writer's write lands after the other's
        if not wrote_one.is_set():
            wrote_one.wait(timeout=0.5)
        write(path, record)
        wrote_one.set()

    monkeypatch.setattr(run_module, "git_commit", scored)
    monkeypatch.setattr(evaluate, "write_json_atomic", slow_write)
    errors = []

    def one_eval(seed):
        try:
            evaluate_run(run, replace(request, seed=seed), progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_eval, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    records = [json.loads(p.read_text()) for p in run.glob("eval*.json")]
    assert sorted(r["request"]["seed"] for r in records) == [1, 2, 9]


def test_cache_and_inception_paths_from_the_environment_expand_a_home_tilde(tmp_path, monkeypatch):
    # A CI job's `env:` block, a Dockerfile ENV or a Makefile variable passes ~ unexpanded (the
    # shell expands it only at a word's start): DIT_BENCH_CACHE=~/.cache/x made a folder named
    # `~` in the working directory and cached the reference statistics there
    from dit_bench.metrics.features import cache_dir, inception_candidates

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIT_BENCH_CACHE", "~/dbc")
    monkeypatch.setenv(INCEPTION_ENV, "~/w/inception.pt")
    assert cache_dir() == tmp_path / "dbc"
    found = inception_candidates()
    assert found[0] == tmp_path / "w" / "inception.pt" and found[-1].parent == tmp_path / "dbc"
    assert inception_candidates("~/i.pt") == [tmp_path / "i.pt"]  # --inception=~/i.pt


def test_a_run_folder_that_cannot_take_the_record_is_named_before_sampling(
    tmp_path, cache, monkeypatch, capsys
):
    """A read-only run folder (a mount, another user's runs) failed at the record's write,
    after all the sampling. (Read-only is faked: root passes a chmod, and a mount needs root.)"""
    import errno

    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and str(path).startswith(str(run)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before the record's folder was checked")

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(evaluate, "generate", sampled)
    assert main(["eval", str(run), "--num-samples", "20", "--metrics", "fd", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dit-bench: [Errno 30] Read-only file system (eval writes its record there; -o names "
        f"another file): '{run}'"
    )
    assert main(["sample", str(run), "--n", "2", "--steps", "2"]) == 2  # its grid: the same
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dit-bench: [Errno 30] Read-only file system (-o names another file): '{run / 'samples'}'"
    )


def test_sample_takes_only_a_checkpoint_of_the_run_as_eval_does(tmp_path, capsys):
    """`sample --checkpoint` with a misspelt name asked "has it trained yet?" of a run with
    checkpoints, naming none of them; a path (../other/last.ckpt) read another run's weights
    as this run's. One line, as eval's, listing the run's checkpoints; nothing read."""
    run = _run_dir(tmp_path, with_checkpoint=True)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"not read")
    for name in ("lats.ckpt", "last", str(other), "../../other.ckpt"):
        assert main(["sample", str(run), "--checkpoint", name]) == 2
        err = capsys.readouterr().err
        assert (
            err == f"dit-bench: {run}: no checkpoint {name!r} under checkpoints/; found last.ckpt\n"
        )
        assert main(["eval", str(run), "--checkpoint", name]) == 2
        assert capsys.readouterr().err == err
    (run / "checkpoints" / "last.ckpt").unlink()
    assert main(["sample", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoints" in err and "nothing to sample or evaluate" in err


def test_generate_conditions_sample_i_on_class_i_mod_the_classes_in_any_share(monkeypatch):
    """eval.json says "sample i conditioned on class i mod num_classes" (eval_labels, which
    label adherence compares against); the in-training FD draws a process's share (rank r: r,
    r + world, ...) and the grid its own labels: each sample's label is its index's, whatever
    the other indices drawn with it and the chunking."""
    from types import SimpleNamespace

    from dit_bench.metrics.evaluate import eval_labels
    from dit_bench.train import run as run_module

    drawn = []

    def sample_images(module, labels, *, seeds, **kwargs):
        drawn.extend(zip(seeds, labels.tolist(), strict=True))
        return torch.zeros(len(labels), 1, 2, 2)

    monkeypatch.setattr(run_module, "sample_images", sample_images)
    module = SimpleNamespace(info=SimpleNamespace(num_classes=3, channels=1, image_size=2))
    kw = dict(seed=5, sampler="ddpm", steps=2, cfg_scale=1.0, use_ema=True, batch_size=2)
    share = [1, 4, 7, 9, 2]
    assert generate(module, share, **kw).shape == (5, 1, 2, 2)
    assert drawn == [(sample_seed(5, i), i % 3) for i in share]
    drawn.clear()
    generate(module, range(7), **kw)
    assert [label for _, label in drawn] == eval_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    drawn.clear()
    labels = torch.tensor([2, 2, 0, 1, 1, 0, 2, 1, 0, 0])
    generate(module, share, **kw, labels=labels)
    assert [label for _, label in drawn] == labels[share].tolist()


def test_a_metric_takes_exactly_the_samples_it_says_it_needs():
    from dit_bench.metrics.evaluate import IS_SPLITS, PR_K, check_sample_count

    # "--metrics pr needs at least 4 samples" must take 4: the boundary a --num-samples of
    # exactly PR_K + 1 (or IS_SPLITS) sits on
    for metric, needed in (("pr", PR_K + 1), ("is", IS_SPLITS), ("fd", 2), ("kid", 2)):
        check_sample_count((metric,), needed, "n")
        with pytest.raises(ValueError, match=f"--metrics {metric} needs at least {needed} "):
            check_sample_count((metric,), needed - 1, "n")


def test_eval_says_what_it_does_after_sampling_and_before_it(tmp_path, cache, capsys):
    # past "sampled N/N" an eval decoded (latents), extracted features of the samples, the
    # training images and the noise anchors, and scored them without a word: minutes of a
    # silent log for 10,000 Inception or VAE-decoded samples; so was the held-out reference
    run = _saved_run(tmp_path, 12)
    request = EvalRequest(num_samples=20, steps=2, metrics=("fd", "kid"), batch_size=8)
    evaluate_run(run, request, progress=True)
    lines = capsys.readouterr().err.splitlines()
    sampled = [i for i, line in enumerate(lines) if "sampled" in line]
    assert any("reference" in line for line in lines[: sampled[0]])
    after = lines[sampled[-1] + 1 :]
    assert any("features of 20 samples" in line for line in after)
    assert any("anchors" in line for line in after)
    evaluate_run(run, request, progress=False)
    assert "features of" not in capsys.readouterr().err


class _LogitFreeNet:
    """Stands in for clean-fid's Inception (a file no test has): pool features, no logits."""

    name, dim, sha256, file, resize = "inception", 4, "0" * 64, "fake.pt", "none"
    class_names, info, metric_prefix, suffix = None, {}, "FID", ""

    def features(self, x, *, batch_size=256):
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(x[0].numel(), self.dim, generator=g, dtype=torch.float64)
        return (x.flatten(1).double() @ proj).numpy(), None

    def protocol(self):
        return {"name": self.name, "sha256": self.sha256}


def test_eval_of_an_inception_run_leaves_is_out_of_all_metrics(tmp_path, cache, monkeypatch):
    # `dit-bench eval RUN_DIR` (README: all metrics) on folder or latents data, or any run
    # with --features inception, sampled the whole held-out split's count, then failed at
    # scoring: IS needs logits and Inception's pool features have none. Nothing was written.
    import dit_bench.metrics.evaluate as ev

    monkeypatch.setattr(ev, "load_feature_net", lambda *a, **k: _LogitFreeNet())
    run = _saved_run(tmp_path, 12)
    request = EvalRequest(num_samples=20, steps=2, features="inception", anchors=False)
    record = evaluate_run(run, request, progress=False)
    assert {"FID", "KID", "precision", "recall"} <= set(record["metrics"])
    assert not any(k.startswith("IS") for k in record["metrics"])


def test_eval_refuses_is_with_inception_before_sampling(tmp_path, cache, monkeypatch):
    import dit_bench.metrics.evaluate as ev

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(ev, "load_feature_net", lambda *a, **k: _LogitFreeNet())
    monkeypatch.setattr(ev, "generate", no_sampling)
    run = _saved_run(tmp_path, 12)
    request = EvalRequest(num_samples=20, steps=2, features="inception", metrics=("fd", "is"))
    with pytest.raises(ValueError, match="--metrics is needs a classifier's logits"):
        evaluate_run(run, request, progress=False)


def test_eval_of_all_metrics_checks_is_s_sample_count_once_the_net_is_known(
    tmp_path, cache, monkeypatch
):
    # --num-samples 5: too few for IS (10), enough for the rest. Inception leaves IS out, so
    # the run is scored (it was refused for IS's sake); a small net keeps IS, refused unsampled
    import dit_bench.metrics.evaluate as ev

    run = _saved_run(tmp_path, 12)
    small_net = ev.load_feature_net
    monkeypatch.setattr(ev, "load_feature_net", lambda *a, **k: _LogitFreeNet())
    request = EvalRequest(num_samples=5, steps=2, features="inception", anchors=False)
    assert "FID" in evaluate_run(run, request, progress=False)["metrics"]

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(ev, "load_feature_net", small_net)
    monkeypatch.setattr(ev, "generate", no_sampling)
    with pytest.raises(ValueError, match="--num-samples 5: --metrics is needs at least 10"):
        evaluate_run(run, EvalRequest(num_samples=5, steps=2, anchors=False), progress=False)


# Streamed, resumable eval: 30 samples in chunks of 8 (8, 8, 8, 6)
STREAMED = EvalRequest(num_samples=30, steps=2, batch_size=8, metrics=("fd", "kid", "is"))


def _spy_generate(monkeypatch, fail=None):
    """evaluate.generate, noting each chunk's indices in the list returned; `fail(indices)`
    may raise or return images to use instead (None: the real samples)."""
    from dit_bench.metrics import evaluate

    real, calls = generate, []  # the module's own, not an earlier spy

    def spy(module, indices, **kwargs):
        indices = list(indices)
        instead = fail(indices) if fail else None
        calls.append(indices)
        return real(module, indices, **kwargs) if instead is None else instead

    monkeypatch.setattr(evaluate, "generate", spy)
    return calls


def test_streamed_eval_scores_what_one_whole_chunk_scores(tmp_path, cache, monkeypatch):
    # One chunk of all 30 is the path before streaming (every sample, then every feature);
    # chunks of 8 must give the same features, up to the feature net's batch rounding.
    from dataclasses import replace

    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    scored, score = [], evaluate.score
    monkeypatch.setattr(
        evaluate, "score", lambda f, z, *a: scored.append((f, z)) or score(f, z, *a)
    )

    one = replace(STREAMED, batch_size=30)
    whole = evaluate_run(run, one, output=tmp_path / "w.json", progress=False)
    streamed = evaluate_run(run, STREAMED, output=tmp_path / "s.json", progress=False)
    (f1, z1), (f2, z2) = scored
    assert f1.shape == (30, 128) and z1.shape == (30, 10)
    np.testing.assert_allclose(f2, f1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(z2, z1, atol=1e-5, rtol=0)
    for name, value in whole["metrics"].items():
        assert streamed["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_an_eval_stopped_after_two_chunks_resumes_from_their_features(
    tmp_path, cache, monkeypatch, capsys
):
    # a preempted node or a crash at hour 3 of a 50,000-sample eval lost every sample
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    uninterrupted = evaluate_run(run, STREAMED, output=tmp_path / "u.json", progress=False)
    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)  # saved after every chunk
    saved = []

    def crash_at_third_chunk(indices):
        if indices[0] == 16:
            (partial,) = run.glob("eval.json.*.partial.npz")
            with np.load(partial) as z:  # on disk before the crash, not written by it
                saved.append((len(z["features"]), float(z["sample_seconds"])))
            raise RuntimeError("node preempted")

    calls = _spy_generate(monkeypatch, crash_at_third_chunk)
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate_run(run, STREAMED, progress=False)
    assert saved[0][0] == 16 and not (run / "eval.json").exists()
    assert "kept the features of 16 of 30 samples in" in capsys.readouterr().err
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(16, 30))  # only the rest drawn
    assert "resuming: 16 of 30 samples' features from" in capsys.readouterr().err
    assert record["metrics"] == uninterrupted["metrics"]  # the same chunks: the same floats
    assert record["protocol"]["resumed_from"] == 16
    assert uninterrupted["protocol"]["resumed_from"] == 0
    assert record["sample_seconds"] >= round(saved[0][1], 2) > 0  # both sessions' sampling
    assert not list(run.glob("*.partial.npz"))  # gone once the record is written


def test_a_ctrl_c_keeps_the_features_so_far_and_the_command_goes_on_from_them(
    tmp_path, cache, monkeypatch, capsys
):
    # saved as it stops, whatever the time since the last save (a minute by default)
    run = _saved_run(tmp_path, 12)
    argv = ["eval", str(run), "--num-samples", "30", "--steps", "2", "--batch-size", "8"]
    argv += ["--metrics", "fd", "--no-anchors", "--quiet"]

    def ctrl_c(indices):
        if indices[0] == 24:
            raise KeyboardInterrupt

    _spy_generate(monkeypatch, ctrl_c)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "kept the features of 24 of 30 samples" in err
    assert "interrupted; no record was written: run the same command again" in err
    calls = _spy_generate(monkeypatch)
    assert main(argv) == 0
    assert calls == [list(range(24, 30))]
    assert "resuming: 24 of 30 samples' features" in capsys.readouterr().err
    assert json.loads((run / "eval.json").read_text())["protocol"]["resumed_from"] == 24


def test_features_saved_by_another_request_are_not_used(tmp_path, cache, monkeypatch, capsys):
    from dataclasses import replace

    from dit_bench.metrics import evaluate

    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)

    def crash(indices):
        if indices[0] == 16:
            raise RuntimeError("crash")

    run = _saved_run(tmp_path, 6)
    for request in (replace(STREAMED, seed=1), STREAMED):  # another seed; then step 6
        _spy_generate(monkeypatch, crash)
        with pytest.raises(RuntimeError):
            evaluate_run(run, request, progress=False)
    assert len(list(run.glob("eval.json.*.partial.npz"))) == 2
    _saved_run(tmp_path, 12)  # the run trained on: last.ckpt is of step 12 now
    capsys.readouterr()
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert calls[0][0] == 0 and record["protocol"]["resumed_from"] == 0
    err = capsys.readouterr().err
    assert "resuming" not in err
    # the two files nothing will resume from are named (up to 0.8 GB each, left forever)
    assert err.count("holds the features of an eval of another request") == 2
    # a file under the request's name but of another key (copied, or a digest collision)
    from dit_bench.metrics.evaluate import _load_partial, _save_partial, partial_path

    key, other = {"seed": 0}, {"seed": 1}
    _save_partial(partial_path(run / "x.json", key), other, [(0, np.zeros((8, 2)), None)], 1.0)
    assert _load_partial(partial_path(run / "x.json", key), key) == ([], 0.0)
    assert "not used (saved by another request)" in capsys.readouterr().err


def test_eval_holds_one_chunk_of_images_at_a_time(tmp_path, cache, one_chunk_at_a_time):
    # FID-50K of 256x256 images held all 39 GB of samples before the first feature
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    sizes = one_chunk_at_a_time(evaluate, "generate", held="result")
    evaluate_run(run, STREAMED, progress=False)
    assert sizes == [8, 8, 8, 6]


def test_a_non_finite_chunk_fails_with_its_indices_before_later_chunks(
    tmp_path, cache, monkeypatch, capsys
):
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)

    def nan_in_second_chunk(indices):
        if indices[0] == 8:
            return torch.full((len(indices), 1, 8, 8), float("nan"))

    calls = _spy_generate(monkeypatch, nan_in_second_chunk)
    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)  # the first chunk's features saved
    with pytest.raises(ValueError, match=r"8 of 8 samples of .*step 12; samples 8\.\.15 of 30"):
        evaluate_run(run, STREAMED, progress=False)
    assert [c[0] for c in calls] == [0, 8]
    # seeded samples: the same command would stop at the same chunk, so no "resumes from them"
    assert "resumes from them" not in capsys.readouterr().err
    assert not list(run.glob("eval.json.*"))


def test_a_full_disk_at_a_save_of_the_features_so_far_does_not_stop_the_eval(
    tmp_path, cache, monkeypatch, capsys
):
    # the saves are for a resume; the features in memory still make the record, a few kB
    # where the file of 50,000 samples' features is 0.8 GB: ENOSPC at the minute's save (or at
    # the one before scoring) failed an hour's eval that would have written its record
    import errno

    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    uninterrupted = evaluate_run(run, STREAMED, output=tmp_path / "u.json", progress=False)
    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate.np, "savez", full)
    record = evaluate_run(run, STREAMED, progress=False)
    assert record["metrics"] == uninterrupted["metrics"]
    assert json.loads((run / "eval.json").read_text())["metrics"] == record["metrics"]
    err = capsys.readouterr().err
    assert "could not save the features so far" in err and "No space left" in err
    assert not list(run.glob("eval.json.*"))  # no partial, no temporary file left


def test_anchors_and_reference_are_those_of_whole_tensors_one_chunk_at_a_time(
    tmp_path, cache, monkeypatch, one_chunk_at_a_time
):
    # the anchors held n training images and n noise images whole, and the held-out images
    # were one tensor through the eval: 3 x 7.9 GB at the gpu profiles' 10,000 256x256 images
    from dit_bench.data import load_datasets
    from dit_bench.metrics import distances as D
    from dit_bench.metrics import evaluate
    from dit_bench.metrics.reference import dataset_tensors, reference_stats

    run = _saved_run(tmp_path, 12)
    net = evaluate.load_feature_net("digits-net", progress=False)
    features = net.features
    seen = one_chunk_at_a_time(net, "features")
    monkeypatch.setattr(evaluate, "load_feature_net", lambda *a, **k: net)
    request = EvalRequest(num_samples=30, steps=2, batch_size=8, metrics=("fd",))
    anchors = evaluate_run(run, request, progress=False)["anchors"]
    assert max(seen) == 8 and len(seen) == 23 + 4 + 4 + 4 + 23  # ref, samples, real, noise, ref

    # the anchors as they were computed whole (evaluate_run before they were chunked)
    cfg = build_config(None, TINY)
    train_set, val = load_datasets(cfg.data)
    ref_x, ref_y = dataset_tensors(val)
    ref = reference_stats(ref_x, net, batch_size=8)
    assert ref.meta["cached"]  # the eval's statistics: the same id
    g = torch.Generator().manual_seed(evaluate.ANCHOR_SEED)
    pick = torch.randperm(len(train_set), generator=g)[:30]
    real_x = torch.stack([train_set[i][0] for i in pick.tolist()])
    real_f, _ = features(real_x, batch_size=8)
    noise = torch.rand((30, *ref_x.shape[1:]), generator=g) * 2 - 1
    noise_f, _ = features(noise, batch_size=8)
    _, ref_logits = features(ref_x, batch_size=8)
    fd = net.metric_prefix
    assert anchors == {
        f"{fd} real(train, n=30) vs reference": D.frechet_distance(
            *D.gaussian_stats(real_f), ref.mu, ref.sigma
        ),
        f"{fd} uniform noise (n=30) vs reference": D.frechet_distance(
            *D.gaussian_stats(noise_f), ref.mu, ref.sigma
        ),
        "adherence-digits-net of the reference images": float(
            (torch.from_numpy(ref_logits).argmax(1) == ref_y).double().mean()
        ),
    }


# --shard K/N: one eval spread over processes (a GPU each); 30 samples in 3 blocks of 10
SHARD_ARGV = ["--num-samples", "30", "--steps", "2", "--batch-size", "8", "--metrics", "fd,kid,is"]


def _shards(run, request=STREAMED, which=(0, 1, 2), of=3):
    for k in which:
        done = evaluate_run(run, request, progress=False, shard=(k, of))
        assert done["file"].endswith(f".shard-{k}-of-{of}.partial.npz")
    assert not (run / "eval.json").exists()  # a shard scores nothing and writes no record


def test_three_shards_then_the_eval_without_shard_score_what_one_eval_scores(
    tmp_path, cache, monkeypatch, capsys
):
    # FID-50K of DiT-XL/2 with DDPM-250 is hours of one GPU; sample i depends on (seed, i)
    # only, so 8 GPUs split it exactly
    run = _saved_run(tmp_path, 12)
    whole = evaluate_run(run, STREAMED, output=tmp_path / "u.json", progress=False)
    calls = _spy_generate(monkeypatch)
    for k in range(3):
        assert main(["eval", str(run), *SHARD_ARGV, "--shard", f"{k}/3", "--quiet"]) == 0
        out, err = capsys.readouterr()
        first, last = k * 10, k * 10 + 9
        assert f"shard {k}/3: the features of samples {first}..{last} of 30 are in " in out
        assert out.count("\n") == 1  # what it made, for scripts; the advice is a note
        assert f"shard-{k}-of-3.partial.npz (no record written)" in out
        assert "run the same command without --shard" in err
    assert [i for chunk in calls for i in chunk] == list(range(30))  # each block once
    assert [len(c) for c in calls] == [8, 2, 8, 2, 8, 2]
    assert len(list(run.glob("eval.json.*.shard-*-of-3.partial.npz"))) == 3
    assert not (run / "eval.json").exists()

    calls = _spy_generate(monkeypatch)
    assert main(["eval", str(run), *SHARD_ARGV]) == 0
    assert calls == []  # every sample from the shards' files
    assert "resuming: 30 of 30 samples' features from" in capsys.readouterr().err
    record = json.loads((run / "eval.json").read_text())
    assert record["metrics"].keys() == whole["metrics"].keys()
    for name, value in whole["metrics"].items():  # other chunks: the feature net's rounding
        assert record["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    p = record["protocol"]
    assert p["shards"] == {"0/3": [[0, 10]], "1/3": [[10, 20]], "2/3": [[20, 30]]}
    assert p["resumed_from"] == 30 and whole["protocol"]["shards"] == {}
    assert record["sample_seconds"] > 0  # the shards' sampling, summed
    assert not list(run.glob("eval.json.*.npz"))  # the shards' files gone with the record


def test_the_eval_without_shard_draws_the_block_of_a_missing_shard(tmp_path, cache, monkeypatch):
    run = _saved_run(tmp_path, 12)
    whole = evaluate_run(run, STREAMED, output=tmp_path / "u.json", progress=False)
    _shards(run, which=(0, 2))  # shard 1/3's machine never ran
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(10, 20))
    assert record["protocol"]["shards"] == {"0/3": [[0, 10]], "2/3": [[20, 30]]}
    assert record["protocol"]["resumed_from"] == 20
    for name, value in whole["metrics"].items():
        assert record["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert not list(run.glob("eval.json.*.npz"))


def test_an_eval_stopped_in_a_missing_shard_s_block_resumes_from_its_own_features(
    tmp_path, cache, monkeypatch, capsys
):
    # its own file then holds samples 10..17, not a run from 0
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)
    _shards(run, which=(0, 2))

    def crash(indices):
        if indices[0] == 18:
            raise RuntimeError("node preempted")

    _spy_generate(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate_run(run, STREAMED, progress=False)
    assert "kept the features of 8 of 30 samples in" in capsys.readouterr().err
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert calls == [[18, 19]]
    assert "resuming: 28 of 30 samples' features from" in capsys.readouterr().err
    assert record["protocol"]["resumed_from"] == 28
    assert record["protocol"]["shards"] == {"0/3": [[0, 10]], "2/3": [[20, 30]]}
    assert not list(run.glob("eval.json.*.npz"))


def test_an_interrupted_shard_resumes_and_the_eval_resumes_an_unfinished_one(
    tmp_path, cache, monkeypatch, capsys
):
    from dit_bench.metrics import evaluate

    run = _saved_run(tmp_path, 12)
    monkeypatch.setattr(evaluate, "PARTIAL_EVERY_S", 0.0)

    def crash_after_first_chunk(indices):
        if indices[0] == 18:
            raise RuntimeError("node preempted")

    for again in ("the shard", "the eval"):
        for path in run.glob("eval*.json*"):  # the first round's record and files
            path.unlink()
        _shards(run, which=(0, 2))
        _spy_generate(monkeypatch, crash_after_first_chunk)
        with pytest.raises(RuntimeError, match="preempted"):
            evaluate_run(run, STREAMED, progress=False, shard=(1, 3))
        assert "kept the features of 8 of 10 samples of shard 1/3 in" in capsys.readouterr().err
        calls = _spy_generate(monkeypatch)
        if again == "the shard":
            evaluate_run(run, STREAMED, progress=False, shard=(1, 3))
            assert calls == [[18, 19]]
            assert "resuming: 8 of 10 samples' features of shard 1/3" in capsys.readouterr().err
            record = evaluate_run(run, STREAMED, progress=False)
            assert calls == [[18, 19]]  # the eval drew nothing more
        else:  # the shard not run again: the eval draws what it did not
            record = evaluate_run(run, STREAMED, progress=False)
            assert calls == [[18, 19]]
        shards = {"0/3": [[0, 10]], "1/3": [[10, 18]], "2/3": [[20, 30]]}
        if again == "the shard":
            shards["1/3"] = [[10, 20]]
        assert record["protocol"]["shards"] == shards
        assert not list(run.glob("eval.json.*.npz"))


def test_shard_files_of_another_request_are_not_used(tmp_path, cache, monkeypatch, capsys):
    from dataclasses import replace

    run = _saved_run(tmp_path, 6)
    _shards(run, which=(0,))  # of the step-6 checkpoint
    _shards(run, replace(STREAMED, seed=1), which=(1, 2))  # of another seed
    _saved_run(tmp_path, 12)  # the run trained on: last.ckpt is of step 12 now
    capsys.readouterr()
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(30))
    assert record["protocol"]["shards"] == {} and record["protocol"]["resumed_from"] == 0
    err = capsys.readouterr().err
    assert "resuming" not in err
    assert err.count("holds the features of an eval of another request") == 3
    assert len(list(run.glob("eval.json.*.shard-*.partial.npz"))) == 3  # left as they were


def test_shards_of_two_splits_take_each_sample_once(tmp_path, cache, monkeypatch, capsys):
    run = _saved_run(tmp_path, 12)
    whole = evaluate_run(run, STREAMED, output=tmp_path / "u.json", progress=False)
    _shards(run, which=(0,), of=3)  # samples 0..9
    _shards(run, which=(0, 1), of=2)  # samples 0..14 and 15..29
    capsys.readouterr()
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, progress=False)
    assert calls == []
    assert "10 samples' features are in more than one file" in capsys.readouterr().err
    assert record["protocol"]["resumed_from"] == 30
    for name, value in whole["metrics"].items():
        assert record["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("text", ["3/3", "1/0", "x", "-1/3", "1/3/4", "1"])
def test_a_shard_that_is_no_shard_is_refused_as_it_is_parsed(text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "run", f"--shard={text}"])  # -1/3 apart would read as a flag
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"argument --shard: expected K/N with 0 <= K < N (shard K of N: 0/8 .. 7/8), got {text!r}"
        in err
    )


def test_a_shard_is_refused_before_sampling_where_it_holds_no_sample(tmp_path, cache, monkeypatch):
    run = _saved_run(tmp_path, 12)
    calls = _spy_generate(monkeypatch)
    with pytest.raises(ValueError, match=r"--shard 3/3: K/N takes 0 <= K < N"):
        evaluate_run(run, STREAMED, progress=False, shard=(3, 3))
    with pytest.raises(ValueError, match="--shard 0/31: 31 shards of 30 samples leave some empty"):
        evaluate_run(run, STREAMED, progress=False, shard=(0, 31))
    assert calls == [] and not list(run.glob("eval.json*"))


def test_shard_files_of_a_copied_checkpoint_are_taken(tmp_path, cache, monkeypatch, capsys):
    # shards on machines sharing -o's folder, each with its own copy of the run folder: a copy
    # made without its times (scp, cp) gave the checkpoint another mtime, then part of the key,
    # and the eval drew all 50,000 samples again; the key has the checkpoint's content now
    from dit_bench.metrics.evaluate import checkpoint_fingerprint

    run = _saved_run(tmp_path, 12)
    out = tmp_path / "shared" / "eval.json"
    out.parent.mkdir()
    for k in (0, 1):
        evaluate_run(run, STREAMED, output=out, progress=False, shard=(k, 3))
    ckpt = run / "checkpoints" / "last.ckpt"
    before = checkpoint_fingerprint(ckpt)
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(ckpt.read_bytes())  # another file, another mtime, the same content
    os.replace(copy, ckpt)
    assert checkpoint_fingerprint(ckpt) == before
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, output=out, progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(20, 30))
    assert record["protocol"]["shards"] == {"0/3": [[0, 10]], "1/3": [[10, 20]]}
    # a checkpoint of other weights (a run trained again to the same step) is another key
    _saved_run(tmp_path, 12)
    assert checkpoint_fingerprint(ckpt) != before


def test_checkpoint_fingerprint_is_of_the_weights_where_torch_wrote_no_crc32(tmp_path):
    # torch.serialization.set_crc32_options(False) (faster saves of big checkpoints) writes
    # every CRC-32 as 0: two runs' checkpoints of other weights at one step had one key, and
    # the eval of the second scored the first one's saved features
    from dit_bench.metrics.evaluate import checkpoint_fingerprint

    g = torch.Generator().manual_seed(0)
    first, second = (torch.randn(64, 64, generator=g) for _ in range(2))
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": first, "global_step": 12}, tmp_path / "a.ckpt")
        torch.save({"w": second, "global_step": 12}, tmp_path / "b.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)  # torch's default
    (tmp_path / "c.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes())  # a copy
    a, b, c = (checkpoint_fingerprint(tmp_path / f"{x}.ckpt") for x in "abc")
    assert a != b and a == c
    # with CRC-32s, the zip directory: the weights, the step, not the file's name
    torch.save({"w": first, "global_step": 12}, tmp_path / "d.ckpt")
    torch.save({"w": second, "global_step": 12}, tmp_path / "e.ckpt")  # the same sizes
    torch.save({"w": first, "global_step": 13}, tmp_path / "f.ckpt")
    d, e, f = (checkpoint_fingerprint(tmp_path / f"{x}.ckpt") for x in "def")
    assert len({d, e, f}) == 3
    with open(tmp_path / "g.tmp", "wb") as file:  # AtomicCheckpointIO: a file, then a rename
        torch.save({"w": first, "global_step": 12}, file)
    assert checkpoint_fingerprint(tmp_path / "g.tmp") == d


def test_the_eval_with_o_takes_the_shards_run_without_it(tmp_path, cache, monkeypatch, capsys):
    # eight GPUs' shards beside RUN_DIR/eval.json, the last eval with -o: it drew all the
    # samples again on one, saying nothing of the shards' files
    run = _saved_run(tmp_path, 12)
    _shards(run, which=(0, 1))
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, output=tmp_path / "e.json", progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(20, 30))
    assert record["protocol"]["shards"] == {"0/3": [[0, 10]], "1/3": [[10, 20]]}
    assert record["protocol"]["resumed_from"] == 20
    assert not list(run.glob("eval.json.*.npz")) and not list(tmp_path.glob("e.json.*.npz"))


def test_the_eval_with_o_names_shard_files_of_another_request_beside_run_dir(
    tmp_path, cache, monkeypatch, capsys
):
    # shards run without -o at another seed, the last eval with -o: it drew every sample again,
    # naming nothing, where the same eval without -o named the files it does not take
    from dataclasses import replace

    run = _saved_run(tmp_path, 12)
    _shards(run, replace(STREAMED, seed=1), which=(0, 1))
    capsys.readouterr()
    calls = _spy_generate(monkeypatch)
    record = evaluate_run(run, STREAMED, output=tmp_path / "e.json", progress=False)
    assert [i for chunk in calls for i in chunk] == list(range(30))
    assert record["protocol"]["shards"] == {}
    err = capsys.readouterr().err
    assert err.count("holds the features of an eval of another request") == 2
    assert str(run / "eval.json.") in err
    assert len(list(run.glob("eval.json.*.shard-*.partial.npz"))) == 2  # left as they were
