"""Session reset on return: nothing one invocation set in the session reaches the next.

``ROLLBACK`` then ``DISCARD ALL`` (only the rollback behind a transaction pooler), written
once as a generator of driver calls (:func:`g_reset_session`) that ``WarmPool`` performs
in either mode and :func:`reset_session` / :func:`areset_session` run outside a pool;
for asyncpg, :data:`ASYNCPG_SESSION_RESET` instead, which keeps asyncpg's own cached
statements; plus the connect keywords that keep the drivers' statement caches
consistent with it (:func:`warm_connect_args`).
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Generator, Mapping
from typing import Any

from lambda_pool.exc import DeadlineExceededError, InvalidRequestError
from lambda_pool.pool import core as pool_core
from lambda_pool.warm.driver import _is_asyncpg, _is_psycopg, _pq_transaction_status

log = logging.getLogger("lambda_pool.warm")

# The session reset is written once, as a generator of driver calls, like the pool's
# procedures (lambda_pool.pool.base): each step is ``(DRIVER_CALL, fn)``; a sync runner
# calls ``fn()``, an async runner calls it and awaits the result.  WarmPool's shells
# perform these steps; reset_session() and areset_session() run them outside a pool.


class _DriverStep(enum.Enum):
    CALL = "driver call"


DRIVER_CALL = _DriverStep.CALL
DriverStep = tuple[_DriverStep, Callable[[], Any]]


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> DriverStep:
    return (DRIVER_CALL, functools.partial(fn, *args, **kwargs))


def _asyncpg_reset_statement(conn: Any, statement: str) -> Any:
    """``conn.execute(statement)`` ending by the current deadline (a coroutine)."""
    from lambda_pool.dialects.asyncpg import asyncpg_bounded

    return asyncpg_bounded(conn, conn.execute(statement), "reset on return")


#: What ``DISCARD ALL`` does, as the statements PostgreSQL documents it equal to
#: (https://www.postgresql.org/docs/current/sql-discard.html), each of which, unlike
#: ``DISCARD ALL``, may run inside the implicit transaction of a multi-statement query:
#: so they can follow the invocation's ``COMMIT`` in the same message (one round trip).
#: All but ``DISCARD PLANS``: once ``DEALLOCATE ALL`` has dropped the prepared
#: statements, the plans left are the server's own caches (PL/pgSQL functions'), which
#: no user can see (PostgreSQL replans when what a plan depends on changes,
#: ``search_path`` included); dropping them at every return would only make each
#: invocation plan its functions anew (as for asyncpg's reset, below).  Each statement
#: is a plain one with no ``;`` inside: the SQLAlchemy adapter splits on it.
SESSION_RESET_STATEMENTS = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)


#: The SQLSTATE :data:`ASYNCPG_SESSION_RESET` raises when one of its steps failed, so that
#: a failure after a ``COMMIT`` sent in the same message is told apart from the
#: ``COMMIT``'s own (:func:`lambda_pool.dialects.asyncpg.asyncpg_commit_then`).
ASYNCPG_RESET_FAILED_SQLSTATE = "LPR01"

#: What ``DISCARD ALL`` does, for an asyncpg connection, without deallocating the
#: statements asyncpg prepared and caches (``statement_cache_size``; named
#: ``__asyncpg_stmt_<n>__``, prepared through the protocol): every other prepared
#: statement goes, among them any a handler made with SQL ``PREPARE`` (``from_sql``),
#: whatever its name.  ``DISCARD PLANS`` is left out: a plan is no session state a user
#: can see (PostgreSQL replans when what it depends on, ``search_path`` included,
#: changes), and dropping the plans of the kept statements at each return would make
#: the server plan them anew at every invocation.
#:
#: One simple query that may follow ``COMMIT`` in the same message (each statement
#: may run in the implicit transaction that follows it).  ``RESET ALL`` and ``SET
#: SESSION AUTHORIZATION DEFAULT`` come first, outside the ``DO`` block, so that the
#: block runs as the login role (``DO`` needs ``USAGE`` on PL/pgSQL, which a role the
#: handler switched to may lack); they cannot fail in practice.  Every failure inside
#: the block, a cancel included, is raised again as :data:`ASYNCPG_RESET_FAILED_SQLSTATE`.
ASYNCPG_SESSION_RESET = (
    "RESET ALL; SET SESSION AUTHORIZATION DEFAULT; DO $lambda_pool_reset$ "
    "DECLARE statement_name text; "
    "BEGIN "
    "EXECUTE 'CLOSE ALL'; "
    "EXECUTE 'UNLISTEN *'; "
    "PERFORM pg_advisory_unlock_all(); "
    "EXECUTE 'DISCARD TEMP'; "
    "EXECUTE 'DISCARD SEQUENCES'; "
    "FOR statement_name IN SELECT name FROM pg_prepared_statements "
    "WHERE from_sql OR left(name, 15) <> '__asyncpg_stmt_' LOOP "
    "EXECUTE format('DEALLOCATE %I', statement_name); "
    "END LOOP; "
    "EXCEPTION WHEN OTHERS OR query_canceled THEN "
    f"RAISE EXCEPTION USING ERRCODE = '{ASYNCPG_RESET_FAILED_SQLSTATE}', "
    "MESSAGE = 'lambda-pool session reset failed: ' || SQLERRM; "
    "END $lambda_pool_reset$"
)

# asyncpg connections on which ASYNCPG_SESSION_RESET ran on its own and succeeded: it
# may then travel with their COMMIT (asyncpg_session_reset_proven()).  And those whose
# server refused it: they are reset with DISCARD ALL, without trying it again.  Weak:
# the connection object is the key and leaves with its last reference.
_asyncpg_reset_proven: weakref.WeakSet[Any] = weakref.WeakSet()
_asyncpg_reset_refused: weakref.WeakSet[Any] = weakref.WeakSet()


def asyncpg_session_reset_proven(conn: Any) -> bool:
    """Whether :data:`ASYNCPG_SESSION_RESET` already ran on its own on this asyncpg
    connection and succeeded.

    Only then may it travel in the same message as the invocation's ``COMMIT``: an
    error there is the ``COMMIT``'s unless it carries
    :data:`ASYNCPG_RESET_FAILED_SQLSTATE`, and a ``DO`` block the server refuses to
    run at all (PL/pgSQL dropped, or ``USAGE`` on it revoked) would not carry it, so
    a committed transaction would be reported as failed.  The first return of each
    connection sends the reset alone and so proves it.
    """
    return conn in _asyncpg_reset_proven


def g_reset_session(
    conn: Any, *, discard: bool = True, discarded: bool = False
) -> Generator[DriverStep, Any, None]:
    """The steps of :func:`reset_session` (sync or async driver), for a runner to perform.

    ``discarded``: the session reset already ran after the last commit (sent with it:
    :data:`SESSION_RESET_STATEMENTS`, or :data:`ASYNCPG_SESSION_RESET` on asyncpg);
    when the connection is still idle nothing is sent again, only psycopg's statement
    cache is emptied as after ``DISCARD ALL`` (asyncpg's statements were kept).
    """
    if _is_psycopg(conn):
        if discarded and _pq_transaction_status(conn) == 0:
            if conn.prepare_threshold is not None:
                _clear_psycopg_prepared_cache(conn)
            return
        if _pq_transaction_status(conn) != 0:
            yield _call(conn.rollback)
        if not discard:
            return
        was_autocommit = bool(conn.autocommit)
        if not was_autocommit:
            # set_autocommit(): the property is read-only on psycopg's AsyncConnection.
            yield _call(conn.set_autocommit, True)
        try:
            yield _call(conn.execute, "DISCARD ALL", prepare=False)
        finally:
            if not was_autocommit:
                yield _call(conn.set_autocommit, False)
        if conn.prepare_threshold is not None:
            _clear_psycopg_prepared_cache(conn)
        return
    if _is_asyncpg(conn):
        yield from _g_reset_asyncpg(conn, discard=discard, discarded=discarded)
        return
    # Generic DB-API connection: a rollback is all a driver-neutral reset can do.
    yield _call(conn.rollback)


def _g_reset_asyncpg(
    conn: Any, *, discard: bool, discarded: bool
) -> Generator[DriverStep, Any, None]:
    """:func:`g_reset_session` for asyncpg: :data:`ASYNCPG_SESSION_RESET` (asyncpg's
    cached statements stay valid), ``DISCARD ALL`` when the server refuses it."""
    # Conn.execute() without arguments is the simple query protocol: nothing is
    # prepared for these.  Bounded by the deadline here: asyncpg has no wait of its own
    # to bound (psycopg's connection class bounds its waits itself).
    if conn.is_in_transaction():
        yield _call(_asyncpg_reset_statement, conn, "ROLLBACK")
    elif discarded:
        return
    if not discard:
        return
    if conn not in _asyncpg_reset_refused:
        try:
            yield _call(_asyncpg_reset_statement, conn, ASYNCPG_SESSION_RESET)
        except DeadlineExceededError:
            raise
        except Exception as exc:
            if conn.is_closed() or conn.is_in_transaction():
                raise  # nothing more can be sent (the pool closes it)
            # DISCARD ALL does it all, asyncpg's cached statements included (so its
            # cache is emptied below): this time when a step of the reset failed (its
            # own SQLSTATE), from now on when the server refused to run it at all
            # (PL/pgSQL not usable).
            log.info("asyncpg session reset failed, using DISCARD ALL: %s", exc)
            if getattr(exc, "sqlstate", None) != ASYNCPG_RESET_FAILED_SQLSTATE:
                _asyncpg_reset_refused.add(conn)
        else:
            _asyncpg_reset_proven.add(conn)
            return
    yield _call(_asyncpg_reset_statement, conn, "DISCARD ALL")
    _clear_asyncpg_statement_cache(conn)


def reset_session(conn: Any, *, discard: bool = True) -> None:
    """Leave ``conn`` as a new session would be, so nothing leaks to the next invocation.

    ``ROLLBACK`` first (a no-op when already idle), then ``DISCARD ALL``, which resets
    ``SET`` parameters and ``SET SESSION AUTHORIZATION``, drops temporary tables,
    deallocates prepared statements, closes cursors, ``UNLISTEN *`` and releases advisory
    locks (it includes ``pg_advisory_unlock_all()``; no separate call needed).  PostgreSQL
    refuses ``DISCARD ALL`` inside a transaction block, hence the rollback before it and
    the autocommit switch around it (psycopg would otherwise open a transaction for it).

    ``discard=False`` (transaction pooling behind PgBouncer / RDS Proxy) only rolls back:
    ``DISCARD`` pins an RDS Proxy session, and such setups must not leave session state.

    psycopg's client-side prepared-statement cache: psycopg clears it when it sees the
    command status ``DISCARD ALL``, but only if that statement text is new to its
    statement counter (``psycopg/_preparing.py``: ``validate()`` runs for first-seen
    queries only), so from the second ``DISCARD ALL`` on it can keep names of statements
    the server just dropped and fail with *prepared statement "_pg3_0" does not exist*.
    Warm connections are therefore opened with ``prepare_threshold=None`` (no automatic
    server-side preparation; :func:`warm_connect_args`); when a user turns preparation back
    on, the cache is cleared here after the discard.

    asyncpg's statement cache has the same hazard, worse (see
    :func:`_clear_asyncpg_statement_cache`), so an asyncpg connection is reset with
    :data:`ASYNCPG_SESSION_RESET` instead, which does what ``DISCARD ALL`` does but
    keeps the statements asyncpg caches; ``DISCARD ALL`` remains its fallback on a
    server that refuses it.  This function is for blocking connections;
    :func:`areset_session` runs the same steps on an asyncio one.
    """

    def perform(step: Any) -> Any:
        result = step[1]()
        if inspect.isawaitable(result):
            _discard_awaitable(result)
            raise InvalidRequestError(
                "reset_session() got an asyncio connection: use 'await areset_session()'"
            )
        return result

    pool_core.drive(g_reset_session(conn, discard=discard), perform)


async def areset_session(conn: Any, *, discard: bool = True) -> None:
    """:func:`reset_session` for an asyncio connection (psycopg ``AsyncConnection``, asyncpg)."""

    async def perform(step: Any) -> Any:
        result = step[1]()
        if inspect.isawaitable(result):
            result = await result
        return result

    await pool_core.drive_async(g_reset_session(conn, discard=discard), perform)


def _discard_awaitable(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning


def _clear_psycopg_prepared_cache(conn: Any) -> None:
    # psycopg has no public call for this; its PrepareManager.clear() is what psycopg
    # itself runs after ROLLBACK and DISCARD ALL.  If a future psycopg renames it, turn
    # preparation off for this connection instead: stale names must never be used.
    manager = getattr(conn, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if callable(clear):
        clear()
    else:
        conn.prepare_threshold = None


def _clear_asyncpg_statement_cache(conn: Any) -> None:
    """Forget asyncpg's cached prepared statements after ``DISCARD ALL`` deallocated them.

    asyncpg prepares the statements of ``fetch()``/``execute(query, *args)``… as named
    server-side statements kept in a per-connection cache (``statement_cache_size``,
    default 100) and is not told about ``DISCARD ALL`` (which includes ``DEALLOCATE
    ALL``); the next use of a cached one fails with ``InvalidSQLStatementNameError``
    (*prepared statement "__asyncpg_stmt_1__" does not exist*), an error asyncpg does
    not retry (it re-prepares only on ``InvalidCachedStatementError``).  Its maintainers
    keep ``DISCARD ALL`` out of asyncpg's own pool reset for this reason
    (MagicStack/asyncpg#270).  The warm reset is therefore
    :data:`ASYNCPG_SESSION_RESET`, which keeps them; ``DISCARD ALL`` is only its
    fallback, after which the cache is emptied here with
    ``_drop_local_statement_cache()``, the private method asyncpg itself calls when it
    drops a connection's cache.  asyncpg then queues the dropped statements to be
    closed on the server, one round trip each before its next prepare; ``DISCARD ALL``
    closed them all already, so the queue (``_stmts_to_close``, private too, looked up
    defensively: left alone, the closes are harmless, closing a statement that does not
    exist is no error) is emptied.  If the drop method is gone, the reset fails, so the
    pool closes the connection instead of keeping it inconsistent.
    """
    if not getattr(conn, "_stmt_cache_enabled", True):
        return
    drop = getattr(conn, "_drop_local_statement_cache", None)
    if not callable(drop):
        raise InvalidRequestError(
            "cannot empty asyncpg's statement cache after DISCARD ALL; open warm asyncpg "
            "connections with statement_cache_size=0"
        )
    drop()
    pending = getattr(conn, "_stmts_to_close", None)
    if isinstance(pending, set):
        pending.clear()


def warm_connect_args(
    connect_args: Mapping[str, Any] | None, *, psycopg: bool, asyncpg: bool = False
) -> dict[str, Any]:
    """Driver keywords for a warm connection.

    psycopg: ``prepare_threshold=None`` (automatic server-side preparation off; see
    :func:`reset_session` for why); a value the caller gave is kept.  asyncpg: nothing
    is added: its statement cache stays on (a warm statement is one round trip, bind
    and execute, instead of two) because the warm reset, :data:`ASYNCPG_SESSION_RESET`,
    keeps the statements it caches.  Transaction pooling turns it off
    (``statement_cache_size=0``, the dialect's ``transaction_pooling_args()``).
    """
    args = dict(connect_args or {})
    if psycopg:
        args.setdefault("prepare_threshold", None)
    return args
