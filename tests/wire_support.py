"""Counting round trips twice, by the server and on the wire, for the round-trip tests.

A throw-away PostgreSQL logs every statement with the backend's pid
(``log_statement=all``: a simple query is a ``statement:`` line, an extended-protocol
bind and execute an ``execute <name>:`` one), and a fault proxy in front of it counts
server replies (one per round trip).  ``tests/test_round_trips*.py`` measure lambda-pool
and a raw held connection this same way in the same test.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from lambda_pool.testing.faults import FaultProxy
from lambda_pool.testing.postgres import EmbeddedPostgres

_LOG_LINE = re.compile(r"^(\d+)\|.*?LOG:  (?:statement|execute [^:]*): (.*)$")


@dataclass
class Wire:
    """The logging server, the proxy in front of it, and how to read both."""

    server: EmbeddedPostgres
    proxy: FaultProxy

    @property
    def url(self) -> str:
        return self.proxy.url_for(self.server.dsn)

    def url_for_driver(self, driver: str) -> str:
        """The proxy's URL naming ``driver`` (``postgresql+asyncpg://``)."""
        return self.url.replace("postgresql://", f"postgresql+{driver}://", 1)

    def statements(self, since: int, pid: int) -> list[str]:
        """Statements backend ``pid`` logged after byte ``since`` of the log."""
        found = []
        for line in self.server.log_file.read_text()[since:].splitlines():
            match = _LOG_LINE.match(line)
            if match and int(match.group(1)) == pid:
                found.append(match.group(2).strip())
        return found

    def count(self, call: Callable[[], Any], pid: int | Callable[[], int]) -> tuple[int, list[str]]:
        """``(server replies, logged statements)`` of one ``call()``; ``pid`` is the
        backend's, or a function telling it after the call (a new connection)."""
        since = len(self.server.log_file.read_text())
        self.proxy.clear_counters()
        call()
        replies = self.proxy.counters().replies
        backend = pid if isinstance(pid, int) else pid()
        # The logger writes asynchronously of the reply; wait until the lines are in.
        for _ in range(50):
            if self.statements(since, backend):
                break
            time.sleep(0.02)
        time.sleep(0.05)
        return replies, self.statements(since, backend)


@contextlib.contextmanager
def logging_wire(setup_sql: str = "") -> Iterator[Wire]:
    """A logging server with ``setup_sql`` run on it, and a counting proxy in front."""
    settings = {"log_statement": "all", "log_line_prefix": "%p|"}
    with EmbeddedPostgres(settings=settings, ssl=False) as server:
        if setup_sql:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute(setup_sql.encode())
        with FaultProxy.in_front_of(server.dsn) as proxy:
            yield Wire(server, proxy)
