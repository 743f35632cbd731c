"""The lambda_invoker fixture: cold starts behave like a new container, warm ones reuse state."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from lambda_pool.testing.invoke import LambdaInvoker
from lambda_pool.testing.postgres import PostgresServer

# A handler written against lambda_pool.warm_engine directly, so these tests do not depend
# on the decorator: what the invoker must get right is import, module state and engines.
HANDLER = textwrap.dedent(
    """
    import os

    import lambda_pool

    IMPORTS = globals().get("IMPORTS", 0) + 1
    CALLS = 0

    def handler(event, context):
        global CALLS
        CALLS += 1
        if event.get("fail"):
            raise ValueError("asked to fail")
        engine = lambda_pool.warm_engine(os.environ["T_DATABASE_URL"])
        with engine.connect() as conn:
            pid = conn.execute("SELECT pg_backend_pid()").scalar()
        return {
            "pid": pid,
            "calls": CALLS,
            "imports": IMPORTS,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "request_id": context.aws_request_id,
            "function": context.function_name,
            "greeting": os.environ.get("T_GREETING"),
            "event": event,
        }

    def mutating(event, context):
        event["touched"] = True
        return event

    def not_json(event, context):
        return {"when": object()}
    """
)


@pytest.fixture
def handler_file(tmp_path: Path) -> Path:
    path = tmp_path / "fn.py"
    path.write_text(HANDLER)
    return path


@pytest.fixture
def db_url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    )


def test_warm_invocations_reuse_module_state_and_the_backend(
    lambda_invoker: Callable[..., LambdaInvoker],
    handler_file: Path,
    db_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    fn = lambda_invoker(str(handler_file), env={"T_DATABASE_URL": db_url})
    first = fn.cold({"n": 1})
    second = fn.warm({"n": 2})
    third = fn.warm({"n": 3})

    assert [r["calls"] for r in (first, second, third)] == [1, 2, 3]
    assert first["pid"] == second["pid"] == third["pid"]
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert third["event"] == {"n": 3}


def test_cold_start_reimports_and_closes_the_previous_containers_connection(
    lambda_invoker: Callable[..., LambdaInvoker],
    handler_file: Path,
    db_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    fn = lambda_invoker(str(handler_file), env={"T_DATABASE_URL": db_url})
    before = fn.cold({})
    fn.warm({})
    after = fn.cold({})

    # New module: counters start over and the import ran in a fresh namespace.
    assert (after["calls"], after["imports"]) == (1, 1)
    assert after["pid"] != before["pid"]
    # The old container's connection was disposed, not leaked next to the new one.
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    assert fn.cold_starts == 2


def test_each_invocation_gets_a_fresh_context_with_the_remaining_time(
    lambda_invoker: Callable[..., LambdaInvoker], handler_file: Path, db_url: str
) -> None:
    fn = lambda_invoker(str(handler_file), env={"T_DATABASE_URL": db_url}, function_name="orders")
    first = fn.cold({}, remaining_ms=1500)
    second = fn.warm({})

    assert first["request_id"] != second["request_id"]
    assert 0 < first["remaining_ms"] <= 1500
    assert 1500 < second["remaining_ms"] <= 3000  # the invoker's default
    assert first["function"] == "orders"


def test_handler_exception_propagates_and_the_next_warm_call_works(
    lambda_invoker: Callable[..., LambdaInvoker], handler_file: Path, db_url: str
) -> None:
    fn = lambda_invoker(str(handler_file), env={"T_DATABASE_URL": db_url})
    with pytest.raises(ValueError, match="asked to fail"):
        fn.cold({"fail": True})
    assert fn.warm({})["calls"] == 2


def test_environment_is_set_for_the_handler_and_restored_at_teardown(
    handler_file: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T_GREETING", "before")
    monkeypatch.delenv("T_DATABASE_URL", raising=False)
    with LambdaInvoker(handler_file, env={"T_DATABASE_URL": db_url}) as fn:
        fn.setenv("T_GREETING", "hello")
        assert fn.cold({})["greeting"] == "hello"
        fn.delenv("T_GREETING")
        assert fn.warm({})["greeting"] is None
    assert os.environ["T_GREETING"] == "before"
    assert "T_DATABASE_URL" not in os.environ


def test_event_and_result_pass_through_json_like_in_lambda(
    lambda_invoker: Callable[..., LambdaInvoker], handler_file: Path
) -> None:
    event = {"items": [1, 2]}
    assert lambda_invoker(f"{handler_file}:mutating").cold(event)["touched"] is True
    assert event == {"items": [1, 2]}  # the handler got its own decoded copy
    with pytest.raises(TypeError, match="not JSON serializable"):
        lambda_invoker(str(handler_file), "not_json").cold({})


def test_relative_path_is_resolved_against_the_rootdir(
    lambda_invoker: Callable[..., LambdaInvoker], request: pytest.FixtureRequest
) -> None:
    fn = lambda_invoker("samples/psycopg_handler/app.py")
    assert fn.module_name == "app"
    assert repr(fn).startswith(f"LambdaInvoker({request.config.rootpath}/samples/")


def test_warm_before_cold_is_a_clear_error(
    lambda_invoker: Callable[..., LambdaInvoker], handler_file: Path
) -> None:
    fn = lambda_invoker(str(handler_file))
    with pytest.raises(RuntimeError, match="cold"):
        fn.warm({})


def test_missing_handler_attribute_fails_like_lambda_init(
    lambda_invoker: Callable[..., LambdaInvoker], handler_file: Path
) -> None:
    with pytest.raises(AttributeError, match="no callable 'nope'"):
        lambda_invoker(str(handler_file), "nope").cold({})
