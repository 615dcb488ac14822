"""Files written whole or not at all: into a temporary file beside the target, then renamed
over it, so a crash or a concurrent reader never sees half of one (run configs, summaries,
manifests, plans, trial records, eval records); locks on them; and the one spelling of a
storage URL that the sweep and the report both open, and the one it is shown and stored in
(`redact`: without its password), and Optuna's process settings kept around their reads.
Standard library only at import: every layer uses it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

try:
    import fcntl
except ImportError:  # Windows: every command imports this module, and failed on the import
    fcntl = None
    import msvcrt

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has none (nor links a user can plant)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the
    block ends without an error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: writers never share
    try:
        with naming(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError of the block that names no file gets `path`: a write or flush that fails
    (a full disk, ENOSPC; a file-size limit, EFBIG) names none, and the commands print the
    message alone ("[Errno 28] No space left on device": of which file, on which disk?)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


# A write refused for room: the disk is full, the user's quota spent, or the process's file
# size limit (ulimit -f) reached; it fails again until room is made, whatever is written
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_room(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_ROOM


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` whole or not at all, on disk before it replaces `path`: a rename can reach the
    disk before the data (XFS, ext4 without auto_da_alloc), and a power cut would then leave
    an empty file where the old one was. Small files only (records, plans, configs): what a
    sync costs a checkpoint of gigabytes, each checkpoint, is left to the writer of that."""
    with replacing(path) as tmp:
        # UTF-8 whatever the locale: reports hold dashes and user text, and a C, Latin-1 or
        # Windows locale would refuse them or write bytes no Markdown viewer reads as UTF-8
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> None:
    """`data` as indented JSON with a final newline; `dumps`: more json.dumps options."""
    write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


def read_record(path: Path, parse=json.loads) -> dict:
    """A run's or a plan's record (JSON, or YAML with `parse`): a mapping, or a ValueError naming
    the file. Folders come from other people and machines (a copy cut short, another tool's
    file of the name): a bare parser error named no file of the hundreds a report reads, and
    a list or an empty file failed later as a TypeError."""
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable ({e}); fix or delete this file") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        held = "nothing" if data is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        raise ValueError(
            f"{path}: holds {held}, not the mapping dit-bench writes; fix or delete this file"
        )
    return data


def dotted(record: dict, prefix: str = "") -> dict[str, Any]:
    """A nested record (a config) with dotted keys: {"train": {"steps": 5}} -> {"train.steps":
    5}, as `--set` spells them and the results table's cfg.* columns name them."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_lock(path: str | Path) -> IO[str]:
    """The lock file `path`, made if missing, opened "a+"; never through a symbolic link. Run
    folders are shared and copied: a link planted in one (`.<hash>.lock -> ~/.bashrc`) had its
    target, a file of whoever trained there next, truncated and written by `note_holder`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise OSError(
            f"{path}: a symbolic link (to {os.readlink(path)}), not a lock file; remove it"
        ) from None
    return os.fdopen(fd, "a+")


def check_writable(folder: str | Path, hint: str) -> None:
    """Whether a file can be made in `folder` (a nameless one, gone at once), asked before long
    work that ends by writing there; else an OSError naming the folder and `hint`, what to do
    instead. Root passes a chmod, not a read-only mount."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} ({hint})", str(folder)) from None


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the block: a read-modify-write of a
    file that two processes may update (two `ablate` calls of one plan with other seeds) runs
    one at a time. Waits for the holder; released when the block ends or the process dies."""
    with open_lock(path) as f:
        flock(f)
        try:
            yield
        finally:
            unlock(f)


# Windows' locks (msvcrt's) are of byte ranges, and mandatory: one on the holder's line would
# keep the others from reading whom they wait for. One byte far past anything written instead.
WIN_LOCK_AT = 1 << 30


def flock(f, wait: bool = True) -> None:
    """An exclusive lock on the open lock file `f`: the kernel's `flock` (freed when its holder
    dies, even by kill -9); on Windows, msvcrt's (freed when the holder's process ends).
    Without `wait`, BlockingIOError while another holds it."""
    if fcntl is not None:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    while True:
        try:
            _win_locking(f, msvcrt.LK_NBLCK)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EDEADLOCK):  # those: held by another
                raise
            if not wait:
                raise BlockingIOError(errno.EWOULDBLOCK, "held by another process") from e
        time.sleep(0.1)  # LK_LOCK gives up after 10 s; a holder trains for hours


def unlock(f) -> None:
    if fcntl is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
    else:
        _win_locking(f, msvcrt.LK_UNLCK)


def _win_locking(f, mode: int) -> None:
    f.flush()
    fd = f.fileno()
    at = os.lseek(fd, 0, os.SEEK_CUR)  # msvcrt locks from the file's position: put back after
    os.lseek(fd, WIN_LOCK_AT, os.SEEK_SET)
    try:
        msvcrt.locking(fd, mode, 1)
    finally:
        os.lseek(fd, at, os.SEEK_SET)


