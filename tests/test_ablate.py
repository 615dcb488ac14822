"""Ablation files: every shipped one validates; expansion; stop-anywhere-and-rerun (tiny runs)."""

import json
import signal
from pathlib import Path

import lightning as L
import pytest
import yaml

from dit_bench.ablate import describe, load_ablation, parse_seeds, run_ablation
from dit_bench.cli import main
from dit_bench.config import ConfigError, read_yaml
from dit_bench.train.run import find_run_dir

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

ABLATIONS = sorted((Path(__file__).parent.parent / "ablations").glob("*.yaml"))


# -- shipped files ------------------------------------------------------------------------------
def test_the_issue_s_ablations_are_shipped():
    names = {p.stem for p in ABLATIONS}
    assert {"conditioning", "objectives", "backbones"} <= names


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.name)
def test_shipped_ablation_validates_in_every_profile(path, tmp_path, latents_root):
    profiles = list(read_yaml(path)["profiles"])
    assert {"cpu", "gpu"} <= set(profiles)
    for profile in profiles:
        ab = load_ablation(path, profile)  # builds (validates) every variant x seed config
        assert len(ab.runs) == len(ab.variants) * len(ab.seeds) and len(ab.seeds) >= 3
        assert ab.base_variant in ab.variants
        assert len({r.cfg.hash for r in ab.runs}) == len(ab.runs)  # no two runs collide
        assert {r.cfg.experiment for r in ab.runs} == {f"{ab.name}-{profile}"}
        # the dry run sizes every run (gpu profiles name a latent folder: give it a manifest)
        text = describe(ab, tmp_path / "runs")  # gpu: sized as SD-VAE latents, and says so
        assert text.count(" new") == len(ab.runs)
        assert ("has no latents yet" in text) == (ab.runs[0].cfg.data.name == "latents")
        root = latents_root if profile == "gpu" else None
        if root is not None:
            ab = load_ablation(path, profile, overrides=[f"data.root={root}"])
        text = describe(ab, tmp_path / "runs")
        assert text.count(" new") == len(ab.runs)


def test_conditioning_ablation_is_dit_figure_5_plus_matched_families():
    path = next(p for p in ABLATIONS if p.stem == "conditioning")
    ab = load_ablation(path, "cpu")
    by = {r.variant: r.cfg for r in ab.runs}
    assert [by[v].backbone.conditioning for v in ("adaln_zero", "adaln", "cross_attn")] == [
        "adaln_zero",
        "adaln",
        "cross_attn",
    ]
    assert by["in_context"].backbone.conditioning == "in_context"
    assert by["mmdit"].backbone.name.startswith("mmdit") and by["uvit"].backbone.name.startswith(
        "uvit"
    )
    from dit_bench.ablate import cost

    macs = {v: cost(c)["macs"] for v, c in by.items()}
    for v in ("mmdit", "uvit"):  # matched MACs: within 10% of the base
        assert abs(macs[v] / macs["adaln_zero"] - 1) < 0.1, (v, macs)
    gpu = load_ablation(path, "gpu")
    assert gpu.runs[0].cfg.backbone.name == "dit-xl/2" and gpu.runs[0].cfg.train.steps == 400_000


# -- expansion rules ----------------------------------------------------------------------------
TINY_BASE = {
    "data": {"name": "digits"},
    "backbone": {"name": "dit-xs/4", "conditioning": "adaln_zero"},
    "optim": {"lr": 1e-3, "ema_decay": 0.9},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "log_every": 2,
        "val_every": 3,
        "checkpoint_every": 2,
        "threads": 1,
    },
    "eval": {"val_images": 16, "samples_per_class": 1, "sample_steps": 2},
}


