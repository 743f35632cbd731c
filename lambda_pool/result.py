"""``Result``: the rows of one executed statement, fully fetched, read as SQLAlchemy's are.

Rows are fetched before ``execute()`` returns (psycopg's default cursor does this
anyway), so a result stays readable after its connection went back to the pool, and
the sync and async engines return the same class.  Rows are plain tuples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lambda_pool.exc import InvalidRequestError, ResourceClosedError

__all__ = ["MultipleResultsFound", "NoResultFound", "Result"]


class NoResultFound(InvalidRequestError):
    """``one()``/``scalar_one()`` found no row."""


class MultipleResultsFound(InvalidRequestError):
    """``one()``/``scalar_one()``/``one_or_none()`` found more than one row."""


class Result:
    """Rows (tuples), column names and ``rowcount`` of one statement."""

    __slots__ = ("_closed", "_keys", "_position", "_returns_rows", "_rows", "rowcount")

    def __init__(
        self,
        keys: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
        rowcount: int,
        returns_rows: bool = True,
    ) -> None:
        self._keys = keys if keys.__class__ is tuple else tuple(keys)  # a tuple is kept as is
        self._rows = list(rows)
        self._position = 0
        self._returns_rows = returns_rows
        self._closed = False
        #: Rows the statement touched, as the driver reports it (-1 when unknown).
        self.rowcount = rowcount

    # state ----------------------------------------------------------------------------

    @property
    def returns_rows(self) -> bool:
        """False for statements without a result set (INSERT without RETURNING, DDL)."""
        return self._returns_rows

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Discard the remaining rows; reading afterwards raises ``ResourceClosedError``."""
        self._closed = True
        self._rows = []

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self._keys)

    def _check(self) -> None:
        if not self._returns_rows:
            raise ResourceClosedError(
                "This result object does not return rows (the statement has no result set)."
            )
        if self._closed:
            raise ResourceClosedError("This result object is closed.")

    def _take(self, count: int | None) -> list[tuple[Any, ...]]:
        self._check()
        end = len(self._rows) if count is None else min(len(self._rows), self._position + count)
        rows = self._rows[self._position : end]
        self._position = end
        return rows

    # fetching ---------------------------------------------------------------------------

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row, or ``None`` when there are no more."""
        rows = self._take(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        """Up to ``size`` next rows (1 when not given, like DB-API's default arraysize)."""
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InvalidRequestError(f"fetchmany size must be an integer >= 0, got {size!r}")
        return self._take(1 if size is None else size)

    def fetchall(self) -> list[tuple[Any, ...]]:
        """Every remaining row."""
        return self._take(None)

    def all(self) -> list[tuple[Any, ...]]:
        """Every remaining row (SQLAlchemy 2.0's spelling of ``fetchall``)."""
        return self._take(None)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self._check()
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def first(self) -> tuple[Any, ...] | None:
        """The first remaining row or ``None``; closes the result."""
        row = self.fetchone()
        self.close()
        return row

    def one_or_none(self) -> tuple[Any, ...] | None:
        """The only remaining row, ``None`` when there is none; more rows raise."""
        rows = self._take(None)
        self.close()
        if len(rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when one or none was required")
        return rows[0] if rows else None

    def one(self) -> tuple[Any, ...]:
        """Exactly one remaining row, else ``NoResultFound``/``MultipleResultsFound``."""
        row = self.one_or_none()
        if row is None:
            raise NoResultFound("No row was found when one was required")
        return row

    def scalar(self) -> Any:
        """The first column of the first row, or ``None`` without rows; closes the result."""
        row = self.first()
        return None if row is None else row[0]

    def scalar_one(self) -> Any:
        """The first column of exactly one row."""
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        """The first column of the only row, or ``None`` without rows."""
        row = self.one_or_none()
        return None if row is None else row[0]

    def scalars(self) -> list[Any]:
        """The first column of every remaining row."""
        return [row[0] for row in self._take(None)]

    def __repr__(self) -> str:
        return f"<Result keys={list(self._keys)!r} rows={len(self._rows)} rowcount={self.rowcount}>"
