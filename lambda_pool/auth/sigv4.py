"""AWS Signature Version 4 with the standard library: RDS IAM tokens and signed JSON requests.

Why hand-written instead of boto3: on a Lambda cold start, ``import boto3`` costs 0.2-0.4 s
and creating a client another 0.1-0.3 s, while what lambda-pool needs from them is an
HMAC-SHA256 over a canonical request, computed locally.  An RDS IAM token is a SigV4
presigned ``GET`` URL (service ``rds-db``, ``X-Amz-Expires=900``) with no API call at all;
a Secrets Manager read is one SigV4-signed JSON POST.  The token this module builds is
byte-identical to botocore's ``generate_db_auth_token`` for the same credentials, host,
port, user, region and time (``tests/test_auth_sigv4.py`` checks it against boto3).

Credentials come from the variables Lambda sets (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``); only when those are absent (a laptop
with profiles or SSO, a SnapStart function, a container credentials endpoint) is botocore's
credential chain imported to find them.  Nothing here logs: a canonical request plus its
signature would be a usable token.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlsplit

from lambda_pool.exc import CredentialsError

__all__ = [
    "AwsCredentials",
    "credentials_from_environment",
    "find_aws_credentials",
    "presign_rds_auth_token",
    "sign_json_request",
]

ALGORITHM = "AWS4-HMAC-SHA256"
RDS_SIGNING_NAME = "rds-db"
# SHA-256 of the empty body: a presigned GET signs no payload.
_EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()
_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclasses.dataclass(frozen=True, repr=False)
class AwsCredentials:
    """An access key, its secret and, for temporary credentials, the session token."""

    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:
        # The access key id is not a secret, but it names an identity: show its kind only.
        kind = "temporary" if self.token is not None else "long-term"
        return f"AwsCredentials({kind}, secret_key='***')"

    __str__ = __repr__


def credentials_from_environment(
    environ: Mapping[str, str] | None = None,
) -> AwsCredentials | None:
    """The credentials Lambda puts in the environment, or ``None`` when they are not there.

    Reads the variables botocore's environment provider reads, in its order: the session
    token is ``AWS_SESSION_TOKEN``, else the older ``AWS_SECURITY_TOKEN``.
    """
    env = os.environ if environ is None else environ
    access_key = env.get("AWS_ACCESS_KEY_ID")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret_key:
        return None
    token = env.get("AWS_SESSION_TOKEN")
    if token is None:
        token = env.get("AWS_SECURITY_TOKEN")
    return AwsCredentials(access_key, secret_key, token)


def _credentials_from_botocore_chain() -> AwsCredentials:
    """Ask botocore's default credential chain (profiles, SSO, container, IMDS)."""
    try:
        import botocore.session
    except ImportError:
        raise CredentialsError(
            "no AWS credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), "
            "and boto3 is not installed to look further (profiles, SSO, container "
            "credentials): set them, or pip install 'lambda-pool[iam]'"
        ) from None
    reason = "no AWS credentials were found (set them in the environment or give the "
    reason += "function an execution role)"
    try:
        found = botocore.session.get_session().get_credentials()
        frozen = found.get_frozen_credentials() if found is not None else None
    except Exception as exc:
        # The text of a provider's error can quote a profile's contents: class name only.
        reason = f"looking for AWS credentials failed ({type(exc).__name__})"
        frozen = None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise CredentialsError(reason)
    return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)


def find_aws_credentials() -> AwsCredentials:
    """The environment's credentials, else botocore's credential chain's.

    Read anew on every call: Lambda may hand a SnapStart-restored or long-lived
    environment fresh credentials, and signing is cheap.  ``CredentialsError`` when none
    are found.
    """
    return credentials_from_environment() or _credentials_from_botocore_chain()


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _timestamp(now: datetime.datetime | None) -> str:
    moment = _utc_now() if now is None else now
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.strftime(_TIMESTAMP_FORMAT)


