"""Database URLs: parsing, validation and secret-safe rendering.

``URL`` mirrors SQLAlchemy's ``sqlalchemy.engine.URL`` (immutable; ``set()``,
``update_query_dict()``, ``render_as_string()``, ``get_backend_name()``,
``get_driver_name()``) so code written against it keeps working.

:func:`make_url` accepts what SQLAlchemy accepts, plus what libpq (and so psycopg)
accepts for PostgreSQL:

* ``postgres://`` as a spelling of ``postgresql://``;
* several hosts in the host part, ``postgresql://u@h1:5432,h2:5433/db``: they become
  libpq's lists, the query's ``host`` and ``port`` tuples (SQLAlchemy's own multi-host
  spelling, ``?host=h1&host=h2``), which the dialects pass on as libpq and asyncpg take
  them;
* a percent-encoded host (``postgresql://%2Ftmp/db`` is the socket directory ``/tmp``);
* key=value connection strings, ``host=db port=5432 dbname=app user=app``
  (:mod:`lambda_pool.conninfo` says why they are parsed here and not by psycopg).

A PostgreSQL URL's parameter values are checked when the URL is built
(:func:`lambda_pool.conninfo.check_params`): a bad ``sslmode`` or ``connect_timeout``
fails at Init, not at the first invocation.

``str()`` and ``repr()`` mask every secret: the password as ``***``, and the value of
any query parameter named like one (libpq's ``?password=`` and ``?sslpassword=``,
``token``, ...): URLs end up in logs and exception messages, and a Lambda's logs are
widely readable.  Parse errors say which part is malformed and never repeat it: in a
mistyped URL that part can be the password.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote

from lambda_pool.conninfo import (
    check_params,
    check_port_text,
    is_secret_query_key,
    looks_like_conninfo,
    parse_conninfo,
    split_host_list,
)
from lambda_pool.dialects import DEFAULT_DRIVERS, check_drivername
from lambda_pool.exc import ArgumentError

__all__ = ["URL", "make_url"]

QueryValue = str | tuple[str, ...]

# SQLAlchemy's URL grammar, so every URL a SQLAlchemy user already has parses the
# same way: a password may hold ':' or '/', but '@' must be percent-encoded.  The host
# part is read as a whole and split by libpq's rules (several comma-separated hosts,
# each with an optional port; IPv6 addresses in brackets).  SQLAlchemy writes it as
# this regular expression; _split_url follows it with string methods, because compiling
# it took about 0.4 ms of every cold start:
#
#     (?P<name>[\w+]+)://
#     (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
#     (?P<hostlist>[^/?]*)(?:/(?P<database>[^?]*))?(?:\?(?P<query>.*))?
#
# (re.S: the query may hold newlines).


def _is_scheme(text: str) -> bool:
    r"""``[\w+]+``: word characters (``str.isalnum()`` or ``_``) and ``+``, at least one."""
    return bool(text) and all(char.isalnum() or char in "_+" for char in text)


def _split_url(
    text: str,
) -> tuple[str, str | None, str | None, str, str | None, str | None] | None:
    """The grammar's groups ``(name, username, password, hostlist, database, query)``,
    ``None`` for an absent one; ``None`` when ``text`` does not start with a scheme and
    ``://``.  As the regex's backtracking decides: when a ':' ends the longest ``[^:/]*``
    run and an '@' follows it, the user ends at that ':' and the password at that '@';
    otherwise the user ends at the run's last '@', if it has one."""
    scheme_end = text.find("://")
    if scheme_end <= 0 or not _is_scheme(text[:scheme_end]):
        return None
    rest = text[scheme_end + 3 :]
    run = len(rest)
    for stop in (rest.find(":"), rest.find("/")):
        if 0 <= stop < run:
            run = stop
    username: str | None = None
    password: str | None = None
    host_start = 0
    at = rest.find("@", run + 1) if run < len(rest) and rest[run] == ":" else -1
    if at >= 0:
        username, password, host_start = rest[:run], rest[run + 1 : at], at + 1
    else:
        at = rest.rfind("@", 0, run)
        if at >= 0:
            username, host_start = rest[:at], at + 1
    tail = rest[host_start:]
    database: str | None = None
    query: str | None = None
    host_end = len(tail)
    for stop in (tail.find("/"), tail.find("?")):
        if 0 <= stop < host_end:
            host_end = stop
    hostlist, tail = tail[:host_end], tail[host_end:]
    if tail.startswith("/"):
        database, _, after = tail[1:].partition("?")
        if _:
            query = after
    elif tail.startswith("?"):
        query = tail[1:]
    return text[:scheme_end], username, password, hostlist, database, query


