"""Two sweep workers share one study in a real PostgreSQL server on loopback: every grid point
completes exactly once.

The server is a throwaway cluster started here from the PostgreSQL binaries (`make postgres`
installs them; `.ci/run` does so before the tests), or the one at $DIT_BENCH_POSTGRES_URL. The
test skips, with the reason, only when no PostgreSQL or driver is found and $CI is not set; in CI
it must run.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_sweep import check_study, cli, write_tiny


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason} (run `make postgres` first)")
    pytest.skip(f"{reason}; `make postgres` installs it")


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    hits = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(hits[-1]).parent if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get("DIT_BENCH_POSTGRES_URL"):
        yield os.environ["DIT_BENCH_POSTGRES_URL"]
        return
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        _missing("the psycopg driver is not installed")
    pg = _pg_bin()
    if pg is None:
        _missing("no PostgreSQL server binaries (initdb, pg_ctl) found")
    # initdb refuses to run as root: run the server as the `postgres` user then
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="dit-bench-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _free_port()
    subprocess.run(
        [*as_user, str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    subprocess.run(
        [
            *as_user,
            str(pg / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            opts,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgres_study(tmp_path, postgres_url):
    name = f"tiny{int(time.time() * 1000) % 10**8}"  # a fresh study on a reused server
    path = write_tiny(tmp_path / "tiny.yaml", name=name)
    out = tmp_path / "runs"
    # two separate `dit-bench sweep` commands, as on two machines, started together
    procs = [
        cli("sweep", str(path), "--out", str(out), "--storage", postgres_url, "--no-progress")
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    check_study(postgres_url, f"{name}-cpu", 4)


def test_heartbeats_survive_a_change_of_the_servers_utc_offset(postgres_url):
    # Optuna stores heartbeats as naive wall times of the session's time zone, the server's
    # `timezone` (initdb takes the host's: America/New_York, say). At the spring DST change the
    # wall clock jumps an hour ahead and every live trial's last beat looked an hour old: failed
    # as stale and re-run by the first worker that looked. A fixed offset changed between the
    # beat and the look stands in for the change here.
    import optuna
    import sqlalchemy as sa

    from dit_bench.files import engine_url
    from dit_bench.sweep import Heartbeat, make_storage

    db = f"tz{int(time.time() * 1000) % 10**8}"
    admin = sa.create_engine(engine_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
        conn.exec_driver_sql(f"ALTER DATABASE {db} SET timezone TO 'Etc/GMT+5'")  # EST
    url = f"{postgres_url.rsplit('/', 1)[0]}/{db}"
    beat = Heartbeat(interval=10, grace=60)
    storages = [make_storage(url, beat)]
    try:
        study = optuna.create_study(storage=storages[0], study_name="tz")
        trial = study.ask()
        storages[0].record_heartbeat(trial._trial_id)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {db} SET timezone TO 'Etc/GMT+4'")  # EDT
        storages.append(make_storage(url, beat))  # another worker's sessions, after the change
        assert storages[1]._get_stale_trial_ids(study._study_id) == []
    finally:
        for s in storages:
            s.engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {db}")
        admin.dispose()


def test_utc_sessions_keep_the_users_own_pgoptions(postgres_url, monkeypatch):
    # libpq reads PGOPTIONS only where the connection names no `options`: the UTC setting handed
    # to every session replaced the user's own (a search_path to the schema of their studies, a
    # statement_timeout), silently. A URL's own `options` replace PGOPTIONS, as in psql.
    import sqlalchemy as sa

    from dit_bench.sweep import Heartbeat, make_storage

    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    for url, timeout in (
        (postgres_url, "4321ms"),
        (
            f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-c%20statement_timeout%3D1234",
            "1234ms",
        ),
    ):
        storage = make_storage(url, Heartbeat(interval=10, grace=60))
        try:
            with storage.engine.connect() as conn:
                shown = [
                    conn.execute(sa.text(f"SHOW {k}")).scalar()
                    for k in ("statement_timeout", "timezone")
                ]
        finally:
            storage.engine.dispose()
        assert shown == [timeout, "UTC"], url


def test_a_reports_heartbeat_ages_on_postgres_are_seconds_not_hours(postgres_url):
    # The report ages a running trial's last beat (stored naive, in UTC: the sweep's sessions
    # are UTC) by the server's now(), read through a plain session in the server's own zone
    # (EST here): a zone dropped instead of converted made a live trial five hours old.
    import optuna
    import sqlalchemy as sa

    from dit_bench.files import engine_url
    from dit_bench.report.scaling import stale_trials
    from dit_bench.sweep import Heartbeat, make_storage

    db = f"age{int(time.time() * 1000) % 10**8}"
    admin = sa.create_engine(engine_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
        conn.exec_driver_sql(f"ALTER DATABASE {db} SET timezone TO 'Etc/GMT+5'")
    url = f"{postgres_url.rsplit('/', 1)[0]}/{db}"
    storage = make_storage(url, Heartbeat(interval=10, grace=60))
    try:
        study = optuna.create_study(storage=storage, study_name="age")
        storage.record_heartbeat(study.ask()._trial_id)
        loaded = optuna.load_study(study_name="age", storage=engine_url(url))  # as the report
        assert stale_trials(loaded, grace=60) == {}
        (age,) = stale_trials(loaded, grace=-1).values()
        assert 0 <= age < 60
        loaded._storage._backend.engine.dispose()
    finally:
        storage.engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {db}")
        admin.dispose()
