"""`lambda-pool demo`, the README's first command: the table it prints tells the truth."""

from __future__ import annotations

import io
import re

import pytest

from lambda_pool import demo

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
    assert "the server refused it (see its log), lambda-pool re-read the secret" in text
    assert text.count("server backends of this function now 0") == 3
    assert "every invocation behaved as expected" in text


def test_demo_without_tls_falls_back_to_passwords_and_still_runs() -> None:
    out = io.StringIO()

    status = demo.main(invocations=1, out=out, tls=False)

    text = out.getvalue()
    assert status == 0, text
    assert "no TLS-capable PostgreSQL" in text
    assert "credentials_expired" not in text
    assert "reused after pre-ping" in text
