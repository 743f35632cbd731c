"""Driver probing: what psycopg, asyncpg or a DB-API driver says about a connection, no round trip.

Recognises the driver by module name (never importing it), reads its local state
(:func:`probe_driver`), polls the socket for unread input, and drops a connection
inherited across ``fork()`` without disturbing the parent (:func:`abandon_inherited_connection`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import select
from typing import TYPE_CHECKING, Any

from lambda_pool.pool.base import running_loop

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import asyncio

log = logging.getLogger("lambda_pool.warm")


def _is_psycopg(conn: Any) -> bool:
    # Checked by module name so that this module never imports the driver; along the
    # MRO, so a subclass of psycopg's connection defined elsewhere counts too.  Known
    # per class: this runs at every checkout and return.
    kind = type(conn)
    known = _PSYCOPG_CLASSES.get(kind)
    if known is None:
        known = _PSYCOPG_CLASSES[kind] = any(
            cls.__module__.startswith("psycopg") for cls in kind.__mro__
        )
    return known


_PSYCOPG_CLASSES: dict[type, bool] = {}


def _is_asyncpg(conn: Any) -> bool:
    return type(conn).__module__.startswith("asyncpg")


def _pq_transaction_status(conn: Any) -> int:
    """libpq's transaction status of a psycopg connection (0 idle, 1 active, 2 in a
    transaction, 3 failed, 4 unknown), read from ``pgconn`` without building psycopg's
    ``ConnectionInfo`` and enum."""
    return int(conn.pgconn.transaction_status)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    return running_loop()


@dataclasses.dataclass(frozen=True)
class DriverState:
    """What the driver and the socket say about a connection, read without a round trip."""

    closed: bool
    idle: bool
    pending_input: bool = False


def probe_driver(conn: Any) -> DriverState:
    """The driver's view of ``conn``, without any network round trip.

    psycopg 3 (``Connection`` and ``AsyncConnection`` alike) reads libpq's local state
    (``closed``, ``broken``, ``info.transaction_status``); asyncpg its protocol's
    (``is_closed()``, ``is_in_transaction()``, both from the last message received).  For
    both the socket is polled with a zero timeout for unread input.  Other DB-API
    drivers report what they expose (``closed``, ``in_transaction``) and are otherwise
    assumed open and idle.
    """
    if _is_psycopg(conn):
        if bool(conn.closed) or bool(getattr(conn, "broken", False)):
            return DriverState(closed=True, idle=False)
        # pq.TransactionStatus.IDLE == 0; compared by value to avoid importing psycopg.
        idle = _pq_transaction_status(conn) == 0
        return DriverState(closed=False, idle=idle, pending_input=_socket_readable(conn))
    if _is_asyncpg(conn):
        if bool(conn.is_closed()):
            return DriverState(closed=True, idle=False)
        return DriverState(
            closed=False,
            idle=not bool(conn.is_in_transaction()),
            pending_input=_socket_readable(conn),
        )
    closed = bool(getattr(conn, "closed", False))
    return DriverState(closed=closed, idle=not bool(getattr(conn, "in_transaction", False)))


def _socket_fileno(conn: Any) -> int | None:
    """The descriptor of ``conn``'s socket, or ``None`` when the driver does not expose one.

    psycopg: ``fileno()`` (libpq's ``pgconn.socket``), sync and async; asyncpg: its
    dialect's :func:`~lambda_pool.dialects.asyncpg.asyncpg_socket_fileno`.  Only polled
    or duplicated here, never read from.
    """
    if _is_asyncpg(conn):
        from lambda_pool.dialects.asyncpg import asyncpg_socket_fileno

        return asyncpg_socket_fileno(conn)
    try:
        fileno = int(conn.fileno())
    except Exception:
        return None
    return fileno if fileno >= 0 else None


def _socket_readable(conn: Any) -> bool:
    """True when the connection's socket has data or EOF waiting (a zero-timeout poll).

    For asyncpg this sees what the kernel holds; what asyncio already read (its loop
    reads eagerly while it runs) has reached the protocol, which then reports the
    connection closed by itself.
    """
    fileno = _socket_fileno(conn)
    if fileno is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


def abandon_inherited_connection(conn: Any) -> None:
    """Forget a connection inherited across ``fork()`` without disturbing the parent.

    Closing it normally would make libpq send *Terminate* on the socket the parent still
    uses, ending the parent's session; letting the garbage collector finalize it does the
    same.  Instead the child's copy of the descriptor is pointed at ``/dev/null``
    (``dup2``), so the driver's close writes there and releases only the child's memory;
    the parent's descriptor is a different file-table entry and stays open.  psycopg's
    ``AsyncConnection`` is closed the same way through libpq (``pgconn.finish()``, no
    event loop).  An asyncpg connection is only kept referenced, never closed: each of
    its close paths goes through asyncio's selector, which after ``fork()`` is the
    parent's epoll instance, shared.
    """
    if _is_asyncpg(conn):
        _ABANDONED.append(conn)
        return
    fileno = _socket_fileno(conn)
    if fileno is None:
        _ABANDONED.append(conn)  # cannot neutralise it: keep it alive, never finalize
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)
    try:
        if _is_psycopg(conn) and inspect.iscoroutinefunction(type(conn).close):
            conn.pgconn.finish()
        else:
            conn.close()
    except Exception:
        log.debug("closing an abandoned inherited connection failed", exc_info=True)


_ABANDONED: list[Any] = []
