"""Exceptions raised by lambda-pool.

Every exception a user can see derives from :class:`LambdaPoolError`; the ones
that mirror SQLAlchemy's (``ArgumentError``, ``TimeoutError``,
``DisconnectionError``, ``InvalidRequestError``) carry the same names so code
written against SQLAlchemy's pool keeps catching them.  Messages say what was
wrong and what to do, and never contain a password, token or secret value.
"""

from __future__ import annotations

import builtins


class LambdaPoolError(Exception):
    """Base class of every lambda-pool error."""


class ArgumentError(LambdaPoolError, ValueError):
    """A function or constructor was given an argument it cannot use."""


class InvalidRequestError(LambdaPoolError):
    """The operation is not valid in the object's current state (e.g. a closed connection)."""


class ResourceClosedError(InvalidRequestError):
    """A connection, proxy or result was used after it was closed."""


class TimeoutError(LambdaPoolError, builtins.TimeoutError):
    """No connection became available within the pool's ``timeout``."""


class DisconnectionError(LambdaPoolError):
    """A connection was found dead; raised in a ``checkout`` listener it asks for a new one."""


class DriverNotInstalledError(LambdaPoolError, ImportError):
    """The database driver a URL asks for is not installed; the message names the extra."""


class CredentialsError(LambdaPoolError):
    """Credentials could not be obtained (secret missing, IAM signing failed, bad config)."""


class StatementTimeoutError(LambdaPoolError, builtins.TimeoutError):
    """A statement was cancelled because the Lambda invocation was about to time out."""


class DeadlineExceededError(LambdaPoolError, builtins.TimeoutError):
    """A blocking step (connect, pre-ping, statement, commit, reset) did not end before
    the invocation's deadline; its connection was discarded.

    ``step`` names the step, ``remaining_ms`` the time it had left when it started,
    ``cause`` what was seen (e.g. that the server did not answer), in words.
    """

    def __init__(
        self, message: str, *, step: str = "", remaining_ms: int = 0, cause: str = ""
    ) -> None:
        super().__init__(message)
        self.step = step
        self.remaining_ms = remaining_ms
        self.cause = cause


class CapacityExhaustedError(DeadlineExceededError):
    """No connection slot came free within the invocation's deadline: the connects were
    refused for lack of connection slots (the server's last refusal is ``__cause__``).

    A :class:`DeadlineExceededError` of the ``connect`` step: code that handles running
    out of time handles this too.  ``attempts``: connects tried (the last one may have
    been cut by the deadline instead of refused); ``elapsed_ms``: time spent on them and
    the backoff between them; ``remaining_ms``: time left when lambda-pool gave up.
    """

    def __init__(
        self, message: str, *, attempts: int = 0, elapsed_ms: int = 0, remaining_ms: int = 0
    ) -> None:
        super().__init__(message, step="connect", remaining_ms=remaining_ms)
        self.attempts = attempts
        self.elapsed_ms = elapsed_ms
