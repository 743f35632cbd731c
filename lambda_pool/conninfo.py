"""libpq's rules for connection parameters: key=value strings, host lists, values, secrets.

:mod:`lambda_pool.url` uses this module to accept every connection string libpq (and
so psycopg) accepts, and to refuse at Init, with a message naming the parameter, any
value the driver would only refuse at the first connect.

The key=value parser is written here rather than borrowed from psycopg
(``psycopg.conninfo.conninfo_to_dict``, which calls libpq's ``PQconninfoParse``) for two
reasons.  ``lambda_pool.url`` is imported by every engine, and importing psycopg (and
libpq through it) just to parse a string would move the driver's import cost into code
paths that never connect with psycopg, asyncpg URLs included.  And libpq's parse errors
quote the text they stumbled on (``missing "=" after "ter2"``): for a password holding
an unquoted space, that text is the password's tail.  The rules followed are libpq's
(``conninfo_parse`` in ``fe-connect.c``): whitespace separates ``keyword = value``
pairs; a value is either a run of non-blank characters or a single-quoted string; a
backslash escapes the next character in both; a later keyword overrides an earlier one.

No message raised here repeats a value of a secret-bearing parameter, nor any text
whose role is unclear (a keyword that may be the tail of a password).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Final

from lambda_pool.exc import ArgumentError

__all__ = [
    "LAMBDA_POOL_QUERY_KEYS",
    "check_params",
    "check_port_text",
    "is_secret_key",
    "is_secret_query_key",
    "libpq_keywords",
    "looks_like_conninfo",
    "mask_params",
    "parse_conninfo",
    "split_host_list",
    "split_options",
]

QueryValue = str | tuple[str, ...]

#: Query keys lambda-pool reads itself (credentials and pooling); none holds a secret
#: value: ``secret=`` names a Secrets Manager secret, it does not contain one.
LAMBDA_POOL_QUERY_KEYS: Final = frozenset(
    {"auth", "secret", "region", "token_margin", "secret_max_age", "transaction_pooling"}
)

# A parameter whose name says it carries a secret (libpq's password and sslpassword,
# a driver's token, anything a user calls secret/passwd/pwd/api_key).
# Compiled by re (and kept in its cache) at the first check, not at import: an engine
# whose URL and keywords name no secret never asks.
_SECRET_NAME = r"pass|pwd|token|secret|credential|api_?key|private_?key"

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_CHOICES: Final[Mapping[str, tuple[str, ...]]] = {
    "sslmode": _SSLMODES,
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "replication": ("true", "false", "on", "off", "yes", "no", "1", "0", "database"),
    "sslcompression": ("0", "1"),
    "sslsni": ("0", "1"),
    "auth": ("", "password", "static", "iam", "secret"),
    "transaction_pooling": ("1", "true", "yes", "on", "0", "false", "no", "off"),
}
# lambda-pool reads these case-insensitively; libpq compares its own values exactly.
_CASE_INSENSITIVE = frozenset({"auth", "transaction_pooling"})
# libpq parses these with parse_int_param: a whole number, nothing else.
_LIBPQ_WHOLE_NUMBERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "token_margin",
    "secret_max_age",
)
# asyncpg's own numeric keywords, when the URL is for asyncpg (connect_timeout is a
# float there: asyncpg's timeout= takes fractions of a second).
_ASYNCPG_NUMBERS: Final[Mapping[str, type]] = {
    "connect_timeout": float,
    "command_timeout": float,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
}
# The largest value PostgreSQL and libpq keep in an int (timeouts in s or ms).
_INT_MAX = 2**31 - 1


def is_secret_key(name: str) -> bool:
    """Whether a connection parameter named ``name`` carries a secret (masked when shown)."""
    return re.search(_SECRET_NAME, name, re.I) is not None


def is_secret_query_key(name: str) -> bool:
    """Whether a URL query key carries a secret: named like one, and not one of
    lambda-pool's own keys (``secret=`` names a secret, ``token_margin=`` is seconds)."""
    return name not in LAMBDA_POOL_QUERY_KEYS and is_secret_key(name)


def mask_params(params: Mapping[str, object]) -> dict[str, object]:
    """``params`` with the value of every secret-bearing key replaced by ``***``."""
    return {key: "***" if is_secret_key(key) else value for key, value in params.items()}


