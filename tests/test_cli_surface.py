"""The CLI surface is a promise to users: a new flag or subcommand must be added here on
purpose (torchtitan's test_no_new_cli_options), and the README must say the same."""

import argparse
from pathlib import Path

from dit_bench.cli import build_parser

SURFACE = {
    "train": {"config", "--set", "--out", "--no-progress"},
    "show-config": {"config", "--set"},
    "sample": {
        "run_dir",
        "--output",
        "--n",
        "--labels",
        "--sampler",
        "--steps",
        "--cfg",
        "--seed",
        "--ncol",
        "--no-ema",
        "--checkpoint",
        "--compile",
    },
    "eval": None,  # checked for presence only below (many metric options)
    "encode-latents": {
        "--vae",
        "--data",
        "--image-size",
        "--out",
        "--flip",
        "--shard-size",
        "--batch-size",
        "--device",
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


def test_subcommands_are_frozen():
    assert set(subcommands()) == set(SURFACE)


def test_core_options_are_frozen():
    subs = subcommands()
    for name, expected in SURFACE.items():
        if expected is not None:
            assert options(subs[name]) == expected, name


def test_design_flags_exist():
    subs = subcommands()
    assert {"--metrics", "--features", "--num-samples", "--compile"} <= options(subs["eval"])
    assert {"--profile", "--seeds", "--jobs", "--dry-run", "--set"} <= options(subs["ablate"])
    assert {"--profile", "--storage", "--workers", "--n-trials", "--set"} <= options(subs["sweep"])
    assert {"--json", "--list"} <= options(subs["info"])
    assert {"--compile", "--against", "--json", "--precision"} <= options(subs["bench"])


def test_readme_lists_every_subcommand():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in subcommands():
        assert f"dit-bench {name}" in readme, name
