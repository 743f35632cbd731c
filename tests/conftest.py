"""The project's own tests use short names for the plugin's ``lp_*`` fixtures.

The plugin registers only ``lp_*`` names, so it never collides with a user's fixtures;
these aliases exist for this test suite alone and are not installed with the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def embedded_postgres(lp_postgres: Any) -> Any:
    return lp_postgres


@pytest.fixture
def postgres_url(lp_postgres_url: str) -> str:
    return lp_postgres_url


@pytest.fixture
def unique_application_name(lp_application_name: str) -> str:
    return lp_application_name


@pytest.fixture
def aws(lp_aws: str) -> str:
    return lp_aws


@pytest.fixture
def db_secret(lp_db_secret: str) -> str:
    return lp_db_secret


@pytest.fixture
def lambda_context(lp_lambda_context: Callable[..., Any]) -> Callable[..., Any]:
    return lp_lambda_context


@pytest.fixture
def lambda_invoker(lp_lambda_invoker: Callable[..., Any]) -> Callable[..., Any]:
    return lp_lambda_invoker


@pytest.fixture(scope="session")
def pgbouncer(lp_pgbouncer: Any) -> Any:
    return lp_pgbouncer
