"""dit_bench.files: a file is replaced whole or not at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from dit_bench import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), files.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_text_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """The rename may reach the disk before the data: the data is synced first, or a power cut
    could leave an empty file where the old one was."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    files.write_json_atomic(tmp_path / "plan.json", {"a": 1})
    assert calls == ["fsync", "replace"]
    assert (tmp_path / "plan.json").read_text() == '{\n  "a": 1\n}\n'


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """A C (or Latin-1, or Windows) locale without Python's UTF-8 mode: the shipped config
    holds "§" and ablation reports write "–" and "·"; both failed with the ascii codec."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from pathlib import Path;"
        "from dit_bench import files; from dit_bench.config import read_yaml;"
        "read_yaml('configs/dit-b4-imagenet256.yaml');"
        "p = Path(sys.argv[1]); files.write_text_atomic(p, 'a \\u2013 b \\u00b7 c')"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "report.md")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.md").read_bytes() == "a \u2013 b \u00b7 c".encode()


def test_metrics_csv_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    from dit_bench.train.callbacks import CSVMetrics

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    log = CSVMetrics(tmp_path / "metrics.csv")
    log.log_metrics({"train/loss": 0.5}, step=2)
    log.flush()
    log.log_metrics({"val/loss": 0.25}, step=4)  # a new column: the file written whole again
    log.flush()
    assert calls == ["fsync", "replace"] * 2
    assert (
        tmp_path / "metrics.csv"
    ).read_bytes() == b"step,train/loss,val/loss\r\n2,0.5,\r\n4,,0.25\r\n"


def test_a_lock_file_planted_as_a_link_leaves_its_target_alone(tmp_path):
    # a shared runs folder's `.<hash>.lock -> ~/.bashrc`: the next to train there had their
    # file truncated and overwritten with the lock holder's line
    from dit_bench.config import load_config
    from dit_bench.train.run import _run_lock

    cfg = load_config(None)
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("export PATH=~/bin:$PATH\n")
    folder = tmp_path / "runs" / cfg.experiment
    folder.mkdir(parents=True)
    (folder / f".{cfg.hash}.lock").symlink_to(victim)
    with pytest.raises(OSError, match="a symbolic link"), _run_lock(tmp_path / "runs", cfg):
        pass
    (tmp_path / "missing").symlink_to(tmp_path / "home" / "made")
    with pytest.raises(OSError, match="a symbolic link"), files.locked(tmp_path / "missing"):
        pass
    assert victim.read_text() == "export PATH=~/bin:$PATH\n"
    assert sorted(p.name for p in victim.parent.iterdir()) == [".bashrc"]


def test_a_record_the_disk_has_no_room_for_names_its_file(tmp_path, file_size_limit):
    """A write that fails for space names no file ("[Errno 28] No space left on device", all a
    command printed): the record's path is added; the old record stays, no temporary left."""
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(OSError) as e, file_size_limit(1000):
        files.write_json_atomic(path, {"x": "y" * 100_000})
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_the_disk_has_no_room_for_is_an_os_error_naming_it(tmp_path, file_size_limit):
    """torch.save to a path said "[enforce fail at inline_container.cc:672] . unexpected pos
    ..." (a RuntimeError: `train` died with a traceback and no word of the disk)."""
    from dit_bench.train.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 4, "w": torch.zeros(10)}, path)
    with pytest.raises(OSError) as e, file_size_limit(64 * 1024):
        io.save_checkpoint({"step": 8, "w": torch.zeros(100_000)}, path)
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
    assert io.load_checkpoint(path)["step"] == 4  # the resume point is the earlier one
    assert list(path.parent.iterdir()) == [path]


def test_a_metrics_row_the_disk_has_no_room_for_names_the_file(tmp_path, file_size_limit):
    from dit_bench.train.callbacks import CSVMetrics, read_metrics

    path = tmp_path / "metrics.csv"
    log = CSVMetrics(path)
    log.log_metrics({"train/loss": 0.5}, step=2)
    log.log_metrics({"train/loss": 0.25}, step=4)  # step 2's row written
    log.flush()  # appended
    size = path.stat().st_size
    log.log_metrics({"train/loss": 0.125}, step=6)
    with pytest.raises(OSError) as e, file_size_limit(size + 3):
        log.flush()
    assert e.value.errno == errno.EFBIG and e.value.filename == str(path)
    resumed = CSVMetrics(path, resume_step=4)  # the row cut short is dropped on resume
    resumed.log_metrics({"train/loss": 0.125}, step=6)
    resumed.flush()
    assert [r["step"] for r in read_metrics(path)] == ["2", "4", "6"]


def test_a_last_metrics_row_cut_mid_number_is_left_out(tmp_path):
    """A write stopped partway (a kill, a full disk) in a row's last value leaves every field
    of the row: "12,0.1234" written as "12,0.12" was kept, with 0.12 for its loss. CSVMetrics
    ends every row with a newline; a last line without one is cut short."""
    from dit_bench.train.callbacks import CSVMetrics, read_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n2,0.5\n12,0.12")
    assert read_metrics(path) == [{"step": "2", "train/loss": "0.5"}]
    resumed = CSVMetrics(path, resume_step=12)  # its checkpoint's step: the row is rewritten
    resumed.log_metrics({"train/loss": 0.1234}, step=12)
    resumed.flush()
    assert [r["train/loss"] for r in read_metrics(path)] == ["0.5", "0.1234"]


def test_an_error_of_a_replacing_block_that_names_no_errno_keeps_its_message(tmp_path):
    # naming() fills in the file of an errno's OSError (a full disk); one raised with a message
    # of its own (open_lock's, a link planted) has no errno to restate and must pass unchanged
    with pytest.raises(OSError, match="a symbolic link"), files.replacing(tmp_path / "a.json"):
        raise OSError("a symbolic link, not a lock file")


@pytest.mark.parametrize("text, held", [("[1, 2]", "a list"), ("null", "nothing"), ("3", "an int")])
def test_a_record_that_is_no_mapping_is_named_not_a_type_error_later(tmp_path, text, held):
    path = tmp_path / "summary.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: holds {held}"):
        files.read_record(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_a_spent_quota_and_a_file_size_limit_are_each_out_of_room(code):
    # each fails again whatever is written next: ablate and sweep stop rather than fail run
    # after run at its first checkpoint
    assert files.out_of_room(OSError(code, os.strerror(code)))
    assert not files.out_of_room(OSError(errno.EACCES, "Permission denied"))
    assert not files.out_of_room(ValueError("no room"))


def test_the_study_file_of_a_storage_url():
    # make_storage, the dry run's line, a changed study's advice and the report each parsed it
    # their own way: "?timeout=" kept in one, `sqlite://` (in memory) an IndexError in another
    assert files.sqlite_file("sqlite:///runs/x/study.db") == Path("runs/x/study.db")
    assert files.sqlite_file("sqlite:////abs/study.db?timeout=60") == Path("/abs/study.db")
    assert files.sqlite_file("sqlite+pysqlite:///s.db") == Path("s.db")
    for url in ("sqlite://", "sqlite:///:memory:", "postgresql://u:p@h/db", "study.db"):
        assert files.sqlite_file(url) is None, url
