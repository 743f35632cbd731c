"""URL parsing, rendering and validation (``lambda_pool.url``)."""

from __future__ import annotations

import copy
import pickle

import pytest

from lambda_pool.exc import ArgumentError
from lambda_pool.url import URL, make_url


def test_postgres_url_parts_are_parsed_and_password_percent_decoded() -> None:
    url = make_url("postgresql+psycopg://app%40corp:p%40ss%3Aw%2Frd@db.example.com:6543/appdb")
    assert url.drivername == "postgresql+psycopg"
    assert url.username == "app@corp"
    assert url.password == "p@ss:w/rd"
    assert url.host == "db.example.com"
    assert url.port == 6543
    assert url.database == "appdb"
    assert dict(url.query) == {}
    assert url.get_backend_name() == "postgresql"
    assert url.get_driver_name() == "psycopg"


def test_password_is_masked_in_repr_and_str_but_not_when_asked() -> None:
    url = make_url("postgresql://user:s3cret@localhost/db")
    assert repr(url) == "postgresql://user:***@localhost/db"
    assert str(url) == "postgresql://user:***@localhost/db"
    assert "s3cret" not in f"{url!r} {url}"
    assert url.render_as_string(hide_password=False) == "postgresql://user:s3cret@localhost/db"


def test_special_characters_round_trip_through_render_and_parse() -> None:
    url = URL.create("postgresql", "us er", "p@ss/w:rd?&", "h", 5432, "d b")
    assert make_url(url.render_as_string(hide_password=False)) == url


def test_query_keeps_single_values_and_collects_repeated_ones() -> None:
    url = make_url("postgresql://u@h/d?sslmode=require&host=a&host=b&application_name=x%20y")
    assert url.query["sslmode"] == "require"
    assert url.query["host"] == ("a", "b")
    assert url.query["application_name"] == "x y"
    assert str(url) == ("postgresql://u@h/d?application_name=x+y&host=a&host=b&sslmode=require")


def test_ipv6_host_is_bracketed() -> None:
    url = make_url("postgresql+asyncpg://u@[::1]:5432/d")
    assert url.host == "::1"
    assert str(url) == "postgresql+asyncpg://u@[::1]:5432/d"
    assert url.get_driver_name() == "asyncpg"


@pytest.mark.parametrize(
    ("text", "database"),
    [
        ("sqlite:///relative/file.db", "relative/file.db"),
        ("sqlite:////abs/file.db", "/abs/file.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite://", None),
    ],
)
def test_sqlite_forms(text: str, database: str | None) -> None:
    url = make_url(text)
    assert url.database == database
    assert url.get_backend_name() == "sqlite"
    assert url.get_driver_name() == "pysqlite"
    assert str(url) == text


def test_url_is_immutable_and_set_returns_a_changed_copy() -> None:
    url = make_url("postgresql://u:p@h/d")
    with pytest.raises(AttributeError):
        url.host = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        url.query["x"] = "y"  # type: ignore[index]
    changed = url.set(host="other", password=None, port=1)
    assert str(changed) == "postgresql://u@other:1/d"
    assert str(url) == "postgresql://u:***@h/d"


def test_update_query_dict_replaces_or_appends() -> None:
    url = make_url("postgresql://u@h/d?a=1")
    assert url.update_query_dict({"a": "2", "b": "3"}).query == {"a": "2", "b": "3"}
    assert url.update_query_dict({"a": "2"}, append=True).query == {"a": ("1", "2")}
    assert url.difference_update_query(["a"]).query == {}


def test_equal_urls_compare_and_hash_equal_and_survive_copy_and_pickle() -> None:
    a = make_url("postgresql://u:p@h/d?x=1")
    b = make_url("postgresql://u:p@h/d?x=1")
    assert a == b and hash(a) == hash(b)
    assert a != make_url("postgresql://u:other@h/d?x=1")
    assert copy.deepcopy(a) == a
    assert pickle.loads(pickle.dumps(a)) == a
    assert make_url(a) is a


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("mysql://u:secret@h/d", "unsupported database scheme 'mysql'"),
        ("postgres://u:secret@h/d", "write postgresql://"),
        ("postgresql+pg8000://u:secret@h/d", "unsupported driver 'pg8000'"),
        ("sqlite+aiosqlite:///x.db", "unsupported driver 'aiosqlite'"),
        ("not a url", "could not parse the database URL"),
        ("postgresql://u:secret@h:port/d", "port must be an integer"),
        ("postgresql://u:secret@h:70000/d", "between 1 and 65535"),
    ],
)
def test_bad_urls_raise_argument_error_naming_what_is_supported(text: str, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        make_url(text)
    message = str(info.value)
    assert fragment in message
    assert "secret" not in message
    if "unsupported" in fragment:
        assert "postgresql+asyncpg://" in message and "sqlite://" in message


def test_make_url_rejects_non_strings() -> None:
    with pytest.raises(ArgumentError, match="expected a database URL string"):
        make_url(42)  # type: ignore[arg-type]
