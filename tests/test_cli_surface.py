"""The CLI surface is a promise to users: a new flag or subcommand must be added here on
purpose (torchtitan's test_no_new_cli_options), and the README must say the same."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit_bench.cli import build_parser

SURFACE = {
    "train": {"config", "--set", "--output", "--no-progress"},  # --output: also --out, -o
    "show-config": {"config", "--set", "--describe"},
    "sample": {
        "run_dir",
        "--output",
        "--num-samples",
        "--labels",
        "--sampler",
        "--steps",
        "--cfg",
        "--seed",
        "--ncol",
        "--no-ema",
        "--checkpoint",
        "--compile",
        "--device",
        "--no-progress",
    },
    "eval": None,  # checked for presence only below (many metric options)
    "encode-latents": {
        "--vae",
        "--data",
        "--image-size",
        "--output",  # also --out, -o
        "--flip",
        "--shard-size",
        "--batch-size",
        "--device",
        "--no-progress",
    },
    "info": None,
    "ablate": None,
    "sweep": None,
    "report": None,
    "bench": None,
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(sp: argparse.ArgumentParser) -> set[str]:
    out = set()
    for a in sp._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        out.add(max(a.option_strings, key=len) if a.option_strings else a.dest)
    return out


def spellings(sp: argparse.ArgumentParser) -> set[str]:
    """Every option string, aliases included: a documented flag stays whatever else spells it."""
    return {o for a in sp._actions for o in a.option_strings}


def test_subcommands_are_frozen():
    assert set(subcommands()) == set(SURFACE)


def test_core_options_are_frozen():
    subs = subcommands()
    for name, expected in SURFACE.items():
        if expected is not None:
            assert options(subs[name]) == expected, name


def test_design_flags_exist():
    subs = subcommands()
    assert {"--metrics", "--features", "--num-samples", "--compile"} <= spellings(subs["eval"])
    assert {"--profile", "--seeds", "--jobs", "--dry-run", "--set"} <= spellings(subs["ablate"])
    assert {"--profile", "--storage", "--workers", "--n-trials", "--set"} <= spellings(
        subs["sweep"]
    )
    assert {"--json", "--list"} <= spellings(subs["info"])
    assert {"--compile", "--against", "--json", "--precision"} <= spellings(subs["bench"])


def test_version_is_the_installed_packages(capsys):
    # the version a bug report names (summaries record it too, as versions["dit-bench"])
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == ["dit-bench", metadata.version("dit-bench")]


def test_readme_lists_every_subcommand():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in subcommands():
        assert f"dit-bench {name}" in readme, name


def test_ctrl_c_promises_a_resume_only_for_commands_that_resume(monkeypatch, capsys):
    # report, bench, info and show-config keep no partial work: "run the same command again
    # to resume" after a Ctrl-C of a long `report scaling` (its bootstrap) was a false promise
    from dit_bench import cli

    def interrupted(args):
        raise KeyboardInterrupt

    runs = {
        "train": ["train", "c.yaml"],
        "encode-latents": ["encode-latents", "--vae", "v", "--data", "shapes", "--out", "o"],
        "report": ["report", "scaling", "runs", "-o", "rep"],
        "bench": ["bench"],
        "info": ["info"],
        "show-config": ["show-config", "c.yaml"],
    }
    runs["encode-latents"] += ["--image-size", "8"]
    for command, argv in runs.items():
        name = "cmd_" + command.replace("-", "_")
        monkeypatch.setattr(cli, name, interrupted)
        assert cli.main(argv) == 130, command
        err = capsys.readouterr().err
        resumes = command in ("train", "encode-latents")
        assert ("to resume" in err) == resumes, (command, err)
        if not resumes:
            assert "run the same command again to start over" in err


def test_help_and_usage_errors_import_no_torch():
    # `dit-bench sample --help` and a mistyped flag (exit 2) took 2.5-3 s on the CPU machine,
    # all of it importing torch (through dit_bench.config, and torch.cuda for
    # encode-latents' --device default) before argparse looked at the command line
    names = sorted(subcommands())
    code = f"""
