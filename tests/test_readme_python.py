"""The README's "From Python" section: its code block runs as it is, and its names exist."""

import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text(encoding="utf-8").split("\n## From Python\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "one runnable block: the one this test runs"
    return blocks[0]


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it trains into ./runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: on shared cores one thread is the fastest
    try:
        namespace: dict = {}
        exec(compile(python_example(), str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "torch.Size([10, 1, 8, 8])"  # what its comment says
    assert "FD-digits-net" in namespace["record"]["metrics"]
    assert (namespace["run"] / "eval.json").is_file()
    assert {"train/loss", "val/loss"} <= set(namespace["metrics"].columns)
    assert namespace["summary"]["steps"] == 50


def test_the_exported_names_resolve_and_import_dit_bench_imports_no_torch():
    import dit_bench
    import dit_bench.train

    for package in (dit_bench, dit_bench.train):
        for name in package.__all__:
            assert callable(getattr(package, name)), name
            assert name in dir(package)
    code = "import sys, dit_bench; dir(dit_bench); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_lazy_exports_are_imported_for_type_checkers_and_ides():
    # an IDE (PyCharm, Pylance) reads the file, never calls __getattr__: without these imports
    # `from dit_bench import load_config` was an unresolved name with no signature or docs
    import ast

    import dit_bench
    import dit_bench.train

    for package in (dit_bench, dit_bench.train):
        tree = ast.parse(Path(package.__file__).read_text(encoding="utf-8"))
        (block,) = [
            n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
        ]
        seen = {
            alias.name: node.module
            for node in block.body
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert sorted(seen) == sorted(package.__all__), package.__name__
        for name, module in seen.items():
            assert getattr(package, name).__module__ == module, name