def _show(value: str) -> str:
    """A non-secret value as it may appear in a message: quoted, and cut when long."""
    return repr(value if len(value) <= 40 else value[:37] + "...")


# --------------------------------------------------------------------------- key=value


def looks_like_conninfo(text: str) -> bool:
    """Whether ``text`` is a libpq key=value string rather than a URL (libpq's own test:
    no URI prefix, and an ``=`` sign)."""
    return "://" not in text and "=" in text


def _conninfo_pairs(text: str) -> Iterator[tuple[str, str]]:
    length = len(text)
    index = 0
    number = 0
    while True:
        while index < length and text[index].isspace():
            index += 1
        if index >= length:
            return
        number += 1
        start = index
        while index < length and text[index] != "=" and not text[index].isspace():
            index += 1
        keyword = text[start:index]
        while index < length and text[index].isspace():
            index += 1
        if index >= length or text[index] != "=" or not keyword:
            # Not repeated: with an unquoted space in a password, the "keyword" here
            # is the password's tail.
            raise ArgumentError(
                f"could not parse the connection string: part {number} is not "
                "keyword=value; quote a value holding spaces with single quotes "
                "(password='a b') or escape them with a backslash"
            )
        index += 1
        while index < length and text[index].isspace():
            index += 1
        value: list[str] = []
        if index < length and text[index] == "'":
            index += 1
            while True:
                if index >= length:
                    raise ArgumentError(
                        f"could not parse the connection string: the value of part {number} "
                        "opens a single quote that is never closed"
                    )
                char = text[index]
                if char == "\\" and index + 1 < length:
                    value.append(text[index + 1])
                    index += 2
                elif char == "'":
                    index += 1
                    break
                else:
                    value.append(char)
                    index += 1
        else:
            while index < length and not text[index].isspace():
                char = text[index]
                if char == "\\" and index + 1 < length:
                    value.append(text[index + 1])
                    index += 2
                else:
                    value.append(char)
                    index += 1
        yield keyword, "".join(value)


# libpq 18's keywords: the fallback when psycopg (and so libpq's own list) is absent.
_LIBPQ_KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requirepeer",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
_keywords: frozenset[str] | None = None


def libpq_keywords() -> frozenset[str]:
    """The keywords the installed libpq knows (asked once, through psycopg, only when a
    key=value string is parsed), or libpq 18's list without psycopg."""
    global _keywords
    if _keywords is None:
        try:
            from psycopg import pq

            _keywords = frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())
        except Exception:  # no psycopg, or no libpq under it: the fallback list
            _keywords = _LIBPQ_KEYWORDS
    return _keywords


def parse_conninfo(text: str) -> dict[str, str]:
    """A libpq key=value connection string as ``{keyword: value}`` (a later keyword wins).

    Keywords must be libpq's (or lambda-pool's own, such as ``auth``), as libpq
    requires.  Raises :class:`ArgumentError` for text libpq would refuse, without quoting
    it: with an unquoted space in a password, the "keyword" is the password's tail.
    """
    result: dict[str, str] = {}
    known: frozenset[str] | None = None
    for number, (keyword, value) in enumerate(_conninfo_pairs(text), start=1):
        if keyword not in LAMBDA_POOL_QUERY_KEYS:
            known = libpq_keywords() if known is None else known
            if keyword not in known:
                raise ArgumentError(
                    f"could not parse the connection string: part {number} names no libpq "
                    "parameter; quote a value holding spaces with single quotes "
                    "(password='a b')"
                )
        result[keyword] = value
    return result


# --------------------------------------------------------------------------- host lists


