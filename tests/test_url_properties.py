"""Properties of URL parsing and of the ``LAMBDA_POOL_*`` settings, over generated input.

For any text: ``make_url`` returns a URL or raises ``ArgumentError``, nothing else.  For
URLs built around a password (percent-encoded or, wrongly, not; in the user-info, the
query or a key=value string; with hosts, ports and parameter values that may be
garbage): the password never shows in ``str``/``repr`` nor in an error message, not
even as a fragment.  For any set of ``LAMBDA_POOL_*`` values: ``Settings.from_env``
either succeeds or raises a documented lambda-pool error naming a variable, and
neither its errors nor ``repr(settings)`` show the URL's password.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_pool.config import Settings
from lambda_pool.exc import ArgumentError, CredentialsError
from lambda_pool.url import make_url

# Passwords are made of letters no message uses (so a fragment of one is unambiguous)
# and of every character that means something in a URL or a key=value string.
SECRET_LETTERS = "qzxjvkw"
_ANY = SECRET_LETTERS + "@:/?#&=% +'\\,[]"
# Some URL-meaningful characters around a run of at least four secret letters.
passwords = st.tuples(
    st.text(alphabet=_ANY, max_size=8),
    st.text(alphabet=SECRET_LETTERS, min_size=4, max_size=8),
    st.text(alphabet=_ANY, max_size=8),
).map("".join)
# Other values never use the secret letters, so any fragment seen is the password's.
other_text = st.text(
    alphabet=st.characters(exclude_characters=SECRET_LETTERS, exclude_categories=("Cs",)),
    max_size=12,
)
hosts = st.sampled_from(["db.example.com", "127.0.0.1", "[::1]", "h1,h2", "%2Ftmp", "", "h@x"])
ports = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=70000).map(lambda port: f":{port}"),
    other_text.map(lambda text: f":{text}"),
    st.just(":" + "9" * 5000),
    st.just(":\u00b2"),
    st.just(":5432,h2:5433"),
)
param_values = st.one_of(
    st.sampled_from(["require", "verify-full", "10", "2.5", "-c a=b", "-c a='b", "garbage"]),
    other_text,
)
param_keys = st.sampled_from(
    [
        "sslmode",
        "connect_timeout",
        "options",
        "target_session_attrs",
        "keepalives_idle",
        "application_name",
        "auth",
        "token_margin",
        "port",
        "command_timeout",
    ]
)
queries = st.dictionaries(param_keys, param_values, max_size=3)
drivers = st.sampled_from(["postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg"])


def _fragments(password: str) -> list[str]:
    """Every run of 4+ secret letters in the password: none may show anywhere."""
    return re.findall(f"[{SECRET_LETTERS}]{{4,}}", password)


def _assert_hidden(password: str, text: str) -> None:
    for fragment in _fragments(password):
        assert fragment not in text, (fragment, text)


@st.composite
def urls_with_a_password(draw: st.DrawFn) -> tuple[str, str]:
    password = draw(passwords)
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in draw(queries).items())
    form = draw(st.sampled_from(["encoded", "raw", "query", "conninfo", "conninfo-raw"]))
    driver, host, port = draw(drivers), draw(hosts), draw(ports)
    tail = f"{host}{port}/app" + (f"?{query}" if query else "")
    if form == "encoded":
        return f"{driver}://app:{quote(password, safe='')}@{tail}", password
    if form == "raw":  # a user who forgot to percent-encode
        return f"{driver}://app:{password}@{tail}", password
    if form == "query":
        sep = "&" if query else "?"
        return f"{driver}://app@{tail}{sep}password={quote(password, safe='')}", password
    escaped = password.replace("\\", "\\\\").replace("'", "\\'")
    value = f"'{escaped}'" if form == "conninfo" else password
    return f"host=db.example.com user=app password={value} dbname=app", password


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=st.characters(), max_size=80)))
def test_any_text_is_a_url_or_an_argument_error(text: str) -> None:
    # The second strategy includes lone surrogates: what os.environ holds for bytes
    # that are not UTF-8.
    try:
        url = make_url(text)
    except ArgumentError:
        return
    assert url.drivername
    assert make_url(url.render_as_string(hide_password=False)) == url


@settings(max_examples=600, deadline=None)
@given(urls_with_a_password())
def test_a_password_never_shows_in_a_url_or_its_errors(case: tuple[str, str]) -> None:
    text, password = case
    try:
        url = make_url(text)
    except ArgumentError as error:
        _assert_hidden(password, str(error))
        return
    _assert_hidden(password, str(url) + repr(url))


VARIABLES = [
    "LAMBDA_POOL_DATABASE_URL",
    "LAMBDA_POOL_AUTH",
    "LAMBDA_POOL_SECRET_ARN",
    "LAMBDA_POOL_IAM_REGION",
    "LAMBDA_POOL_PRE_PING_IDLE_SECONDS",
    "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS",
    "LAMBDA_POOL_TRANSACTION_POOLING",
    "LAMBDA_POOL_REGISTER_EXTENSION",
    "LAMBDA_POOL_WARM",
]
variable_values = st.one_of(
    other_text,
    st.sampled_from(
        [
            "1",
            "0",
            "true",
            "static",
            "iam",
            "secret",
            "eu-west-1",
            "500",
            "-5",
            "nan",
            "1e400",
            "9" * 5000,
            "\u0665",
            "prod/db",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf",
        ]
    ),
)


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    environ = draw(st.dictionaries(st.sampled_from(VARIABLES[1:]), variable_values, max_size=5))
    url, password = draw(urls_with_a_password())
    if draw(st.booleans()):
        environ["LAMBDA_POOL_DATABASE_URL"] = url
    if draw(st.booleans()):
        environ[draw(st.sampled_from(["LAMBDA_POOL_DATABSE_URL", "LAMBDA_POOL_WRAM"]))] = "1"
    return environ, password


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(environments())
def test_settings_from_any_environment_fail_only_with_documented_errors(
    case: tuple[dict[str, str], str],
) -> None:
    environ, password = case
    try:
        found = Settings.from_env(environ)
    except (ArgumentError, CredentialsError) as error:
        message = str(error)
        assert "LAMBDA_POOL_" in message, message
        _assert_hidden(password, message)
        return
    _assert_hidden(password, repr(found))
    if found.database_url is not None:
        _assert_hidden(password, repr(found.url()))
