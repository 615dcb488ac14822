"""The architecture reads from the folders: backbones/ and objectives/ know nothing of
Lightning, Optuna or pandas, and report/ never imports torch or a model. Every module of each
package is imported in a fresh interpreter (a new file is covered as it lands), and what it
pulled in is checked."""

import subprocess
import sys

import pytest

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

CODE = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
bad = sorted({{b for b in {banned!r} for m in sys.modules if m == b or m.startswith(b + ".")}})
assert not bad, bad
"""


@pytest.mark.parametrize(
    "package, banned",
    [
        ("dit_bench.backbones", ("lightning", "optuna", "pandas", "dit_bench.train")),
        ("dit_bench.objectives", ("lightning", "optuna", "pandas", "dit_bench.train")),
        ("dit_bench.report", ("torch", "lightning", "dit_bench.backbones", "dit_bench.train")),
    ],
)
def test_each_layer_imports_only_what_the_architecture_allows(package, banned):
    code = CODE.format(package=package, banned=set(banned))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
