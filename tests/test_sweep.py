"""Sweeps: shipped files validate without training; concurrent workers never duplicate a grid
point; a worker killed mid-trial leaves its trial failed and the trial re-runs on resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from dit_bench.config import ConfigError
from dit_bench.files import engine_url
from dit_bench.sweep import Claims, Heartbeat, load_sweep, make_storage, open_study, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))

# Four grid points of a one-block DiT on 8x8 shapes: a trial trains in about a second.
TINY = {
    "name": "tiny",
    "base": {
        "data": {"name": "shapes", "image_size": 8, "num_samples": 128},
        "backbone": {"name": "dit-xs/4"},
        "objective": {"name": "flow"},
        "train": {
            "batch_size": 8,
            "log_every": 5,
            "val_every": 100000,
            "checkpoint_every": 2,
            "threads": 1,
        },
        "eval": {
            "val_images": 8,
            "use_ema": False,
            "sampler": "euler",
            "sample_steps": 1,
            "samples_per_class": 1,
        },
    },
    "space": {
        "size": {
            "choices": {
                "a": {"backbone.depth": 1, "backbone.hidden_size": 16, "backbone.num_heads": 1},
                "b": {"backbone.depth": 1, "backbone.hidden_size": 32, "backbone.num_heads": 2},
            }
        },
        "backbone.patch_size": {"choices": [2, 4]},
    },
    "budgets": [2.0e6, 8.0e6, 3.2e7],
    "heartbeat": {"interval": 1, "grace": 3, "max_retry": 2},
}


def write_tiny(path: Path, **changes) -> Path:
    spec = json.loads(json.dumps(TINY))
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_study(storage: str, name: str, n_points: int) -> list:
    """All points complete, each exactly once; returns the complete trials."""
    study = optuna.load_study(study_name=name, storage=engine_url(storage))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = [t.user_attrs["point"] for t in done]
    assert len(done) == n_points, [
        (t.number, t.state, t.user_attrs.get("error")) for t in study.trials
    ]
    assert len(set(points)) == n_points, f"duplicated grid points: {points}"
    for t in done:  # every trial records its sizes, compute and curve
        a = t.user_attrs
        for key in ("params", "macs", "flops", "tokens", "train_flops", "curve", "val_loss"):
            assert a[key] is not None, key
        assert a["val_loss"] == t.value
        assert len(t.intermediate_values) == len(a["budget_steps"])  # a value per budget
        assert (Path(a["run_dir"]) / "trial.json").is_file()
        # the machine its losses and timings are of, as the run's summary.json names it
        summary = json.loads((Path(a["run_dir"]) / "summary.json").read_text())
        assert a["device"] == summary["device"], a.get("device")
        # how its val losses were measured: a study continued by a later version mixes them
        for key in ("val_batch", "val_grid", "val_protocol_changed_at"):
            assert a[key] == summary[key], key
    return done


def cli(*args: str, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "dit_bench.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


# -- shipped files: listed and validated, no training ---------------------------------------------
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path):
    raw = yaml.safe_load(path.read_text())
    assert raw.get("profiles"), f"{path.name}: needs cpu and gpu profiles"
    assert {"cpu", "gpu"} <= set(raw["profiles"])
    for profile in raw["profiles"]:
        sweep = load_sweep(path, profile)
        # every grid point builds a valid config (meta device: no weights); the gpu profile's
        # latents are not here: its dry run sizes them as SD-VAE latents and says so
        dry = profile == "gpu"
        sweep.validate(dry_run=dry)
        text = sweep.describe()
        assert ("has no latents yet" in text) == dry
        assert "grid points" in text or "sampled" in text
        if sweep.spec.sampler == "grid":
            assert len(sweep.points()) >= 12, "the cpu profile is a real sweep of >= 12 trials"


def test_gpu_profile_compiles_every_trial_and_graphs_the_small_ones():
    """The shapes-scaling gpu profile trains each trial compiled; S and B (short steps, bound
    by kernel launches) replay CUDA graphs; L and XL checkpoint activations instead (the config
    refuses both). Execution keys: each trial's hash is that of the same run without them."""
    from dit_bench.config import build_config

    sweep = load_sweep(ROOT / "sweeps" / "shapes-scaling.yaml", "gpu")
    sizes = set()
    for params in sweep.points():
        cfg = sweep.plan(params, dry_run=True).cfg
        size = params["size"]
        sizes.add(size)
        assert cfg.train.compile, params
        assert cfg.train.cudagraphs == (size in ("S", "B")), params
        assert cfg.train.activation_checkpointing == (size in ("L", "XL")), params
        # every other block: 1.13x the step of every block, 49 GiB at batch 256 (H200, run 6)
        assert cfg.train.activation_checkpointing_every == (2 if size in ("L", "XL") else 1)
        plain = cfg.model_dump(mode="json")
        plain["train"].update(compile=False, cudagraphs=False, activation_checkpointing=False)
        plain["train"].update(activation_checkpointing_every=1)
        assert build_config(plain).hash == cfg.hash, params
    assert sizes == {"S", "B", "L", "XL"}


def test_the_study_file_is_made_with_the_umask_s_mode(tmp_path):
    # SQLite makes its file 0644 whatever the umask: a group sharing the runs (umask 002)
    # could write every run folder but not the study their sweep goes on in
    old = os.umask(0o002)
    try:
        storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", Heartbeat())
    finally:
        os.umask(old)
    storage.engine.dispose()
    assert (tmp_path / "study.db").stat().st_mode & 0o777 == 0o664
    optuna.create_study(study_name="s", storage=storage)  # an empty file is a database


def test_an_in_memory_study_makes_no_file(tmp_path, monkeypatch):
    # SQLAlchemy's in-memory URLs name no file: "sqlite://" read as the path "sqlite:" made
    # an empty file of that name in the working directory
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite://", "sqlite:///:memory:"):
        make_storage(url, Heartbeat()).engine.dispose()
    assert list(tmp_path.iterdir()) == []


