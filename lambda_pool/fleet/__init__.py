"""``lambda-pool fleet``: run many Lambda-like containers against one database and report.

A tool, not part of the library's API: nothing under ``lambda_pool`` imports this
package, so ``import lambda_pool`` never pays for it. Modules:

* :mod:`~lambda_pool.fleet.handler` — the default function: one short transaction
  (INSERT + SELECT) per invocation, through ``@with_connection()``;
* :mod:`~lambda_pool.fleet.container` — what runs inside one container process;
* :mod:`~lambda_pool.fleet.containers` — the coordinator's side of a container (a
  process driven over a pipe, or the real ``awslambdaric`` through ``LocalLambda``);
* :mod:`~lambda_pool.fleet.targets` — the database a fleet runs against (embedded
  PostgreSQL, PgBouncer in front of it, or a URL) and sampling its backends;
* :mod:`~lambda_pool.fleet.run` — the traffic: burst, sustained, frozen, thawed;
* :mod:`~lambda_pool.fleet.report` — figures from a run: table, JSON;
* :mod:`~lambda_pool.fleet.svg` — the plots, written with the standard library;
* :mod:`~lambda_pool.fleet.cli` — ``lambda-pool fleet``'s options.
"""
