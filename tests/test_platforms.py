"""Windows, read on Linux: what a Windows machine lacks (fcntl, O_NOFOLLOW, symbolic links in a
git checkout) is taken away here, and the commands must still work."""

import ast
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LINKED = ("ablations", "sweeps", "configs")

# POSIX-only modules of the standard library: importing one at a module's top fails every
# command on Windows (`import fcntl` in dit_bench.files, which every command imports)
POSIX_ONLY = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "syslog"}


def module_imports(path: Path) -> Iterator[tuple[str, bool]]:
    """Each module the file at `path` imports absolutely, and whether at its top level (not in
    a function, a class, a try/except or an `if`). tests/test_packaging.py reads it too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name, node.col_offset == 0


def test_no_module_imports_a_posix_only_module_unguarded():
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "dit_bench").rglob("*.py"))
        for name, top in module_imports(path)
        if top and name in POSIX_ONLY
    ]
    assert not found, found


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking's contract: a lock of `n` bytes from the file's position, refused with
    OSError (EDEADLOCK, after LK_NBLCK's one try) while another handle holds one there."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self):
        super().__init__("msvcrt")
        self.held: dict[tuple[int, int], int] = {}
        self.at: list[int] = []

    def locking(self, fd: int, mode: int, n: int) -> None:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        key = (os.fstat(fd).st_ino, pos)
        self.at.append(pos)
        if mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise OSError(errno.EACCES, "not locked")
            del self.held[key]
        elif self.held.setdefault(key, fd) != fd:
            raise OSError(errno.EDEADLOCK, "Resource deadlock avoided")


@pytest.fixture
def windows_files(monkeypatch):
    """dit_bench/files.py as Windows imports it: no fcntl, no O_NOFOLLOW, msvcrt's locks."""
    fake = FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.delattr(os, "O_NOFOLLOW")
    spec = importlib.util.spec_from_file_location("windows_files", ROOT / "dit_bench/files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # was: ModuleNotFoundError: No module named 'fcntl'
    return module, fake


def test_the_locks_work_without_fcntl(windows_files, tmp_path):
    files, fake = windows_files
    path = tmp_path / ".abc.lock"
    with files.open_lock(path) as first, files.open_lock(path) as second:
        assert files.try_lock(first) is None
        holder = files.try_lock(second)
        assert holder.startswith(f"pid {os.getpid()} on "), holder
        # the lock lies past what is written: Windows' locks are mandatory, and one over the
        # holder's line would keep the waiting process from reading it
        assert min(fake.at) > path.stat().st_size
        # the text layer's position is left where it was (note_holder's writes follow it)
        first.seek(0)
        assert first.read() == f"{holder}\n"
        files.unlock(first)
        assert files.try_lock(second) is None
        files.unlock(second)
    with files.locked(tmp_path / ".ablation.lock"):
        assert len(fake.held) == 1
    assert not fake.held


def unlinked_checkout(dst: Path) -> Path:
    """A copy of the repository as git checks it out without symbolic links: each of
    dit_bench/shipped's links a small file holding its target."""
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, dst, symlinks=True, ignore=skip)
    for name in LINKED:
        link = dst / "dit_bench" / "shipped" / name
        target = os.readlink(link)
        link.unlink()
        link.write_text(target)
    return dst