def test_sweep_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        load_sweep(write_tiny(tmp_path / "a.yaml", bogus=1))
    with pytest.raises(ConfigError, match="budgets"):
        load_sweep(write_tiny(tmp_path / "b.yaml", budgets=[-1.0]))
    bad = json.loads(json.dumps(TINY["space"]))
    bad["backbone.patch_size"]["choices"] = [3]  # does not divide 8
    with pytest.raises(ConfigError, match="patch"):
        load_sweep(write_tiny(tmp_path / "c.yaml", space=bad)).validate()
    rng = {**TINY["space"], "optim.lr": {"low": 1e-4, "high": 1e-3, "log": True}}
    with pytest.raises(ConfigError, match="grid needs choices"):
        load_sweep(write_tiny(tmp_path / "d.yaml", space=rng)).validate()
    twice = {**TINY["space"], "backbone.patch_size": {"choices": [4, 4]}}
    with pytest.raises(ConfigError, match="repeated choices"):
        load_sweep(write_tiny(tmp_path / "e.yaml", space=twice))
    steps = {**TINY["space"], "train.steps": {"choices": [10, 20]}}  # the budgets set it
    with pytest.raises(ConfigError, match="train.steps is set by the sweep"):
        load_sweep(write_tiny(tmp_path / "f.yaml", space=steps))
    nested = json.loads(json.dumps(TINY["space"]))
    nested["size"]["choices"]["a"] = {"backbone": {"depth": 1}}  # would drop backbone.name
    with pytest.raises(ConfigError, match="a: backbone is given a mapping"):
        load_sweep(write_tiny(tmp_path / "g.yaml", space=nested))
    # val/loss is the study's objective and the scaling fits': a velocity MSE and an x0 MSE
    # are other quantities, and the envelope took the lower one as the better model
    target = {**TINY["space"], "objective.prediction": {"choices": ["velocity", "x0"]}}
    with pytest.raises(ConfigError, match="val losses are not on one scale: .*prediction x0"):
        load_sweep(write_tiny(tmp_path / "s.yaml", space=target)).validate()
    grid = {**TINY["space"], "eval.val_images": {"choices": [8, 16]}}
    with pytest.raises(ConfigError, match="not on one scale: .*eval.val_images 16"):
        load_sweep(write_tiny(tmp_path / "t.yaml", space=grid)).validate()
    with pytest.raises(ConfigError, match="--set experiment=x: experiment is set by the sweep"):
        load_sweep(write_tiny(tmp_path / "h.yaml"), overrides=["experiment=x"])
    # name and profile make the runs' folder: each trial's config named `experiment`, a key
    # the file never sets; "../x" and past 255 bytes too
    profiles = {"../x": {}, "cpu": {}, "cpu.": {}}
    for name, profile, why in (
        ("_tiny", "cpu", "_tiny-cpu may hold only letters"),
        # folders Windows cannot make: a device (con.x-cpu is CON) or a name ending in '.'
        ("con.x", "cpu", r"con\.x-cpu is a device name on Windows \(CON"),
        ("tiny", "cpu.", r"tiny-cpu\. ends in '\.'"),
        ("tiny", "../x", r"tiny-\.\./x may hold only letters"),
        ("t" * 252, "cpu", "is 256 characters, more than a file name's 255"),
    ):
        with pytest.raises(ConfigError, match=f"name and profile: the runs' folder .*{why}"):
            load_sweep(write_tiny(tmp_path / "n.yaml", name=name, profiles=profiles), profile)
    # a key every trial sets: the --set would reach no run (it was silently dropped)
    for item, param in (
        ("backbone.patch_size=2", "backbone.patch_size"),
        ("backbone.depth=2", "size"),
    ):
        with pytest.raises(ConfigError, match=f"--set {item}: .* set by each trial .*'{param}'"):
            load_sweep(write_tiny(tmp_path / "h.yaml"), overrides=[item])
    # one only some choices set reaches the others' runs: allowed where it agrees with those
    # choices; where it does not, they would keep their own value (trial parameters come after)
    some = json.loads(json.dumps(TINY["space"]))
    some["size"]["choices"]["a"]["train.threads"] = 1
    load_sweep(write_tiny(tmp_path / "k.yaml", space=some), overrides=["train.threads=1"])
    with pytest.raises(ConfigError, match="--set train.threads=2: size=a sets 1, and a trial"):
        load_sweep(write_tiny(tmp_path / "k.yaml", space=some), overrides=["train.threads=2"])
    reversed_range = {**TINY["space"], "optim.lr": {"low": 1e-3, "high": 1e-4}}
    with pytest.raises(ConfigError) as e:  # a range's error only, not the choices' too
        load_sweep(write_tiny(tmp_path / "j.yaml", space=reversed_range, sampler="tpe"))
    assert str(e.value).endswith(
        "invalid sweep:\n  space.optim.lr.high: high=0.0001 must exceed low=0.001"
    )
    # one error, one "trial" prefix
    with pytest.raises(ConfigError) as e:
        load_sweep(write_tiny(tmp_path / "i.yaml", max_steps=1)).validate()
    assert str(e.value).count("trial {") == 1 and "reaches no budget" in str(e.value)


def test_a_profile_set_of_a_key_the_trials_set_is_refused_as_a_set_is(tmp_path):
    """A profile's `set` comes before the trial's parameters as --set does: a key every trial
    sets (or a choice sets to another value) reached no run, silently, where --set is refused."""
    some = json.loads(json.dumps(TINY["space"]))
    some["size"]["choices"]["a"]["train.threads"] = 1
    for sets, message in (
        (
            {"backbone.patch_size": 2},
            "profiles.cpu.set backbone.patch_size=2: backbone.patch_size is set by each trial",
        ),
        ({"backbone.depth": 2}, "profiles.cpu.set backbone.depth=2: .* \\(the space's 'size'\\)"),
        (
            {"train.threads": 2},
            "set train.threads=2: size=a sets 1, and a trial's parameters come after the profile",
        ),
        # named as the profile's, not as the file's `base:` (which has no train.steps)
        ({"train.steps": 5}, "profiles.cpu.set train.steps=5: train.steps is set by the sweep"),
    ):
        path = write_tiny(tmp_path / "p.yaml", space=some, profiles={"cpu": {"set": sets}})
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)
    path = write_tiny(
        tmp_path / "p.yaml", space=some, profiles={"cpu": {"set": {"train.threads": 1}}}
    )
    assert load_sweep(path).base_raw()["train"]["threads"] == 1  # agrees with the choice


