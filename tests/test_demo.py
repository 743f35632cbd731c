"""`lambda-pool demo`, the README's first command: the table it prints tells the truth."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from lambda_pool import demo
from lambda_pool.testing.postgres import PostgresServer

pytestmark = pytest.mark.e2e


def _table(output: str, title: str) -> list[list[str]]:
    """The rows of the table under the heading that starts with ``title``."""
    section = output.split(f"== {title}", 1)[1].split("\n== ", 1)[0]
    return [
        re.split(r"\s{2,}", line.strip())
        for line in section.splitlines()
        if re.match(r"^\s*\d+\s", line)
    ]


def test_demo_shows_reuse_pre_ping_token_recycle_rollback_and_clean_shutdown() -> None:
    out = io.StringIO()

    status = demo.main(invocations=3, out=out)

    text = out.getvalue()
    assert status == 0, text
    warm = _table(text, "1. lambda-pool warm cache")
    connection_notes = [row[-3] for row in warm]
    assert connection_notes[0] == "opened"
    assert connection_notes[1:4] == ["reused"] * 3
    assert "reused after pre-ping" in connection_notes
    if "with RDS IAM tokens" in text:
        assert "recycled: credentials_expired" in connection_notes
    assert "rolled back, kept" in connection_notes
    assert connection_notes[-1] == "reused"
    null = _table(text, "2. NullPool default")
    assert all(row[-3].startswith(("opened", "rolled back")) for row in null)
    rotation = _table(text, "3. Secrets Manager (moto) rotation")
    assert [row[3] for row in rotation] == ["ok"] * 4
    assert rotation[2][-3].startswith("recycled")
    assert (
        "the server refused it (a failed login in its log), lambda-pool re-read the secret" in text
    )
    assert text.count("server backends of this function now 0") == 3
    assert "every claim above held" in text
    assert "FAILED" not in text
    assert "columns: start = cold" in text
    assert " 1 backends" not in text


def test_demo_without_tls_falls_back_to_passwords_and_still_runs() -> None:
    out = io.StringIO()

    status = demo.main(invocations=1, out=out, tls=False)

    text = out.getvalue()
    assert status == 0, text
    assert "the embedded PostgreSQL has no TLS" in text
    assert "credentials_expired" not in text
    assert "reused after pre-ping" in text


def test_demo_against_a_given_server_names_it_and_leaves_no_rows_or_schema(
    embedded_postgres: PostgresServer,
) -> None:
    out = io.StringIO()

    status = demo.main(invocations=1, out=out, database_url=embedded_postgres.dsn)

    text = out.getvalue()
    assert status == 0, text
    assert f"127.0.0.1:{embedded_postgres.port}" in text
    assert embedded_postgres.password not in text
    assert "PostgreSQL " in text and ("TLS (TLSv" in text or "no TLS" in text)
    assert "IAM role into a server it did not start" in text
    schema = re.search(r"working in schema (\S+) ", text)
    assert schema, text
    with embedded_postgres.admin_connect(dbname=embedded_postgres.dbname) as admin:
        left = admin.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema.group(1),)
        ).fetchone()
        public_visits = admin.execute("SELECT to_regclass('public.visits')").fetchone()
    assert left == (0,)
    assert public_visits == (None,)


def test_the_cli_never_reads_database_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lambda_pool import cli

    seen: dict[str, object] = {}
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone:pw@db.invalid/prod")
    monkeypatch.setattr(demo, "main", lambda **kwargs: seen.update(kwargs) or 0)
    assert cli.main(["demo", "--invocations", "1"]) == 0
    assert seen == {"invocations": 1, "database_url": None}


def test_the_built_wheel_carries_the_sample_the_demo_runs(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("lambda_pool-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = archive.read("lambda_pool/demo_sample/app.py")
    assert packaged == (root / "samples" / "psycopg_handler" / "app.py").read_bytes()
