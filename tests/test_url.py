"""URL parsing, rendering and validation (``lambda_pool.url``)."""

from __future__ import annotations

import copy
import pickle
import socket
from urllib.parse import quote

import pytest

from lambda_pool import create_engine
from lambda_pool.asyncio import create_async_engine
from lambda_pool.exc import ArgumentError
from lambda_pool.testing.postgres import PostgresServer
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
        ("postgresql+pg8000://u:secret@h/d", "unsupported driver 'pg8000'"),
        ("sqlite+aiosqlite:///x.db", "unsupported driver 'aiosqlite'"),
        ("not a url", "could not parse the database URL"),
        ("postgresql://u:secret@h:port/d", "port must be an integer"),
        ("postgresql://u:secret@h:70000/d", "from 1 to 65535"),
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


# --------------------------------------------------------------------------- libpq's forms


def test_postgres_scheme_is_postgresql_as_libpq_reads_it() -> None:
    url = make_url("postgres://u:pw@h/d")
    assert url.drivername == "postgresql"
    assert make_url("postgres+asyncpg://u@h/d").drivername == "postgresql+asyncpg"


def test_several_hosts_in_the_host_part_become_libpq_host_and_port_lists() -> None:
    url = make_url("postgresql://u:pw@h1:5432,h2:5433/appdb")
    assert (url.host, url.port) == (None, None)
    assert url.query["host"] == ("h1", "h2")
    assert url.query["port"] == ("5432", "5433")
    assert url.database == "appdb"
    assert make_url(url.render_as_string(hide_password=False)) == url


def test_a_host_list_with_some_ports_missing_keeps_libpq_empty_entries() -> None:
    url = make_url("postgresql://u@h1,[::1]:5433/d")
    assert url.query["host"] == ("h1", "::1")
    assert url.query["port"] == ("", "5433")
    assert "port" not in make_url("postgresql://u@h1,h2/d").query


def test_a_host_list_and_a_query_host_together_are_refused() -> None:
    with pytest.raises(ArgumentError, match="both in its host part and in"):
        make_url("postgresql://u@h1,h2/d?host=h3")


def test_percent_encoded_host_is_decoded_like_libpq_and_rendered_back() -> None:
    url = make_url("postgresql://u@%2Ftmp%2Fpg/d")
    assert url.host == "/tmp/pg"
    assert str(url) == "postgresql://u@%2Ftmp%2Fpg/d"
    assert make_url(str(url)) == url


def test_key_value_connection_strings_follow_libpq_quoting() -> None:
    url = make_url(
        r"host=db.example.com port = 6432 dbname=app user=app "
        r"password='its \'q\' a b' sslmode=require application_name=x\ y"
    )
    assert url.drivername == "postgresql"
    assert (url.host, url.port, url.database, url.username) == (
        "db.example.com",
        6432,
        "app",
        "app",
    )
    assert url.password == "its 'q' a b"
    assert dict(url.query) == {"sslmode": "require", "application_name": "x y"}
    assert "a b" not in repr(url)


def test_key_value_string_with_a_host_list() -> None:
    url = make_url("host=h1,h2 port=5432,5433 dbname=d")
    assert url.query["host"] == ("h1", "h2")
    assert url.query["port"] == ("5432", "5433")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("host=h password=qzxj vkwq dbname=d", "part 3 is not keyword=value"),
        ("host=h password='qzxj vkwq", "never closed"),
        ("host=h port=qzxjvkwq", "port must be an integer"),
    ],
)
def test_malformed_key_value_strings_say_where_without_repeating_text(
    text: str, fragment: str
) -> None:
    with pytest.raises(ArgumentError) as info:
        make_url(text)
    assert fragment in str(info.value)
    assert "qzxj" not in str(info.value) and "vkwq" not in str(info.value)


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("key", ["password", "sslpassword", "token", "api_key", "PASSWD"])
def test_secret_named_query_parameters_are_masked_in_str_and_repr(key: str) -> None:
    url = make_url(f"postgresql://u@h/d?{key}=hunter2&sslmode=require")
    assert "hunter2" not in repr(url) and "hunter2" not in str(url)
    assert f"{key}=***" in str(url)
    assert "sslmode=require" in str(url)
    assert url.render_as_string(hide_password=False).count("hunter2") == 1


