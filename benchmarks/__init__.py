"""Side-by-side benchmarks of lambda-pool against SQLAlchemy's pool and psycopg_pool.

Run ``python -m benchmarks`` (``make bench``).  Every figure is measured in the same
run as the peers it is compared with, and reported as a ratio: on a shared, noisy
machine absolute timings mean little, ratios within one run mean more.

Sections: :mod:`benchmarks.imports` (cold-start import cost, fresh subprocesses),
:mod:`benchmarks.checkout` (pool checkout + return), :mod:`benchmarks.invocation`
(a simulated Lambda invocation: ``NullPool`` against the warm engine),
:mod:`benchmarks.async_pools` (both again for asyncio: lambda-pool's async engine
against SQLAlchemy's ``create_async_engine`` and psycopg_pool's ``AsyncConnectionPool``;
``NullPool`` against ``warm_async_engine`` on psycopg and asyncpg).  See
``docs/benchmarks.md``.
"""

from __future__ import annotations

__all__: list[str] = []
