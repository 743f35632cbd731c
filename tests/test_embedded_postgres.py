"""The throw-away PostgreSQL server and its pg_stat_activity helpers behave as tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from lambda_pool.testing.postgres import (
    EmbeddedPostgres,
    PostgresBinaries,
    PostgresServer,
    candidate_bindirs,
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
