"""A stand-in for the context object AWS Lambda passes to a handler, for local runs and tests.

It has the attributes and the one method the real ``LambdaContext`` offers, with the
remaining time counted down from a deadline fixed at creation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LambdaContext"]

_REGION = "us-east-1"
_ACCOUNT = "123456789012"


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
        return max(0, round((self._deadline - self.clock()) * 1000))