# libpq's URI prefixes; ``postgres://`` means the same as ``postgresql://``.
_BACKEND_ALIASES = {"postgres": "postgresql"}

_UNSET: Any = object()


def _freeze_query(query: Mapping[str, str | Sequence[str]] | None) -> Mapping[str, QueryValue]:
    frozen: dict[str, QueryValue] = {}
    for key, value in (query or {}).items():
        if not isinstance(key, str):
            raise ArgumentError(f"URL query keys must be strings, got {key!r}")
        if isinstance(value, str):
            frozen[key] = value
        elif isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
            frozen[key] = tuple(value)
        else:
            raise ArgumentError(
                f"URL query value for {key!r} must be a string or a sequence of strings"
            )
    return MappingProxyType(frozen)


def _check_port(port: Any) -> int | None:
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int):
        raise ArgumentError(f"URL port must be an integer, got {type(port).__name__}")
    if not 0 < port < 65536:
        raise ArgumentError(f"URL port must be between 1 and 65535, got {port}")
    return port


class URL:
    """An immutable database URL: ``drivername://username:password@host:port/database?query``.

    Build one with :func:`make_url` or :meth:`URL.create`; derive changed copies with
    :meth:`set` and :meth:`update_query_dict`.  Equal URLs (password included) compare
    and hash equal; the hash never exposes the password.
    """

    __slots__ = ("database", "drivername", "host", "password", "port", "query", "username")

    drivername: str
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    query: Mapping[str, QueryValue]

    def __init__(
        self,
        drivername: str,
        username: str | None = None,
        password: str | None = None,
        host: str | None = None,
        port: int | None = None,
        database: str | None = None,
        query: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        if not isinstance(drivername, str) or not drivername:
            raise ArgumentError("URL drivername must be a non-empty string such as 'postgresql'")
        check_drivername(drivername)
        for name, value in (
            ("username", username),
            ("password", password),
            ("host", host),
            ("database", database),
        ):
            if value is not None and not isinstance(value, str):
                raise ArgumentError(f"URL {name} must be a string or None")
        setter = object.__setattr__
        setter(self, "drivername", drivername)
        setter(self, "username", username)
        setter(self, "password", password)
        setter(self, "host", host)
        setter(self, "port", _check_port(port))
        setter(self, "database", database)
        setter(self, "query", _freeze_query(query))
        if drivername.partition("+")[0] == "postgresql":
            # At Init, so a value the driver would refuse fails the deployment, not the
            # first invocation.
            check_params(self.query, self.get_driver_name())

    @classmethod
    def create(
        cls,
        drivername: str,
        username: str | None = None,
        password: str | None = None,
        host: str | None = None,
        port: int | None = None,
        database: str | None = None,
        query: Mapping[str, str | Sequence[str]] | None = None,
    ) -> URL:
        """Build a URL from its parts (SQLAlchemy's spelling of the constructor)."""
        return cls(drivername, username, password, host, port, database, query)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"URL is immutable; use url.set({name}=...) for a changed copy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("URL is immutable")

    def set(
        self,
        drivername: str | None = None,
        username: str | None = _UNSET,
        password: str | None = _UNSET,
        host: str | None = _UNSET,
        port: int | None = _UNSET,
        database: str | None = _UNSET,
        query: Mapping[str, str | Sequence[str]] | None = _UNSET,
    ) -> URL:
        """Return a copy with the given parts replaced (``None`` clears a part)."""
        return URL(
            self.drivername if drivername is None else drivername,
            self.username if username is _UNSET else username,
            self.password if password is _UNSET else password,
            self.host if host is _UNSET else host,
            self.port if port is _UNSET else port,
            self.database if database is _UNSET else database,
            self.query if query is _UNSET else query,
        )

    def update_query_dict(
        self, query_parameters: Mapping[str, str | Sequence[str]], append: bool = False
    ) -> URL:
        """Return a copy whose query has ``query_parameters`` merged in.

        With ``append=True`` a key already present keeps its values and gains the new
        ones (as a tuple); otherwise the new value replaces the old one.
        """
        merged: dict[str, str | Sequence[str]] = dict(self.query)
        for key, value in _freeze_query(query_parameters).items():
            if append and key in merged:
                old = merged[key]
                old_t = (old,) if isinstance(old, str) else tuple(old)
                new_t = (value,) if isinstance(value, str) else tuple(value)
                merged[key] = old_t + new_t
            else:
                merged[key] = value
        return self.set(query=merged)

    def difference_update_query(self, names: Iterable[str]) -> URL:
        """Return a copy without the given query keys."""
        drop = set(names)
        return self.set(query={k: v for k, v in self.query.items() if k not in drop})

    def get_backend_name(self) -> str:
        """The database part of the drivername: ``postgresql`` or ``sqlite``."""
        return self.drivername.partition("+")[0]

    def get_driver_name(self) -> str:
        """The driver part of the drivername, or the backend's default driver when absent."""
        backend, sep, driver = self.drivername.partition("+")
        return driver if sep else DEFAULT_DRIVERS[backend]

    def render_as_string(self, hide_password: bool = True) -> str:
        """The URL as a string; the password (and the value of every query parameter named
        like a secret, such as ``?password=``) shows as ``***`` unless ``hide_password=False``."""
        out = self.drivername + "://"
        if self.username is not None:
            out += quote(self.username, safe=" +")
            if self.password is not None:
                out += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            out += "@"
        if self.host is not None:
            # Percent-encoded as libpq decodes it: a socket directory (/tmp) or an IPv6
            # zone (%eth0) must not read as a path or an escape.
            if ":" in self.host:
                out += "[" + quote(self.host, safe=":") + "]"
            else:
                out += quote(self.host, safe="")
        if self.port is not None:
            out += f":{self.port}"
        if self.database is not None:
            # ':' stays readable so sqlite:///:memory: renders as written.
            out += "/" + quote(self.database, safe=" +/:")
        if self.query:
            pairs: list[str] = []
            for key in sorted(self.query):
                value = self.query[key]
                for element in (value,) if isinstance(value, str) else value:
                    shown = "***" if hide_password and is_secret_query_key(key) else element
                    pairs.append(f"{quote_plus(key)}={quote_plus(shown, safe='*')}")
            out += "?" + "&".join(pairs)
        return out

    def _key(self) -> tuple[Any, ...]:
        return (
            self.drivername,
            self.username,
            self.password,
            self.host,
            self.port,
            self.database,
            tuple(sorted(self.query.items())),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URL) and self._key() == other._key()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        # The masked rendering: equal URLs hash equal, and the password never feeds
        # anything observable.
        return hash(self.render_as_string())

    def __str__(self) -> str:
        return self.render_as_string()

    def __repr__(self) -> str:
        return self.render_as_string()

    def __copy__(self) -> URL:
        return self

    def __deepcopy__(self, memo: Any) -> URL:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            URL,
            (
                self.drivername,
                self.username,
                self.password,
                self.host,
                self.port,
                self.database,
                dict(self.query),
            ),
        )