import contextlib, io, sys
from dit_bench.cli import main
for argv in [["--help"], *[[n, "--help"] for n in {names!r}], ["info", "--no-such-flag"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == (2 if "--no-such-flag" in argv else 0), (argv, e.code)
print(sorted(m for m in ("torch", "lightning", "pydantic") if m in sys.modules))
"""
    root = Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_report_commands_import_no_torch(tmp_path):
    # `report` reads tables (pandas, scipy, matplotlib), yet every command imported
    # dit_bench.config, and torch with it, for the error types main() catches: 3 s of a
    # report's 8 on the 2-core CPU. `from dit_bench import ConfigError` imported torch too.
    from test_report_ablation import make_source
    from test_scaling import fake_sweep

    ablation = make_source(tmp_path)
    fake_sweep(tmp_path / "sweep")
    code = f"""
import sys
from dit_bench import ConfigError
from dit_bench.cli import main
assert main(["report", "ablation", {str(ablation)!r}, "-o", {str(tmp_path / "a")!r}]) == 0
assert main(["report", "scaling", {str(tmp_path / "sweep")!r}, "-o", {str(tmp_path / "s")!r}]) == 0
print(sorted(m for m in ("torch", "lightning", "optuna") if m in sys.modules))
"""
    root = Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_path_options_given_with_equals_expand_a_home_tilde(tmp_path, monkeypatch):
    # the shell expands ~ only at a word's start: `--out=~/runs` arrived as "~/runs" and
    # trained into a folder named ~ in the working directory (one `rm -rf ~` from a disaster)
    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path / "x")
    parse = build_parser().parse_args
    for argv, dest in [
        (["train", "--out=~/x"], "out"),
        (["ablate", "a.yaml", "--out=~/x"], "out"),
        (["sweep", "s.yaml", "--out=~/x"], "out"),
        (["sample", "run", "--output=~/x"], "output"),
        (["eval", "run", "--output=~/x"], "output"),
        (["eval", "run", "--inception=~/x"], "inception"),
        (["report", "ablation", "runs", "--output=~/x"], "output"),
        (["bench", "--csv=~/x"], "csv"),
        (["encode-latents", "--vae=~/x", "--data=shapes", "--image-size=8", "--out=~/x"], "out"),
        (["encode-latents", "--vae=~/x", "--data=shapes", "--image-size=8", "--out=o"], "vae"),
    ]:
        assert getattr(parse(argv), dest) == home, argv
    assert parse(["train"]).out == "runs"


def test_every_option_says_what_it_does():
    # `dit-bench sample --help` showed a bare `--seed SEED`: the one flag that decides which
    # samples come out, with no word on its default or on the per-sample seed rule
    for name, sp in subcommands().items():
        for a in sp._actions:
            assert a.help, (name, a.option_strings or a.dest)


def test_readme_describes_every_config_key():
    # ten keys a user sets all the time (train.label_dropout, train.val_every,
    # eval.sample_steps, ...) appeared nowhere in the README: only show-config's bare names
    # and the pydantic models said they exist
    import re

    from dit_bench.config import DDPMConfig, ExperimentConfig, FlowConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = []
    for section, field in ExperimentConfig.model_fields.items():
        models = (DDPMConfig, FlowConfig) if section == "objective" else (field.annotation,)
        for model in models:
            for key in getattr(model, "model_fields", {}):
                # `section.key`, or the key in a YAML example or a list such as
                # backbone.depth/hidden_size/num_heads
                if f"{section}.{key}" not in readme and not re.search(
                    rf"(?<![\w.]){key}(?=[:=`/])", readme
                ):
                    missing.append(f"{section}.{key}")
    assert not missing, missing


def test_a_reader_that_stops_reading_ends_the_command_successfully(tmp_path, monkeypatch):
    # `dit-bench info --list | head`: the reader has what it wanted; a pipeline under
    # `set -o pipefail` must not fail on it
    from dit_bench import cli

    class ClosedPipe:
        def __init__(self):
            self.file = (tmp_path / "stdout").open("w")  # what the handler points at devnull

        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            pass

        def fileno(self):
            return self.file.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["info", "dit-s/2"]) == 0


def test_eval_metrics_are_read_as_typed_with_spaces(monkeypatch, capsys):
    # `--metrics "fd, kid"`, as a list is written in prose: " kid" is no unknown metric
    from dit_bench import cli
    from dit_bench.metrics import evaluate

    asked = []

    def evaluate_run(run_dir, request, **kwargs):
        asked.append(request.metrics)
        raise KeyboardInterrupt  # the request is all this test needs

    monkeypatch.setattr(evaluate, "evaluate_run", evaluate_run)
    assert cli.main(["eval", "some-run", "--metrics", "fd, kid,"]) == 130
    assert asked == [("fd", "kid")]


def test_encode_latents_of_a_built_in_data_set_needs_no_root(tmp_path, monkeypatch, capsys):
    # `--data shapes`: NAME alone, no ROOT (a data.root is refused for a built-in set)
    from dit_bench import cli
    from dit_bench.data import latents

    sources = []

    def encode_latents(vae, source, out, **kwargs):
        sources.append(source)
        raise KeyboardInterrupt

    monkeypatch.setattr(latents, "encode_latents", encode_latents)
    argv = ["encode-latents", "--vae", str(tmp_path), "--data", "shapes", "--image-size", "32"]
    assert cli.main([*argv, "--out", str(tmp_path / "lat")]) == 130, capsys.readouterr().err
    assert [(s.name, s.root) for s in sources] == [("shapes", None)]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_guidance_scale_that_is_no_number_is_refused_as_it_is_parsed(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "some-run", "--cfg", value])
    assert f"--cfg: expected a guidance scale >= 0 (1: no guidance), got '{value}'" in (
        capsys.readouterr().err
    )


# `dit-bench CMD` as a shell runs it, with CMD blocking until stopped (no work, no CPU)
BLOCKING_COMMAND = """
import sys, time
from dit_bench import cli
def cmd_info(args):
    print("started", file=sys.stderr, flush=True)
    time.sleep(10)
cli.cmd_info = cmd_info
sys.argv = ["dit-bench", "info"]
sys.exit(cli.main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and shells")
def test_ctrl_c_of_a_command_in_a_shell_loop_stops_the_loop(tmp_path):
    """`for s in 0 1 2; do dit-bench train ...; done` and Ctrl-C: the terminal signals the shell
    and the command alike, and a shell goes on with its loop when the command exits by itself
    (130: "it handled the Ctrl-C"), so the next training started. A command that dies of the
    SIGINT, as Python itself does, stops the loop; the shell's $? is 130 all the same."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (tmp_path / "cmd.py").write_text(BLOCKING_COMMAND)
    script = f'for i in 1 2; do "{sys.executable}" cmd.py; echo "next after $?" >&2; done'
    root = Path(__file__).parent.parent
    proc = subprocess.Popen(
        [bash, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        start_new_session=True,  # its own process group, as a terminal's foreground job
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr.readline() == "started\n"
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "dit-bench: interrupted; run the same command again to start over" in err, err
    assert "next after" not in err and "started" not in err, err
    assert "Traceback" not in err, err
    assert proc.returncode == -signal.SIGINT, err  # the shell itself stopped by the Ctrl-C


def test_ctrl_c_while_torch_loads_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    # the first seconds of every command import torch: a Ctrl-C then (a mistyped run folder
    # seen on the screen) printed 40 lines of torch's import machinery
    from dit_bench import cli

    class Interrupted:
        def find_spec(self, name, path=None, target=None):
            if name == "dit_bench.config":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "dit_bench.config")  # put back as it was afterwards
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    try:  # imported by the command itself (show-config's), inside main's handlers
        assert cli.main(["show-config"]) == 130
    except KeyboardInterrupt:  # not raised on: it would stop pytest itself
        pytest.fail("the Ctrl-C left main() (the command printed its traceback)")
    err = capsys.readouterr().err
    assert err == "\ndit-bench: interrupted; run the same command again to start over\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_error_on_the_way_out_of_a_ctrl_c_is_the_interruption(tmp_path):
    # a Ctrl-C that cut an import short (scipy's, under `eval`) left half a module, and the
    # command ended in numpy's AttributeError: 40 lines of traceback, exit status 1
    script = """
import os, signal, sys
from dit_bench import cli
def cmd_info(args):
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        raise AttributeError("module 'numpy._core' has no attribute '_multiarray_umath'")
cli.cmd_info = cmd_info
sys.argv = ["dit-bench", "info"]
sys.exit(cli.main())
"""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stderr == "\ndit-bench: interrupted; run the same command again to start over\n"
    assert proc.returncode == -signal.SIGINT  # died of the SIGINT: the shell's $? is 130


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and pipes")
def test_ctrl_c_of_a_command_whose_reader_is_gone_still_dies_of_it(tmp_path):
    # `dit-bench ... | tee log` and Ctrl-C: tee dies of it too, and the output still buffered
    # for it could not be flushed on the way out: "Exception ignored in atexit callback", a
    # BrokenPipeError's traceback, and the command exited 130 by itself (a shell loop went on)
    script = """
import os, signal, sys
from dit_bench import cli
def cmd_info(args):
    read, write = os.pipe()
    os.close(read)  # the reader, gone
    os.dup2(write, sys.stdout.fileno())
    print("a line for the reader")  # buffered: stdout is no terminal
    os.kill(os.getpid(), signal.SIGINT)
cli.cmd_info = cmd_info
sys.argv = ["dit-bench", "info"]
sys.exit(cli.main())
"""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("PYTHONUNBUFFERED", None)  # the line stays in stdout's buffer
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stderr == "\ndit-bench: interrupted; run the same command again to start over\n"
    assert proc.returncode == -signal.SIGINT


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_ctrl_c_tests_pass_in_a_suite_started_with_sigint_ignored():
    # `pytest ... &` in a script: the shell starts it with SIGINT ignored, and the Ctrl-C
    # tests failed (no KeyboardInterrupt in-process, none in the commands they start)
    root = Path(__file__).parent.parent
    tests = [
        "tests/test_sweep_invariants.py::test_a_second_stop_while_one_is_held_acts_at_once",
        "tests/test_cli_surface.py::test_an_error_on_the_way_out_of_a_ctrl_c_is_the_interruption",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]


def test_one_concept_has_one_flag_in_every_command():
    # a user moving between commands types the spelling the last one taught: `eval --n 500`
    # (sample's) was argparse's "ambiguous option: --n could match --num-samples, --no-ema,
    # --no-anchors", `bench --batch-size` (eval's) and `eval --no-progress` (train's) unknown
    parse = build_parser().parse_args
    assert parse(["eval", "run", "--n", "500"]).num_samples == 500
    assert parse(["eval", "run", "--num-samples", "500"]).num_samples == 500
    assert parse(["sample", "run", "--num-samples", "8"]).n == 8
    assert parse(["sample", "run", "--n", "8"]).n == 8
    assert parse(["bench", "--batch-size", "8"]).batch == 8
    assert parse(["bench", "--batch", "8"]).batch == 8
    latents = ["encode-latents", "--vae", "v", "--data", "shapes", "--image-size", "8"]
    for argv in (["sample", "run"], ["eval", "run"], [*latents, "--out", "o"], ["bench"]):
        assert parse([*argv, "--no-progress"]).quiet and parse([*argv, "--quiet"]).quiet
    assert parse(["ablate", "a.yaml", "--workers", "2"]).jobs == 2  # sweep's word
    assert parse(["sweep", "s.yaml", "--jobs", "2"]).workers == 2  # ablate's
    for argv in (["train"], ["ablate", "a.yaml"], ["sweep", "s.yaml"]):
        assert parse([*argv, "--no-progress"]).no_progress and parse([*argv, "--quiet"]).no_progress
    for argv in (["sample", "run"], ["eval", "run"], [*latents, "--out", "o"], ["bench"]):
        assert parse(argv).device == "auto", argv  # bench's word for it, everywhere
        assert parse([*argv, "--device", "cuda:1"]).device == "cuda:1", argv


def test_a_command_that_writes_takes_every_output_spelling():
    # `dit-bench report ablation runs/x --out reports/x` after `ablate --out`, or `train -o
    # runs` after `report -o`: "unrecognized arguments"; each command's own spelling stays its
    # main one, first in its help (its usage line)
    subs = subcommands()
    latents = ["encode-latents", "--vae", "v", "--data", "shapes", "--image-size", "8"]
    writers = {
        "train": (["train"], "out", "--out"),
        "ablate": (["ablate", "a.yaml"], "out", "--out"),
        "sweep": (["sweep", "s.yaml"], "out", "--out"),
        "encode-latents": (latents, "out", "--out"),
        "sample": (["sample", "run"], "output", "-o"),
        "eval": (["eval", "run"], "output", "-o"),
        "report": (["report", "ablation", "runs"], "output", "-o"),
    }
    for command, (argv, dest, main) in writers.items():
        for flag in ("--out", "-o", "--output"):
            assert vars(subs[command].parse_args([*argv[1:], flag, "x"]))[dest] == "x", flag
            assert vars(subs[command].parse_args([*argv[1:], f"{flag}=~/x"]))[dest] == (
                os.path.expanduser("~/x")
            )
        (action,) = [a for a in subs[command]._actions if a.dest == dest]
        assert action.option_strings[0] == main, command
        assert f"[{main} " in subs[command].format_usage() or f" {main} " in (
            subs[command].format_usage()
        ), command


@pytest.mark.parametrize("command", ["sample", "eval", "encode-latents"])
def test_a_device_that_is_no_device_is_refused_as_it_is_parsed(command, capsys):
    argv = {"encode-latents": ["--vae", "v", "--data", "shapes", "--image-size", "8"]}
    argv = [command, *argv.get(command, ["run"])] + ["--out", "o"] * (command == "encode-latents")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--device", "gpu"])
    assert e.value.code == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_every_option_with_a_default_names_it():
    # `sample --n` said "number of samples", not that it draws 64; eval's --batch-size,
    # --seed and --checkpoint, ablate --jobs, encode-latents --shard-size likewise
    for name, sp in subcommands().items():
        for a in sp._actions:
            if a.default is None or a.default is False or isinstance(a, argparse._HelpAction):
                continue
            assert "default" in a.help, (name, a.option_strings, a.default)


def test_sample_and_eval_run_on_the_gpu_torch_sees(monkeypatch, capsys):
    # sample kept load_module's CPU module where eval moved it to the GPU: a DiT-XL/2 grid on
    # a GPU machine was drawn on its CPU
    import torch

    from dit_bench import cli
    from dit_bench.metrics import evaluate
    from dit_bench.train import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    moved = []

    class Module:
        def to(self, device):
            moved.append(device)
            raise KeyboardInterrupt  # where it samples is all this test needs

    def evaluate_run(run_dir, request, device=None, **kwargs):
        moved.append(device)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "load_module", lambda run_dir, checkpoint: Module())
    monkeypatch.setattr(evaluate, "evaluate_run", evaluate_run)
    for argv in (["sample", "run"], ["eval", "run"]):
        assert cli.main(argv) == 130
        assert cli.main([*argv, "--device", "cuda:1"]) == 130
        assert cli.main([*argv, "--device", "cpu"]) == 130
    assert moved == ["cuda", "cuda:1", "cpu"] * 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    capsys.readouterr()
    assert cli.main(["sample", "run", "--device", "cuda"]) == 2
    assert "dit-bench: --device cuda: torch" in capsys.readouterr().err
    assert cli.main(["eval", "run", "--device", "cuda:2"]) == 2
    assert capsys.readouterr().err.endswith("sees no GPU\n")


@pytest.mark.parametrize(
    "sets",
    [
        [],  # the demo: flow, euler
        ["objective.name=ddpm", "eval.sampler=ddim", "eval.cfg_interval=[1, 500]"],
        ["experiment='2.0e3'", "optim.betas=[0.5, 0.9]", "data.name=latents", "data.root=a b"],
    ],
)
def test_show_config_describe_says_what_each_key_means_and_loads_back(sets, capsys):
    # a user meeting train.accumulate_grad_batches in show-config's output had to search the
    # README for what it means and takes, though the config's models say it
    import yaml

    from dit_bench import cli
    from dit_bench.config import EXECUTION_KEYS, ExperimentConfig, _Loader, build_config

    argv = [a for s in sets for a in ("--set", s)]
    assert cli.main(["show-config", *argv]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["show-config", "--describe", *argv]) == 0
    out = capsys.readouterr().out
    cfg = build_config(yaml.load(out, Loader=_Loader))
    header = f"# config hash {cfg.hash}\n"
    assert out.startswith(header) and plain.startswith(header)
    assert cfg == build_config(yaml.load(plain, Loader=_Loader))
    assert max(map(len, out.splitlines())) <= 100  # a terminal's width

    lines = out.splitlines()
    comments = " ".join(line.split("# ", 1)[1] for line in lines if "# " in line)
    for section, field in ExperimentConfig.model_fields.items():
        model = type(getattr(cfg, section))
        for key, info in getattr(model, "model_fields", {section: field}).items():
            if info.description:  # wrapped: its words in order, line breaks aside
                assert " ".join(info.description.split()) in comments, (section, key)

    def comment(key):
        (line,) = [line for line in lines if line.lstrip().startswith(f"{key}:")]
        return line.split("  # ", 1)[1]

    assert comment("strategy") == "one of: auto, ddp, fsdp (not hashed)"  # a Literal
    assert "objective:" in lines and lines[lines.index("objective:") + 1].endswith(
        "# one of: ddpm, flow"
    )  # the section's tag: every objective, not the Literal of the one chosen
    assert comment("lr") == "> 0"  # a bound
    assert comment("ema_decay") == "in [0, 1)"
    assert comment("betas") == "each in [0, 1)"  # bounds of a tuple's elements
    assert comment("image_size").endswith("; > 0, or null")
    assert comment("accumulate_grad_batches") == "> 0 (not hashed)"
    assert comment("fd_features").endswith("inception, null")
    marked = {line.split(":")[0].strip() for line in lines if "not hashed" in line}
    assert {key for _, key in EXECUTION_KEYS} <= marked
    assert "tf32" not in marked and "steps" not in marked


def test_readme_shows_show_config_describe():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    usage = [line for line in readme.splitlines() if line.startswith("dit-bench show-config [")]
    assert usage and "[--describe]" in usage[0]
