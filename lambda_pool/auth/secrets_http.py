"""Read a Secrets Manager secret without boto3: a signed ``GetSecretValue`` call, or the extension.

Two lightweight ways to the same ``GetSecretValue`` answer (a JSON object whose
``SecretString`` is the secret):

- :func:`get_secret_value_from_api`: one SigV4-signed POST (JSON 1.1 protocol,
  ``X-Amz-Target: secretsmanager.GetSecretValue``) over :mod:`http.client`, to
  ``AWS_ENDPOINT_URL_SECRETS_MANAGER`` or ``AWS_ENDPOINT_URL`` when set (moto server,
  LocalStack, a VPC endpoint), else ``https://secretsmanager.<region>.amazonaws.com``.
- :func:`get_secret_value_from_extension`: a GET to the AWS Parameters and Secrets Lambda
  Extension on ``localhost:$PARAMETERS_SECRETS_EXTENSION_HTTP_PORT``, authenticated with
  the function's ``AWS_SESSION_TOKEN``; the extension caches (``SECRETS_MANAGER_TTL``).

Why hand-written instead of boto3: boto3's import (0.2-0.4 s) plus a client (0.1-0.3 s)
would be most of a cold start for one HTTPS request.  Errors name the AWS error code or
the failure's class, never a response body or the secret.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from lambda_pool.auth.sigv4 import find_aws_credentials, sign_json_request

__all__ = [
    "EXTENSION_PORT_VARIABLE",
    "SecretReadError",
    "get_secret_value_from_api",
    "get_secret_value_from_extension",
    "secrets_manager_endpoint",
]

EXTENSION_PORT_VARIABLE = "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"
# Without a deadline, an unreachable endpoint must still not eat the whole invocation.
_DEFAULT_TIMEOUT = 10.0
_ATTEMPTS = 3
# AWS error codes worth another try (the SDKs' standard retry mode retries these too).
_TRANSIENT_CODES = frozenset(
    {"ThrottlingException", "InternalServiceError", "ServiceUnavailable", "RequestTimeout"}
)

_XML_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,100})</Code>")


class SecretReadError(Exception):
    """Why a read failed, in words safe to show (no secret, no response body)."""


def secrets_manager_endpoint(region: str, environ: Mapping[str, str] | None = None) -> str:
    """The Secrets Manager endpoint the AWS SDKs would use for ``region``.

    A service-specific ``AWS_ENDPOINT_URL_SECRETS_MANAGER``, else the global
    ``AWS_ENDPOINT_URL`` (both ignored with ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``),
    else the public regional endpoint (``.amazonaws.com.cn`` in the China regions).
    """
    env = os.environ if environ is None else environ
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        for name in ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_ENDPOINT_URL"):
            configured = env.get(name)
            if configured:
                return configured
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://secretsmanager.{region}.{suffix}"


def _timeout() -> float:
    from lambda_pool import deadlines

    remaining = deadlines.remaining()
    if remaining is None:
        return _DEFAULT_TIMEOUT
    return max(0.05, min(_DEFAULT_TIMEOUT, remaining))


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SecretReadError(f"the endpoint {url!r} is not an http(s) URL")
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _error_code(body: bytes, headers: http.client.HTTPMessage) -> str | None:
    """The AWS error code of a JSON-protocol error response (``__type``), if it has one."""
    code: Any = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        code = document.get("__type") or document.get("code")
    if not isinstance(code, str) or not code:
        code = headers.get("x-amzn-ErrorType")
    if not isinstance(code, str) or not code:
        # The query protocol's XML error (what moto's IAM checks answer with).
        found = _XML_ERROR_CODE.search(body[:4096])
        code = found.group(1).decode("ascii") if found else None
    if not isinstance(code, str) or not code:
        return None
    # "com.amazonaws.secretsmanager#ResourceNotFoundException" or "Code:http://..." forms.
    return code.rsplit("#", 1)[-1].split(":", 1)[0] or None


def _exchange(
    url: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes, http.client.HTTPMessage]:
    connection = _connection(url, _timeout())
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response.headers
    finally:
        connection.close()


def _parse_value(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise SecretReadError("the GetSecretValue response is not a JSON object")
    return document


def get_secret_value_from_api(secret_id: str, region: str) -> dict[str, Any]:
    """``GetSecretValue`` for ``secret_id`` in ``region``, signed with the AWS credentials.

    Retries a throttled or failed request (at most 3 attempts, within the invocation's
    deadline).  Raises :class:`SecretReadError`, or ``lambda_pool.exc.CredentialsError``
    when no AWS credentials can be found.
    """
    endpoint = secrets_manager_endpoint(region)
    path = urlsplit(endpoint).path or "/"
    body = json.dumps({"SecretId": secret_id}).encode("utf-8")
    own_headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "secretsmanager.GetSecretValue",
    }
    failure = "no attempt was made"
    for attempt in range(_ATTEMPTS):
        if attempt:
            time.sleep(min(0.05 * 2**attempt, max(0.0, _timeout() - 0.05)))
        # Credentials are read per attempt: Lambda may have renewed them meanwhile.
        credentials = find_aws_credentials()
        headers = sign_json_request(
            endpoint,
            body,
            own_headers,
            service="secretsmanager",
            region=region,
            credentials=credentials,
        )
        try:
            status, answer, response_headers = _exchange(endpoint, "POST", path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            host = urlsplit(endpoint).netloc
            failure = (
                f"the AWS endpoint {host} could not be reached ({type(exc).__name__}; a VPC "
                "without a NAT gateway or a Secrets Manager VPC endpoint?)"
            )
            continue
        if status == 200:
            return _parse_value(answer)
        code = _error_code(answer, response_headers)
        failure = f"AWS error {code}" if code else f"HTTP {status} from {urlsplit(endpoint).netloc}"
        if status < 500 and code not in _TRANSIENT_CODES:
            break
    raise SecretReadError(failure)


def get_secret_value_from_extension(secret_id: str, port: str) -> dict[str, Any]:
    """``GetSecretValue`` for ``secret_id`` as the Parameters and Secrets extension caches it."""
    if not port.isdigit():
        raise SecretReadError(f"{EXTENSION_PORT_VARIABLE}={port!r} is not a port number")
    token = os.environ.get("AWS_SESSION_TOKEN")
    if not token:
        raise SecretReadError(
            "the Parameters and Secrets extension needs AWS_SESSION_TOKEN, which Lambda sets; "
            f"unset {EXTENSION_PORT_VARIABLE} outside Lambda"
        )
    url = f"http://localhost:{port}"
    path = f"/secretsmanager/get?secretId={quote(secret_id, safe='')}"
    try:
        status, answer, headers = _exchange(
            url, "GET", path, None, {"X-Aws-Parameters-Secrets-Token": token}
        )
    except (OSError, http.client.HTTPException) as exc:
        raise SecretReadError(
            f"the Parameters and Secrets extension on localhost:{port} did not answer "
            f"({type(exc).__name__}; is its layer attached to the function?)"
        ) from None
    if status == 200:
        return _parse_value(answer)
    code = _error_code(answer, headers)
    raise SecretReadError(
        f"the Parameters and Secrets extension answered HTTP {status}"
        + (f" (AWS error {code})" if code else "")
    )
