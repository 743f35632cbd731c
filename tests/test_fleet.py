"""``lambda-pool fleet``: small fleets of real container processes against a real server.

Counts the fleet reports are checked against what the server says (``pg_stat_activity``,
read by the coordinator's own connection) and against the handlers' own records (the
rows they inserted). No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambda_pool.exc import ArgumentError
from lambda_pool.fleet import targets
from lambda_pool.fleet.report import format_table, percentile, summarize
from lambda_pool.fleet.run import FleetConfig, FleetResult, run_fleet
from lambda_pool.fleet.schema import TABLE
from lambda_pool.fleet.svg import fleet_svg
from lambda_pool.testing.pgbouncer import find_pgbouncer

# Short phases; the deadline is generous because a shared CI machine can be slow, and
# the grace before a container is killed is longer still.
QUICK = {"ramp_s": 1.0, "sustain_s": 1.5, "think_ms": 20.0, "deadline_ms": 10_000}


def _ok(result: FleetResult) -> int:
    return sum(1 for r in result.records if r.outcome.ok)


def _per_container_backends(target: targets.Target, run_id: str) -> dict[int, int]:
    rows = target.execute(
        f"SELECT container, count(DISTINCT backend_pid) FROM {TABLE} WHERE run_id = %s "
        "GROUP BY container",
        (run_id,),
    )
    return {int(container): int(count) for container, count in rows}


def test_warm_fleet_holds_one_backend_per_container_and_reports_what_the_server_saw() -> None:
    with targets.embedded(max_connections=60) as target:
        result = run_fleet(
            FleetConfig(containers=20, idle_s=0.5, thaw_invocations=1, **QUICK), target
        )
        per_container = _per_container_backends(target, result.run_id)
        left_now = target.sample().total
    summary = summarize(result)
    invocations = summary["invocations"]
    assert invocations["failed"] == 0, invocations["error_examples"]
    # Every container ran its first invocation, then more.
    assert {r.container for r in result.records} == set(range(20))
    assert invocations["total"] >= 20 + 20  # at least one each, plus one after the thaw
    # The handlers' own records: one row per ok invocation, nothing more.
    assert result.rows_inserted == invocations["ok"] == invocations["total"]
    # Warm cache: one connect per container, one backend per container for the whole run.
    assert summary["connects"]["total"] == 20
    assert sum(1 for r in result.records if r.outcome.cold) == 20
    assert per_container == dict.fromkeys(range(20), 1)
    # pg_stat_activity while frozen: each frozen container still holds its backend.
    assert result.frozen["at_freeze"] == {"server_backends": 20, "held_by_frozen_containers": 20}
    assert summary["backends"]["peak_during_traffic"] <= 20
    assert summary["backends"]["per_container_peak"] <= 1
    # Stopped containers close their connections: nothing left on the server.
    assert result.backends_after_stop == 0 and left_now == 0
    # Memory is measured from /proc for every container.
    assert summary["memory_kb"]["containers_measured"] == 20
    assert all(m["rss_kb"] > 0 for m in result.memory)
    table = format_table(summary)
    assert "invocations" in table and "rows inserted" in table
    svg = fleet_svg(result, "test", {"limit": 57})
    assert svg.startswith("<svg") and "limit = 57" in svg


def test_thaw_after_idle_session_timeout_reconnects_without_handler_errors() -> None:
    settings = {"idle_session_timeout": "1s"}
    with targets.embedded(max_connections=40, settings=settings) as target:
        result = run_fleet(
            FleetConfig(containers=10, idle_s=3.0, thaw_invocations=2, **QUICK), target
        )
    summary = summarize(result)
    assert summary["invocations"]["failed"] == 0, summary["invocations"]["error_examples"]
    assert result.rows_inserted == summary["invocations"]["ok"]
    # Frozen: 10 backends held; the server's idle_session_timeout ends them all.
    assert result.frozen["at_freeze"]["held_by_frozen_containers"] == 10
    assert result.frozen["before_thaw"] == {
        "server_backends": 0,
        "held_by_frozen_containers": 0,
    }
    # On thaw each container notices its closed socket and opens exactly one new one.
    assert summary["connects"]["by_phase"]["thaw"] == {
        "invocations": 20,
        "connects": 10,
        "per_invocation": 0.5,
    }


def test_nullpool_fleet_connects_once_per_invocation() -> None:
    with targets.embedded(max_connections=40) as target:
        result = run_fleet(FleetConfig(containers=6, warm=False, **QUICK), target)
    summary = summarize(result)
    assert summary["invocations"]["failed"] == 0, summary["invocations"]["error_examples"]
    assert summary["connects"]["total"] == summary["invocations"]["total"] > 6
    assert result.rows_inserted == _ok(result)
    assert result.backends_after_stop == 0


def test_over_capacity_fleet_fails_with_capacity_errors_only() -> None:
    # 8 slots, 3 reserved for superusers, 1 taken by the coordinator's own session: 4 warm
    # containers fit, the others cannot.
    with targets.embedded(max_connections=8) as target:
        result = run_fleet(
            FleetConfig(containers=8, ramp_s=0.5, sustain_s=1.0, think_ms=20.0), target
        )
    failed = [r for r in result.records if not r.outcome.ok]
    assert failed, "a fleet past max_connections must see refusals"
    # Refused for capacity after the retries, or a retry's connect cut short by the deadline.
    assert all(
        r.outcome.capacity or r.outcome.error_type == "lambda_pool.DeadlineExceededError (connect)"
        for r in failed
    ), {(r.outcome.error_type, r.outcome.error) for r in failed}
    assert any(r.outcome.capacity for r in failed)
    assert result.rows_inserted == _ok(result)
    assert max(s.total for s in result.samples) <= 4
    summary = summarize(result)
    assert summary["invocations"]["capacity_errors"] == sum(r.outcome.capacity for r in failed)


@pytest.mark.skipif(
    find_pgbouncer() is None, reason="pgbouncer not installed: apt-get install pgbouncer"
)
def test_fleet_through_pgbouncer_stays_within_the_pool_size() -> None:
    with targets.through_pgbouncer(3, max_connections=20) as target:
        result = run_fleet(FleetConfig(containers=20, **QUICK), target)
    summary = summarize(result)
    assert summary["invocations"]["failed"] == 0, summary["invocations"]["error_examples"]
    assert result.rows_inserted == summary["invocations"]["ok"]
    # 20 clients, never more than PgBouncer's 3 server connections on the server.
    assert 1 <= max(s.total for s in result.samples) <= 3
    assert summary["pooler"]["after_sustained"]["cl_active"] == 20


def test_fleet_through_the_real_runtime_client() -> None:
    pytest.importorskip("awslambdaric")
    with targets.embedded(max_connections=20) as target:
        result = run_fleet(
            FleetConfig(
                containers=2, runtime="ric", ramp_s=0.2, sustain_s=0.5, **{"deadline_ms": 10_000}
            ),
            target,
        )
    summary = summarize(result)
    assert summary["invocations"]["failed"] == 0, summary["invocations"]["error_examples"]
    assert result.rows_inserted == summary["invocations"]["ok"] >= 2
    # The handler counts its own connects through awslambdaric: one per warm container.
    assert summary["connects"]["total"] == 2


def test_cli_writes_json_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lambda_pool.cli import main

    out_json, out_svg = tmp_path / "fleet.json", tmp_path / "fleet.svg"
    code = main(
        [
            "fleet",
            "--containers=3",
            "--ramp=0.3",
            "--sustain=0.5",
            "--deadline-ms=10000",
            "--max-connections=20",
            "--quiet",
            f"--json={out_json}",
            f"--svg={out_svg}",
        ]
    )
    assert code == 0
    document = json.loads(out_json.read_text())
    assert document["invocations"]["ok"] == document["rows_inserted"] >= 3
    assert document["server"]["max_connections"] == "20"
    assert out_svg.read_text().startswith("<svg")
    assert "latency ms" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("containers", 0, "containers=0"),
        ("deadline_ms", 0, "deadline"),
        ("ramp_s", -1.0, "ramp_s"),
        ("runtime", "docker", "process, ric"),
        ("handler", "nodots", "module.function"),
    ],
)
def test_bad_parameters_are_refused_before_anything_starts(
    field: str, value: object, words: str
) -> None:
    with pytest.raises(ArgumentError, match=words):
        FleetConfig(**{field: value}).check()  # type: ignore[arg-type]


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([10.0], 0.99) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_scale_page_is_written_from_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # benchmarks/ is a folder of the checkout, not an installed package.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks.fleet import _scenarios, run_scenarios, write_page

    (scenario,) = [s for s in _scenarios(0.2) if s.id == "direct-warm"]
    results = run_scenarios([scenario], tmp_path / "scale", say=lambda message: None)
    meta = {
        "started_at": "now",
        "cpu_count": 2,
        "load_average_at_start": None,
        "python": "3",
        "elapsed_s": 1.0,
    }
    write_page(results, meta, tmp_path / "scale.md")
    page = (tmp_path / "scale.md").read_text()
    invocations = results[0]["invocations"]
    assert f"| direct-warm | {scenario.config.containers} | {invocations['total']} |" in page
    # Up to max_connections - reserved - the coordinator's session, every container fits.
    assert "0 failures and one backend per container: **holds**." in page
    assert (tmp_path / "scale" / "direct-warm.svg").read_text().startswith("<svg")


def test_fleet_against_a_url_counts_its_own_sessions_by_application_name(
    tmp_path: Path,
) -> None:
    from lambda_pool.cli import main
    from lambda_pool.testing.postgres import EmbeddedPostgres

    out_json = tmp_path / "fleet.json"
    # Another session of the same user must not be counted as the fleet's.
    with (
        EmbeddedPostgres(max_connections=30) as server,
        server.admin_connect(application_name="someone-else"),
    ):
        code = main(
            [
                "fleet",
                f"--database-url={server.dsn}",
                "--containers=3",
                "--ramp=0.3",
                "--sustain=0.5",
                "--deadline-ms=10000",
                "--idle=0.3",
                "--quiet",
                f"--json={out_json}",
            ]
        )
    assert code == 0
    document = json.loads(out_json.read_text())
    assert document["target"] == "url"
    assert document["invocations"]["ok"] == document["rows_inserted"], document["invocations"]
    assert document["frozen"]["at_freeze"] == {
        "server_backends": 3,
        "held_by_frozen_containers": 3,
    }, document


def test_unreachable_database_is_a_clear_error_without_the_password() -> None:
    from lambda_pool.exc import LambdaPoolError

    url = "postgresql://app:s3cret-pw@127.0.0.1:1/app?connect_timeout=2"
    with targets.external(url) as target, pytest.raises(LambdaPoolError) as caught:
        run_fleet(FleetConfig(containers=1), target)
    message = str(caught.value)
    assert "could not create its table" in message and "127.0.0.1:1" in message
    assert "s3cret-pw" not in message
