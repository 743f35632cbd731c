"""Keep the AWS SDK's debug logging from printing the secrets lambda-pool fetches or signs.

At DEBUG, botocore logs the SigV4 canonical request and signature (``botocore.auth``:
together they are an RDS IAM token) and every response body (``botocore.parsers``: a
``GetSecretValue`` body is the secret).  While a provider signs or reads, those loggers
drop records from that thread; other AWS calls keep their debug logs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

__all__ = ["SECRET_READ_LOGGERS", "SIGNING_LOGGERS", "hide_sdk_debug"]

SIGNING_LOGGERS = ("botocore.auth",)
SECRET_READ_LOGGERS = ("botocore.parsers",)


class _ThreadScopedMute(logging.Filter):
    """Drops every record while the current thread is inside ``hide_sdk_debug``."""

    def __init__(self) -> None:
        super().__init__()
        self.state = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.state, "depth", 0)


_mute = _ThreadScopedMute()
_installed: set[str] = set()
_lock = threading.Lock()


@contextlib.contextmanager
def hide_sdk_debug(logger_names: tuple[str, ...]) -> Iterator[None]:
    """Mute ``logger_names`` for the current thread for the duration of the block."""
    with _lock:
        for name in logger_names:
            if name not in _installed:
                logging.getLogger(name).addFilter(_mute)
                _installed.add(name)
    _mute.state.depth = getattr(_mute.state, "depth", 0) + 1
    try:
        yield
    finally:
        _mute.state.depth -= 1
