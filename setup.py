"""The build is pyproject.toml's; this adds one step to it. dit_bench/shipped/ links to the
repository's ablations/, sweeps/ and configs/, and package-data takes their files through the
links. A checkout without links (git on Windows, core.symlinks=false) has small text files
there instead, naming the targets: its wheel held none of the files, without a word, and the
README's `dit-bench ablate ablations/conditioning.yaml` failed outside a checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SHIPPED = ROOT / "dit_bench" / "shipped"
LINKED = ("ablations", "sweeps", "configs")  # dit_bench/shipped's links (MANIFEST.in's grafts)


class BuildPy(build_py):
    def run(self):
        super().run()
        for name in LINKED:
            if (SHIPPED / name).is_dir():  # a link, or an sdist's copy: package-data took them
                continue
            source = ROOT / name
            if not source.is_dir():  # never a wheel without them
                raise SystemExit(f"{SHIPPED / name} is not a folder, and {source} is missing")
            into = Path(self.build_lib) / "dit_bench" / "shipped" / name
            into.mkdir(parents=True, exist_ok=True)
            for path in sorted(source.glob("*.yaml")):
                shutil.copyfile(path, into / path.name)


setup(cmdclass={"build_py": BuildPy})