def write_ablation(tmp_path: Path, **changes) -> Path:
    raw = {
        "name": "tiny",
        "base": TINY_BASE,
        "variants": {"adaln_zero": {}, "adaln": {"backbone.conditioning": "adaln"}},
        "seeds": [0, 1],
        "metrics": ["val_loss"],
        "profiles": {"cpu": {"set": {"train.steps": 6}}, "gpu": {"set": {"train.steps": 9}}},
        **changes,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_override_order_base_profile_variant_cli_seed(tmp_path):
    path = write_ablation(
        tmp_path,
        profiles={
            "cpu": {
                "set": {"train.steps": 7, "optim.lr": 2e-3},
                "variants": {"adaln": {"train.steps": 8}},
            }
        },
    )
    ab = load_ablation(path, "cpu", seeds=[3], overrides=["optim.lr=5e-4"])
    steps = {r.variant: r.cfg.train.steps for r in ab.runs}
    assert steps == {"adaln_zero": 7, "adaln": 8}
    assert {r.cfg.optim.lr for r in ab.runs} == {5e-4}
    assert [r.seed for r in ab.runs] == [3, 3] and ab.runs[0].cfg.seed == 3
    assert parse_seeds("0,1,2") == (0, 1, 2) and parse_seeds("2-4") == (2, 3, 4)


def test_the_dry_run_names_the_set_items_beside_the_file_s_description(tmp_path):
    """The profile's description is the file's ("500 steps x 32 images"): a `--set` that
    changes what it says, or an eval key no column shows, is named in the listing."""
    path = write_ablation(tmp_path, profiles={"cpu": {"description": "6 steps", "set": {}}})
    plain = describe(load_ablation(path, "cpu"), tmp_path / "runs")
    assert "--set" not in plain
    sets = ["train.steps=3", "eval.cfg_scale=1"]
    text = describe(load_ablation(path, "cpu", overrides=sets), tmp_path / "runs")
    assert "  with --set train.steps=3 --set eval.cfg_scale=1 on every run" in text.splitlines()


def test_a_variant_switching_objective_or_family_starts_afresh_from_the_profiles_keys(tmp_path):
    # the profile's keys lie under the variant's: its DDPM schedule and DiT conditioning are
    # not carried into a flow variant or a U-Net variant
    path = write_ablation(
        tmp_path,
        variants={
            "ddpm": {},
            "flow": {"objective.name": "flow"},
            "unet": {"backbone.name": "unet-xs"},
        },
        profiles={
            "cpu": {"set": {"objective.schedule": "cosine", "backbone.conditioning": "adaln"}}
        },
    )
    by = {r.variant: r.cfg for r in load_ablation(path, "cpu", seeds=[0]).runs}
    assert by["ddpm"].objective.schedule == "cosine" and by["ddpm"].backbone.conditioning == "adaln"
    assert by["flow"].objective.name == "flow" and by["flow"].backbone.conditioning == "adaln"
    assert by["unet"].backbone.conditioning == "adagn" and by["unet"].objective.schedule == "cosine"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"variants": {"a": {"backbone.conditioning": "film"}}}, ["variant 'a'", "conditioning"]),
        ({"variants": {"a": {"train.stepz": 3}}}, ["variant 'a'", "stepz", "unknown key"]),
        ({"variants": {"a": {}, "b": {"train.steps": 6}}}, ["'a' and 'b'", "same config"]),
        # compiled vs eager: an execution key, left out of the hash
        (
            {"variants": {"eager": {}, "compiled": {"train.compile": True}}},
            ["share their runs: train.compile only says how a run executes", "dit-bench bench"],
        ),
        ({"base_variant": "zzz"}, ["base_variant"]),
        ({"seeds": [0, 0]}, ["repeated"]),
        # a count reads as "three seeds"; it ran one, seed 3
        ({"seeds": 3}, ["seeds: 3 is one number", "[3] for seed 3", "[0, 1, 2] for 3 seeds"]),
        ({"colour": 1}, ["unknown keys", "colour"]),
        # a mapping would replace the base's whole backbone section (its name too)
        ({"variants": {"a": {"backbone": {"conditioning": "adaln"}}}}, ["backbone.conditioning"]),
        ({"variants": {"a/b": {}}}, ["variant name 'a/b'"]),
        # samples/aux.png: a device on Windows, whatever the case or extension; a plan made on
        # Linux failed there after all the training
        (
            {"variants": {"a": {}, "Aux": {"optim.lr": 2e-3}}},
            ["variant name 'Aux': the report's samples/Aux.png is a device name on Windows (AUX"],
        ),
        # the runs' folder <name>-<profile>: each run's config named `experiment`, a key the
        # file never sets
        ({"name": "ünï"}, ["name and profile: the runs' folder ünï-cpu may hold only letters"]),
        ({"name": "t" * 252}, ["the runs' folder tttt", "is 256 characters"]),
        # samples/<variant>.png past a file name's 255 bytes: the report failed after training
        ({"variants": {"a": {}, "v" * 252: {"optim.lr": 2e-3}}}, ["variant name 'vvvv", "251"]),
        # samples/<variant>.png: one file on a case-insensitive file system (macOS, Windows)
        (
            {"variants": {"adaln": {}, "AdaLN": {"backbone.conditioning": "adaln"}}},
            ["'adaln' and 'AdaLN' differ only in case"],
        ),
        ({"metrics": []}, ["non-empty list"]),
        ({"metrics": ["val_los"]}, ["unknown 'val_los'"]),
        ({"profiles": {"cpu": 5}}, ["profiles.cpu must be a mapping"]),
        # silently replaced per run (a seed made two variants "the same config")
        ({"variants": {"a": {}, "b": {"seed": 5}}}, ["variants.b: seed is set by the ablation"]),
        # an FD the runs do not log would be missing from the report after all the training
        ({"metrics": ["val_FD-digits-net"]}, ["does not compute val_FD-digits-net", "no FD"]),
        (
            {"metrics": ["val_FID"], "base": {**TINY_BASE, "eval": {"fd_every": 6}}},
            [
                "variant 'adaln_zero' (profile cpu) does not compute val_FID; its runs log "
                "val_FD-digits-net"
            ],
        ),  # fmt: skip
        ({"profiles": {"cpu": {"metrics": ["fid"]}}}, ["profiles.cpu.metrics: unknown 'fid'"]),
        # DDPM's default grid has 10 levels: l10 would never be logged
        ({"metrics": ["val_loss_l10"]}, ["val_loss_l10: the val-loss grid", "levels 0..9"]),
        (
            {"profiles": {"cpu": {"set": {"experiment": "x"}}}},
            ["profiles.cpu.set: experiment is set by the ablation"],
        ),
        # a misspelt profile key would train the base's sizes under the profile's name
        (
            {"profiles": {"cpu": {"sets": {"train.steps": 6}}}},
            ["profiles.cpu: unknown keys ['sets']"],
        ),
        # the base's seed would be replaced by each run's without a word
        ({"base": {**TINY_BASE, "seed": 3}}, ["base: leave out `experiment` and `seed`"]),
    ],
)
def test_bad_ablation_files_are_refused_naming_the_problem(tmp_path, changes, words):
    path = write_ablation(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_ablation(path, "cpu")
    for w in words:
        assert w in str(e.value)
    with pytest.raises(ConfigError, match="no profile 'tpu'"):
        load_ablation(write_ablation(tmp_path), "tpu")
    with pytest.raises(ConfigError, match="the ablation sets seed and experiment"):
        load_ablation(write_ablation(tmp_path), "cpu", overrides=["seed=5"])


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(write_ablation(tmp_path).read_text() + "seeds: [4]\n")
    with pytest.raises(ConfigError, match="twice.yaml: not valid YAML: key 'seeds' given twice"):
        load_ablation(path, "cpu")


def test_a_variant_name_yaml_reads_as_a_number_is_refused_with_the_way_out(tmp_path):
    # `1e-3:` or `off:` (an lr or EMA ablation) reach the file's check as 0.001 and False: it
    # said "use letters, digits, '.', '-' or '_'", which the name as written already did
    path = write_ablation(tmp_path)
    text = path.read_text()
    for name, read in (("1e-3", "0.001"), ("0.5", "0.5"), ("2", "2"), ("off", "False")):
        path.write_text(text.replace("  adaln:\n", f"  {name}:\n"))
        with pytest.raises(ConfigError, match=f"variant name {read}: YAML reads it as a"):
            load_ablation(path, "cpu")
        path.write_text(text.replace("  adaln:\n", f"  '{name}':\n"))
        assert load_ablation(path, "cpu").variants == ("adaln_zero", name)


def test_yaml_merge_keys_are_read_and_only_a_key_written_twice_is_refused(tmp_path):
    # variants sharing settings through an anchor and `<<` (valid YAML): the check for keys
    # given twice built the `<<` key itself, and every such file was "not valid YAML"
    path = write_ablation(tmp_path)
    text = path.read_text().replace(
        "  adaln:\n",
        "  lr: &fast\n    optim.lr: 0.002\n    train.log_every: 2\n"
        "  adaln:\n    <<: *fast\n    train.log_every: 3\n",
    )
    path.write_text(text)
    ab = load_ablation(path, "cpu")
    got = {r.variant: (r.cfg.optim.lr, r.cfg.train.log_every) for r in ab.runs}
    assert got["lr"] == (0.002, 2) and got["adaln"] == (0.002, 3)  # its own key wins
    path.write_text(text.replace("    train.log_every: 3\n", "    optim.lr: 1\n    optim.lr: 2\n"))
    with pytest.raises(ConfigError, match="key 'optim.lr' given twice"):
        load_ablation(path, "cpu")


# -- stop anywhere, run again -------------------------------------------------------------------
class InterruptRun(L.Callback):
    """Ctrl-C at `step` of the `nth` run that starts training (as Lightning sees a Ctrl-C)."""

    def __init__(self, nth: int, step: int):
        self.nth, self.step, self.starts = nth, step, 0

    def on_train_start(self, trainer, pl_module):
        self.starts += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.starts == self.nth and trainer.global_step == self.step:
            raise KeyboardInterrupt


def _snapshot(out: Path) -> dict[str, tuple]:
    return {
        str(p.parent): (p.stat().st_mtime_ns, p.read_text())
        for p in sorted(out.rglob("summary.json"))
    }


def test_interrupted_ablation_reruns_without_losing_or_duplicating_runs(tmp_path, capsys):
    path = write_ablation(tmp_path)
    out = tmp_path / "runs"
    ab = load_ablation(path, "cpu")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of the 3rd of 4 runs
        run_ablation(ab, out, progress=False, callbacks=[InterruptRun(nth=3, step=4)])
    finished = _snapshot(out)
    assert len(finished) == 2
    partial = find_run_dir(out, ab.runs[2].cfg)
    assert (partial / "checkpoints" / "last.ckpt").exists()
    assert not (partial / "summary.json").exists()
    assert "4 new" not in describe(ab, out) and describe(ab, out).count(" partial") == 1

    # run the same command again (the CLI), then once more: nothing lost, redone or duplicated
    assert main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("already finished") == 2 and "resuming" in err
    assert main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 0
    after = _snapshot(out)
    assert len(after) == 4
    assert {k: after[k] for k in finished} == finished  # finished runs untouched
    run_dirs = [p for p in (out / "tiny-cpu").iterdir() if p.is_dir()]
    assert len(run_dirs) == 4  # one directory per (variant, seed), no duplicates
    assert sorted(d.name.split("-")[-1] for d in run_dirs) == sorted(r.cfg.hash for r in ab.runs)
    resumed = json.loads((partial / "summary.json").read_text())
    assert resumed["steps"] == 6
    metrics = (partial / "metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[0]) for line in metrics[1:]]
    assert steps == sorted(set(steps))  # no step logged twice across the interruption

    import pandas as pd

    table = pd.read_csv(out / "tiny-cpu" / "results.csv")
    assert len(table) == 4 and not table.duplicated(["variant", "seed"]).any()
    assert set(table["variant"]) == {"adaln_zero", "adaln"}
    plan = json.loads((out / "tiny-cpu" / "ablation.json").read_text())
    assert plan["base_variant"] == "adaln_zero" and len(plan["runs"]) == 4
    labels = json.loads((partial / "labels.json").read_text())
    assert labels["variant"] == ab.runs[2].variant and labels["seed"] == ab.runs[2].seed
    # a call for one seed keeps every finished run of the ablation in results.csv (the report's
    # view), but not the runs of another --set (another experiment in the same folder)
    # config.yaml files lost in a crash: the plan's runs get theirs back; another run without
    # one is left out of the table, named, instead of breaking it
    dirs = {r.seed: find_run_dir(out, r.cfg) for r in ab.runs if r.variant == "adaln"}
    lost = {seed: run / "config.yaml" for seed, run in dirs.items()}
    kept = lost[0].read_text()
    for config in lost.values():
        config.unlink()
    assert main(["ablate", str(path), "--out", str(out), "--no-progress", "--seeds", "1"]) == 0
    assert lost[1].is_file() and not lost[0].is_file()
    assert f"skipped {lost[0].parent.name}: no config.yaml" in capsys.readouterr().err
    assert len(pd.read_csv(out / "tiny-cpu" / "results.csv")) == 3
    lost[0].write_text(kept)
    assert main(["ablate", str(path), "--out", str(out), "--no-progress", "--seeds", "1"]) == 0
    assert len(pd.read_csv(out / "tiny-cpu" / "results.csv")) == 4
    plan = json.loads((out / "tiny-cpu" / "ablation.json").read_text())
    assert plan["seeds"] == [0, 1] and len(plan["runs"]) == 4  # the plan keeps seed 0
    lr = ["--set", "optim.lr=2e-3", "--seeds", "0"]
    assert main(["ablate", str(path), "--out", str(out), "--no-progress", *lr]) == 0
    assert len(pd.read_csv(out / "tiny-cpu" / "results.csv")) == 2
    # the report follows the plan: the lr runs, not pooled with the first four
    assert main(["report", "ablation", str(out / "tiny-cpu"), "-o", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Left out: 4 finished runs" in md and "2 finished runs: 2 variants x seeds [0]" in md


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_failing_run_does_not_stop_the_others(tmp_path, capfd, monkeypatch, jobs):
    variants = {
        "adaln_zero": {},
        "diverges": {"optim.lr": 1e30},
        "adaln": {"backbone.conditioning": "adaln"},
    }
    path = write_ablation(tmp_path, variants=variants, seeds=[0])
    out = tmp_path / "runs"
    # progress on, not a terminal (and --jobs workers share one): lines naming their run
    monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", "0")  # a line every step (spawned too)
    argv = ["ablate", str(path), "--out", str(out), "--jobs", str(jobs)]
    assert main(argv) == 1
    printed = capfd.readouterr()
    err = printed.err
    for label in ("ablate run 1/3 adaln_zero seed 0", "ablate run 3/3 adaln seed 0"):
        assert f"[{label}] step 1/" in err, err
    assert "it/s]" not in printed.out + err  # no tqdm bar
    assert (
        "dit-bench: 1 run(s) failed:\n  run 2 diverges seed 0: FloatingPointError: non-finite"
        in err
    )
    assert "Traceback" not in err  # the divergence message says what to fix
    import pandas as pd

    table = pd.read_csv(out / "tiny-cpu" / "results.csv")  # the runs after it trained too
    assert sorted(table["variant"]) == ["adaln", "adaln_zero"]
    assert "(and .parquet): 2 of 3 runs" in printed.out
    # the printed report command works, names the variant that has no runs, and (a scratch
    # --out) writes beside the runs, not over the repo's reports/
    (hint,) = [line for line in printed.out.splitlines() if line.startswith("report:")]
    words = hint.split()[2:]  # drop "report:" and "dit-bench"
    assert words[-1] == str(out / "tiny-cpu" / "report")
    assert main(words) == 0
    md = (out / "tiny-cpu" / "report" / "report.md").read_text()
    assert "Not finished: diverges seed 0 (planned" in md


def _finished_run(out: str, cfg) -> str:
    """The run directory train() leaves for `cfg` once finished (config and summary only)."""
    run = Path(out) / cfg.experiment / f"20260101T000000Z-{cfg.hash}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    summary = {"experiment": cfg.experiment, "config_hash": cfg.hash, "seed": cfg.seed}
    (run / "summary.json").write_text(json.dumps({**summary, "val_loss": 0.5}))
    return str(run)


def _worker_killed_by_lr_half(cfg_dict: dict, out: str, progress: bool, label: str) -> str:
    """ablate's worker, without training (fast): the run with optim.lr 0.5 kills its own
    process as the OOM killer would, each time. adaln_zero, submitted beside it, does not end
    its first try (the broken pool terminates it, so it is in flight at the death); every
    other try leaves a finished run at once, as train() would."""
    import os
    import time

    from dit_bench.config import build_config

    cfg = build_config(cfg_dict)
    if cfg.optim.lr == 0.5:
        os.kill(os.getpid(), signal.SIGKILL)
    tried = Path(out) / "tried-adaln_zero"
    if label.split()[3] == "adaln_zero" and not tried.exists():  # "ablate run i/n variant ..."
        tried.touch()
        # a fixed half second after the death, as before, lost the race to the pool's
        # noticing it on a loaded machine
        time.sleep(120)
    return _finished_run(out, cfg)


def test_a_pool_broken_between_two_runs_gives_its_queue_to_the_next_pool(tmp_path):
    """A worker died (idle, or as its run ended) before the pool saw it: the next submit raises
    BrokenProcessPool. That run never started: it stays queued, nothing is counted against it,
    and the ablation goes on in a new pool. It aborted with a traceback and no results."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from dit_bench import ablate

    ab = load_ablation(write_ablation(tmp_path, seeds=[0]), "cpu")
    queue = list(ab.runs)
    done: list[int] = []

    class BreaksOnTheSecondRun:
        runs = 0

        def submit(self, fn, *args):
            fut: Future = Future()
            if fn is ablate._worker:
                self.runs += 1
                if self.runs == 2:
                    raise BrokenProcessPool("A child process terminated abruptly")
            fut.set_result("run-dir")
            return fut

    def failed(r, e):
        raise AssertionError(f"run {r.index} failed: {e}")

    in_flight = ablate._train_in_pool(
        BreaksOnTheSecondRun(), queue, 1, {}, tmp_path, len(ab.runs),
        lambda r, path: done.append(r.index), failed, False,
    )  # fmt: skip
    assert in_flight == [] and done == [1]
    assert [r.index for r in queue] == [2]  # for the next pool, first, never started


@pytest.mark.slow  # spawned pools (3 of them) import torch: 20-60 s
def test_a_worker_killed_twice_fails_its_run_and_the_others_finish(tmp_path, capsys, monkeypatch):
    # one worker killed (OOM killer, kill -9) broke the pool: an uncaught BrokenProcessPool
    # traceback, the healthy worker's run stopped, no results.csv and no failed run named
    from dit_bench import ablate

    monkeypatch.setattr(ablate, "_worker", _worker_killed_by_lr_half)
    variants = {"adaln_zero": {}, "killed": {"optim.lr": 0.5}, "adaln": {"backbone.depth": 3}}
    path = write_ablation(tmp_path, variants=variants, seeds=[0])
    out = tmp_path / "runs"
    argv = ["ablate", str(path), "--out", str(out), "--no-progress", "--jobs", "2"]
    assert main(argv) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    assert (
        "dit-bench: 1 run(s) failed:\n  run 2 killed seed 0: BrokenProcessPool: its worker "
        "process died at two tries in a row" in printed.err
    )
    # the first death: both runs in flight are tried again, the healthy one finishes
    assert "in flight: adaln_zero seed 0, killed seed 0; trying adaln_zero seed 0, " in printed.err
    assert "run 1/3 adaln_zero seed 0 done" in printed.err
    import pandas as pd

    table = pd.read_csv(out / "tiny-cpu" / "results.csv")
    assert sorted(table["variant"]) == ["adaln", "adaln_zero"]
    assert "(and .parquet): 2 of 3 runs" in printed.out


def test_report_hint_of_default_runs_names_the_repo_reports_folder():
    from dit_bench.cli import _report_command

    hint = _report_command("scaling", Path("runs") / "shapes-cpu", "runs")
    assert (
        hint
        == f"dit-bench report scaling {Path('runs/shapes-cpu')} -o {Path('reports/shapes-cpu')}"
    )


def test_report_hint_quotes_a_runs_folder_with_spaces():
    """macOS folders have spaces (~/Documents/My Runs): the printed command must paste back into
    a shell as one argument per path, as the command recorded for the report does."""
    import shlex

    from dit_bench.cli import _report_command

    out = "/Users/ada/My Runs"
    root = Path(out) / "tiny-cpu"
    words = shlex.split(_report_command("ablation", root, out))
    assert words == ["dit-bench", "report", "ablation", str(root), "-o", str(root / "report")]


def test_an_ablation_with_no_finished_run_points_to_no_results(tmp_path, capsys):
    base = {**TINY_BASE, "optim": {**TINY_BASE["optim"], "lr": 1e30}}  # every run diverges
    path = write_ablation(tmp_path, base=base, seeds=[0])
    out = tmp_path / "runs"
    assert main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "2 run(s) failed" in printed.err and "results:" not in printed.out
    assert not (out / "tiny-cpu" / "results.csv").exists()


def test_a_damaged_plan_record_is_named_before_anything_trains(tmp_path, capsys):
    # an ablation.json cut short (a copied folder) said "Expecting value: line 1 column 1"
    path = write_ablation(tmp_path, seeds=[0])
    plan = tmp_path / "runs" / "tiny-cpu" / "ablation.json"
    plan.parent.mkdir(parents=True)
    plan.write_text("")
    assert main(["ablate", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"dit-bench: {plan}: unreadable")
    assert sorted(p.name for p in plan.parent.iterdir()) == [".ablation.lock", "ablation.json"]


def test_dry_run_trains_nothing(tmp_path, capsys):
    path = write_ablation(tmp_path)
    out = tmp_path / "runs"
    assert main(["ablate", str(path), "--dry-run", "--out", str(out), "--seeds", "0,1,2"]) == 0
    text = capsys.readouterr().out
    assert "6 runs" in text and text.count(" new") == 6 and "estimated training compute" in text
    assert "params" in text and "MACs" in text
    assert not out.exists()


def test_dry_runs_import_no_lightning_nor_pandas(tmp_path):
    # sizing a plan builds its nets on the meta device: importing Lightning for it (train.module's
    # build_net, train.run's find_run_dir) was 6 s of a 13 s `ablate --dry-run` of the
    # conditioning ablation on the 2-core CPU, and of a 15 s `sweep --dry-run`; the report's
    # pandas and scipy (the scaling report's, for a finished sweep) were 1 s of the latter
    import subprocess
    import sys

    from test_sweep import write_tiny

    ablation, sweep, out = write_ablation(tmp_path), write_tiny(tmp_path / "s.yaml"), tmp_path / "r"
    code = (
        "import sys; from dit_bench.cli import main; "
        f"assert main(['ablate', {str(ablation)!r}, '--dry-run', '--out', {str(out)!r}]) == 0; "
        f"assert main(['sweep', {str(sweep)!r}, '--dry-run', '--out', {str(out)!r}]) == 0; "
        "print(sorted(m for m in ('lightning', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.slow
def test_parallel_jobs_train_every_run_once(tmp_path):
    path = write_ablation(tmp_path)
    out = tmp_path / "runs"
    ab = load_ablation(path, "cpu")
    run_ablation(ab, out, jobs=2, progress=False)
    assert len(_snapshot(out)) == 4
    assert len([p for p in (out / "tiny-cpu").iterdir() if p.is_dir()]) == 4


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (reparented to a PID 1 that does not reap)


def _training_in_two_workers(tmp_path, base: dict):
    """`ablate --jobs 2` of one seed of two variants started in a process of its own, returned
    once both workers train (each run has a checkpoint): (the parent, the workers' pids)."""
    import subprocess
    import sys
    import time

    path = write_ablation(tmp_path, base=base, seeds=[0], profiles={"cpu": {}})
    cmd = [sys.executable, "-m", "dit_bench.cli", "ablate", str(path), "--jobs", "2"]
    parent = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "runs"), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list((tmp_path / "runs" / "tiny-cpu").glob("*/checkpoints/last.ckpt"))) < 2:
        assert parent.poll() is None and time.time() < deadline, "the workers did not train"
        time.sleep(0.2)
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
    workers = [int(p) for p in children if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, children
    return parent, workers


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_parallel_ablation_leaves_no_worker_training(tmp_path, sig):
    # `kill PID`, `timeout`, a preemption (SIGTERM) or the OOM killer (SIGKILL) stopped the
    # parent alone: its pool's workers trained on as orphans, holding locks and ~1 GB each.
    import time

    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 100000}}
    parent, workers = _training_in_two_workers(tmp_path, base)
    parent.send_signal(getattr(signal, sig))
    parent.wait(timeout=60)
    deadline = time.time() + 60
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(map(_alive, workers)), f"workers still running after the parent's {sig}"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_sigterm_stops_a_parallel_ablation_in_a_workers_long_evaluation(tmp_path):
    """A SIGTERM reaches the workers while they sample for the in-training FD (minutes here):
    they stop at once, as at a step. With Lightning's own SIGTERM handler they stopped only at
    the next step's end, after the FD, and the parent waited for them."""
    import time

    base = {
        **TINY_BASE,
        "train": {**TINY_BASE["train"], "steps": 100000, "val_every": 1000},
        "eval": {**TINY_BASE["eval"], "fd_every": 3, "fd_samples": 4000, "sample_steps": 250},
    }
    parent, workers = _training_in_two_workers(tmp_path, base)
    time.sleep(5)  # step 3's FD has begun: 4000 samples of 250 steps
    t0 = time.time()
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=120)
    assert time.time() - t0 < 20, f"the parent waited {time.time() - t0:.0f} s for its workers"
    assert not any(map(_alive, workers))


def _no_room_for_lr_half(cfg_dict: dict, out: str, progress: bool, label: str) -> str:
    """ablate's worker, without training (fast): the run with optim.lr 0.5 finds the disk full
    until `<out>/room` exists (room made); the others leave a finished run as train() would."""
    import errno

    from dit_bench.config import build_config

    cfg = build_config(cfg_dict)
    if cfg.optim.lr == 0.5 and not (Path(out) / "room").exists():
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "last.ckpt"))
    return _finished_run(out, cfg)


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_full_disk_stops_the_ablation_and_the_next_call_finishes_it(
    tmp_path, capsys, monkeypatch, jobs
):
    """A run that found the disk full (a quota, ulimit -f) was failed and the ablation went on:
    every later run failed at its first checkpoint too, each with its line. It stops, as the
    sweep does, saying what to do; the same command, with room made, finishes the plan."""
    from dit_bench import ablate

    monkeypatch.setattr(ablate, "_worker", _no_room_for_lr_half)
    monkeypatch.setattr(
        ablate,
        "_train_one",
        lambda cfg, out, progress, label, callbacks=(): _no_room_for_lr_half(
            cfg.to_dict(), out, progress, label
        ),
    )
    variants = {"adaln_zero": {}, "full": {"optim.lr": 0.5}, "adaln": {"backbone.depth": 3}}
    path = write_ablation(tmp_path, variants=variants, seeds=[0])
    out = tmp_path / "runs"
    argv = ["ablate", str(path), "--out", str(out), "--no-progress", "--jobs", str(jobs)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"dit-bench: [Errno 28] No space left on device: '{out / 'last.ckpt'}'"
    )
    assert "run 2/3 full seed 0 stopped: [Errno 28]" in err
    assert "make room, then run the same command again to resume it" in err
    assert "FAILED" not in err and "failed" not in err and "Traceback" not in err, err
    if jobs == 1:  # the run after it never started
        assert "adaln seed 0" not in err.replace("adaln_zero", "")
    (out / "room").touch()
    assert main(argv) == 0
    import pandas as pd

    table = pd.read_csv(out / "tiny-cpu" / "results.csv")
    assert sorted(table["variant"]) == ["adaln", "adaln_zero", "full"]


def test_workers_that_die_as_they_start_stop_the_ablation_with_the_way_out(
    tmp_path, unguarded_script
):
    # A script calling run_ablation(jobs=2) at its top level, without the `if __name__ ==
    # "__main__":` guard: each spawned worker runs the script again, which refuses to start
    # processes of its own, so the worker dies before any run starts. The pool died with no
    # run in flight, none counted as a suspect, and a new pool took over, for ever (an hour
    # of tracebacks, a new pair of workers every few seconds).
    path = write_ablation(tmp_path, seeds=[0])
    last = unguarded_script(
        "from dit_bench.ablate import load_ablation, run_ablation\n"
        f"run_ablation(load_ablation({str(path)!r}, 'cpu'), {str(tmp_path / 'runs')!r}, "
        "jobs=2, progress=False)\n"
    )
    assert "RuntimeError: the ablation's worker processes died as they started" in last
    assert 'if __name__ == "__main__":' in last
