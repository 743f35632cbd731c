"""Run the real ``pgbouncer`` binary in front of a test PostgreSQL server.

`PgBouncer` writes a config and auth file into a temporary directory, starts pgbouncer on a
free 127.0.0.1 port (as ``nobody`` when we are root: pgbouncer refuses root), waits until it
accepts connections, and removes everything on `stop()` or at interpreter exit.
Transaction pooling is the default: clients must not use server-side prepared statements
(psycopg: ``prepare_threshold=None``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lambda_pool.testing.postgres import (
    PostgresServer,
    _chown_tree,
    _free_port,
    _tail,
    _unprivileged_user,
    _url,
    scratch_parent,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgBouncer", "PgBouncerStartError", "find_pgbouncer"]

_READY_TIMEOUT = 15.0


class PgBouncerStartError(RuntimeError):
    """pgbouncer did not come up; the message carries its log tail."""


def find_pgbouncer() -> str | None:
    """The pgbouncer binary on PATH or Debian's /usr/sbin/pgbouncer, else None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    debian = "/usr/sbin/pgbouncer"
    return debian if os.access(debian, os.X_OK) else None


def _ini_quote(value: str) -> str:
    # auth_file lines are "user" "password" with embedded quotes doubled.
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """pgbouncer in front of `postgres`, authenticating its application user.

    `dsn` is the application URL through the bouncer; `admin_dsn` reaches the admin console
    (database ``pgbouncer``), and `show("POOLS")` reads it.
    """

    def __init__(
        self,
        postgres: PostgresServer,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 5,
        max_client_conn: int = 500,
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        """`settings` are extra ``[pgbouncer]`` lines, overriding the defaults."""
        self._postgres = postgres
        self._pool_mode = pool_mode
        self._default_pool_size = default_pool_size
        self._max_client_conn = max_client_conn
        self._settings = dict(settings or {})
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._port = 0
        self._owner_pid = 0
        # Stats/admin console user: a name that exists only in the auth file, so the admin
        # console works without touching roles on the server.
        self._admin_user = "pgbouncer_admin"
        self._admin_password = secrets.token_urlsafe(18)

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._proc is not None else "stopped"
        return f"<PgBouncer {self._pool_mode} {state}>"

    # facts -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        self._require_running()
        return self._port

    @property
    def pool_mode(self) -> str:
        return self._pool_mode

    @property
    def default_pool_size(self) -> int:
        return self._default_pool_size

    @property
    def dsn(self) -> str:
        """The application URL through the bouncer (same user, password, database)."""
        pg = self._postgres
        return _url(pg.user, pg.password, self.host, self.port, pg.dbname, {})

    @property
    def admin_dsn(self) -> str:
        """The admin console (``SHOW POOLS`` ...); simple-protocol queries only."""
        return _url(self._admin_user, self._admin_password, self.host, self.port, "pgbouncer", {})

    @property
    def log_file(self) -> Path:
        self._require_running()
        assert self._tmpdir is not None
        return self._tmpdir / "pgbouncer.log"

    def _require_running(self) -> None:
        if self._proc is None:
            raise RuntimeError("PgBouncer is not started: call start() or use `with`")

    # admin console -----------------------------------------------------------

    def show(self, what: str = "POOLS") -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, as dicts (e.g. ``show("POOLS")``)."""
        import psycopg
        from psycopg.rows import dict_row

        if not what.replace("_", "").isalpha():
            raise ValueError(f"not a SHOW target: {what!r}")
        # The admin console speaks only the simple query protocol: ClientCursor sends the
        # statement as text with no Parse/Bind.
        conn: psycopg.Connection[dict[str, Any]]
        with psycopg.connect(
            self.admin_dsn,
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
            row_factory=dict_row,
            connect_timeout=10,
        ) as conn:
            return list(conn.execute(f"SHOW {what}").fetchall())

    def pool_stats(self, database: str | None = None) -> dict[str, Any]:
        """The ``SHOW POOLS`` row for the application database (default) and user."""
        database = database or self._postgres.dbname
        for row in self.show("POOLS"):
            if row.get("database") == database and row.get("user") == self._postgres.user:
                return row
        return {}

    def connect(self, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg connection through the bouncer, safe for transaction pooling."""
        import psycopg

        options: dict[str, Any] = {"prepare_threshold": None, "connect_timeout": 10}
        options.update(kwargs)
        return psycopg.connect(self.dsn, **options)

    # lifecycle ---------------------------------------------------------------

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> PgBouncer:
        """Write config, start pgbouncer and wait for it; idempotent."""
        with self._lock:
            if self._proc is not None:
                return self
            binary = find_pgbouncer()
            if binary is None:
                raise PgBouncerStartError("pgbouncer not installed: apt-get install pgbouncer")
            try:
                self._start_locked(binary)
            except BaseException:
                self._stop_locked()
                raise
            return self

    def _write_files(self, tmp: Path) -> None:
        pg = self._postgres
        (tmp / "userlist.txt").write_text(
            f"{_ini_quote(pg.user)} {_ini_quote(pg.password)}\n"
            f"{_ini_quote(self._admin_user)} {_ini_quote(self._admin_password)}\n"
        )
        os.chmod(tmp / "userlist.txt", 0o600)
        settings: dict[str, str | int] = {
            "listen_addr": "127.0.0.1",
            "listen_port": self._port,
            "unix_socket_dir": str(tmp),
            "auth_type": "scram-sha-256",
            "auth_file": str(tmp / "userlist.txt"),
            "pool_mode": self._pool_mode,
            "default_pool_size": self._default_pool_size,
            "max_client_conn": self._max_client_conn,
            "admin_users": self._admin_user,
            "stats_users": self._admin_user,
            "logfile": str(tmp / "pgbouncer.log"),
            "pidfile": str(tmp / "pgbouncer.pid"),
            # asyncpg and JDBC send this at startup; pgbouncer rejects unknown parameters.
            "ignore_startup_parameters": "extra_float_digits",
            "server_tls_sslmode": "prefer",
            "server_reset_query": "DISCARD ALL",
        }
        settings.update(self._settings)
        target = f"host={pg.host} port={pg.port} dbname={pg.dbname}"
        lines = ["[databases]", f"{pg.dbname} = {target}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        (tmp / "pgbouncer.ini").write_text("\n".join(lines) + "\n")

    def _start_locked(self, binary: str) -> None:
        self._owner_pid = os.getpid()
        atexit.register(self.stop)
        # As root pgbouncer runs as nobody, who must reach this directory (not a private
        # TMPDIR): scratch_parent() knows where.
        tmp = Path(tempfile.mkdtemp(prefix="lambda-pool-pgbouncer-", dir=scratch_parent()))
        self._tmpdir = tmp
        run_as = _unprivileged_user()
        spawn: dict[str, Any] = {"cwd": str(tmp)}
        if run_as is not None:
            spawn.update(user=run_as[0], group=run_as[1], extra_groups=[])
        log = tmp / "pgbouncer.log"
        # A free port can be taken between probing and binding: retry on a fresh one.
        for attempt in range(5):
            self._port = _free_port()
            self._write_files(tmp)
            if run_as is not None:
                _chown_tree(tmp, *run_as)
            self._proc = subprocess.Popen(
                [binary, str(tmp / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **spawn,
            )
            if self._wait_ready(log, last_attempt=attempt == 4):
                return

    def _wait_ready(self, log: Path, last_attempt: bool) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                self._proc = None
                text = _tail(log)
                if not last_attempt and "Address already in use" in text:
                    return False
                raise PgBouncerStartError(
                    f"pgbouncer exited with status {status} during startup; log tail:\n{text}"
                )
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self._port)) == 0:
                    return True
            time.sleep(0.02)
        raise PgBouncerStartError(
            f"pgbouncer did not listen within {_READY_TIMEOUT:.0f}s; log tail:\n{_tail(log)}"
        )

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), then remove the temporary directory."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._owner_pid and self._owner_pid != os.getpid():
            # A forked child's atexit must not stop its parent's bouncer.
            return
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(5.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        atexit.unregister(self.stop)
        self._owner_pid = 0