def test_lambda_pool_credential_keys_name_secrets_and_are_shown() -> None:
    url = make_url("postgresql://u@h/d?secret=prod/db&secret_max_age=60")
    assert "secret=prod%2Fdb" in str(url) and "secret_max_age=60" in str(url)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # No host: "app:hunter2" reads as host:port.
        ("postgresql://app:hunter2/appdb", "the URL has no '@'"),
        # An unescaped '@' in the password: its tail would be the host.
        ("postgresql://app:hun@ter2@db.example.com/appdb", "percent-encode '@' as %40"),
        ("postgresql://app:hun@ter2/x@db.example.com/appdb", "percent-encode '@' as %40"),
        ("postgresql://app:hun@ter2?x@db.example.com/appdb", "percent-encode '@' as %40"),
        ("postgresql://app:hun@ter2:5432@db.example.com/appdb", "percent-encode '@' as %40"),
        # Ports that are no ASCII number.
        ("postgresql://u:hunter2@h:²/d", "port must be an integer"),
        ("postgresql://u:hunter2@h:" + "9" * 5000 + "/d", "port must be an integer"),
        ("postgresql://u:hunter2@h1:1,h2:x/d", "a port in the URL's host list"),
        ("postgresql://u:hunter2@[::1/d", "without a matching ']'"),
    ],
)
def test_malformed_urls_name_the_part_and_never_show_the_password(text: str, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        make_url(text)
    message = str(info.value)
    assert fragment in message
    for piece in ("hunter2", "hun", "ter2"):
        assert piece not in message


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("postgresql://u@h/d?sslmode=garbage", "sslmode='garbage' is not one of disable"),
        ("postgresql://u@h/d?sslmode=REQUIRE", "sslmode='REQUIRE'"),
        ("postgresql://u@h/d?connect_timeout=abc", "connect_timeout='abc' is not a whole number"),
        ("postgresql://u@h/d?connect_timeout=2.5", "connect_timeout='2.5' is not a whole number"),
        ("postgresql+asyncpg://u@h/d?connect_timeout=abc", "connect_timeout='abc' is not a number"),
        ("postgresql+asyncpg://u@h/d?command_timeout=-1", "command_timeout='-1' is not a number"),
        ("postgresql+asyncpg://u@h/d?statement_cache_size=x", "statement_cache_size='x'"),
        ("postgresql://u@h/d?keepalives_idle=" + "9" * 30, "keepalives_idle="),
        ("postgresql://u@h/d?target_session_attrs=writer", "target_session_attrs='writer'"),
        ("postgresql://u@h/d?options=-c%20a%3D%27b", "options has an unclosed quote"),
        ("postgresql+asyncpg://u@h/d?options=-c%20a%3D%27b", "options has an unclosed quote"),
        ("postgresql://u@h/d?options=search_path%3Dx", "options must be server settings"),
        ("postgresql://u@h/d?options=-c%20search_path", "each -c needs name=value"),
        ("postgresql://u@h/d?sslmode=require&sslmode=disable", "sslmode is given more than once"),
        ("postgresql://u@h/d?auth=kerberos", "auth='kerberos' is not one of password"),
        ("postgresql://u@h/d?token_margin=soon", "token_margin='soon'"),
        ("postgresql://u@h/d?port=5432,x", "port must be an integer"),
        ("host=h connect_timeout=abc", "connect_timeout='abc'"),
    ],
)
def test_parameter_values_the_driver_would_refuse_are_refused_when_parsed(
    text: str, fragment: str
) -> None:
    with pytest.raises(ArgumentError) as info:
        make_url(text)
    assert fragment in str(info.value)


def test_values_are_checked_for_urls_built_from_parts_too() -> None:
    with pytest.raises(ArgumentError, match="sslmode='nope'"):
        URL.create("postgresql+psycopg", host="h", query={"sslmode": "nope"})
    with pytest.raises(ArgumentError, match="connect_timeout"):
        make_url("postgresql://u@h/d").update_query_dict({"connect_timeout": "soon"})


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@h/d?sslmode=verify-full&connect_timeout=10&keepalives=1",
        "postgresql+asyncpg://u@h/d?connect_timeout=2.5&command_timeout=30",
        "postgresql://u@h/d?options=-c%20search_path%3Da%5C%20b%20--work_mem%3D64MB",
        "postgresql://u@h/d?auth=IAM&token_margin=30&transaction_pooling=true",
        "postgresql://u@h/d?unknown_to_us=anything&unknown_to_us=twice",
        "sqlite:///x.db?mode=whatever",
    ],
)
def test_valid_values_pass(text: str) -> None:
    make_url(text)


# --------------------------------------------------------------------------- real server


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _netloc_url(pg: PostgresServer, scheme: str, closed_port: int) -> str:
    userinfo = f"{quote(pg.user, safe='')}:{quote(pg.password, safe='')}"
    return f"{scheme}://{userinfo}@127.0.0.1:{closed_port},127.0.0.1:{pg.port}/{pg.dbname}"


def test_psycopg_tries_each_host_of_a_multi_host_url_as_libpq_does(
    embedded_postgres: PostgresServer, closed_port: int
) -> None:
    engine = create_engine(_netloc_url(embedded_postgres, "postgres", closed_port))
    with engine.connect() as conn:
        assert conn.execute("SELECT inet_server_port()").scalar() == embedded_postgres.port
    engine.dispose()


async def test_asyncpg_tries_each_host_of_a_multi_host_url(
    embedded_postgres: PostgresServer, closed_port: int
) -> None:
    engine = create_async_engine(_netloc_url(embedded_postgres, "postgresql+asyncpg", closed_port))
    async with engine.connect() as conn:
        port = (await conn.execute("SELECT inet_server_port()")).scalar()
        assert port == embedded_postgres.port
    await engine.dispose()


def test_a_key_value_connection_string_connects(embedded_postgres: PostgresServer) -> None:
    pg = embedded_postgres
    password = pg.password.replace("\\", "\\\\").replace("'", "\\'")
    conninfo = (
        f"host=127.0.0.1 port={pg.port} dbname={pg.dbname} user={pg.user} "
        f"password='{password}' application_name='lp url test'"
    )
    engine = create_engine(conninfo)
    assert pg.password not in repr(engine)
    with engine.connect() as conn:
        assert conn.execute("SHOW application_name").scalar() == "lp url test"
    engine.dispose()


def test_a_password_in_the_query_logs_in_and_is_masked(embedded_postgres: PostgresServer) -> None:
    pg = embedded_postgres
    url = f"postgresql://{pg.user}@127.0.0.1:{pg.port}/{pg.dbname}?password={quote(pg.password)}"
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1
        assert pg.password not in repr(conn) + repr(engine) + str(engine.url)
    engine.dispose()
