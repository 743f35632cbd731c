"""lambda-pool sample: the SQLAlchemy ORM on a warm engine from ``lambda_pool.sqlalchemy``.

``lambda_pool.sqlalchemy.warm_engine()`` returns SQLAlchemy's own ``Engine`` whose pool
keeps one connection across invocations and checks it before each reuse (same process,
no SnapStart restore, not broken, idle, within its recycle and credentials deadlines,
pre-pinged after an idle gap) — the ORM code below is ordinary SQLAlchemy 2.0.

Configuration comes from the same ``LAMBDA_POOL_*`` variables as ``@with_connection()``
(template.yaml sets them), read by :class:`lambda_pool.config.Settings`:
``LAMBDA_POOL_DATABASE_URL``, ``LAMBDA_POOL_AUTH`` (``static``/``iam``/``secret``),
``LAMBDA_POOL_SECRET_ARN``, ``LAMBDA_POOL_PRE_PING_IDLE_SECONDS``,
``LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS``, ``LAMBDA_POOL_TRANSACTION_POOLING``,
``LAMBDA_POOL_REGISTER_EXTENSION``.

``{"fail": true}`` raises ``ValueError`` after the INSERT was flushed: the session's
transaction is rolled back and the visit is not counted.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Text, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from lambda_pool import lifecycle
from lambda_pool.config import Settings, credentials_for
from lambda_pool.sqlalchemy import warm_engine

SOURCE = "sqlalchemy"


class Base(DeclarativeBase):
    pass


class Visit(Base):
    """One invocation's visit; the table is shared with the other samples."""

    __tablename__ = "visits"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # bigserial
    source: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    visited_at: Mapped[datetime.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


# --- Init: runs once per execution environment ------------------------------------------
# Read and validate the settings at import: a bad variable fails the deployment's first
# Init with a message naming it, instead of failing every invocation.
settings = Settings.from_env()
_url = settings.url()
engine = warm_engine(
    # SQLAlchemy parses the URL itself; the password (static mode) must survive the trip.
    _url.render_as_string(hide_password=False),
    credentials=credentials_for(settings, _url),
    pre_ping_idle_seconds=settings.pre_ping_idle_seconds,
    transaction_pooling=settings.transaction_pooling,
)
# Dispose the engine on SIGTERM / at exit / around SnapStart.  Lambda only sends SIGTERM
# when an extension is registered; lambda-pool can register an internal one.
lifecycle.install_shutdown_hooks()
if settings.register_extension:
    lifecycle.register_internal_extension()

_schema_ready = False


def _ensure_schema() -> None:
    """``CREATE TABLE IF NOT EXISTS`` once per container (``checkfirst`` is the default)."""
    global _schema_ready
    if not _schema_ready:
        Base.metadata.create_all(engine)
        _schema_ready = True


def _checkout_summary(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """What the warm pool did during this invocation, from two ``engine.pool.stats`` reads.

    ``reused`` is true only when no connection had to be opened: on a cold start the
    table check opens the connection and the session then reuses it, which is still a
    new connection as far as this invocation is concerned.
    """
    opened = now["opened"] > before["opened"]
    return {
        "opened": opened,
        "reused": not opened and now["reused"] > before["reused"],
        "pre_ping": now["pre_pings"] > before["pre_pings"],
    }


def _deadline_timeout(session: Session, context: Any) -> None:
    """Bound this transaction's statements by the invocation's remaining time.

    ``set_config(..., true)`` is ``SET LOCAL``: it ends with the transaction, so nothing
    leaks into the next invocation on the warm connection.
    """
    remaining = context.get_remaining_time_in_millis() - settings.margin_ms
    session.execute(
        text("SELECT set_config('statement_timeout', :ms, true)"),
        {"ms": str(max(remaining, 1))},
    )


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Record one visit in one transaction; answer with the count and the backend."""
    stats = engine.pool.stats  # a WarmSQLAlchemyPool (warm_engine chose it): WarmStats
    before = stats.as_dict()
    _ensure_schema()
    with Session(engine) as session, session.begin():
        # Check the connection out now, so the summary covers this invocation's checkout.
        session.connection()
        summary = _checkout_summary(before, stats.as_dict())
        _deadline_timeout(session, context)
        session.add(Visit(source=SOURCE, request_id=context.aws_request_id))
        session.flush()
        if event.get("fail"):
            # session.begin() rolls the flushed INSERT back on the way out.
            raise ValueError("the event asked this invocation to fail")
        visits = session.scalar(
            select(func.count()).select_from(Visit).where(Visit.source == SOURCE)
        )
        backend_pid = session.scalar(text("SELECT pg_backend_pid()"))
    return {
        "visits": visits,
        "backend_pid": backend_pid,
        "reused": summary["reused"],
        "connection": summary,
    }
