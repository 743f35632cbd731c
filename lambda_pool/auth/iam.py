"""``IAMCredentials``: RDS IAM authentication tokens signed locally, cached until near expiry.

A token is a SigV4-presigned URL (``host:port/?Action=connect&DBUser=...&X-Amz-Date=...&
X-Amz-Expires=900&...``); RDS checks it only when a connection is opened, and only over
TLS.  It is signed by :mod:`lambda_pool.auth.sigv4` with the standard library from the
credentials Lambda puts in the environment, so the first connect imports neither boto3
nor botocore (0.3-0.6 s of a cold start); botocore's credential chain is consulted only
when the environment has no credentials.  Given ``session=`` or ``client_factory=``,
the token comes from that boto3 client's ``generate_db_auth_token`` instead (the same
string for the same credentials and second).  One token is reused for every
connection until ``issued_at + lifetime - margin`` — both read from the token itself — and
``Credentials.expires_at`` is that moment, so the engine retires connections opened with
it at their next checkout after it (bounding how long a revoked permission keeps a session).
"""

from __future__ import annotations

import calendar
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lambda_pool.auth._errors import describe_aws_error
from lambda_pool.auth._quiet import SIGNING_LOGGERS, hide_sdk_debug
from lambda_pool.auth.base import Credentials
from lambda_pool.auth.registry import register_provider
from lambda_pool.exc import ArgumentError, CredentialsError

__all__ = [
    "TLS_SSLMODES",
    "IAMCredentials",
    "check_tls_sslmode",
    "resolve_region",
    "token_validity",
]

_log = logging.getLogger("lambda_pool.auth")

# libpq sslmodes that guarantee TLS; "allow"/"prefer" may silently fall back to plain text,
# which RDS refuses for IAM (and which would send the token in clear).
TLS_SSLMODES = ("require", "verify-ca", "verify-full")

# What RDS documents as a token's life; only used to validate ``margin`` up front, the
# real lifetime is read from each token's X-Amz-Expires.
_DOCUMENTED_LIFETIME = 900


def check_tls_sslmode(sslmode: str | None) -> str:
    """``sslmode`` (default ``require``); ``ArgumentError`` if it allows plain text."""
    if sslmode is None:
        return "require"
    if sslmode not in TLS_SSLMODES:
        raise ArgumentError(
            f"sslmode={sslmode!r} cannot be used with RDS IAM authentication: RDS accepts IAM "
            f"tokens only over TLS. Use one of {', '.join(TLS_SSLMODES)} (verify-full with "
            "sslrootcert set to the RDS CA bundle is the safest)."
        )
    return sslmode


def resolve_region(region: str | None) -> str:
    """``region``, else ``AWS_REGION`` (set by Lambda), else ``AWS_DEFAULT_REGION``."""
    resolved = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not resolved:
        raise CredentialsError(
            "RDS IAM authentication needs the database's AWS region: pass region=... "
            "(or ?region=... in the URL) or set AWS_REGION"
        )
    return resolved


def token_validity(token: str) -> tuple[float, int]:
    """``(issued_at, lifetime)`` read from a token's ``X-Amz-Date`` and ``X-Amz-Expires``.

    ``issued_at`` is epoch seconds (UTC); raises ``CredentialsError`` (without the token) if
    either is missing or malformed.
    """
    # The token has no scheme; add one so urlsplit finds the query after "host:port/".
    query = parse_qs(urlsplit("https://" + token).query)
    try:
        issued = time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
        lifetime = int(query["X-Amz-Expires"][0])
    except (KeyError, IndexError, ValueError):
        raise CredentialsError(
            "the RDS IAM token has no readable X-Amz-Date/X-Amz-Expires; is botocore's "
            "generate_db_auth_token returning a presigned URL?"
        ) from None
    return float(calendar.timegm(issued)), lifetime


ClientFactory = Callable[[str], Any]


