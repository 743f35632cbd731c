"""Describe an AWS SDK failure without repeating its message, which could carry a secret.

botocore and Powertools put request details and, for transform failures, parts of the
fetched value into their messages.  lambda-pool's errors name only the error *code* or
exception class, which is enough to act on ("AccessDeniedException", "no credentials").
"""

from __future__ import annotations

__all__ = ["HINTS", "describe_aws_error"]

# botocore exception classes whose meaning we can state with a remedy.
HINTS = {
    "NoCredentialsError": "no AWS credentials were found (set them in the environment or "
    "give the function an execution role)",
    "PartialCredentialsError": "the AWS credentials in the environment are incomplete",
    "NoRegionError": "no AWS region is configured (pass region=... or set AWS_REGION)",
    "EndpointConnectionError": "the AWS endpoint could not be reached (VPC without a NAT "
    "gateway or VPC endpoint?)",
    "TransformParameterError": "the secret's value is not a JSON object",
}


def describe_aws_error(exc: BaseException) -> str:
    """A one-line, secret-free description of ``exc`` and the error it wraps."""
    # Powertools wraps the botocore error it caught (as context, not cause); look through
    # the chain for the most specific one.
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 5:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for err in reversed(seen):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if isinstance(code, str) and code:
                return f"AWS error {code}"
        hint = HINTS.get(type(err).__name__)
        if hint is not None:
            return hint
    return f"{type(exc).__name__} (details withheld: they may contain secret material)"
