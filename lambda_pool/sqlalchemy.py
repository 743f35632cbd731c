"""SQLAlchemy adapter: a real ``sqlalchemy.engine.Engine`` with lambda-pool's serverless behaviour.

For applications already written against SQLAlchemy (Core or ORM).  :func:`create_engine`
returns SQLAlchemy's own ``Engine`` and adds what Lambda needs:

* ``NullPool`` by default (a connection per checkout, closed on return); an explicit
  ``poolclass`` wins, and ``pool_size``/``max_overflow``/``pool_timeout`` select
  ``QueuePool``, as in ``lambda_pool.create_engine``;
* ``warm=True`` (or :func:`warm_engine`): :class:`WarmSQLAlchemyPool`, the warm-container
  cache — one connection reused across invocations under exactly the rules of
  :func:`lambda_pool.warm.decide_reuse` (same code), with the same reset and stats;
* ``credentials=``: a lambda-pool provider (IAM tokens, Secrets Manager, static) applied in
  a ``do_connect`` listener, one retry after ``refresh()`` on an authentication failure,
  and the connection retired at checkout once its credentials expired (never during an
  invocation);
* registration with :func:`lambda_pool.lifecycle.register`, so the shutdown and SnapStart
  hooks dispose it.

``postgresql://`` URLs are given the psycopg 3 driver (``postgresql+psycopg://``).
This module imports SQLAlchemy at the top; nothing in ``lambda_pool`` imports it, so only
applications that use it pay for it.

Round trips (issue 9)
---------------------
SQLAlchemy commits through the driver (``Dialect.do_commit``) before the pool hears that
a return follows, so the warm session's reset cannot travel with the invocation's
``COMMIT`` as it does in ``with_connection``; sent at return, ``DISCARD ALL`` was a round
trip of its own (4 for ``SELECT 1`` and a commit, against 3 for a raw psycopg
connection held in a global).  Two changes, both in the psycopg connection class the
adapter opens for every pool (a
:class:`~lambda_pool.dialects._psycopg_deadline.DeadlineConnection` subclass and its
default cursor class), so no SQLAlchemy internals are touched.  They lean on psycopg
internals, as ``psycopg_execute_opening`` does (the project requires psycopg >= 3.3 and
tests/test_round_trips_sqlalchemy.py checks each): ``Connection._start_query`` (where
every statement starts and psycopg sends ``BEGIN``), ``Cursor._execute_gen`` /
``_maybe_prepare_gen`` / ``_check_results`` / ``_set_results`` (the statement sent with
its opening), ``Connection._prepared.clear()`` and ``_notifies_backlog``:

* a transaction's ``BEGIN`` travels with its first statement when that statement takes
  no parameters (psycopg's simple query protocol allows several statements in one
  message; an explicit ``BEGIN`` there opens a real transaction block), as
  :func:`lambda_pool.dialects.psycopg.psycopg_execute_opening` does for
  ``with_connection``.  The statement's results and errors are its own: the opening's
  results are counted off, and an error of the statement is raised by its
  ``execute()``;
* the warm pool (:class:`WarmSQLAlchemyPool`) resets an idle session **at the next
  transaction start instead of at return**: the return records a debt, and the next
  ``BEGIN`` carries ``BEGIN; <the statements DISCARD ALL stands for>; COMMIT`` before it,
  in the same message.  The reset runs in a transaction of its own so that a
  ``ROLLBACK`` of the user's transaction cannot undo ``RESET ALL`` or ``DISCARD TEMP``.

A warm ``SELECT 1`` and commit is then 2 round trips (raw held: 3); statements with
parameters need the extended protocol, so the first goes after the opening: one round
trip per statement plus the opening and the ``COMMIT`` (raw held: the same).
``transaction_pooling`` sends no reset at all, as before, and gains the merged ``BEGIN``
(as do the adapter's ``NullPool`` and ``QueuePool`` engines).

Why deferring is safe, and what it changes:

* *Nothing reaches the next invocation.*  The debt is paid before any statement of the
  next checkout, whatever path it takes: a cursor's ``execute``/``executemany``/``copy``/
  ``stream``, a server-side cursor, ``Connection.execute`` on the raw driver connection
  (``engine.raw_connection()``, ``conn.connection.driver_connection``), autocommit
  (the reset then goes alone, first), and ``transaction()``, ``pipeline()``,
  ``tpc_begin()``, ``notifies()`` (which send it before they start).  Once it ran,
  psycopg's prepared-statement cache is emptied (the reset's ``DEALLOCATE ALL`` ran
  behind its back) and its notification backlog too; notifications still arriving for
  the old ``LISTEN`` during the reset are dropped, not handed to the new invocation.
* *A broken connection is still replaced.*  When the pre-ping is due (idle longer than
  ``pre_ping_idle_seconds``, or unread input on the socket), the owed reset **is** the
  ping (one round trip, as the ping was): if it fails, the connection is replaced in the
  same checkout.  When no ping is due, a connection that broke while idle fails its first
  statement, exactly as it did before (the reset at return could not see a break that
  came later either), and SQLAlchemy invalidates it.  A reset that fails closes the
  connection and raises ``OperationalError`` from the statement that carried it: the
  session's state is then unknown, so it is never reused.
* *Every step is bounded by the deadline*: the reset travels inside the statement's
  (or the ping's) wait, which :class:`DeadlineConnection` bounds.
* *Between invocations* (the container may be frozen for minutes) the idle session keeps
  what the last invocation left in it.  Session settings, temporary tables, prepared
  statements and held cursors are the session's own: no other session sees them, and
  the next invocation never does.  Two things are visible from other sessions: a
  session-level advisory lock the handler forgot to release, and a ``LISTEN`` it left
  (the server queues notifications for it).  With the reset at return they ended when
  the invocation did; deferred, they end at the next checkout or when the connection is
  closed (shutdown, recycle, replacement).  Locks and listens a handler releases itself
  are unaffected, and a raw held connection or SQLAlchemy's own pools never release
  them.  We accept this for the round trip every invocation saves; an application that
  relies on the pool to release forgotten advisory locks at once passes
  ``defer_session_reset=False`` (``?defer_session_reset=false`` with the plugin):
  ``DISCARD ALL`` at return, one round trip more.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, Pool, QueuePool

from lambda_pool import deadlines, lifecycle
from lambda_pool.dialects.psycopg import (
    PsycopgDialect,
    psycopg_is_auth_failure,
    psycopg_is_disconnect,
    psycopg_timeout_defaults,
)
from lambda_pool.exc import ArgumentError, DeadlineExceededError
from lambda_pool.warm import (
    CREDENTIALS_EXPIRE_AT,
    WARM_INFO_KEY,
    EngineCache,
    Ping,
    Replace,
    ReplaceReason,
    Reuse,
    ReuseDecision,
    ReusePolicy,
    WarmConnectionInfo,
    WarmGuard,
    WarmStats,
    abandon_inherited_connection,
    identity_key,
    pre_ping_idle_seconds_from_env,
    reset_session,
)
from lambda_pool.warm.reset import SESSION_RESET_STATEMENTS

__all__ = [
    "WarmSQLAlchemyPool",
    "cached_engines",
    "create_engine",
    "forget_cached_engines",
    "warm_engine",
]

_QUEUE_POOL_ARGS = ("pool_size", "max_overflow", "pool_timeout")
_PSYCOPG = PsycopgDialect()


class RetiredConnection(sa_exc.DisconnectionError):
    """Why a warm connection was not reused (the reason shown in SQLAlchemy's pool log)."""

    def __init__(self, reason: ReplaceReason) -> None:
        super().__init__(f"warm connection replaced: {reason.value}")
        self.reason = reason


class WarmSQLAlchemyPool(Pool):
    """SQLAlchemy pool holding one reusable connection, vetted at every checkout.

    The connection is reused only when :func:`lambda_pool.warm.decide_reuse` says so
    (same process, no SnapStart restore, open, idle, within its recycle and credentials
    deadlines, pre-pinged after ``pre_ping_idle_seconds`` of idleness); otherwise it is
    replaced before the caller sees it.  While it is checked out, another checkout gets
    a separate connection that is closed when returned.  On return SQLAlchemy rolls back
    (when a transaction is open) and the session is reset: an idle psycopg session (the
    adapter's connection class) owes the reset to its next transaction start, which
    sends it with its ``BEGIN`` (see the module docstring); otherwise, or with
    ``defer_session_reset=False``, :func:`lambda_pool.warm.reset_session` sends
    ``DISCARD ALL`` now.  ``transaction_pooling=True`` sends no reset.  ``stats`` is a
    :class:`lambda_pool.warm.WarmStats`.

    ``recycle`` (``pool_recycle``) and ``pre_ping`` (``pool_pre_ping=True`` means ping at
    every checkout) are honoured through the same decision, on the injected ``warm_clock``.
    """

    def __init__(
        self,
        creator: Any,
        # Not keyword-only: sqlalchemy.create_engine() finds a pool class's arguments
        # by introspecting positional parameter names (util.get_cls_kwargs).
        recycle: int = -1,
        pre_ping: bool = False,
        pre_ping_idle_seconds: float | None = None,
        recycle_on_credentials_expiry: bool = True,
        transaction_pooling: bool = False,
        warm_clock: Callable[[], float] | None = None,
        warm_stats: WarmStats | None = None,
        defer_session_reset: bool = True,
        **kw: Any,
    ) -> None:
        # SQLAlchemy's own recycle and pre-ping are off: both are part of the shared
        # decision (one clock, one pre-ping per checkout at most).
        super().__init__(creator, recycle=-1, pre_ping=False, **kw)
        idle = (
            pre_ping_idle_seconds_from_env()
            if pre_ping_idle_seconds is None
            else pre_ping_idle_seconds
        )
        if idle < 0:
            raise ArgumentError(
                f"pre_ping_idle_seconds must be >= 0 (0 pings at every checkout); got {idle!r}"
            )
        self._warm_args: dict[str, Any] = {
            "recycle": recycle,
            "pre_ping": pre_ping,
            "pre_ping_idle_seconds": pre_ping_idle_seconds,
            "recycle_on_credentials_expiry": recycle_on_credentials_expiry,
            "transaction_pooling": transaction_pooling,
            "warm_clock": warm_clock,
            "defer_session_reset": defer_session_reset,
        }
        policy = ReusePolicy(
            recycle=recycle if recycle is not None and recycle >= 0 else None,
            pre_ping_idle_seconds=0.0 if pre_ping else idle,
            recycle_on_credentials_expiry=recycle_on_credentials_expiry,
        )
        self.stats = warm_stats if warm_stats is not None else WarmStats()
        self._guard = WarmGuard(policy, clock=warm_clock, stats=self.stats)
        self._transaction_pooling = transaction_pooling
        self._defer_session_reset = defer_session_reset
        self._lock = threading.Lock()
        self._record: ConnectionPoolEntry | None = None
        self._in_use = False
        self._separate = 0
        # dispose() while the warm connection is checked out: close it when it returns.
        self._close_on_return = False
        # Set while this thread creates the warm record (it is not self._record yet).
        self._making_warm = threading.local()
        # Stamp the warm connection as it is made: the creator runs inside SQLAlchemy's
        # connect, after record.info was cleared for the new connection.
        invoke = self._invoke_creator

        def stamping_creator(record: ConnectionPoolEntry) -> Any:
            conn = invoke(record)
            if record is self._record or getattr(self._making_warm, "active", False):
                record.info[WARM_INFO_KEY] = self._guard.new_info()
            return conn

        self._invoke_creator = stamping_creator  # type: ignore[assignment]

    @property
    def policy(self) -> ReusePolicy:
        """The reuse rules this pool applies."""
        return self._guard.policy

    # -- checkout ---------------------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        with self._lock:
            claimed = not self._in_use
            if claimed:
                self._in_use = True
                record = self._record
        if not claimed:
            # Never share the one connection: a concurrent caller gets its own.
            self.stats.record_separate_connection()
            separate = self._create_connection()
            with self._lock:
                self._separate += 1
            return separate
        try:
            if record is None:
                self._making_warm.active = True
                try:
                    record = self._create_connection()
                finally:
                    self._making_warm.active = False
                self._record = record
            else:
                self._vet(record)
        except BaseException:
            with self._lock:
                self._in_use = False
            raise
        return record

    def _vet(self, record: ConnectionPoolEntry) -> None:
        conn = record.dbapi_connection
        info = record.info.get(WARM_INFO_KEY)
        if conn is None or not isinstance(info, WarmConnectionInfo):
            return  # invalidated: SQLAlchemy reconnects in get_connection(), stamped anew
        decision: ReuseDecision = self._guard.decide(
            conn, info, record.info.get(CREDENTIALS_EXPIRE_AT)
        )
        if isinstance(decision, Ping):
            try:
                ok = _ping(conn)
            except DeadlineExceededError as exc:
                # No time left for a replacement: drop this one, tell the caller why.
                self.stats.record_pre_ping(False, decision.idle_seconds)
                self.stats.record_replaced(ReplaceReason.PRE_PING_FAILED)
                record.invalidate(exc)
                raise
            self.stats.record_pre_ping(ok, decision.idle_seconds)
            decision = Reuse() if ok else Replace(ReplaceReason.PRE_PING_FAILED)
        if isinstance(decision, Reuse):
            self.stats.record_reused()
            return
        self.stats.record_replaced(decision.reason)
        if not decision.may_close:
            abandon_inherited_connection(conn)
        # A hard invalidation closes it (a no-op after abandoning) and makes
        # SQLAlchemy's get_connection() open the replacement in this same checkout.
        record.invalidate(RetiredConnection(decision.reason))

    # -- return -----------------------------------------------------------------------

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if record is not self._record:
            with self._lock:
                self._separate -= 1
            record.close()
            return
        if self._close_on_return:
            with self._lock:
                self._record = None
                self._in_use = False
                self._close_on_return = False
            record.close()
            return
        try:
            conn = record.dbapi_connection
            info = record.info.get(WARM_INFO_KEY)
            if conn is not None and isinstance(info, WarmConnectionInfo):
                if info.opener_pid == os.getpid():
                    try:
                        self._reset_session_on_return(conn)
                    except Exception as exc:
                        # Caller already has its result; the next checkout replaces it.
                        info.reset_failed = True
                        self.logger.info("warm connection reset failed: %r", exc)
                self._guard.mark_returned(info)
        finally:
            with self._lock:
                self._in_use = False

    def _reset_session_on_return(self, conn: Any) -> None:
        """Reset the session, or (idle psycopg session, ``DISCARD ALL`` mode) owe it
        a reset that the next transaction start sends with its ``BEGIN``."""
        if self._transaction_pooling:
            reset_session(conn, discard=False)  # ROLLBACK if needed; never DISCARD
            return
        defer = getattr(conn, "defer_session_reset", None)
        if defer is None:
            reset_session(conn)
            return
        if (
            self._defer_session_reset
            and not conn.closed
            and conn.pgconn.transaction_status == _IDLE
        ):
            defer()  # no round trip now: the next invocation's BEGIN carries it
            return
        # Not idle (SQLAlchemy's rollback failed?) or deferral off: DISCARD ALL now.
        conn.forget_deferred_reset()
        reset_session(conn)
        if conn._notifies_backlog is not None:
            conn._notifies_backlog.clear()  # the last invocation's unread notifications

    # -- pool API ---------------------------------------------------------------------

    def dispose(self) -> None:
        with self._lock:
            record = self._record if not self._in_use else None
            if record is not None:
                self._record = None
            elif self._in_use:
                self._close_on_return = True
        if record is not None:
            info = record.info.get(WARM_INFO_KEY)
            conn = record.dbapi_connection
            if (
                conn is not None
                and isinstance(info, WarmConnectionInfo)
                and info.opener_pid != os.getpid()
            ):
                abandon_inherited_connection(conn)
            record.close()
        self.logger.info("Pool disposed. %s", self.status())

    def recreate(self) -> WarmSQLAlchemyPool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
            warm_stats=self.stats,
            **self._warm_args,
        )

    def status(self) -> str:
        return (
            f"WarmSQLAlchemyPool warm connection: "
            f"{'in use' if self._in_use else ('idle' if self._record else 'none')}, "
            f"separate connections checked out: {self._separate}"
        )

    def size(self) -> int:
        return 1

    def checkedin(self) -> int:
        return 1 if self._record is not None and not self._in_use else 0

    def checkedout(self) -> int:
        return int(self._in_use) + self._separate

    def overflow(self) -> int:
        return self._separate


