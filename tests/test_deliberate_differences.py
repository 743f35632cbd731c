"""Each difference from SQLAlchemy that the README lists as deliberate, shown side by side
with SQLAlchemy 2.x on the same input (issue 11 §8: the list must be true)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")
import sqlalchemy.pool as sa_pool  # noqa: E402

import lambda_pool  # noqa: E402
from lambda_pool import exc  # noqa: E402
from lambda_pool import pool as lp_pool  # noqa: E402


def _memory() -> sqlite3.Connection:
    return sqlite3.connect(":memory:")


def test_file_sqlite_gets_nullpool_where_sqlalchemy_gives_queuepool(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert type(lambda_pool.create_engine(url).pool).__name__ == "NullPool"
    assert type(sqlalchemy.create_engine(url).pool).__name__ == "QueuePool"


def test_in_memory_sqlite_gets_singletonthreadpool_in_both() -> None:
    assert type(lambda_pool.create_engine("sqlite://").pool).__name__ == "SingletonThreadPool"
    assert type(sqlalchemy.create_engine("sqlite://").pool).__name__ == "SingletonThreadPool"


@pytest.mark.parametrize("name", ["NullPool", "StaticPool", "SingletonThreadPool"])
def test_status_gives_the_four_figures_where_sqlalchemy_gives_the_class_name(name: str) -> None:
    ours = getattr(lp_pool, name)(_memory).status()
    theirs = getattr(sa_pool, name)(_memory).status()
    assert ours.startswith("Pool size: ") and "Current Checked out connections: 0" in ours
    assert theirs.startswith(name)


def test_a_negative_pool_size_is_refused_where_sqlalchemy_accepts_it() -> None:
    theirs = sa_pool.QueuePool(_memory, pool_size=-1)
    assert theirs.size() == -1
    with pytest.raises(exc.ArgumentError, match="pool_size"):
        lp_pool.QueuePool(_memory, pool_size=-1)


def test_execute_refuses_sqlalchemy_text_with_advice() -> None:
    engine = lambda_pool.create_engine("sqlite://")
    with engine.connect() as conn:
        with pytest.raises(
            exc.InvalidRequestError, match=r"lambda_pool\.sqlalchemy\.create_engine"
        ):
            conn.execute(sqlalchemy.text("SELECT 1"))  # type: ignore[arg-type]
        assert conn.execute("SELECT 1").scalar() == 1