def test_an_editable_install_of_a_checkout_without_links_reads_the_shipped_files(
    tmp_path, monkeypatch, capsys
):
    from dit_bench import cli, config

    src = tmp_path / "src"
    for name in LINKED:
        shutil.copytree(ROOT / name, src / name)
    shipped = src / "dit_bench" / "shipped"
    shipped.mkdir(parents=True)
    for name in LINKED:
        (shipped / name).write_text(os.readlink(ROOT / "dit_bench" / "shipped" / name))
    monkeypatch.setattr(config, "SHIPPED", shipped)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["ablate", "ablations/conditioning.yaml", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err  # was 2: config file not found
    assert "6 variants x 3 seeds = 18 runs" in out
    assert f"installed with dit-bench, {src.resolve()}/ablations/conditioning" in err
    assert config.shipped_or_given("sweeps/nothing.yaml") == "sweeps/nothing.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("via_sdist", [False, True], ids=["wheel", "sdist-then-wheel"])
def test_a_checkout_without_links_builds_a_wheel_with_the_shipped_files(tmp_path, via_sdist):
    src = unlinked_checkout(tmp_path / "src")

    def wheel(folder: Path) -> set[str]:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "."]
        proc = subprocess.run(
            [*cmd, "-w", str(tmp_path)], cwd=folder, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (built,) = tmp_path.glob("dit_bench-*.whl")
        return set(zipfile.ZipFile(built).namelist())

    if via_sdist:  # `python -m build`: the wheel is built from the sdist, not the checkout
        proc = subprocess.run(
            [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (tarball,) = (tmp_path / "sdist").glob("*.tar.gz")
        shutil.unpack_archive(tarball, tmp_path / "unpacked")
        (src,) = (tmp_path / "unpacked").iterdir()
    names = wheel(src)
    for folder in LINKED:  # was: none of them, without a word
        files = sorted((ROOT / folder).glob("*.yaml"))
        assert files
        for path in files:
            assert f"dit_bench/shipped/{folder}/{path.name}" in names


def test_a_ctrl_c_on_windows_exits_130_not_2(monkeypatch):
    """After a Ctrl-C the command dies of SIGINT (cli._die_of_sigint), but Windows' os.kill
    has no SIGINT to send itself: TerminateProcess with exit code 2, dit-bench's usage error."""
    from dit_bench import cli

    killed = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    cli._die_of_sigint(["stopped"])
    assert killed == [cli.signal.SIGINT]  # Linux and macOS: the shell sees it died of it
    monkeypatch.setattr(sys, "platform", "win32")
    killed.clear()
    cli._die_of_sigint(["stopped"])
    assert killed == []  # was [SIGINT]: exit status 2; now main's 130


def test_clean_fid_s_tmp_file_on_windows_is_skipped_saying_why(tmp_path, monkeypatch):
    """clean-fid writes its Inception weights to "/tmp", C:\\tmp on Windows, which has no
    os.getuid: eval with Inception features failed there with an AttributeError."""
    from dit_bench.metrics import features

    path = tmp_path / features.INCEPTION_FILE
    path.write_bytes(b"weights")
    monkeypatch.delattr(os, "getuid")
    assert "every user" in features._untrusted(path)


CHILD = """
import os, sys, time

def child(path):
    os.getppid = lambda: 1  # Windows: getppid() keeps the pid of a parent that has died
    from dit_bench.train.run import exit_with_parent

    exit_with_parent(poll=0.05)
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the worker's state in /proc")
def test_a_worker_exits_with_its_killed_parent_where_getppid_never_changes(tmp_path):
    """ablate --jobs / sweep --workers: a worker watched os.getppid() for its parent's death,
    and on Windows it never changes: the workers of a killed parent trained on as orphans.
    The spawned worker's multiprocessing.parent_process() tells on every platform."""
    import signal
    import time

    def alive() -> bool:
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"  # exited, reparented to a PID 1 that does not reap

    (tmp_path / "windows_child.py").write_text(CHILD)
    pid_file = tmp_path / "pid"
    worker = None
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import multiprocessing as mp, sys, time; sys.path.insert(0, sys.argv[1]); "
            "import windows_child; "
            "mp.get_context('spawn').Process(target=windows_child.child, args=(sys.argv[2],))"
            ".start(); time.sleep(120)",
            str(tmp_path),
            str(pid_file),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None and time.time() < deadline, "the worker did not start"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)  # no cleanup: the worker must notice by itself
        parent.wait(timeout=10)

        deadline = time.time() + 20
        while alive() and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(), "the worker trained on after its parent was killed"
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and alive():
            os.kill(worker, signal.SIGKILL)  # the test's failure, not an orphan left behind