def _ping(conn: Any) -> bool:
    """One round trip that leaves no transaction behind; False when it fails.

    A psycopg connection that owes its session a reset sends it as the ping (the same
    single round trip): a connection that fails it is replaced in this checkout."""
    try:
        if getattr(conn, "session_reset_owed", False):
            with deadlines.step("pre-ping"):
                conn.send_deferred_reset()
            return True
        psycopg = sys.modules.get("psycopg")
        if psycopg is not None and isinstance(conn, psycopg.Connection):
            return _PSYCOPG.do_ping(conn)
        cursor = conn.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        return True
    except DeadlineExceededError:
        raise  # the driver closed it; the invocation has no time for another
    except Exception:
        # Whatever went wrong, this connection is not one to hand out: replace it.
        return False


# -- the session reset deferred to the next transaction ----------------------------------


@functools.cache
def _session_connection_class() -> type[Any]:
    """The psycopg connection class the adapter opens (built on first use: it imports
    psycopg, which ``import lambda_pool.sqlalchemy`` must not)."""
    from psycopg import Cursor, errors, generators

    from lambda_pool.dialects._psycopg_deadline import DeadlineConnection

    class OpeningCursor(Cursor[Any]):
        """A cursor whose ``execute()`` sends the transaction's opening (``BEGIN``, and
        the session reset the connection owes) in the same message as its statement,
        when the statement takes no parameters (psycopg's simple query protocol)."""

        def _execute_gen(
            self, query: Any, params: Any = None, *, prepare: Any = None, binary: Any = None
        ) -> Any:
            conn: Any = self._conn
            conn._opening_allowed = True  # _start_query() keeps the opening for us
            try:
                yield from super()._execute_gen(query, params, prepare=prepare, binary=binary)
            finally:
                conn._opening_allowed = False
                conn._opening = None

        def _maybe_prepare_gen(self, pgq: Any, *, prepare: Any = None, binary: Any = None) -> Any:
            conn: Any = self._conn
            opening, conn._opening = conn._opening, None
            if opening is None:
                yield from super()._maybe_prepare_gen(pgq, prepare=prepare, binary=binary)
                return
            text_format = self.format == _TEXT if binary is None else not binary
            query = pgq.query
            if (
                pgq.params  # the extended protocol: one statement a message
                or not text_format
                or prepare
                or conn.prepare_threshold is not None  # psycopg may prepare it
                or query.lstrip()[:4].upper() == b"COPY"  # needs psycopg's copy()
            ):
                yield from conn._send_opening_gen(opening, None)
                yield from super()._maybe_prepare_gen(pgq, prepare=prepare, binary=binary)
                return
            self._query = pgq
            results = yield from conn._send_opening_gen(opening, query)
            if not results:  # comments only: no result of its own; psycopg's way then
                yield from super()._maybe_prepare_gen(pgq, prepare=prepare, binary=binary)
                return
            self._check_results(results)  # the statement's own error, raised here
            self._set_results(results)

    class SessionResetConnection(DeadlineConnection):
        """A :class:`~lambda_pool.dialects._psycopg_deadline.DeadlineConnection` that
        opens transactions in fewer round trips and can owe its session a reset.

        Every statement psycopg runs first goes through ``_start_query()``
        (``execute``, ``executemany``, ``copy``, ``stream``, server-side cursors,
        ``Connection.execute``), which sends ``BEGIN`` when a transaction is to begin.
        Here, when the statement is a cursor's ``execute()`` (:class:`OpeningCursor`,
        the default cursor class), the opening waits for the statement and travels
        with it when it takes no parameters.  The opening carries the session reset
        the connection owes (:meth:`defer_session_reset`, the warm pool's return) in a
        transaction of its own before the ``BEGIN``; with no transaction to begin
        (autocommit) the owed reset is sent alone, first.  Entering ``transaction()``,
        ``pipeline()``, ``tpc_begin()`` or ``notifies()`` sends it first too, and
        :meth:`send_deferred_reset` sends it now (the warm pool's pre-ping).
        """

        _reset_owed = False
        _opening_allowed = False
        _opening: _Opening | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cursor_factory = OpeningCursor  # connect(cursor_factory=...) still wins

        def defer_session_reset(self) -> None:
            """Owe the session a reset, sent before the next statement."""
            self._reset_owed = True

        def forget_deferred_reset(self) -> None:
            """The caller resets the session another way (``DISCARD ALL``)."""
            self._reset_owed = False

        @property
        def session_reset_owed(self) -> bool:
            """Whether a deferred session reset is still to be sent."""
            return self._reset_owed

        def send_deferred_reset(self) -> None:
            """Send the owed reset now, as its own round trip (nothing when none is owed)."""
            if self._reset_owed:
                with self.lock:
                    self.wait(self._send_opening_gen(_opening(True, None), None))

        def _start_query(self) -> Any:
            begins = (
                not self._autocommit
                and self.pgconn.transaction_status == _IDLE
                and self._pipeline is None
            )
            if begins:
                opening = _opening(self._reset_owed, self._get_tx_start_command())
                if self._opening_allowed:
                    self._opening = opening  # sent by the cursor, with its statement
                    return
                if self._reset_owed:
                    yield from self._send_opening_gen(opening, None)
                    return
            elif self._reset_owed:
                yield from self._send_opening_gen(_opening(True, None), None)
            yield from super()._start_query()

        def _send_opening_gen(self, opening: _Opening, statement: bytes | None) -> Any:
            """Send ``opening`` and ``statement`` as one simple query; raise what the
            opening raised; return the statement's results."""
            pgconn = self.pgconn
            if opening.resets and (
                self._pipeline is not None or pgconn.transaction_status != _IDLE
            ):
                # Unreachable through psycopg's API (see the entry points above); if it is
                # ever reached, no statement may run in the previous session's state.
                pgconn.finish()
                raise errors.OperationalError(
                    "the session reset deferred from the last return could not be sent "
                    "before this statement; the connection was closed"
                )
            encoding = self.info.encoding
            query = opening.text.encode(encoding)
            if statement is not None:
                query += b"; " + statement  # last: it may end in a -- comment
            # Notifications still arriving for the last invocation's LISTEN belong to
            # it: dropped (psycopg would keep them in its backlog for notifies()).
            handler = pgconn.notify_handler
            if opening.resets:
                pgconn.notify_handler = None
            try:
                self._check_connection_ok()
                pgconn.send_query(query)
                results = yield from generators.execute(pgconn)
            finally:
                pgconn.notify_handler = handler
            head = results[: opening.count]
            failed = next((r for r in head if r.status == _FATAL_ERROR), None)
            if failed is not None or len(head) < opening.count:
                cause = (
                    errors.error_from_result(failed, encoding=encoding)
                    if failed is not None
                    else errors.InternalError("the server skipped part of the opening")
                )
                if not opening.resets:
                    raise cause  # the BEGIN's own error, as psycopg would raise it
                # The session's state is unknown: close it; the statement fails as on a
                # connection found broken, and SQLAlchemy replaces it.
                pgconn.finish()
                raise errors.OperationalError(
                    "the session reset deferred from the last return failed; the "
                    "connection was closed"
                ) from cause
            if opening.resets:
                self._reset_owed = False
                # DEALLOCATE ALL ran behind psycopg's back: forget its prepared statements
                # (what psycopg does itself when it sees DISCARD ALL), and the
                # notifications the last invocation left unread.
                self._prepared.clear()
                if self._notifies_backlog is not None:
                    self._notifies_backlog.clear()
            return results[opening.count :]

        @contextlib.contextmanager
        def transaction(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            self.send_deferred_reset()
            with super().transaction(*args, **kwargs) as tx:
                yield tx

        @contextlib.contextmanager
        def pipeline(self) -> Iterator[Any]:
            self.send_deferred_reset()
            with super().pipeline() as pipe:
                yield pipe

        def tpc_begin(self, xid: Any) -> None:
            self.send_deferred_reset()
            super().tpc_begin(xid)

        def notifies(self, *args: Any, **kwargs: Any) -> Generator[Any, None, None]:
            self.send_deferred_reset()
            yield from super().notifies(*args, **kwargs)

    return SessionResetConnection


#: The statements of :data:`SESSION_RESET_STATEMENTS`, one a string (none holds a ";"),
#: counted so that the opening's results are told apart from the statement's.
_RESET_PARTS = tuple(part.strip() for part in SESSION_RESET_STATEMENTS.split(";") if part.strip())


@functools.cache
def _opening(resets: bool, begin: bytes | None) -> _Opening:
    """The (immutable) opening for ``resets`` and psycopg's ``begin`` command, built once:
    every transaction start asks for one."""
    return _Opening(resets, begin)


class _Opening:
    """What goes before a transaction's first statement: the owed session reset in a
    transaction of its own (``BEGIN`` … ``COMMIT``, so that a ``ROLLBACK`` of the
    user's transaction cannot undo ``RESET ALL`` or ``DISCARD TEMP``), then the
    user's transaction start (psycopg's ``BEGIN`` command), each optional."""

    __slots__ = ("count", "resets", "text")

    def __init__(self, resets: bool, begin: bytes | None = None) -> None:
        parts = ["BEGIN", *_RESET_PARTS, "COMMIT"] if resets else []
        if begin is not None:
            parts.append(begin.decode("ascii"))
        self.resets = resets
        self.count = len(parts)
        self.text = "; ".join(parts)


# libpq's PQTRANS_IDLE, PGRES_FATAL_ERROR and the text format, by value (no import).
_IDLE = 0
_FATAL_ERROR = 7
_TEXT = 0


# -- credentials ------------------------------------------------------------------------


def _install_credentials(
    engine: Engine,
    provider: Any,
    *,
    recycle_on_credentials_expiry: bool,
    clock: Callable[[], float],
    warm: bool,
) -> None:
    """Give ``engine`` the provider's user/password, retry once on auth failure, and
    (outside the warm pool, which decides itself) retire expired connections at checkout."""

    @event.listens_for(engine, "do_connect")
    def _connect_with_credentials(
        dialect: Any, conn_rec: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> Any:
        base = dict(cparams)
        for attempt in (1, 2):
            creds = provider.get()
            params = _PSYCOPG.apply_credentials(
                base, creds.user, creds.password, creds.connect_args
            )
            try:
                conn = _driver_connect(dialect, cargs, params)
            except Exception as exc:
                if attempt == 1 and psycopg_is_auth_failure(exc):
                    # Rotated secret or stale token: forget the cache and try once more.
                    provider.refresh()
                    continue
                raise
            conn_rec.info[CREDENTIALS_EXPIRE_AT] = creds.expires_at
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    if recycle_on_credentials_expiry and not warm:

        @event.listens_for(engine, "checkout")
        def _retire_expired(dbapi_conn: Any, conn_rec: ConnectionPoolEntry, proxy: Any) -> None:
            expire_at = conn_rec.info.get(CREDENTIALS_EXPIRE_AT)
            if expire_at is not None and clock() >= expire_at:
                # SQLAlchemy invalidates this connection and reconnects, still inside
                # the checkout: an invocation never loses its connection midway.
                raise sa_exc.DisconnectionError("credentials expired; reconnecting")


# -- engine construction ----------------------------------------------------------------


def _driver_connect(dialect: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """A new DB-API connection: for blocking psycopg lambda-pool's
    :class:`~lambda_pool.dialects._psycopg_deadline.DeadlineConnection`, whose connect and
    every wait end by the current deadline (:mod:`lambda_pool.deadlines`)."""
    if getattr(dialect, "driver", None) == "psycopg" and not getattr(dialect, "is_async", False):
        return _session_connection_class().connect(*cargs, **cparams)
    return dialect.connect(*cargs, **cparams)


def _install_deadline_connect(engine: Engine) -> None:
    """Open psycopg connections whose waits end by the current deadline (without a
    credentials provider; with one, its ``do_connect`` listener does the same)."""

    @event.listens_for(engine, "do_connect")
    def _connect_with_deadline(
        dialect: Any, conn_rec: ConnectionPoolEntry, cargs: Any, cparams: dict[str, Any]
    ) -> Any:
        return _driver_connect(dialect, cargs, cparams)


def _timeout_connect_args(parsed: URL, kwargs: dict[str, Any]) -> None:
    """libpq connect/socket timeouts in ``connect_args`` (in place) for every key the URL
    and the caller's ``connect_args`` leave unset (SQLAlchemy lets ``connect_args`` win
    over the URL, hence the URL check)."""
    import psycopg  # noqa: F401  - psycopg_timeout_defaults() asks the loaded libpq

    connect_args = dict(kwargs.get("connect_args") or {})
    for key, value in psycopg_timeout_defaults().items():
        if key not in parsed.query and key not in connect_args:
            connect_args[key] = value
    kwargs["connect_args"] = connect_args


def _install_disconnect_rules(engine: Engine) -> None:
    """Count what lambda-pool's psycopg dialect counts as a lost session as a disconnect.

    SQLAlchemy's psycopg dialect does not treat SQLSTATE 25006 (a write on a read-only
    server: the old writer after a failover) as one, so a warm connection would stay on
    the reader for good; marked a disconnect, SQLAlchemy drops it and reconnects.
    """

    @event.listens_for(engine, "handle_error")
    def _lambda_pool_disconnects(context: Any) -> None:
        original = context.original_exception
        if not context.is_disconnect and (
            isinstance(original, DeadlineExceededError) or psycopg_is_disconnect(original, None)
        ):
            # A deadline hit closed the connection (pgconn.finish()): drop it too.
            context.is_disconnect = True


def _libpq_form(text: str) -> URL:
    """A PostgreSQL URL string read by lambda-pool's parser, as a SQLAlchemy ``URL``.

    So the adapter takes what libpq takes (``postgres://``, several hosts in the host
    part, key=value strings; several hosts become SQLAlchemy's ``?host=h1:5432&host=h2``)
    with the same checks, and malformed text raises lambda-pool's ``ArgumentError``,
    which never repeats a password."""
    from lambda_pool.url import make_url as libpq_make_url

    ours = libpq_make_url(text)
    query = {k: v for k, v in ours.query.items() if k not in ("host", "port")}
    hosts = ours.query.get("host")
    if hosts is not None:
        host_list = [hosts] if isinstance(hosts, str) else list(hosts)
        ports = ours.query.get("port", ())
        port_list = [ports] if isinstance(ports, str) else list(ports)
        port_list += [""] * (len(host_list) - len(port_list))
        query["host"] = tuple(
            f"{host}:{port}" if port else host
            for host, port in zip(host_list, port_list, strict=False)
        )
    return URL.create(
        ours.drivername,
        username=ours.username,
        password=ours.password,
        host=ours.host,
        port=ours.port,
        database=ours.database,
        query=query,
    )


def _normalise_url(url: str | URL) -> URL:
    from lambda_pool.conninfo import looks_like_conninfo

    if isinstance(url, str) and (
        looks_like_conninfo(url) or re.match(r"\s*postgres(ql)?(\+(psycopg|asyncpg))?://", url)
    ):
        # lambda-pool's parser: libpq's forms, values checked, and errors that never
        # repeat the password (SQLAlchemy's quote the text they choke on, and read an
        # unescaped '@' in a password as the start of the host).
        parsed = _libpq_form(url)
    else:
        parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    query_password = parsed.query.get("password")
    if isinstance(query_password, str):
        # libpq's ?password= wins over the user-info one; as the URL's password it is
        # masked in SQLAlchemy's repr, which shows every query value.
        parsed = parsed.set(password=query_password).difference_update_query(["password"])
    return parsed


def create_engine(
    url: str | URL,
    *,
    warm: bool = False,
    credentials: Any = None,
    pre_ping_idle_seconds: float | None = None,
    recycle_on_credentials_expiry: bool = True,
    transaction_pooling: bool = False,
    clock: Callable[[], float] | None = None,
    **sqlalchemy_kwargs: Any,
) -> Engine:
    """A SQLAlchemy ``Engine`` with lambda-pool's pool choice, credentials and registration.

    ``warm=True`` uses :class:`WarmSQLAlchemyPool` (and conflicts with ``poolclass``);
    ``pre_ping_idle_seconds`` (default: ``LAMBDA_POOL_PRE_PING_IDLE_SECONDS`` or 60),
    ``transaction_pooling`` (no ``DISCARD ALL``, no server-side prepared statements: for
    PgBouncer / RDS Proxy in transaction mode), ``defer_session_reset`` (default true: the
    session reset travels with the next invocation's ``BEGIN``; see the module docstring)
    and ``clock`` apply to it.  ``credentials``
    is a lambda-pool provider (``IAMCredentials``, ``SecretsManagerCredentials``,
    ``StaticCredentials``); ``clock`` defaults to the provider's.  Every other keyword
    goes to ``sqlalchemy.create_engine`` unchanged.
    """
    parsed = _normalise_url(url)
    if clock is None:
        clock = getattr(credentials, "clock", None)
    effective_clock: Callable[[], float] = clock or _wall_clock
    kwargs = dict(sqlalchemy_kwargs)
    is_psycopg = parsed.drivername == "postgresql+psycopg"
    _choose_pool(
        kwargs,
        warm=warm,
        is_psycopg=is_psycopg,
        pre_ping_idle_seconds=pre_ping_idle_seconds,
        recycle_on_credentials_expiry=recycle_on_credentials_expiry,
        transaction_pooling=transaction_pooling,
        clock=effective_clock,
    )
    if is_psycopg:
        _timeout_connect_args(parsed, kwargs)
    engine = sqlalchemy.create_engine(parsed, **kwargs)
    _equip_engine(
        engine,
        is_psycopg=is_psycopg,
        credentials=credentials,
        recycle_on_credentials_expiry=recycle_on_credentials_expiry,
        clock=effective_clock,
        warm=warm,
    )
    return engine


def _choose_pool(
    kwargs: dict[str, Any],
    *,
    warm: bool,
    is_psycopg: bool,
    pre_ping_idle_seconds: float | None,
    recycle_on_credentials_expiry: bool,
    transaction_pooling: bool,
    clock: Callable[[], float],
) -> None:
    """Set the pool keywords of ``sqlalchemy.create_engine`` in ``kwargs`` (in place):
    the warm pool, or NullPool unless the caller chose or sized a pool.  Shared by
    :func:`create_engine` and the ``lambda_pool`` SQLAlchemy plugin."""
    if warm:
        if "poolclass" in kwargs or "pool" in kwargs:
            raise ArgumentError(
                "warm=True chooses the pool (WarmSQLAlchemyPool); drop poolclass=/pool= "
                "or drop warm=True"
            )
        if any(name in kwargs for name in _QUEUE_POOL_ARGS):
            raise ArgumentError(
                "warm=True keeps exactly one connection; pool_size, max_overflow and "
                "pool_timeout do not apply to it"
            )
        kwargs["poolclass"] = WarmSQLAlchemyPool
        kwargs["pre_ping_idle_seconds"] = pre_ping_idle_seconds
        kwargs["recycle_on_credentials_expiry"] = recycle_on_credentials_expiry
        kwargs["transaction_pooling"] = transaction_pooling
        kwargs["warm_clock"] = clock
        if is_psycopg:
            connect_args = dict(kwargs.get("connect_args") or {})
            # See lambda_pool.warm.reset_session: keeps psycopg's prepared-statement
            # cache consistent with DISCARD ALL, and is required behind a
            # transaction-pooling proxy.
            if transaction_pooling:
                connect_args["prepare_threshold"] = None
            else:
                connect_args.setdefault("prepare_threshold", None)
            kwargs["connect_args"] = connect_args
        return
    if pre_ping_idle_seconds is not None or transaction_pooling:
        raise ArgumentError(
            "pre_ping_idle_seconds and transaction_pooling apply to warm=True engines; "
            "for other pools use pool_pre_ping=True and connect_args="
            '{"prepare_threshold": None}'
        )
    if "poolclass" not in kwargs and "pool" not in kwargs:
        sized = any(name in kwargs for name in _QUEUE_POOL_ARGS)
        kwargs["poolclass"] = QueuePool if sized else NullPool


def _equip_engine(
    engine: Engine,
    *,
    is_psycopg: bool,
    credentials: Any,
    recycle_on_credentials_expiry: bool,
    clock: Callable[[], float],
    warm: bool,
) -> None:
    """What a new engine gets after ``sqlalchemy.create_engine``: lambda-pool's disconnect
    rules, the credentials, and registration with the shutdown hooks."""
    if is_psycopg:
        _install_disconnect_rules(engine)
        if credentials is None:
            _install_deadline_connect(engine)
    if credentials is not None:
        _install_credentials(
            engine,
            credentials,
            recycle_on_credentials_expiry=recycle_on_credentials_expiry,
            clock=clock,
            warm=warm,
        )
    _register_for_shutdown(engine)


class _ShutdownHandle:
    """What the shutdown hook disposes for one SQLAlchemy engine.

    ``Engine.dispose()`` closes the idle connections and then builds (and logs) a new
    pool; at SIGTERM the process has a few hundred milliseconds left, so only the
    closing is done.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)

    def dispose_for_shutdown(self) -> None:
        engine = self._engine()
        if engine is not None:
            engine.pool.dispose()


# The registry holds handles weakly; each handle lives exactly as long as its engine.
_shutdown_handles: weakref.WeakKeyDictionary[Engine, _ShutdownHandle] = weakref.WeakKeyDictionary()


def _register_for_shutdown(engine: Engine) -> None:
    handle = _ShutdownHandle(engine)
    _shutdown_handles[engine] = handle
    lifecycle.register(handle)


def _wall_clock() -> float:
    import time

    return time.time()


# -- the warm cache for SQLAlchemy engines ----------------------------------------------

_engines: EngineCache[Engine] = EngineCache()


def warm_engine(url: str | URL, **kwargs: Any) -> Engine:
    """The container's warm SQLAlchemy engine for this identity, created on first call.

    Same identity rules as :func:`lambda_pool.warm_engine`: the URL without its password
    (the password and any option values are folded in through a per-process keyed
    digest), the credentials provider's identity, and every keyword.  Call it at module
    scope or in the handler: warm invocations get the same engine back.
    """
    parsed = _normalise_url(url)
    credentials = kwargs.get("credentials")
    key = identity_key(parsed, credentials, kwargs)
    return _engines.get_or_create(
        key, credentials, lambda: create_engine(parsed, warm=True, **kwargs)
    )


def cached_engines() -> list[Engine]:
    """The engines :func:`warm_engine` created in this process (for diagnostics)."""
    return _engines.engines()


def forget_cached_engines() -> list[Engine]:
    """Empty the cache, so the next :func:`warm_engine` call builds a new engine.

    What a new execution environment starts with; a test standing in for a cold start
    needs it.  The forgotten engines are returned, not disposed: the caller decides.
    """
    return _engines.forget()
