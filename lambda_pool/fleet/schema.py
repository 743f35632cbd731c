"""The table the fleet's default handler writes: one row per successful invocation.

Kept apart from the handler module, which configures its engine from the environment
when imported: the coordinator needs the table's name and DDL without that.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "TABLE"]

TABLE = "lambda_pool_fleet_invocations"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    container integer NOT NULL,
    request_id text NOT NULL,
    backend_pid integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
