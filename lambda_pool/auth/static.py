"""``StaticCredentials``: a fixed user and password, for local databases and tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from lambda_pool.auth.base import Credentials
from lambda_pool.exc import ArgumentError

__all__ = ["StaticCredentials"]


class StaticCredentials:
    """A provider that always returns the same user and password; they never expire.

    ``refresh()`` has nothing to re-read, so a failed authentication fails again on the
    engine's single retry and the caller sees the server's error.
    """

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        connect_args: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(user, str) or not user:
            raise ArgumentError("StaticCredentials needs a non-empty user name")
        if password is not None and not isinstance(password, str):
            raise ArgumentError("StaticCredentials password must be a str or None")
        self.clock = clock
        self._credentials = Credentials(user, password, None, dict(connect_args or {}))

    def get(self) -> Credentials:
        """Return the fixed credentials (immutable, so sharing them between threads is safe)."""
        return self._credentials

    def refresh(self) -> None:
        """Nothing is cached from elsewhere, so there is nothing to forget."""

    def __repr__(self) -> str:
        return f"StaticCredentials(user={self._credentials.user!r}, password='***')"
