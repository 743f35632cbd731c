"""samples/psycopg_handler in the real awslambdaric runtime client, driven like Lambda does.

One execution environment (a subprocess running ``python -m awslambdaric app.handler``
from the sample folder): a cold start and 20 warm invocations on one backend, a failing
invocation reported through ``/invocation/{id}/error``, and a Shutdown whose SIGTERM
(delivered because the decorator registered an internal extension) closes the
connection, so the server is left with no backend of the function.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.testing.runtime import LocalLambda

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "psycopg_handler"


def test_psycopg_sample_in_the_real_runtime_reuses_one_backend_and_closes_it_at_shutdown(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    app = unique_application_name
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, embedded_postgres.password, application_name=app
    )
    env = {
        "LAMBDA_POOL_DATABASE_URL": url,
        "LAMBDA_POOL_REGISTER_EXTENSION": "1",
        # The package is installed (editable) in this interpreter's environment; the
        # checkout is added too, so a plain source tree works as well.
        "PYTHONPATH": os.pathsep.join([str(SAMPLE), str(ROOT)]),
    }
    with LocalLambda(
        "app.handler",
        SAMPLE,
        env=env,
        python=sys.executable,
        timeout_s=10.0,
        observe=lambda: {"backends": embedded_postgres.backend_count(app)},
    ) as fn:
        cold = fn.invoke({})
        assert cold.ok, fn.logs()
        warm = [fn.invoke({}) for _ in range(20)]
        failed = fn.invoke({"fail": True})
        after = fn.invoke({})

        assert fn.extensions_registered == 1
        status = fn.shutdown(grace=2.0)
        left = embedded_postgres.wait_for_backend_count(0, app, timeout=10)

    assert cold.cold and not any(r.cold for r in warm)
    assert all(r.ok for r in warm), [r.error_message for r in warm if not r.ok]
    pids = {cold.payload["backend_pid"], *(r.payload["backend_pid"] for r in warm)}
    assert len(pids) == 1
    assert all(r.payload["reused"] for r in warm)
    assert all(r.observed == {"backends": 1} for r in (cold, *warm))
    visits = [r.payload["visits"] for r in (cold, *warm)]
    assert visits == list(range(visits[0], visits[0] + 21))

    # The failure reaches Lambda as the handler's exception type via /error ...
    assert not failed.ok and failed.error_type == "ValueError"
    assert "asked this invocation to fail" in (failed.error_message or "")
    # ... its INSERT was rolled back, and the same connection serves the next one.
    assert after.ok and not after.cold
    assert after.payload["visits"] == visits[-1] + 1
    assert after.payload["backend_pid"] in pids
    assert after.observed == {"backends": 1}

    # SIGTERM reached the process (it did not need the SIGKILL after the grace period)
    # and the shutdown hook closed the connection.
    assert status != -9, fn.logs()
    assert left == 0