class IAMCredentials:
    """RDS IAM tokens for ``user`` at ``host:port``, each reused until shortly before it expires.

    ``margin`` seconds are taken off each token's life so no connect races its expiry.
    ``clock`` is the wall clock ``expires_at`` is expressed in (inject a fake in tests).
    Without ``client_factory``/``session`` the token is signed in-process from the
    environment's AWS credentials (else botocore's credential chain's), read anew for each
    token.  With them, an rds client from ``client_factory(region)`` or ``session`` (a
    ``boto3.Session``) signs it; the client is created on first use.
    ``connect_args`` carry ``sslmode`` (``require`` unless a stricter TLS mode is given).
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        *,
        region: str | None = None,
        margin: float = 60,
        clock: Callable[[], float] = time.time,
        session: Any = None,
        client_factory: ClientFactory | None = None,
        sslmode: str | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ArgumentError("IAMCredentials needs the database host the token is for")
        if not isinstance(user, str) or not user:
            raise ArgumentError("IAMCredentials needs the database user the token is for")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ArgumentError("IAMCredentials port must be an integer between 1 and 65535")
        if not 0 <= margin < _DOCUMENTED_LIFETIME:
            raise ArgumentError(
                f"margin must be between 0 and {_DOCUMENTED_LIFETIME} seconds (a token lives "
                f"{_DOCUMENTED_LIFETIME} s); got {margin!r}"
            )
        if session is not None and client_factory is not None:
            raise ArgumentError("give IAMCredentials either session= or client_factory=, not both")
        self.host = host
        self.port = port
        self.user = user
        self.region = resolve_region(region)
        self.margin = margin
        self.clock = clock
        self.sslmode = check_tls_sslmode(sslmode)
        self._session = session
        self._client_factory = client_factory
        self._client: Any = None
        # Held while signing too: signing is local and fast, and concurrent first
        # connections then share one token instead of each signing their own.
        self._lock = threading.Lock()
        self._cached: Credentials | None = None
        register_provider(self)

    def get(self) -> Credentials:
        """A token valid for at least ``margin`` more seconds, signing a new one when needed."""
        with self._lock:
            now = self.clock()
            if self._cached is not None and not self._cached.expired(now):
                return self._cached
            token = self._sign()
            issued_at, lifetime = token_validity(token)
            # X-Amz-Date is stamped from the system's wall clock; measure the token's
            # remaining life in that frame, then carry it into the provider's clock (the
            # same clock in production, a test's fake clock in tests).
            remaining = issued_at + lifetime - time.time()
            expires_at = now + remaining - self.margin
            self._cached = Credentials(self.user, token, expires_at, {"sslmode": self.sslmode})
            _log.debug(
                "signed an RDS IAM token for %s at %s:%s (X-Amz-Expires=%d), reused until %.0f",
                self.user,
                self.host,
                self.port,
                lifetime,
                expires_at,
            )
            return self._cached

    def refresh(self) -> None:
        """Forget the token and the rds client.

        Dropping the client matters after an authentication failure or a SnapStart restore:
        the AWS credentials it signed with may be the stale ones.
        """
        with self._lock:
            self._cached = None
            self._client = None

    def __repr__(self) -> str:
        return (
            f"IAMCredentials(host={self.host!r}, port={self.port!r}, user={self.user!r}, "
            f"region={self.region!r}, margin={self.margin!r})"
        )

    def _rds_client(self) -> Any:
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory(self.region)
            else:
                self._client = self._session.client("rds", region_name=self.region)
        return self._client

    def _sign(self) -> str:
        if self._client_factory is None and self._session is None:
            return self._sign_in_process()
        return self._sign_with_boto3()

    def _sign_in_process(self) -> str:
        # Imported at the first signing: hashlib's OpenSSL binding is not free at Init.
        from lambda_pool.auth.sigv4 import find_aws_credentials, presign_rds_auth_token

        reason: str | None = None
        try:
            with hide_sdk_debug(SIGNING_LOGGERS):  # only reached via botocore's chain
                credentials = find_aws_credentials()
        except CredentialsError as exc:
            reason = str(exc)
        else:
            return presign_rds_auth_token(self.host, self.port, self.user, self.region, credentials)
        raise CredentialsError(
            f"could not sign an RDS IAM token for {self.user!r} at {self.host}:{self.port} "
            f"in {self.region}: {reason}"
        )

    def _sign_with_boto3(self) -> str:
        reason: str | None = None
        try:
            with hide_sdk_debug(SIGNING_LOGGERS):
                token = self._rds_client().generate_db_auth_token(
                    DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.region
                )
        except CredentialsError:
            raise
        except Exception as exc:
            reason = describe_aws_error(exc)
        else:
            if isinstance(token, str) and token:
                return token
            reason = "generate_db_auth_token returned no token"
        # Raised outside the except block so botocore's error is not attached as context.
        raise CredentialsError(
            f"could not sign an RDS IAM token for {self.user!r} at {self.host}:{self.port} "
            f"in {self.region}: {reason}"
        )