def _encode(value: str) -> str:
    """Percent-encode as SigV4 wants: UTF-8, everything but ``A-Za-z0-9-._~``."""
    return quote(value.encode("utf-8"), safe="-_.~")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _signature(
    secret_key: str, datestamp: str, region: str, service: str, string_to_sign: str
) -> str:
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), datestamp)
    key = _hmac(key, region)
    key = _hmac(key, service)
    key = _hmac(key, "aws4_request")
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _string_to_sign(timestamp: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def _host_header(netloc_url: str) -> str:
    """The ``host`` value botocore signs: lower case, without the scheme's default port."""
    parts = urlsplit(netloc_url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default_port:
        host = f"{host}:{parts.port}"
    return host


def presign_rds_auth_token(
    host: str,
    port: int,
    user: str,
    region: str,
    credentials: AwsCredentials,
    *,
    now: datetime.datetime | None = None,
    expires: int = 900,
) -> str:
    """An RDS IAM authentication token: ``host:port/?Action=connect&DBUser=...&X-Amz-...``.

    The same string botocore's ``generate_db_auth_token`` returns for these inputs at
    ``now`` (default: the current UTC time, whole seconds as ``X-Amz-Date`` has them).
    """
    timestamp = _timestamp(now)
    datestamp = timestamp[:8]
    scope = f"{datestamp}/{region}/{RDS_SIGNING_NAME}/aws4_request"
    params: list[tuple[str, str]] = [
        ("Action", "connect"),
        ("DBUser", user),
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key}/{scope}"),
        ("X-Amz-Date", timestamp),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.token is not None:
        params.append(("X-Amz-Security-Token", credentials.token))
    encoded = [(_encode(key), _encode(value)) for key, value in params]
    query = "&".join(f"{key}={value}" for key, value in encoded)
    # botocore builds the URL from "https://host:port" and drops the scheme afterwards.
    host_header = _host_header(f"https://{host}:{port}")
    canonical_request = "\n".join(
        [
            "GET",
            "/",
            "&".join(f"{key}={value}" for key, value in sorted(encoded)),
            f"host:{host_header}\n",
            "host",
            _EMPTY_PAYLOAD_SHA256,
        ]
    )
    signature = _signature(
        credentials.secret_key,
        datestamp,
        region,
        RDS_SIGNING_NAME,
        _string_to_sign(timestamp, scope, canonical_request),
    )
    return f"{host}:{port}/?{query}&X-Amz-Signature={signature}"


def sign_json_request(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    service: str,
    region: str,
    credentials: AwsCredentials,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """The headers for a SigV4-signed ``POST`` of ``body`` to ``url`` (path ``/``, no query).

    ``headers`` are the request's own (``Content-Type``, ``X-Amz-Target``); the result adds
    ``Host``, ``X-Amz-Date``, ``X-Amz-Security-Token`` (temporary credentials) and
    ``Authorization``.  All of them are signed.
    """
    timestamp = _timestamp(now)
    datestamp = timestamp[:8]
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    signed: dict[str, str] = {
        name.lower(): " ".join(value.split()) for name, value in headers.items()
    }
    signed["host"] = _host_header(url)
    signed["x-amz-date"] = timestamp
    if credentials.token is not None:
        signed["x-amz-security-token"] = credentials.token
    names: Sequence[str] = sorted(signed)
    signed_names = ";".join(names)
    path = urlsplit(url).path or "/"
    canonical_request = "\n".join(
        [
            "POST",
            quote(path, safe="/~"),
            "",
            "".join(f"{name}:{signed[name]}\n" for name in names),
            signed_names,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    signature = _signature(
        credentials.secret_key,
        datestamp,
        region,
        service,
        _string_to_sign(timestamp, scope, canonical_request),
    )
    result = dict(headers)
    result["Host"] = signed["host"]
    result["X-Amz-Date"] = timestamp
    if credentials.token is not None:
        result["X-Amz-Security-Token"] = credentials.token
    result["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return result
