"""Helpers several test modules share (imported as ``support``: pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from lambda_pool.testing.postgres import PostgresServer


class FakeClock:
    """A wall clock the test moves by hand (it starts at the real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def in_forked_child(work: Callable[[], int]) -> int:
    """Run ``work`` in a ``fork()``ed child and return the number it produced.

    The child reports through a pipe and leaves with ``os._exit`` (no atexit hooks, no
    pytest teardown in the child); a failure in the child fails the test here.
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            os.write(write_fd, str(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    assert reported, "the forked child reported nothing"
    return int(reported)


def require_tls(server: PostgresServer) -> None:
    """Skip unless the test server offers TLS, which RDS IAM authentication requires."""
    if not server.ssl_enabled:
        pytest.skip(
            "the test PostgreSQL has no TLS, which IAM authentication requires; install "
            "TLS-capable binaries (apt-get install postgresql) or set LAMBDA_POOL_TEST_DSN"
        )