_MALFORMED_HINT = (
    "expected e.g. postgresql://user:password@host:5432/dbname, "
    "host=HOST port=5432 dbname=DB user=USER, or sqlite:///path/to/file.db"
)


# With no '@', "user:password" reads as "host:port": say so without showing the text.
_NO_AT_HINT = (
    "; the URL has no '@': if the text after ':' is a password, write "
    "postgresql://USER:PASSWORD@HOST/DB and percent-encode '@', '/', '?' and '#' "
    "inside the password (%40, %2F, %3F, %23)"
)


def _query_from(text: str) -> dict[str, str | list[str]]:
    query: dict[str, str | list[str]] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if key in query:
            existing = query[key]
            query[key] = [*([existing] if isinstance(existing, str) else existing), value]
        else:
            query[key] = value
    return query


def _hosts_into_query(
    hosts: list[str], ports: list[str], query: dict[str, str | list[str]]
) -> None:
    """A host list goes where SQLAlchemy and the dialects read libpq's lists: the query."""
    if "host" in query or "port" in query:
        raise ArgumentError(
            "the URL names several hosts both in its host part and in ?host=/?port=: "
            "keep one of them"
        )
    query["host"] = hosts
    if any(ports):
        query["port"] = ports


def _from_conninfo(text: str) -> URL:
    params = parse_conninfo(text)
    query: dict[str, str | list[str]] = {}
    host = params.pop("host", None)
    port_text = params.pop("port", None)
    port: int | None = None
    if host is not None and "," in host:
        _hosts_into_query(host.split(","), (port_text or "").split(","), query)
        host = None
    elif port_text:
        port = check_port_text(port_text, "the connection string's port")
    for key, value in params.items():
        if key not in ("user", "password", "dbname"):
            query[key] = value
    return URL(
        "postgresql",
        username=params.get("user"),
        password=params.get("password"),
        host=host or None,
        port=port,
        database=params.get("dbname"),
        query=query,
    )


