"""Test support for lambda-pool users and its own suite: a throw-away PostgreSQL server
(`lambda_pool.testing.postgres`), PgBouncer in front of it (`.pgbouncer`), a Lambda context
double (`.context`) and the pytest plugin (`.plugin`) exposing them as fixtures.

Nothing is imported here: each submodule pulls in its heavy dependencies only when used.
"""
