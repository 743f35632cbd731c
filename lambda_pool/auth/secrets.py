"""``SecretsManagerCredentials``: user and password read from an AWS Secrets Manager secret.

The secret is the JSON object RDS and Secrets Manager's rotation templates write:
``{"username": ..., "password": ..., "host": ..., "port": ..., "dbname": ...}``.

Which way the secret is read (``reader=``; ``"auto"`` picks per read, in this order):

1. ``"extension"``: the AWS Parameters and Secrets Lambda Extension, when
   ``PARAMETERS_SECRETS_EXTENSION_HTTP_PORT`` is set (the extension caches for every
   reader in the function).  A forced re-read (after ``refresh()``) skips it and calls
   the API, because the extension would answer from its cache.
2. ``"powertools"``: Powertools Parameters (``get_secret(..., transform="json")``), when
   the function has already imported ``aws_lambda_powertools.utilities.parameters``: its
   cost is paid, and the value shares Powertools' cache with the function's own
   ``get_secret`` calls.  Also while moto's ``mock_aws`` is active in the process (tests):
   it intercepts botocore only.
3. ``"api"``: one SigV4-signed ``GetSecretValue`` over ``http.client``
   (:mod:`lambda_pool.auth.secrets_http`), without boto3.

``max_age`` defaults the way Powertools does: ``POWERTOOLS_PARAMETERS_MAX_AGE``, else 300 s;
on the Powertools path an unset ``max_age`` is left to Powertools itself.  Rotation: when
the engine sees an authentication failure it calls ``refresh()`` and retries once;
``refresh()`` makes the next read bypass every cache (``force_fetch=True`` for Powertools).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from lambda_pool.auth._errors import HINTS, describe_aws_error
from lambda_pool.auth._quiet import SECRET_READ_LOGGERS, hide_sdk_debug
from lambda_pool.auth.base import Credentials
from lambda_pool.auth.registry import register_provider
from lambda_pool.exc import ArgumentError, CredentialsError

__all__ = [
    "MAX_AGE_VARIABLE",
    "READERS",
    "SecretLocation",
    "SecretsManagerCredentials",
    "default_max_age",
    "region_from_arn",
]

_log = logging.getLogger("lambda_pool.auth")

READERS = ("auto", "api", "extension", "powertools")
#: Powertools Parameters' cache-age variable, honoured by every reader.
MAX_AGE_VARIABLE = "POWERTOOLS_PARAMETERS_MAX_AGE"
# Powertools' own default (aws_lambda_powertools.utilities.parameters.constants).
_POWERTOOLS_DEFAULT_MAX_AGE = 300
_POWERTOOLS_PARAMETERS = "aws_lambda_powertools.utilities.parameters"
# The same words whichever reader found the value unparsable.
_HINT_NOT_JSON = HINTS["TransformParameterError"]
# Read here rather than imported from secrets_http, which is loaded only for a read.
_EXTENSION_PORT_VARIABLE = "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"


def default_max_age() -> int:
    """``POWERTOOLS_PARAMETERS_MAX_AGE`` as Powertools resolves it, else its default 300 s."""
    raw = os.environ.get(MAX_AGE_VARIABLE)
    if raw is None:
        return _POWERTOOLS_DEFAULT_MAX_AGE
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ArgumentError(
            f"{MAX_AGE_VARIABLE}={raw!r} must be a whole number of seconds >= 0 "
            "(it sets how long a secret read is cached)"
        )
    return value


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


def _aws_mocked_in_process() -> bool:
    """Whether moto's ``mock_aws`` is active in this process.

    It answers AWS calls made through botocore; a request from the standard library would
    go past it to the real endpoint.  Tests that mock AWS this way (the pytest plugin's
    ``aws`` fixture, a user's ``@mock_aws``) therefore get the SDK path.  Nothing is
    imported to find out: without moto loaded, the answer is no.
    """
    models = sys.modules.get("moto.core.models")
    stubber = getattr(models, "botocore_stubber", None)
    return bool(getattr(stubber, "enabled", False))


class SecretsManagerCredentials:
    """Credentials from a Secrets Manager secret, cached for ``max_age`` seconds of ``clock``.

    ``max_age`` ``None`` means Powertools' resolution (``POWERTOOLS_PARAMETERS_MAX_AGE``,
    else 300).  ``reader`` is ``"auto"``, ``"api"``, ``"extension"`` or ``"powertools"``
    (see the module docstring for which ``"auto"`` takes when).
    ``region`` defaults to the one in ``secret_id`` when it is an ARN, else to the AWS SDK's
    default (``AWS_REGION``, which Lambda sets).  With ``include_location=True`` the
    credentials' ``connect_args`` also carry the secret's ``host``, ``port`` and ``dbname``
    so the engine connects wherever the secret points, even from a URL without a host.
    """

    def __init__(
        self,
        secret_id: str,
        *,
        max_age: int | None = None,
        region: str | None = None,
        clock: Callable[[], float] = time.time,
        include_location: bool = False,
        reader: str = "auto",
    ) -> None:
        if not isinstance(secret_id, str) or not secret_id:
            raise ArgumentError("SecretsManagerCredentials needs a secret name or ARN")
        if max_age is not None and (
            isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0
        ):
            raise ArgumentError("max_age must be a whole number of seconds >= 0 (or None)")
        if reader not in READERS:
            raise ArgumentError(f"reader must be one of {', '.join(READERS)}; got {reader!r}")
        self.clock = clock
        self.secret_id = secret_id
        # What Powertools is asked for (None: its own resolution); self.max_age is the
        # resolved figure this provider caches for on its own clock.
        self._requested_max_age = max_age
        self.max_age = default_max_age() if max_age is None else max_age
        self.reader = reader
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
            f"max_age={self.max_age!r}, reader={self.reader!r})"
        )

    def _current(self) -> tuple[Credentials, SecretLocation]:
        with self._lock:
            now = self.clock()
            if self._cached is not None and now < self._fetched_at + self.max_age:
                return self._cached
            # The first read may take a value the function's own get_secret call cached
            # moments ago; every later read is a re-read on this provider's clock (or after
            # refresh()), so it must not be answered from Powertools' cache.
            force = self._force_next
            reader = self._choose_reader(force_fetch=force)
            if reader == "powertools":
                value = self._read_with_powertools(force_fetch=force)
            else:
                value = self._read_without_sdk(reader)
            self._cached = self._parse(value)
            self._fetched_at = now
            self._force_next = True
            _log.debug("read database credentials from secret %s (%s)", self.secret_id, reader)
            return self._cached

    def _choose_reader(self, *, force_fetch: bool) -> str:
        reader = self.reader
        if reader == "auto":
            if os.environ.get(_EXTENSION_PORT_VARIABLE):
                reader = "extension"
            elif _POWERTOOLS_PARAMETERS in sys.modules or _aws_mocked_in_process():
                reader = "powertools"
            else:
                reader = "api"
        # The extension answers from its cache (SECRETS_MANAGER_TTL) and has no way to
        # bypass it, so a forced re-read after a rotation asks the API itself.
        if reader == "extension" and force_fetch:
            reader = "api"
        return reader

    def _api_region(self) -> str:
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise CredentialsError(
                f"could not read secret {self.secret_id!r}: no AWS region is configured "
                "(give the secret's ARN, pass region=... or set AWS_REGION)"
            )
        return region

    def _read_without_sdk(self, reader: str) -> Any:
        from lambda_pool.auth import secrets_http

        try:
            if reader == "extension":
                document = secrets_http.get_secret_value_from_extension(
                    self.secret_id, os.environ.get(_EXTENSION_PORT_VARIABLE, "2773")
                )
            else:
                document = secrets_http.get_secret_value_from_api(
                    self.secret_id, self._api_region()
                )
            reason = None
        except (secrets_http.SecretReadError, CredentialsError) as exc:
            reason = str(exc)
        if reason is None:
            text = document.get("SecretString")
            if not isinstance(text, str):
                reason = "the secret has no SecretString (binary secrets are not supported)"
            else:
                try:
                    return json.loads(text)
                except ValueError:
                    reason = _HINT_NOT_JSON
        # Raised outside the except block: nothing of the failed read is attached.
        raise CredentialsError(f"could not read secret {self.secret_id!r}: {reason}")

    def _read_with_powertools(self, *, force_fetch: bool) -> Any:
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
                        max_age=self._requested_max_age,
                        force_fetch=force_fetch,
                    )
                return self._regional_provider(parameters).get(
                    self.secret_id,
                    transform="json",
                    max_age=self._requested_max_age,
                    force_fetch=force_fetch,
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