def split_host_list(netloc_hosts: str) -> list[tuple[str, str]]:
    """A URL's ``host1:port1,host2,[::1]:port3`` as ``[(host, port), ...]`` (port ``""``
    when absent), as libpq reads a multi-host URI.  Hosts are returned undecoded."""
    specs: list[tuple[str, str]] = []
    for number, spec in enumerate(netloc_hosts.split(","), start=1):
        if spec.startswith("["):
            host, bracket, rest = spec[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ArgumentError(
                    f"host {number} of the URL's host list opens '[' for an IPv6 address "
                    "without a matching ']'"
                )
            port = rest[1:]
        else:
            host, _, port = spec.partition(":")
        specs.append((host, port))
    return specs


def check_port_text(port: str, where: str, hint: str = "") -> int:
    """``port`` as an int in 1..65535; the message names ``where`` and never the text
    (a mistyped URL can put a password where the port goes)."""
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
        raise ArgumentError(f"{where} must be an integer from 1 to 65535 (ASCII digits){hint}")
    return int(port)


# --------------------------------------------------------------------------- options


def split_options(options: str) -> list[str]:
    """libpq's ``options`` split the way the PostgreSQL server splits it: at unescaped
    whitespace, a backslash escaping the next character (quotes have no meaning)."""
    words: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(options):
        char = options[index]
        if char == "\\" and index + 1 < len(options):
            current.append(options[index + 1])
            index += 2
            continue
        if char.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(char)
        index += 1
    if current:
        words.append("".join(current))
    return words


def _check_options(options: str, source: str) -> None:
    if options.count("'") % 2 or options.count('"') % 2:
        raise ArgumentError(
            f"{source} options has an unclosed quote; PostgreSQL gives quotes no meaning "
            r"in options: escape a space inside a value with a backslash (-c name=a\ b)"
        )
    words = split_options(options)
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            assignment = words[index + 1]
            index += 2
        elif word.startswith("--") or (word.startswith("-c") and len(word) > 2):
            assignment = word[2:]
            index += 1
        else:
            raise ArgumentError(
                f"{source} options must be server settings written -c name=value "
                "(or --name=value), separated by spaces"
            )
        name, sep, _ = assignment.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
            raise ArgumentError(
                f"{source} options: each -c needs name=value with a setting name "
                "(letters, digits, '_', '.', '-')"
            )


# --------------------------------------------------------------------------- values


def _single(key: str, value: QueryValue, source: str) -> str | None:
    if isinstance(value, str):
        return value
    if key in ("host", "hostaddr", "port"):
        return None  # libpq's lists: one value per host
    raise ArgumentError(f"{source} {key} is given more than once; give it once")


def _check_number(key: str, text: str, source: str, kind: type, what: str) -> None:
    try:
        number = kind(text.strip())
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or number > _INT_MAX:
        raise ArgumentError(
            f"{source} {key}={_show(text)} is not {what} from 0 to {_INT_MAX}; write e.g. {key}=10"
        )


def check_params(params: Mapping[str, QueryValue], driver: str, source: str = "URL query") -> None:
    """Refuse any connection parameter value the driver would refuse at connect.

    ``params`` are libpq-named parameters (a URL's query, lambda-pool's own keys
    included); ``driver`` is ``psycopg`` or ``asyncpg``; ``source`` starts every message
    (``URL query``), so it names where the value came from.  Unknown keywords are
    left to the driver: libpq's list grows with each release.
    """
    for key, raw in params.items():
        if is_secret_query_key(key):
            if not isinstance(raw, str):
                raise ArgumentError(f"{source} {key} is given more than once; give it once")
            continue
        if key == "port" or key == "host" or key == "hostaddr":
            values = (raw,) if isinstance(raw, str) else raw
            if key == "port":
                for entry in (piece for value in values for piece in value.split(",")):
                    if entry.strip():
                        check_port_text(entry.strip(), f"{source} port")
            continue
        checked = (
            key in _CHOICES
            or key in _LIBPQ_WHOLE_NUMBERS
            or key == "options"
            or (driver == "asyncpg" and key in _ASYNCPG_NUMBERS)
        )
        if not checked:
            continue  # the driver's to judge; repeated keys are the dialect's to refuse
        value = _single(key, raw, source)
        assert value is not None
        choices = _CHOICES.get(key)
        if choices is not None:
            given = value.strip().lower() if key in _CASE_INSENSITIVE else value
            if given not in choices:
                raise ArgumentError(
                    f"{source} {key}={_show(value)} is not one of "
                    f"{', '.join(choice for choice in choices if choice)}"
                )
        elif driver == "asyncpg" and key in _ASYNCPG_NUMBERS:
            kind = _ASYNCPG_NUMBERS[key]
            _check_number(
                key, value, source, kind, "a number" if kind is float else "a whole number"
            )
        elif key in _LIBPQ_WHOLE_NUMBERS:
            _check_number(key, value, source, int, "a whole number")
        elif key == "options":
            _check_options(value, source)