def test_the_sweep_dry_run_names_the_set_items(tmp_path):
    # the trial lines show sizes, steps and hashes: a --set on the base (eval.*, the lr) shows
    # nowhere else
    path = write_tiny(tmp_path / "s.yaml")
    assert "--set" not in load_sweep(path).describe()
    text = load_sweep(path, overrides=["optim.lr=3e-4"]).describe()
    assert "  base with --set optim.lr=3e-4" in text.splitlines()


def test_sweep_numbers_are_finite_and_not_booleans(tmp_path):
    # `budgets: [.inf]` (or 1e400, inf to YAML 1.2) passed `> 0` and the dry run died on an
    # OverflowError; lax mode read `yes`, `on` or `true` as 1 (a budget of 1 FLOP, a 1-step cap)
    inf, nan = float("inf"), float("nan")
    for changes, message in (
        ({"budgets": [1e7, inf]}, "budgets.1: Input should be a finite number"),
        ({"budgets": [nan]}, "budgets.0: Input should be a finite number"),
        ({"budgets": [True]}, "budgets: expected a number, got [True]"),
        ({"max_steps": True}, "max_steps: expected a number, got True"),
        ({"seed": True}, "seed: expected a number, got True"),
        ({"heartbeat": {"max_retry": False}}, "heartbeat.max_retry: expected a number"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_sweep(write_tiny(tmp_path / "n.yaml", **changes)).validate(dry_run=True)
    rng = {"optim.lr": {"low": 1e-4, "high": inf, "log": True}}
    with pytest.raises(ConfigError, match="space.optim.lr.high: Input should be a finite"):
        load_sweep(write_tiny(tmp_path / "r.yaml", space=rng, sampler="tpe", n_trials=2))


def test_a_choice_label_yaml_reads_as_a_number_is_refused_with_the_way_out(tmp_path):
    # `2:` or `off:` as a label: the error was the union's, "Input should be a valid list" and
    # "...choices.dict[str,dict[str,any]].0.[key]: Input should be a valid string"
    space = json.loads(json.dumps(TINY["space"]))
    for label, read in ((2, "2"), (False, "False")):
        space["size"]["choices"] = {label: TINY["space"]["size"]["choices"]["a"]}
        with pytest.raises(ConfigError) as e:
            load_sweep(write_tiny(tmp_path / "l.yaml", space=space))
        assert str(e.value).endswith(
            f"invalid sweep:\n  space.size.choices: label {read}: YAML reads it as a "
            f"{'boolean' if label is False else 'number'}; write it in quotes"
        )


def test_budget_steps_follow_the_compute_convention(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    plan = sweep.plan({"size": "b", "backbone.patch_size": 2})
    per_step = 3 * plan.forward_flops * plan.cfg.train.batch_size
    assert plan.forward_flops == 2 * plan.macs
    for budget, step in zip(plan.budgets, plan.budget_steps, strict=True):
        assert (step - 1) * per_step < budget <= step * per_step or step == 1
    assert plan.cfg.train.steps == max(plan.budget_steps)
    assert plan.cfg.experiment == "tiny-cpu"


def test_claims_are_exclusive_under_concurrency(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    study, rdb = open_study(sweep, url)
    wins = []

    def grab(i):
        claims = Claims(make_storage(url, sweep.spec.heartbeat), study._study_id, f"w{i}")
        wins.append(sum(claims.claim(f"k{j}") for j in range(20)))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 20  # every key claimed exactly once


def test_two_sqlite_workers_run_every_point_once(tmp_path):
    # a grace of seconds, not TINY's 3: on a loaded machine a worker's beats can lag that long,
    # its live trial is then failed as stale and retried, and the retry finds the run done
    # (no step lines of its own); the lost-worker paths have tests of their own
    path = write_tiny(tmp_path / "tiny.yaml", heartbeat={"interval": 1, "grace": 30})
    out = tmp_path / "runs"
    # progress on: the workers share one output, so each trial shows lines naming it, no bar
    lines_every_step = {"DIT_BENCH_PROGRESS_EVERY": "0"}
    proc = cli("sweep", str(path), "--out", str(out), "--workers", "2", env_extra=lines_every_step)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    storage = f"sqlite:///{(out / 'tiny-cpu' / 'study.db').resolve()}"
    study = check_study(storage, "tiny-cpu", 4)
    assert len(list((out / "tiny-cpu").glob("*/summary.json"))) == 4
    for t in study:
        label = re.escape(f"[sweep trial {t.number} {t.user_attrs['point']}]")
        assert re.search(rf"^{label} step 1/\d+ ", log, re.M), log
    assert "it/s]" not in log  # no tqdm bar


@pytest.mark.slow  # a worker process, a kill, a grace period and a resume: ~15-60 s
def test_killed_worker_trial_fails_and_reruns_on_resume(tmp_path):
    # long enough trials that the kill lands mid-training, after a checkpoint
    path = write_tiny(tmp_path / "tiny.yaml", budgets=[2.0e6, 2.0e8])
    out = tmp_path / "runs"
    proc = cli(
        "sweep",
        str(path),
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
        start_new_session=True,
    )
    exp = out / "tiny-cpu"
    deadline = time.time() + 180
    while not list(exp.glob("*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker dies mid-trial: no tell, no summary
    proc.wait()
    killed_run = next(exp.glob("*/checkpoints/last.ckpt")).parents[1]
    assert not (killed_run / "summary.json").exists()

    storage = f"sqlite:///{(exp / 'study.db').resolve()}"
    sweep = load_sweep(path)
    run_sweep(sweep, out, storage=storage, workers=1, progress=False)

    study = optuna.load_study(study_name="tiny-cpu", storage=storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "error" not in failed[0].user_attrs
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == failed[0].params
    check_study(storage, "tiny-cpu", 4)
    assert (killed_run / "summary.json").exists()  # the re-run resumed the same run directory
    assert len(list(exp.glob("*/config.yaml"))) == 4


def worker_pids(parent: int) -> list[int]:
    """The sweep's spawned worker processes (children running multiprocessing's spawn)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        if ppid == parent and b"spawn_main" in cmd:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow  # two workers, a kill, a grace period: ~30-90 s
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_dead_worker_is_a_message_and_the_other_finishes_its_trial(tmp_path):
    path = write_tiny(tmp_path / "tiny.yaml", budgets=[2.0e6, 2.0e8])
    out = tmp_path / "runs"
    proc = cli("sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress")
    deadline = time.time() + 180
    while not list((out / "tiny-cpu").glob("*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)  # mid-trial: its trial goes stale, the other re-runs it
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log  # every trial finished: the sweep did its work
    assert "[sweep] 1 of 2 workers died (exit codes [-9]); the others took over" in log, log
    assert "Traceback" not in log, log
    check_study(f"sqlite:///{(out / 'tiny-cpu' / 'study.db').resolve()}", "tiny-cpu", 4)


@pytest.mark.slow  # two workers training, a SIGTERM: ~20-60 s
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_sigterm_to_the_sweep_stops_its_workers_at_once_and_their_trials_rerun(tmp_path):
    """`kill PID` (a preemption, `timeout`) reaches the command's process only: it passes the
    signal on, and each worker fails its trial as stopped (re-run by the next call, not
    counted as a lost worker). The workers trained on for 30 s, then were killed."""
    path = write_tiny(tmp_path / "tiny.yaml", budgets=[2.0e6, 2.0e9])  # trials of minutes
    out = tmp_path / "runs"
    proc = cli("sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress")
    deadline = time.time() + 180
    while len(list((out / "tiny-cpu").glob("*/checkpoints/last.ckpt"))) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    assert len(worker_pids(proc.pid)) == 2
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.time() - t0 < 25, log
    assert "Traceback" not in log, log
    storage = f"sqlite:///{(out / 'tiny-cpu' / 'study.db').resolve()}"
    trials = optuna.load_study(study_name="tiny-cpu", storage=storage).trials
    stopped = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(stopped) == 2 and all(t.state.name == "FAIL" for t in stopped), [
        (t.number, t.state, t.user_attrs) for t in trials
    ]
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_dry_run_lists_the_space(tmp_path, capsys):
    from dit_bench.cli import main

    path = write_tiny(tmp_path / "tiny.yaml")
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "4 trials (grid points)" in text and "size=b,backbone.patch_size=4" in text


def test_the_storage_url_can_stay_off_the_command_line(tmp_path, capsys, monkeypatch):
    # a command line is visible to every user of the machine (`ps`): $DIT_BENCH_STORAGE
    # names the storage, password and all, and --storage still wins over it
    from dit_bench.cli import main

    path = write_tiny(tmp_path / "tiny.yaml")
    (tmp_path / "team").mkdir()
    monkeypatch.setenv("DIT_BENCH_STORAGE", f"sqlite:///{tmp_path / 'team' / 'study.db'}")
    args = ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "runs")]
    assert main(args) == 0
    assert (
        f"storage: sqlite:///{tmp_path / 'team' / 'study.db'} (no study yet"
        in capsys.readouterr().out
    )
    assert main([*args, "--storage", f"sqlite:///{tmp_path / 'own.db'}"]) == 0
    assert f"storage: sqlite:///{tmp_path / 'own.db'} (no study yet" in capsys.readouterr().out


def test_dry_run_lists_what_the_command_line_asks_for(tmp_path, capsys):
    # --n-trials and --workers take the file's place in the listing and in validation: a tpe
    # file without n_trials runs with --n-trials, so its dry run must accept it too
    from dit_bench.cli import main

    path = write_tiny(tmp_path / "tiny.yaml")
    args = ["sweep", str(path), "--dry-run", "--out", str(tmp_path)]
    assert main([*args, "--n-trials", "2", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 trials (grid points)" in text and "workers 1" in text
    space = {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    tpe = write_tiny(tmp_path / "tpe.yaml", space=space, sampler="tpe")
    assert main(["sweep", str(tpe), "--dry-run", "--out", str(tmp_path)]) == 2
    assert "sampler tpe needs n_trials" in capsys.readouterr().err
    assert main(["sweep", str(tpe), "--dry-run", "--out", str(tmp_path), "--n-trials", "3"]) == 0


def test_a_point_no_model_has_fails_its_trial_and_the_sweep_goes_on(tmp_path, capsys):
    # validate() checks a range's corners (16 and 20 build); 17..19 break the head split or
    # the sin-cos table. Such a trial fails with its error, is not retried, and the worker
    # (here the only one) runs the remaining trials.
    base = json.loads(json.dumps(TINY["base"]))
    base["backbone"].update(depth=1, num_heads=2)
    space = {"backbone.hidden_size": {"low": 16, "high": 20, "type": "int"}}
    path = write_tiny(
        tmp_path / "t.yaml", base=base, space=space, sampler="random", n_trials=4, seed=1
    )  # seed 1 draws 18, 19, 16, 17
    from dit_bench.cli import main

    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 1
    printed = capsys.readouterr().out  # the command names the points missing from the report
    assert printed.count("failed: ConfigError: trial {'backbone.hidden_size'") == 3  # 18 19 17
    url = f"sqlite:///{tmp_path / 'runs' / 'tiny-cpu' / 'study.db'}"
    study = optuna.load_study(study_name="tiny-cpu", storage=url)
    sizes = {t.params["backbone.hidden_size"]: t for t in study.trials}
    assert len(study.trials) == 4 and {16, 20} & set(sizes) and set(sizes) - {16, 20}
    for size, t in sizes.items():
        ok = size in (16, 20)
        assert t.state == (optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL)
        assert ok or t.user_attrs["error"].startswith("ConfigError: trial {'backbone.hidden_size'")
    assert not any("retry_of" in t.user_attrs for t in study.trials)


def test_a_sweep_with_trials_left_unfinished_exits_non_zero(tmp_path, capsys, monkeypatch):
    # a trial its worker left running (killed, preempted, out of memory): the command says so
    # and fails, or `dit-bench sweep ... && dit-bench report ...` fits a sweep missing points
    from dit_bench import sweep as sweep_mod
    from dit_bench.cli import main

    study = optuna.create_study()
    study.ask()  # left RUNNING
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *args, **kwargs: study)
    monkeypatch.setattr(sweep_mod, "summarize", lambda study: "summary")
    argv = ["sweep", str(write_tiny(tmp_path / "t.yaml")), "--out", str(tmp_path / "runs")]
    assert main([*argv, "--no-progress"]) == 1
    assert "trials [0] did not finish; run the same command again" in capsys.readouterr().out


def test_a_sweep_whose_every_trial_failed_prints_no_report_command(tmp_path, capsys, monkeypatch):
    # every trial diverged: the command named the failures, then printed a report command to
    # run, which could only be refused (no finished trial, no point to fit)
    from dit_bench import sweep as sweep_mod
    from dit_bench.cli import main

    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("error", "FloatingPointError: non-finite weights at step 4")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *args, **kwargs: study)
    argv = ["sweep", str(write_tiny(tmp_path / "t.yaml")), "--out", str(tmp_path / "runs")]
    assert main([*argv, "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "trial 0  failed: FloatingPointError: non-finite weights at step 4" in printed
    assert "report:" not in printed
    study.tell(study.ask(), 1.0)  # one finished: its point is reported
    assert main([*argv, "--no-progress"]) == 1
    assert "report:  dit-bench report scaling" in capsys.readouterr().out


def test_trial_records_carry_the_preset_sizes_of_a_sweep_over_names(tmp_path):
    # The report names and groups runs by depth, width and patch: a sweep over preset names
    # sets none of them, and recorded None for all (every run one "dNone-wNone" size).
    from dit_bench.report.scaling import tables
    from dit_bench.sweep import trial_record

    space = {"backbone.name": {"choices": ["dit-xs/2", "dit-xs/4", "dit-ti/4", "unet-xs"]}}
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", space=space))
    records = []
    for params in sweep.points():
        rec = trial_record(sweep.plan(params), [{"step": 1, "val_loss": 1.0}])
        records.append({**rec, "trial_params": {}})
    got = [(r["depth"], r["width"], r["heads"], r["patch"]) for r in records]
    assert got == [(4, 128, 4, 2), (4, 128, 4, 4), (6, 192, 3, 4), (1, 32, None, None)]
    runs = tables(records)[0]
    assert runs["size"].nunique() == 3  # the two dit-xs share a size; their patches differ
    # and the setting the sweep does not vary: the report says which objective they trained
    setup = records[0]["setup"]
    cfg = sweep.plan(sweep.points()[0]).cfg
    assert setup["objective.name"] == cfg.objective.name and setup["seed"] == cfg.seed
    assert setup["backbone.conditioning"] == cfg.backbone.conditioning
    assert runs["cfg.data.name"].tolist() == [cfg.data.name] * len(records)


def test_a_sweep_over_preset_names_refuses_a_base_size_that_every_preset_would_keep(tmp_path):
    # A size in the base is an override on whatever preset a trial names: over a base with
    # patch_size 4, "dit-xs/2" and "dit-s/8" both trained at patch 4 (16 tokens), under their
    # names; the report's patch column said 4 for both.
    space = {"backbone.name": {"choices": ["dit-xs/2", "dit-s/8"]}}
    base = json.loads(json.dumps(TINY["base"]))
    base["backbone"]["patch_size"] = 4
    with pytest.raises(ConfigError, match=r"space.backbone.name: dit-xs/2 \(patch_size 2\), but"):
        load_sweep(write_tiny(tmp_path / "b.yaml", space=space, base=base))
    with pytest.raises(ConfigError, match="sets backbone.depth=1, which every trial keeps"):
        load_sweep(write_tiny(tmp_path / "s.yaml", space=space), overrides=["backbone.depth=1"])
    # sizes the space sets (a bundle with the name, another axis) are meant
    bundles = {"size": {"choices": {"a": {"backbone.name": "dit-xs/2", "backbone.patch_size": 4}}}}
    load_sweep(write_tiny(tmp_path / "m.yaml", space=bundles, base=base))
    load_sweep(write_tiny(tmp_path / "p.yaml", space={**space, "backbone.patch_size": {
        "choices": [2, 4]}}, base=base))  # fmt: skip
    load_sweep(write_tiny(tmp_path / "a.yaml", space=space, base=TINY["base"]))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, not optimize
def test_a_lost_trial_is_retried_max_retry_times_and_an_erroring_one_never(tmp_path):
    from dit_bench.sweep import Worker

    hb = {"interval": 1, "grace": 3, "max_retry": 1}
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", heartbeat=hb))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    w = Worker(sweep, url, tmp_path / "runs", name="w", log=lambda m: None)
    w.study, rdb = open_study(sweep, url)
    w.storage = w.study._storage
    w.claims = Claims(rdb, w.study._study_id, "w")
    fail, waiting = optuna.trial.TrialState.FAIL, (optuna.trial.TrialState.WAITING,)

    def lose(trial, **attrs):  # as fail_stale_trials leaves a dead worker's trial
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        w.study.tell(trial, state=fail)

    lose(w.study.ask(), attempt=1)
    lose(w.study.ask(), attempt=1, error="ValueError: bad data")  # would fail again
    w._retry_failed()
    (retry,) = w.study.get_trials(states=waiting)
    assert retry.user_attrs["attempt"] == 2  # max_retry 1: one re-run of the lost trial
    lose(w._pop_waiting())  # its re-run is lost too: attempt 2 > max_retry, no more
    w._retry_failed()
    assert not w.study.get_trials(states=waiting)
    assert len(w.study.trials) == 3
    # a stop the user asked for (Ctrl-C, a preemption's SIGTERM) is no lost worker: however
    # often it happens, the next call re-runs the trial (and did drop it after max_retry)
    lose(w.study.ask(), attempt=2, interrupted=True)
    for _ in range(3):
        w._retry_failed()
        (retry,) = w.study.get_trials(states=waiting)
        assert retry.user_attrs["attempt"] == 2
        lose(w._pop_waiting(), interrupted=True)


def test_a_run_without_its_final_validation_has_no_final_value(tmp_path):
    # a pruned or cut-short run: its last curve row is not the last step, so the trial is not
    # COMPLETE with an earlier value
    from dit_bench.sweep import trial_record

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    plan = sweep.plan(sweep.points()[0])
    last = plan.cfg.train.steps
    early = [{"step": 1, "val_loss": 2.0}]
    assert trial_record(plan, early)["val_loss"] is None
    assert trial_record(plan, [*early, {"step": last, "val_loss": 1.5}])["val_loss"] == 1.5


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, not optimize
def test_dry_run_checks_the_storage_and_makes_nothing(tmp_path, capsys):
    from dit_bench.cli import main

    path, out = write_tiny(tmp_path / "tiny.yaml"), tmp_path / "runs"
    assert main(["sweep", str(path), "--dry-run", "--out", str(out)]) == 0
    assert "no study yet; the first run makes it" in capsys.readouterr().out
    assert not out.exists()  # the default study file's folder is made by the run, not here

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, _ = open_study(load_sweep(path), url)
    study.tell(study.ask(), 1.0)
    study.ask()  # a trial some worker is running
    assert main(["sweep", str(path), "--dry-run", "--storage", url]) == 0
    assert "(study tiny-cpu: 1 complete, 1 running)" in capsys.readouterr().out

    # A URL no run could use fails in the dry run, with a message instead of a traceback.
    for bad in ("nosuchdb://x/y", f"sqlite:///{tmp_path / 'missing' / 'study.db'}"):
        assert main(["sweep", str(path), "--dry-run", "--storage", bad]) == 2
        assert f"storage {bad}" in capsys.readouterr().err


def test_a_changed_base_is_refused_naming_the_settings_that_changed(tmp_path):
    # "base config changed: a --set, the file or its profile" left the user to diff two sweep
    # files (two files of one name, or an edited one) and their --sets to find what differs
    from dit_bench.sweep import storage_status

    path = write_tiny(tmp_path / "t.yaml")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(load_sweep(path, overrides=["train.threads=2"]), url)
    base = json.loads(json.dumps(TINY["base"]))
    base["optim"] = {"lr": 5e-3}
    base["data"]["num_samples"] = 64
    other = load_sweep(write_tiny(tmp_path / "other.yaml", base=base))  # threads: no change
    said = r"base config changed \(data.num_samples 128 -> 64, optim.lr 0.0001 -> 0.005\): "
    with pytest.raises(ConfigError, match=said):
        open_study(other, url)
    with pytest.raises(ConfigError, match=said):
        storage_status(other, url)  # the dry run's
    with pytest.raises(ConfigError, match=r"changed \(optim.lr 0.0001 -> 0.001\): a --set"):
        open_study(load_sweep(path, overrides=["optim.lr=1e-3"]), url)


def test_a_study_of_another_sweep_in_a_given_storage_is_not_kept_apart_by_another_out(tmp_path):
    # Two sweep files of one `name:` on one --storage (a PostgreSQL server shared by machines):
    # the refusal said "give this one another --out", but a study is found by its name in the
    # storage, whatever the --out: the same command with another --out met the same refusal
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_study(load_sweep(write_tiny(tmp_path / "a.yaml")), url)
    other = load_sweep(write_tiny(tmp_path / "b.yaml", budgets=[2.0e6, 8.0e6]))
    with pytest.raises(ConfigError) as e:
        open_study(other, url)
    assert "budgets changed" in str(e.value) and "another --out" not in str(e.value)
    assert "give this one another `name:` in the file (its study's name in this storage, " in (
        str(e.value)
    )


def test_a_postgresql_url_reaches_sqlalchemy_with_the_psycopg_driver(monkeypatch):
    # SQLAlchemy 2.0 reads a bare postgresql:// as psycopg2, not installed: the README's
    # `--storage postgresql://user:pw@host/db` failed there, in sweeps and in reports alike
    import sqlalchemy

    from dit_bench.report import scaling
    from dit_bench.sweep import Heartbeat

    seen = []

    def storage(url, **kw):  # an engine for the UTC sessions' hook, connecting nowhere
        seen.append(url)
        return SimpleNamespace(engine=sqlalchemy.create_engine("sqlite://"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(optuna, "get_all_study_names", lambda storage: seen.append(storage) or [])
    make_storage("postgresql://ann:pw@db.example/studies", Heartbeat())
    assert scaling.study_trials("postgresql://ann:pw@db.example/studies") == {}
    assert len(seen) == 2
    for url in seen:  # named, not left to the SQLAlchemy version's default
        assert sqlalchemy.engine.make_url(url).drivername == "postgresql+psycopg"
        assert sqlalchemy.engine.make_url(url).get_dialect().driver == "psycopg"


def test_a_postgres_url_as_hosted_databases_give_it_opens_with_psycopg():
    # `postgres://` (libpq's other spelling; Heroku's, Render's DATABASE_URL) reached
    # SQLAlchemy as is: "Can't load plugin: sqlalchemy.dialects:postgres"
    import sqlalchemy

    url = sqlalchemy.engine.make_url(engine_url("postgres://ann:pw@db.example/studies"))
    assert url.drivername == "postgresql+psycopg" and url.get_dialect().driver == "psycopg"
    assert (url.username, url.host, url.database) == ("ann", "db.example", "studies")
    spelled = "postgresql+psycopg2://ann@db.example/studies"  # a driver named: left as it is
    assert engine_url(spelled) == spelled


def test_a_sweep_leaves_the_callers_optuna_settings_as_it_found_them(tmp_path):
    # From a notebook: after a sweep Optuna stayed at WARNING (the user's own studies logged no
    # trial lines) and its experimental warnings stayed ignored
    import warnings

    verbosity = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.INFO)
        filters = list(warnings.filters)
        run_sweep(load_sweep(write_tiny(tmp_path / "t.yaml")), tmp_path / "runs", n_trials=1,
                  workers=1, progress=False)  # fmt: skip
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert warnings.filters == filters
    finally:
        optuna.logging.set_verbosity(verbosity)


def test_tpe_sweep_with_a_pruner_runs_n_trials(tmp_path):
    space = {**TINY["space"], "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    path = write_tiny(tmp_path / "t.yaml", space=space, sampler="tpe", n_trials=3,
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})  # fmt: skip
    study = run_sweep(load_sweep(path), tmp_path / "runs", workers=1, progress=False)
    states = [t.state for t in study.trials]
    assert len(states) == 3 and all(
        s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states
    )
    assert all("optim.lr" in t.params for t in study.trials)


def test_a_pruned_trial_is_pruned_at_a_budget_and_says_which(tmp_path, capsys):
    # one model, three learning rates: the median pruner compares at equal compute (the budget
    # index is the step), and the worker's line said "trial 1 pruned: pruned", neither where
    # nor how far
    base = json.loads(json.dumps(TINY["base"]))
    base["backbone"].update(depth=1, hidden_size=16, num_heads=1, patch_size=2)
    space = {"optim.lr": {"choices": [3e-3, 1e-5, 1e-6]}}  # the first learns, the others barely
    pruner = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    path = write_tiny(tmp_path / "t.yaml", base=base, space=space, pruner=pruner)
    study = run_sweep(load_sweep(path), tmp_path / "runs", workers=1, progress=False)
    first, *rest = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert sorted(first.intermediate_values) == [0, 1, 2]  # a value per budget, by its index
    assert rest and all(t.state == optuna.trial.TrialState.PRUNED for t in rest)
    log = capsys.readouterr().err
    for t in rest:
        steps = t.user_attrs["budget_steps"]
        assert sorted(t.intermediate_values) == [0]  # pruned at the first budget
        said = f"trial {t.number} pruned: pruned at budget 2e+06 (step {steps[0]} of {steps[-1]})"
        assert said in log, log
        record = json.loads((Path(t.user_attrs["run_dir"]) / "trial.json").read_text())
        assert record["state"] == "PRUNED" and record["val_at_budget"][1:] == [None, None]


def test_trial_records_carry_the_in_training_fd(tmp_path):
    # with eval.fd_every on, a trial records its FD (as it does its val loss) on the trial and
    # in trial.json, and the curve keeps it at the steps it was measured
    from dit_bench.report.scaling import tables
    from dit_bench.sweep import read_curve, trial_record

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"), overrides=["eval.fd_every=4"])
    plan = sweep.plan(sweep.points()[0])
    last = plan.cfg.train.steps
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,train/loss,val/FD-shapes-net,val/loss\n"
        "1,2.0,,1.9\n"
        "4,1.5,80.0,\n"  # an FD step that is no budget: no curve row of its own
        f"{last},1.0,40.0,0.9\n"
    )
    curve = read_curve(run, plan)
    assert [c.get("val_FD-shapes-net") for c in curve] == [None, 40.0]
    rec = trial_record(plan, curve)
    assert rec["val_loss"] == 0.9 and rec["val_FD-shapes-net"] == 40.0
    runs = tables([{**rec, "state": "COMPLETE"}])[0]
    assert runs["val_FD-shapes-net"].tolist() == [40.0]


def test_a_pruned_trial_names_the_device_its_config_trains_on(tmp_path, monkeypatch):
    # A pruned run stops before its summary.json, so its record names a device by the trial's
    # config: train.accelerator=cpu on a GPU machine trained on the CPU, and the scaling
    # report's devices line said the GPU
    import torch

    from dit_bench.config import build_config
    from dit_bench.sweep import run_device, run_summary

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    cpu = build_config(None, ["train.accelerator=cpu"])
    assert run_device(run_summary(tmp_path), cpu).startswith("cpu (")  # no summary.json there
    assert run_device(run_summary(None), build_config(None, [])) == "Some GPU"  # auto: the GPU
    (tmp_path / "summary.json").write_text('{"device": "NVIDIA H100"}')
    assert run_device(run_summary(tmp_path), cpu) == "NVIDIA H100"  # the run's own word first


def test_a_pruned_trial_names_the_threads_its_config_trained_with(tmp_path):
    # `train` restores the process's thread count when the pruning stops it: read after, the
    # count was the process's, and the report's "Trained on" listed the cpu profile's pruned
    # runs (train.threads: 1) as a second device, "2 threads", beside its complete ones
    import torch

    from dit_bench.config import build_config
    from dit_bench.sweep import run_device, run_summary

    threads = torch.get_num_threads()
    other = threads + 1
    cfg = build_config(None, ["train.accelerator=cpu", f"train.threads={other}"])
    assert run_device(run_summary(tmp_path), cfg).endswith(f", {other} threads)")
    assert torch.get_num_threads() == threads
    default = build_config(None, ["train.accelerator=cpu"])  # no count set: the torch default
    assert run_device(run_summary(tmp_path), default).endswith(f", {threads} threads)")


def test_read_curve_leaves_out_a_val_row_cut_short_by_a_failed_append(tmp_path):
    """metrics.csv appends a log window's row (train.callbacks.CSVMetrics): a write that fails
    partway (a full disk) leaves the row cut short, and the trial's record is read right
    after (Sweep's objective). A val loss cut from 0.4725835 to 0.47258 is no val loss."""
    from dit_bench.sweep import read_curve

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    plan = sweep.plan(sweep.points()[0])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,lr,train/loss,val/loss,val/loss_l0\n"
        "4,0.001,1.5,1.25,1.0\n"
        "6,,,0.47258"  # of 0.4725835,0.61: the write stopped here
    )
    assert [(c["step"], c["val_loss"]) for c in read_curve(run, plan)] == [(4, 1.25)]


@pytest.mark.slow  # two sweep calls, one trial trained: ~15-20 s
def test_a_full_disk_stops_the_sweep_and_the_next_call_runs_the_trial(
    tmp_path, monkeypatch, capsys
):
    """A trial whose training found the disk full failed for good (a training error is not
    retried), as did every trial after it: the sweep, run again once room was made, never ran
    those points. It stops instead, and the next call resumes the trial."""
    import errno

    from dit_bench.cli import main
    from dit_bench.train import run as run_module

    real_train = run_module.train

    def disk_full(cfg, out, **kw):
        monkeypatch.setattr(run_module, "train", real_train)  # room is made after this call
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "last.ckpt"))

    monkeypatch.setattr(run_module, "train", disk_full)
    path = write_tiny(tmp_path / "t.yaml", space={"backbone.patch_size": {"choices": [4]}})
    args = ["sweep", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"dit-bench: [Errno 28] No space left on device: '{tmp_path / 'runs' / 'last.ckpt'}'"
    )
    assert "make room, then run the same command again to resume it" in err
    assert main(args) == 0
    check_study(f"sqlite:///{tmp_path / 'runs' / 'tiny-cpu' / 'study.db'}", "tiny-cpu", 1)


@pytest.mark.slow  # one sweep of two workers, its trials stopped at their first checkpoint: ~20 s
def test_a_full_disk_stops_each_worker_with_its_line_not_a_traceback(tmp_path):
    """With --workers 2 (the shipped command), a worker whose trial found no room printed a
    traceback of 60 lines after its trial's line, and the sweep said its workers had died."""
    import resource

    path = write_tiny(tmp_path / "t.yaml", space={"backbone.patch_size": {"choices": [4, 2]}})
    limit = 4 << 20  # a file-size limit (ulimit -f): a checkpoint is 20 MB, the study 128 KB

    def no_room() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "runs"
    proc = cli("sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress",
               preexec_fn=no_room)  # fmt: skip
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode not in (0, None), text
    assert "make room, then run the same command again to resume it" in text
    assert "Traceback" not in text and "died" not in text, text


def test_the_cpu_profile_quotes_its_trials_sizes():
    # "0.2M-2.2M parameters": the XL trials have 2.45M-2.50M, as the dry run lists them
    sweep = load_sweep(ROOT / "sweeps" / "shapes-scaling.yaml", "cpu")
    sizes = [sweep.plan(p, dry_run=True).num_params for p in sweep.points()]
    quoted = re.search(r"\((\d+\.\d)M-(\d+\.\d)M parameters\)", sweep.spec.profile_description)
    assert quoted, sweep.spec.profile_description
    assert [float(q) for q in quoted.groups()] == [
        round(min(sizes) / 1e6, 1),
        round(max(sizes) / 1e6, 1),
    ]


def test_a_changed_study_names_a_guidance_interval_refused_since_it_was_made(tmp_path):
    # a study made before the config refused an interval between the grid's levels: fixing the
    # interval in the file met "base config changed" naming nothing, as the study's recorded
    # base no longer built
    from dit_bench.sweep import base_changes

    guided = {"sample_steps": 50, "cfg_scale": 3.0}
    old = json.loads(json.dumps(TINY["base"]))
    old["eval"] |= guided | {"cfg_interval": [510, 515]}  # the 50-step grid has 500 and 520
    base = json.loads(json.dumps(TINY["base"]))
    base["eval"] |= guided | {"cfg_interval": [500, 520]}
    sweep = load_sweep(write_tiny(tmp_path / "s.yaml", base=base))
    changes = base_changes(sweep, {"spec": {"base": old}, "overrides": []})
    assert changes == ["eval.cfg_interval [510.0, 515.0] -> [500.0, 520.0]"]


def test_workers_that_die_as_they_start_stop_the_sweep_with_the_way_out(tmp_path, unguarded_script):
    # A script calling run_sweep(workers=2) at its top level, without the `if __name__ ==
    # "__main__":` guard: each spawned worker runs the script again, which refuses to start
    # processes of its own, and dies before any trial. The sweep said only "2 of 2 workers
    # died (exit codes [1, 1]); their trials are left to the next call", which dies alike.
    path = write_tiny(tmp_path / "tiny.yaml")
    last = unguarded_script(
        "from dit_bench.sweep import load_sweep, run_sweep\n"
        f"run_sweep(load_sweep({str(path)!r}, 'cpu'), {str(tmp_path / 'runs')!r}, workers=2, "
        "progress=False)\n"
    )
    assert "RuntimeError: the sweep's 2 worker processes died as they started" in last
    assert 'if __name__ == "__main__":' in last


def test_a_grid_cut_short_by_n_trials_says_so_when_the_sweep_ends(tmp_path, capsys):
    # it said "study ...: 1 complete" and the report command, as for a whole grid
    from dit_bench.cli import main

    path = write_tiny(tmp_path / "tiny.yaml")
    args = ["sweep", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main([*args, "--n-trials", "1", "--workers", "1"]) == 0  # done as asked
    err = capsys.readouterr().err
    assert "3 of the grid's 4 points never started (n_trials 1); a larger --n-trials" in err


def test_a_trial_finding_its_run_done_by_an_earlier_version_records_that_protocol(tmp_path):
    # the study file removed and the sweep run again: each trial finds its run finished by
    # an earlier version (summary.json without val_batch: noise in batches of
    # train.batch_size), and its record claimed this version's protocol, which the scaling
    # report then took for the run's
    base = json.loads(json.dumps(TINY["base"]))
    base["backbone"].update(depth=1, hidden_size=16, num_heads=1, patch_size=4)
    path = write_tiny(tmp_path / "t.yaml", base=base, space={"optim.lr": {"choices": [1e-3]}})
    out = tmp_path / "runs"
    run_sweep(load_sweep(path), out, workers=1, progress=False)
    exp = out / "tiny-cpu"
    (summary_path,) = exp.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    for key in ("val_batch", "val_grid", "val_protocol_changed_at"):  # as an earlier version
        summary.pop(key)
    summary_path.write_text(json.dumps(summary))
    (exp / "study.db").unlink()
    (trial,) = run_sweep(load_sweep(path), out, workers=1, progress=False).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["run_dir"] == str(summary_path.parent)
    protocol = {k: trial.user_attrs[k] for k in ("val_batch", "val_grid")}
    assert protocol == {"val_batch": None, "val_grid": None}