def _parse(text: str) -> URL:
    if looks_like_conninfo(text):
        return _from_conninfo(text)
    split = _split_url(text)
    if split is None:
        scheme = text.partition("://")[0] if "://" in text else ""
        if scheme and not _is_scheme(scheme):
            raise ArgumentError("could not parse the database URL: the scheme is malformed")
        raise ArgumentError(f"could not parse the database URL; {_MALFORMED_HINT}")
    name, username_text, password_text, hostlist, database_text, query_text = split
    backend, plus, driver = name.partition("+")
    drivername = _BACKEND_ALIASES.get(backend, backend) + plus + driver
    has_userinfo = username_text is not None
    if drivername.startswith("postgresql") and (
        "@" in hostlist
        or "@" in (database_text or "")
        or (has_userinfo and "@" in (query_text or ""))
    ):
        # libpq and SQLAlchemy both end the password at the first '@': what follows a
        # second one would be shown as host, database or query, and is the password's tail.
        raise ArgumentError(
            "the database URL has an '@' after its user:password part: percent-encode "
            "'@' as %40 in the password (and in the database name and query values)"
        )
    query = _query_from(query_text) if query_text else {}
    specs = split_host_list(hostlist) if hostlist else []
    if len(specs) > 1 and not drivername.startswith("postgresql"):
        raise ArgumentError("only postgresql:// URLs may name several hosts")
    host: str | None = None
    port: int | None = None
    if len(specs) == 1:
        host_text, port_text = specs[0]
        host = unquote(host_text) or None
        if port_text:
            port = check_port_text(port_text, "the URL's port", "" if has_userinfo else _NO_AT_HINT)
    elif specs:
        for _, port_text in specs:
            if port_text:
                check_port_text(port_text, "a port in the URL's host list")
        _hosts_into_query(
            [unquote(host_text) for host_text, _ in specs],
            [port_text for _, port_text in specs],
            query,
        )
    return URL(
        drivername,
        username=unquote(username_text) if username_text is not None else None,
        password=unquote(password_text) if password_text is not None else None,
        host=host,
        port=port,
        database=unquote(database_text) if database_text else None,
        query=query,
    )


def make_url(name_or_url: str | URL) -> URL:
    """Return ``name_or_url`` as a :class:`URL`, parsing it when it is a string.

    Besides SQLAlchemy's URLs, takes libpq's forms (``postgres://``, several hosts,
    key=value connection strings; see the module docstring).  Raises
    :class:`~lambda_pool.exc.ArgumentError` for text that is not a URL, names a backend
    or driver lambda-pool does not support, or holds a parameter value the driver would
    refuse; the message names the part and never repeats the password.
    """
    if isinstance(name_or_url, URL):
        return name_or_url
    if not isinstance(name_or_url, str):
        raise ArgumentError(
            f"expected a database URL string or lambda_pool.URL, got {type(name_or_url).__name__}"
        )
    try:
        name_or_url.encode("utf-8")
    except UnicodeEncodeError:
        # os.environ keeps undecodable bytes as lone surrogates: no driver can send them.
        raise ArgumentError(
            "the database URL holds bytes that are not UTF-8 text; write it in UTF-8 "
            "(percent-encode anything else)"
        ) from None
    return _parse(name_or_url.strip())
