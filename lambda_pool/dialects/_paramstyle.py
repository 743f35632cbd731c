"""Translate psycopg-style placeholders (``%s``, ``%(name)s``) for other drivers.

``Connection.execute()`` takes the same SQL on every driver: psycopg's
``format``/``pyformat`` style.  asyncpg wants ``$1, $2`` and sqlite3 wants ``?``
or ``:name``; this module rewrites the text following psycopg's own rules, so a
statement that works on psycopg works unchanged on the others:

* without parameters the SQL is sent as written (``%`` needs no escaping);
* with parameters every ``%`` starts a placeholder: ``%s`` (also ``%b``/``%t``),
  ``%(name)s`` or ``%%`` for a literal ``%``; anything else is an error, as are
  mixing positional and named placeholders and a count that does not match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lambda_pool.exc import ArgumentError

__all__ = ["Params", "to_numeric", "to_sqlite"]

Params = Sequence[Any] | Mapping[str, Any] | None

_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\))?(?P<fmt>.?)", re.S)


def _walk(sql: str, params: Params, emit: Callable[[int, str | None], str]) -> tuple[str, int]:
    """Rewrite every placeholder with ``emit(position, name)``; return (sql, count)."""
    if isinstance(params, (str, bytes)):
        raise ArgumentError(
            "query parameters must be a sequence or a mapping, not a string: "
            "write execute(sql, (value,)) for a single value"
        )
    named = isinstance(params, Mapping)
    out: list[str] = []
    pos = 0
    count = 0
    for match in _PLACEHOLDER.finditer(sql):
        out.append(sql[pos : match.start()])
        pos = match.end()
        name, fmt = match.group("name"), match.group("fmt")
        if name is None and fmt == "%":
            out.append("%")
            continue
        if fmt not in ("s", "b", "t"):
            raise ArgumentError(
                f"only '%s', '%b', '%t' (or '%(name)s') are placeholders, found "
                f"{match.group(0)!r}; write '%%' for a literal '%'"
            )
        if (name is not None) != named:
            raise ArgumentError(
                "positional placeholders ('%s') need a sequence of parameters and named "
                "placeholders ('%(name)s') a mapping; they cannot be mixed"
            )
        out.append(emit(count, name))
        count += 1
    out.append(sql[pos:])
    return "".join(out), count


def to_numeric(sql: str, params: Params) -> tuple[str, list[Any]]:
    """Rewrite for asyncpg: ``$1, $2 …``; a name used twice reuses its number."""
    if params is None:
        return sql, []
    numbers: dict[str, int] = {}
    args: list[Any] = []

    def emit(position: int, name: str | None) -> str:
        if name is None:
            return f"${position + 1}"
        if name not in numbers:
            if not isinstance(params, Mapping) or name not in params:
                raise ArgumentError(f"query parameter {name!r} is missing")
            args.append(params[name])
            numbers[name] = len(args)
        return f"${numbers[name]}"

    text, count = _walk(sql, params, emit)
    if not isinstance(params, Mapping):
        args = list(params)
        if count != len(args):
            raise ArgumentError(
                f"the query has {count} placeholders but {len(args)} parameters were passed"
            )
    return text, args


def to_sqlite(sql: str, params: Params) -> tuple[str, Sequence[Any] | Mapping[str, Any]]:
    """Rewrite for sqlite3: ``%s`` → ``?``, ``%(name)s`` → ``:name``."""
    if params is None:
        return sql, ()

    def emit(position: int, name: str | None) -> str:
        if name is None:
            return "?"
        if not isinstance(params, Mapping) or name not in params:
            raise ArgumentError(f"query parameter {name!r} is missing")
        if not name.isidentifier():
            raise ArgumentError(f"sqlite parameter names must be identifiers, got {name!r}")
        return f":{name}"

    text, count = _walk(sql, params, emit)
    if isinstance(params, Mapping):
        return text, params
    if count != len(params):
        raise ArgumentError(
            f"the query has {count} placeholders but {len(params)} parameters were passed"
        )
    return text, tuple(params)