def try_lock(f, launch: str | None = None) -> str | None:
    """An exclusive lock on the open lock file `f` (mode "a+"), without waiting: None if this
    process now holds it (and has written its pid, host and time into it: `note_holder`),
    else the holder's line ("" while it has not written it yet). The lock is the kernel's:
    a holder killed with kill -9 frees it at once, and its stale line is replaced."""
    try:
        flock(f, wait=False)
    except BlockingIOError:
        f.seek(0)
        # not the lines of processes waiting for it (run._run_lock's, of a multi-process launch)
        held = [line for line in f.read().splitlines() if not line.startswith(WAITING)]
        return held[0].strip() if held else ""
    note_holder(f, launch)
    return None


WAITING = "waiting: "  # starts a lock file's line for a process that waits for its holder


def holder_line(launch: str | None = None) -> str:
    """This process's pid, host and start (and `launch`, the job it is one process of)."""
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {platform.node()} since {since}" + (
        f", launch {launch}" if launch else ""
    )


def note_holder(f, launch: str | None = None) -> None:
    """This process's `holder_line` in the lock file `f` it holds, for others to name, and
    the lines of the processes waiting for it, but its own launch's (run._run_lock's): a
    waiting rank 0's other ranks go on waiting only while its line is there."""
    f.seek(0)
    ours = f", launch {launch}" if launch else None
    waiting = [
        s
        for s in f.read().splitlines()
        if s.startswith(WAITING) and not (ours and s.endswith(ours))
    ]
    f.seek(0)
    f.truncate()
    f.write("".join(f"{line}\n" for line in [holder_line(launch), *waiting]))
    f.flush()
    if launch:  # its other ranks read it, from other nodes over NFS: not at writeback, 30 s on
        os.fsync(f.fileno())


def engine_url(url: str) -> str:
    """The URL handed to SQLAlchemy: `postgresql://` with the psycopg driver named. SQLAlchemy
    2.0 reads a bare `postgresql://` as psycopg2, which dit-bench does not install (psycopg is
    its driver; 2.1 made it the default), and fails with "Failed to import DB access module".
    `postgres://` too: libpq and psql take it, hosted databases hand it out (Heroku, Render,
    Supabase), and SQLAlchemy knows no such dialect ("Can't load plugin")."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


# A file name's bytes at most (ext4, APFS, NTFS's UTF-16 units): an experiment's runs folder,
# an ablation variant's samples/<variant>.png
NAME_MAX = 255
# Names Windows keeps for devices, in any case and with any extension (`nul.txt` is NUL): no
# file or folder there can have one. A plan written on Linux must run on every team machine.
WINDOWS_DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)),
}


def windows_name_error(name: str) -> str | None:
    """Why Windows cannot make a file or folder named `name`, or None (the characters it
    refuses, `<>:"/\\|?*`, are the callers' patterns' business)."""
    if (device := name.split(".", 1)[0].upper()) in WINDOWS_DEVICES:
        return f"is a device name on Windows ({device}, in any case, with any extension)"
    if name.endswith((".", " ")):  # Windows drops them: `x.` would be the folder `x`
        return f"ends in {name[-1]!r}, which Windows drops from a file name (naming another)"
    return None


def sqlite_file(url: str) -> Path | None:
    """The study file of a SQLite storage URL (`sqlite:///runs/x/study.db`, a `?timeout=...`
    left out; `sqlite+pysqlite:///...` too); None for another database and for SQLite in memory
    (`sqlite://`, `sqlite:///:memory:`), which has none."""
    scheme, sep, rest = url.partition(":///")
    path = rest.split("?", 1)[0]
    if not (sep and scheme.startswith("sqlite")) or path in ("", ":memory:"):
        return None
    return Path(path)


# SQLAlchemy reads a URL's password from the user's ":" on to an "@", any "/" or "?" in it
# included, so it is hidden that far. An "@" in the password (SQLAlchemy ends it at the first)
# is hidden with it: to the last "@" before the "/" or "?" that follows the first.
_USER = re.compile(r"://[^:/@]*:")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")  # libpq reads one there too


def redact(text: str) -> str:
    """A storage URL (or a command-line word holding one, `--storage=URL`) without its
    password: as it is printed, written into run folders and reports, and raised in errors."""
    user = _USER.search(text)
    first = text.find("@", user.end()) if user else -1
    if first != -1:
        end = min(
            (i for i in (text.find("/", first), text.find("?", first)) if i != -1),
            default=len(text),
        )
        text = f"{text[: user.end()]}***{text[text.rindex('@', first, end) :]}"
    return _QUERY_PASSWORD.sub(r"\1***", text) if "://" in text else text


@contextlib.contextmanager
def optuna_settings_kept() -> Iterator[None]:
    """Optuna's verbosity and the warning filters, the caller's again after the block (a sweep
    or a report read from a notebook or script). Set for good (WARNING, experimental warnings
    ignored), the caller's own studies after it logged no trial lines and hid those warnings."""
    import warnings

    import optuna

    verbosity = optuna.logging.get_verbosity()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
