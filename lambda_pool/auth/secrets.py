"""``SecretsManagerCredentials``: user and password read from an AWS Secrets Manager secret.

The secret is the JSON object RDS and Secrets Manager's rotation templates write:
``{"username": ..., "password": ..., "host": ..., "port": ..., "dbname": ...}``.  It is
read through Powertools Parameters (``get_secret(..., transform="json", max_age=...)``),
which shares its cache with any other ``get_secret`` call in the function.  Rotation:
when the engine sees an authentication failure it calls ``refresh()`` and retries once;
``refresh()`` makes the next read bypass every cache (``force_fetch=True``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from lambda_pool.auth._errors import describe_aws_error
from lambda_pool.auth._quiet import SECRET_READ_LOGGERS, hide_sdk_debug
from lambda_pool.auth.base import Credentials
from lambda_pool.auth.registry import register_provider
from lambda_pool.exc import ArgumentError, CredentialsError

__all__ = ["SecretLocation", "SecretsManagerCredentials", "region_from_arn"]

_log = logging.getLogger("lambda_pool.auth")


def region_from_arn(secret_id: str) -> str | None:
    """The region named in a Secrets Manager ARN, or ``None`` for a plain secret name."""
    parts = secret_id.split(":")
    if len(parts) >= 7 and parts[0] == "arn" and parts[2] == "secretsmanager" and parts[3]:
        return parts[3]
    return None


@dataclasses.dataclass(frozen=True)
class SecretLocation:
    """Where the secret says the database is (everything but the password)."""

    username: str
    host: str | None
    port: int | None
    dbname: str | None

    def url(self, drivername: str = "postgresql+psycopg") -> str:
        """A URL without password built from the secret alone (for ``create_engine``)."""
        if not self.host:
            raise CredentialsError("the secret has no 'host' key, so no URL can be built from it")
        netloc = f"{quote(self.username, safe='')}@{self.host}"
        if self.port is not None:
            netloc += f":{self.port}"
        return f"{drivername}://{netloc}/{quote(self.dbname or '', safe='')}"


class SecretsManagerCredentials:
    """Credentials from a Secrets Manager secret, cached for ``max_age`` seconds of ``clock``.

    ``region`` defaults to the one in ``secret_id`` when it is an ARN, else to the AWS SDK's
    default (``AWS_REGION``, which Lambda sets).  With ``include_location=True`` the
    credentials' ``connect_args`` also carry the secret's ``host``, ``port`` and ``dbname``
    so the engine connects wherever the secret points, even from a URL without a host.
    """

    def __init__(
        self,
        secret_id: str,
        *,
        max_age: int = 300,
        region: str | None = None,
        clock: Callable[[], float] = time.time,
        include_location: bool = False,
    ) -> None:
        if not isinstance(secret_id, str) or not secret_id:
            raise ArgumentError("SecretsManagerCredentials needs a secret name or ARN")
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
            raise ArgumentError("max_age must be a whole number of seconds >= 0")
        self.clock = clock
        self.secret_id = secret_id
        self.max_age = max_age
        self.region = region or region_from_arn(secret_id)
        self.include_location = include_location
        # One lock serialises fetches: concurrent first calls read the secret once.
        self._lock = threading.Lock()
        self._cached: tuple[Credentials, SecretLocation] | None = None
        self._fetched_at = 0.0
        self._force_next = False
        self._powertools_provider: Any = None
        register_provider(self)

    def get(self) -> Credentials:
        """The secret's user and password, read at most once per ``max_age`` seconds."""
        return self._current()[0]

    def location(self) -> SecretLocation:
        """The secret's ``username``/``host``/``port``/``dbname`` (read like ``get()``)."""
        return self._current()[1]

    def url(self, drivername: str = "postgresql+psycopg") -> str:
        """A URL without password for the database the secret describes."""
        return self.location().url(drivername)

    def refresh(self) -> None:
        """Forget the cached value; the next read goes to Secrets Manager (``force_fetch``)."""
        with self._lock:
            self._cached = None
            self._force_next = True

    def __repr__(self) -> str:
        return (
            f"SecretsManagerCredentials(secret_id={self.secret_id!r}, region={self.region!r}, "
            f"max_age={self.max_age!r})"
        )

    def _current(self) -> tuple[Credentials, SecretLocation]:
        with self._lock:
            now = self.clock()
            if self._cached is not None and now < self._fetched_at + self.max_age:
                return self._cached
            # The first read may take a value the function's own get_secret call cached
            # moments ago; every later read is a re-read on this provider's clock (or after
            # refresh()), so it must not be answered from Powertools' cache.
            value = self._read(force_fetch=self._force_next)
            self._cached = self._parse(value)
            self._fetched_at = now
            self._force_next = True
            _log.debug("read database credentials from secret %s", self.secret_id)
            return self._cached

    def _read(self, *, force_fetch: bool) -> Any:
        try:
            from aws_lambda_powertools.utilities import parameters
        except ImportError:
            raise CredentialsError(
                "SecretsManagerCredentials needs aws-lambda-powertools and boto3: "
                "pip install 'lambda-pool[secrets]'"
            ) from None
        reason: str | None = None
        try:
            with hide_sdk_debug(SECRET_READ_LOGGERS):
                if self.region is None:
                    # The default provider: its cache is shared with the function's own
                    # get_secret calls, so a secret both read costs one API call.
                    return parameters.get_secret(
                        self.secret_id,
                        transform="json",
                        max_age=self.max_age,
                        force_fetch=force_fetch,
                    )
                return self._regional_provider(parameters).get(
                    self.secret_id, transform="json", max_age=self.max_age, force_fetch=force_fetch
                )
        except Exception as exc:
            reason = describe_aws_error(exc)
        # Raised outside the except block so the SDK error (whose text may quote the
        # value) is not even attached as __context__.
        raise CredentialsError(f"could not read secret {self.secret_id!r}: {reason}")

    def _regional_provider(self, parameters: Any) -> Any:
        if self._powertools_provider is None:
            from botocore.config import Config

            self._powertools_provider = parameters.SecretsProvider(
                boto_config=Config(region_name=self.region)
            )
        return self._powertools_provider

    def _parse(self, value: Any) -> tuple[Credentials, SecretLocation]:
        if not isinstance(value, Mapping):
            raise CredentialsError(
                f"secret {self.secret_id!r} must hold a JSON object with 'username' and "
                f"'password' keys"
            )
        missing = [k for k in ("username", "password") if not isinstance(value.get(k), str)]
        if missing:
            # Key names are not secret; the values never appear.
            raise CredentialsError(
                f"secret {self.secret_id!r} has no string {' or '.join(map(repr, missing))} "
                f"key (keys present: {sorted(str(k) for k in value)})"
            )
        host = value.get("host")
        dbname = value.get("dbname", value.get("database"))
        location = SecretLocation(
            username=value["username"],
            host=str(host) if host else None,
            port=self._parse_port(value.get("port")),
            dbname=str(dbname) if dbname else None,
        )
        connect_args: dict[str, Any] = {}
        if self.include_location:
            if location.host is None:
                raise CredentialsError(
                    f"secret {self.secret_id!r} has no 'host' key, but include_location=True "
                    "asks to connect where the secret points"
                )
            connect_args["host"] = location.host
            if location.port is not None:
                connect_args["port"] = location.port
            if location.dbname is not None:
                connect_args["dbname"] = location.dbname
        credentials = Credentials(value["username"], value["password"], None, connect_args)
        return credentials, location

    def _parse_port(self, port: Any) -> int | None:
        if port is None or port == "":
            return None
        try:
            return int(port)
        except (TypeError, ValueError):
            raise CredentialsError(
                f"secret {self.secret_id!r} has a 'port' that is not a whole number"
            ) from None
