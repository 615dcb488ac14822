"""What `pip install dit-bench` brings is what the code imports: an import that only works
because another package happens to pull its distribution in breaks when that one stops."""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from test_platforms import module_imports

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """The distributions of `dependencies`, and those of every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}

    extras = set().union(*map(names, project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def imported() -> tuple[set[str], set[str]]:
    """Top-level names of third-party modules dit_bench imports: at module level, and inside
    functions (lazily)."""
    top, lazy = set(), set()
    for path in (ROOT / "dit_bench").rglob("*.py"):
        for mod, at_top in module_imports(path):
            name = mod.split(".")[0]
            if name not in sys.stdlib_module_names and name != "dit_bench":
                (top if at_top else lazy).add(name)
    return top, lazy


def test_every_import_is_declared():
    deps, extras = declared()
    dists = metadata.packages_distributions()
    top, lazy = imported()
    undeclared = {m for m in top if not {canonical(d) for d in dists.get(m, [m])} & deps}
    assert not undeclared, f"imported at module level, not in dependencies: {undeclared}"
    undeclared = {
        m for m in lazy if not {canonical(d) for d in dists.get(m, [m])} & (deps | extras)
    }
    assert not undeclared, f"imported, in neither dependencies nor an extra: {undeclared}"


def test_the_tracker_floors_import_beside_numpy_2():
    # `numpy>=1.24` lets pip keep numpy 2 beside a tracker pinned at its floor: tensorboard
    # before 2.17.1 fails a run's first event (the hyperparameters) on np.string_, wandb before
    # 0.17.2 its import on np.float_ (both gone in numpy 2)
    first = {"tensorboard": (2, 17, 1), "wandb": (0, 17, 2)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = [
        re.fullmatch(r"([a-z]+)>=([\d.]+)", req).groups()
        for reqs in project["optional-dependencies"].values()
        for req in reqs
        if re.match(r"(tensorboard|wandb)\b", req)
    ]
    assert sorted({name for name, _ in floors}) == ["tensorboard", "wandb"]
    for name, floor in floors:
        assert tuple(map(int, floor.split("."))) >= first[name], f"{name}>={floor}"


def package_data() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]


def test_every_file_the_package_reads_is_package_data():
    """A wheel holds a package's .py files and, of the rest, what package-data names: a file
    the code opens beside itself (a feature net's weights, a shipped ablation through
    dit_bench/shipped's links) that no pattern names works in a checkout only."""
    patterns = package_data()
    missing = []
    for folder, dirs, names in os.walk(ROOT / "dit_bench", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            path = Path(folder, name).relative_to(ROOT)
            if path.suffix in (".py", ".pyc"):
                continue
            # the patterns of its nearest package (a folder with __init__.py) and those above
            owners = [p for p in path.parents if (ROOT / p / "__init__.py").is_file()]
            if not any(
                fnmatch.fnmatch(str(path.relative_to(pkg)), pattern)
                for pkg in owners
                for pattern in patterns.get(".".join(pkg.parts), [])
            ):
                missing.append(str(path))
    assert not missing, f"read by the package, not in [tool.setuptools.package-data]: {missing}"


def test_the_shipped_ablation_sweep_and_config_files_are_in_the_package():
    """The README's `dit-bench ablate ablations/conditioning.yaml`, `sweep
    sweeps/shapes-scaling.yaml` and `train configs/...` name files of the repository: a copy
    installed with pip has them only through dit_bench/shipped."""
    from dit_bench.config import SHIPPED

    for folder in ("ablations", "sweeps", "configs"):
        files = sorted(p.name for p in (ROOT / folder).glob("*.yaml"))
        assert files, folder
        assert sorted(p.name for p in (SHIPPED / folder).glob("*.yaml")) == files, folder


def test_readme_commands_from_a_folder_without_the_shipped_files(tmp_path, monkeypatch, capsys):
    """A user's own project folder, not a checkout's root: the installed copy is read, and
    said; a file of that name in the folder wins."""
    from dit_bench import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["ablate", "ablations/conditioning.yaml", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err  # was 2: config file not found

    from dit_bench.config import SHIPPED

    assert "ablation 'conditioning', profile cpu: 6 variants x 3 seeds = 18 runs" in out
    assert f"reading the copy installed with dit-bench, {SHIPPED}/ablations/conditioning" in err
    assert not (tmp_path / "runs").exists()

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dit-b4-imagenet256.yaml").write_text("experiment: mine\n")
    assert cli.main(["show-config", "configs/dit-b4-imagenet256.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "experiment: mine" in out and "installed" not in err
    assert cli.main(["show-config", "configs/nothing.yaml"]) == 2
    assert "config file not found: configs/nothing.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_holds_the_package_data(tmp_path):
    """The wheel itself, built from a copy of the checkout (a build writes build/ and
    *.egg-info beside the sources): the shipped files and the feature nets' weights."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "."]
    proc = subprocess.run(
        [*cmd, "-w", str(tmp_path)], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("dit_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("ablations", "sweeps", "configs"):
        for path in (ROOT / folder).glob("*.yaml"):
            assert f"dit_bench/shipped/{folder}/{path.name}" in names
    for path in (ROOT / "dit_bench" / "metrics" / "nets").iterdir():
        assert f"dit_bench/metrics/nets/{path.name}" in names


def test_the_python_loaders_read_the_shipped_files_from_any_folder(tmp_path, monkeypatch, capsys):
    """A notebook in the user's own folder: `load_ablation("ablations/...")` and the others
    read the installed copies as the commands do (they resolved it in the command line only)."""
    from dit_bench import ConfigError, load_ablation, load_config, load_sweep
    from dit_bench.config import SHIPPED

    monkeypatch.chdir(tmp_path)
    assert load_ablation("ablations/conditioning.yaml").name == "conditioning"
    assert load_sweep("sweeps/shapes-scaling.yaml").spec.name == "shapes-scaling"
    with pytest.raises(ConfigError, match="no manifest.json"):  # read: its latents are not here
        load_config("configs/dit-b4-imagenet256.yaml", [f"data.root={tmp_path}"])
    assert (
        capsys.readouterr().err.count(f"reading the copy installed with dit-bench, {SHIPPED}") == 3
    )
