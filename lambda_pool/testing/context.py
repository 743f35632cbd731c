"""A stand-in for the context object AWS Lambda passes to a handler, for local runs and tests.

It has the attributes and methods of awslambdaric's ``LambdaContext`` (the object a real
Lambda passes): ``aws_request_id``, ``function_name``, ``function_version``,
``memory_limit_in_mb``, ``invoked_function_arn``, ``log_group_name``,
``log_stream_name``, ``client_context``, ``identity``, ``tenant_id``,
``get_remaining_time_in_millis()`` and ``log()``, with the remaining time counted down
from a deadline fixed at creation.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CognitoIdentity", "LambdaContext"]

_REGION = "us-east-1"
_ACCOUNT = "123456789012"


@dataclass
class CognitoIdentity:
    """``context.identity``: set for invocations through the AWS Mobile SDK, else both
    ``None`` (the runtime always gives the object)."""

    cognito_identity_id: str | None = None
    cognito_identity_pool_id: str | None = None


@dataclass
class LambdaContext:
    """Like the runtime's context: ``get_remaining_time_in_millis()`` falls as time passes.

    ``LambdaContext(remaining_ms=3000)`` behaves like an invocation with three seconds
    left. `clock` (monotonic seconds) can be injected to control time in tests.
    """

    function_name: str = "lambda-pool-test"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 128
    remaining_ms: int = 3000
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    invoked_function_arn: str = ""
    log_group_name: str = ""
    log_stream_name: str = ""
    #: The mobile client's context (``None`` unless the invoker sent one).
    client_context: Any = None
    identity: CognitoIdentity = field(default_factory=CognitoIdentity)
    #: The tenant of a multi-tenant function's invocation, else ``None``.
    tenant_id: str | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _deadline: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._deadline = self.clock() + self.remaining_ms / 1000.0
        if not self.invoked_function_arn:
            self.invoked_function_arn = (
                f"arn:aws:lambda:{_REGION}:{_ACCOUNT}:function:{self.function_name}"
            )
        if not self.log_group_name:
            self.log_group_name = f"/aws/lambda/{self.function_name}"
        if not self.log_stream_name:
            # The runtime's format: date/[version]hex-id.
            self.log_stream_name = (
                time.strftime("%Y/%m/%d", time.gmtime())
                + f"/[{self.function_version}]{uuid.uuid4().hex}"
            )

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the deadline, never below zero (as the runtime reports)."""
        # round, not truncate: float subtraction would turn 300 ms into 299.
        left = (self._deadline - self.clock()) * 1000
        return round(left) if left > 0 else 0

    def log(self, msg: object) -> None:
        """Write ``msg`` to the function's log, as the runtime's ``context.log`` does: to a
        root-logger handler that has a ``log_sink`` (the runtime's), else to stdout."""
        for handler in logging.getLogger().handlers:
            sink = getattr(handler, "log_sink", None)
            if sink is not None:
                sink.log(str(msg))
                return
        sys.stdout.write(str(msg))
