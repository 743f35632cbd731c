"""Engine connect hooks: the ``do_connect`` event and ``engine.connect_wrappers``.

``do_connect`` is SQLAlchemy's ``DialectEvents.do_connect``: ``(dialect, conn_rec, cargs,
cparams)``, fired before each new driver connection with the keywords the driver will
get; a listener may change them or return its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import create_engine, event
from lambda_pool.asyncio import create_async_engine
from lambda_pool.engine_setup import ConnectAttempt
from lambda_pool.exc import ArgumentError
from lambda_pool.pool import NullPool, QueuePool
from lambda_pool.testing.postgres import PostgresServer

ASYNC_DRIVERS = ["postgresql+asyncpg", "postgresql+psycopg"]


def _short_name(tag: str) -> str:
    # application_name is cut at 63 bytes by the server: keep it short and unique.
    return f"lpt-{tag}-{uuid.uuid4().hex[:12]}"


def _set_application_name(cparams: dict[str, Any], name: str) -> None:
    # asyncpg sends server settings in their own dict; libpq takes the keyword.
    if "server_settings" in cparams:
        cparams["server_settings"] = {**cparams["server_settings"], "application_name": name}
    else:
        cparams["application_name"] = name


def test_do_connect_listener_changes_a_connect_parameter_seen_by_the_server(
    embedded_postgres: PostgresServer,
) -> None:
    engine = create_engine(embedded_postgres.dsn + "?application_name=original")
    renamed = _short_name("renamed")
    calls: list[tuple[Any, Any, Any]] = []

    @event.listens_for(engine, "do_connect")
    def rename(dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        calls.append((dialect, conn_rec, cargs))
        assert cparams["application_name"] == "original"
        cparams["application_name"] = renamed

    with engine.connect() as conn:
        assert conn.execute("SHOW application_name").scalar() == renamed
        assert embedded_postgres.backend_count(renamed) == 1
    assert calls == [(engine.dialect, None, [])]
    engine.dispose()


def test_do_connect_listener_can_return_its_own_connection(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = create_engine(embedded_postgres.dsn)
    made: list[Any] = []

    def own_connection(
        dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]
    ) -> Any:
        connection = psycopg.connect(**{**cparams, "application_name": unique_application_name})
        made.append(connection)
        return connection

    event.listen(engine, "do_connect", own_connection)
    with engine.connect() as conn:
        assert conn.driver_connection is made[0]
        assert conn.execute("SHOW application_name").scalar() == unique_application_name
    assert made[0].closed  # NullPool closed the listener's connection on return
    assert len(made) == 1


def test_do_connect_fires_once_per_new_connection_not_per_checkout(
    embedded_postgres: PostgresServer,
) -> None:
    for poolclass, expected in ((QueuePool, 1), (NullPool, 3)):
        engine = create_engine(embedded_postgres.dsn, poolclass=poolclass)
        fired: list[dict[str, Any]] = []

        def count(*args: Any, fired: list[dict[str, Any]] = fired) -> None:
            fired.append(args[3])

        event.listen(engine, "do_connect", count)
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute("SELECT 1")
        assert len(fired) == expected, poolclass
        engine.dispose()


def test_do_connect_listeners_survive_dispose_and_take_named_arguments(
    embedded_postgres: PostgresServer,
) -> None:
    engine = create_engine(embedded_postgres.dsn, pool_size=1)
    seen: list[str] = []

    @event.listens_for(engine, "do_connect", named=True)
    def named(**kw: Any) -> None:
        seen.append(",".join(sorted(kw)))

    with engine.connect() as conn:
        conn.execute("SELECT 1")
    engine.dispose()
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert seen == ["cargs,conn_rec,cparams,dialect"] * 2
    event.remove(engine, "do_connect", named)
    engine.dispose()
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert len(seen) == 2
    engine.dispose()


def test_do_connect_is_an_engine_event_not_a_pool_event(embedded_postgres: PostgresServer) -> None:
    engine = create_engine(embedded_postgres.dsn)
    with pytest.raises(ArgumentError, match="engine event"):
        event.listen(engine.pool, "do_connect", lambda *args: None)
    with pytest.raises(ArgumentError, match="engine event"):
        event.listen(QueuePool, "do_connect", lambda *args: None)


def test_do_connect_sees_provider_credentials_and_nothing_logs_the_password(
    embedded_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    from lambda_pool.auth import StaticCredentials

    url = embedded_postgres.dsn.replace(f":{embedded_postgres.password}@", "@")
    assert embedded_postgres.password not in url
    engine = create_engine(
        url,
        credentials=StaticCredentials(embedded_postgres.user, embedded_postgres.password),
        echo=True,
        echo_pool="debug",
    )
    passwords: list[str] = []
    event.listen(
        engine, "do_connect", lambda d, r, a, cparams: passwords.append(cparams["password"])
    )
    with caplog.at_level(logging.DEBUG), engine.connect() as conn:
        conn.execute("SELECT 1")
    assert passwords == [embedded_postgres.password]
    assert embedded_postgres.password not in caplog.text


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
async def test_async_do_connect_changes_parameters_and_may_return_an_awaitable(
    embedded_postgres: PostgresServer, driver: str
) -> None:
    url = embedded_postgres.dsn.replace("postgresql://", f"{driver}://")
    engine = create_async_engine(url + "?application_name=original", pool_size=1)
    renamed = _short_name("async")

    @event.listens_for(engine, "do_connect")
    def rename(dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        _set_application_name(cparams, renamed)

    for _ in range(2):
        async with engine.connect() as conn:
            assert (await conn.execute("SHOW application_name")).scalar() == renamed
    assert embedded_postgres.backend_count(renamed) == 1
    await engine.dispose()

    # A listener may hand back the dialect's own connect coroutine: it is awaited.
    returned = _short_name("returned")
    event.remove(engine, "do_connect", rename)

    def own(dialect: Any, conn_rec: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        _set_application_name(cparams, returned)
        return dialect.connect(cparams)

    event.listen(engine, "do_connect", own)
    async with engine.connect() as conn:
        assert (await conn.execute("SHOW application_name")).scalar() == returned
    await engine.dispose()


def test_connect_wrappers_span_each_new_connection_and_see_failures(
    embedded_postgres: PostgresServer,
) -> None:
    log: list[tuple[str, Any]] = []

    @contextlib.contextmanager
    def wrapper(attempt: ConnectAttempt) -> Iterator[None]:
        log.append(("enter", attempt.connection))
        try:
            yield
        except Exception as exc:
            log.append(("failed", type(exc).__name__))
            raise
        log.append(("opened", attempt.connection))

    engine = create_engine(embedded_postgres.dsn, pool_size=1)
    engine.connect_wrappers.append(wrapper)
    for _ in range(2):
        with engine.connect() as conn:
            driver = conn.driver_connection
    assert log == [("enter", None), ("opened", driver)]

    bad = create_engine(
        embedded_postgres.dsn_for(embedded_postgres.user, "wrong-password"), connect_retries=0
    )
    bad.connect_wrappers.append(wrapper)
    with pytest.raises(psycopg.OperationalError):
        bad.connect()
    assert log[2:] == [("enter", None), ("failed", "OperationalError")]
    engine.dispose()
