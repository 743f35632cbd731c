"""The traffic of a fleet run: start the containers, burst, sustain, freeze, thaw, stop.

:func:`run_fleet` drives one thread per container (a container serves one invocation at
a time, as a Lambda environment does):

1. *start*: every container process is started and runs Init (the handler module's
   import); nothing touches the database yet;
2. *burst*: container ``i`` of ``N`` sends its first invocation at ``i * ramp_s / N``,
   so concurrency ramps from 0 to N within ``ramp_s``; a container's first invocation is
   its cold one (its first connect);
3. *sustained*: every container invokes back to back (``think_ms`` apart) until
   ``ramp_s + sustain_s``;
4. *frozen* (when ``idle_s`` > 0): every container is stopped with SIGSTOP for
   ``idle_s`` while the server's backends are sampled, then continued with SIGCONT;
5. *thaw*: every container serves ``thaw_invocations`` more invocations at once.

Every loop is bounded in count (``max_invocations`` per container) and in time (the
phase's end, each invocation's deadline plus ``grace_s``), and the containers are
stopped (or killed) whatever happens. A sampler thread reads the server's backends every
``sample_interval_s`` throughout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lambda_pool.exc import ArgumentError, LambdaPoolError
from lambda_pool.fleet.containers import (
    Container,
    ContainerSpec,
    Outcome,
    ProcessContainer,
    RuntimeContainer,
    memory_of,
    run_id,
)
from lambda_pool.fleet.targets import BackendSample, Target

__all__ = [
    "DEFAULT_HANDLER",
    "FleetConfig",
    "FleetResult",
    "InvocationRecord",
    "Sample",
    "run_fleet",
]

DEFAULT_HANDLER = "lambda_pool.fleet.handler.handler"
RUNTIMES = ("process", "ric")
START_METHODS = ("forkserver", "spawn")
_MAX_CONTAINERS = 5000
_STOP_SAMPLES_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FleetConfig:
    """Every parameter of a run; :meth:`check` says what is wrong with a bad one."""

    containers: int = 20
    ramp_s: float = 2.0
    sustain_s: float = 3.0
    think_ms: float = 50.0
    idle_s: float = 0.0
    thaw_invocations: int = 2
    deadline_ms: int = 3000
    grace_s: float = 2.0
    max_invocations: int = 10_000
    warm: bool = True
    runtime: str = "process"
    start_method: str = "forkserver"
    handler: str = DEFAULT_HANDLER
    code_dir: str | None = None
    sample_interval_s: float = 0.2
    spawn_concurrency: int = 8
    env: Mapping[str, str] = field(default_factory=dict)
    #: Append the containers' stdout/stderr here (None: the coordinator's own).
    container_log: str | None = None

    def check(self) -> None:
        """Raise :class:`lambda_pool.exc.ArgumentError` naming the first bad parameter."""

        def bad(name: str, rule: str) -> ArgumentError:
            return ArgumentError(f"fleet {name}={getattr(self, name)!r}: {rule}")

        if not 1 <= self.containers <= _MAX_CONTAINERS:
            raise bad("containers", f"give a whole number from 1 to {_MAX_CONTAINERS}")
        for name in ("ramp_s", "sustain_s", "think_ms", "idle_s", "grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise bad(name, "give a number of seconds (or ms) >= 0")
        if self.deadline_ms <= 0:
            raise bad("deadline_ms", "give the per-invocation deadline in ms, > 0")
        if self.max_invocations < 1:
            raise bad("max_invocations", "give at least 1 invocation per container")
        if self.thaw_invocations < 0:
            raise bad("thaw_invocations", "give a whole number >= 0")
        if self.sample_interval_s <= 0:
            raise bad("sample_interval_s", "give a sampling interval in seconds, > 0")
        if self.spawn_concurrency < 1:
            raise bad("spawn_concurrency", "give a whole number >= 1")
        if self.runtime not in RUNTIMES:
            raise bad("runtime", f"choose one of {', '.join(RUNTIMES)}")
        if self.start_method not in START_METHODS:
            raise bad("start_method", f"choose one of {', '.join(START_METHODS)}")
        if "." not in self.handler:
            raise bad("handler", "give the function as 'module.function'")


@dataclass(frozen=True)
class InvocationRecord:
    """One invocation: which container, in which phase, when, and what came of it."""

    container: int
    phase: str
    started_s: float
    outcome: Outcome


@dataclass(frozen=True)
class Sample:
    """The server's fleet backends at ``t_s`` seconds into the run."""

    t_s: float
    phase: str
    total: int
    active: int
    idle: int
    idle_in_transaction: int
    in_flight: int


@dataclass
class FleetResult:
    """Everything a run observed; :mod:`lambda_pool.fleet.report` turns it into figures."""

    config: FleetConfig
    target_kind: str
    run_id: str
    records: list[InvocationRecord]
    samples: list[Sample]
    phases: dict[str, tuple[float, float]]
    init_ms: list[float]
    init_errors: list[str]
    memory: list[dict[str, int]]
    frozen: dict[str, Any]
    server_settings: dict[str, str | None]
    rows_inserted: int | None
    backends_after_stop: int | None
    pooler: dict[str, Any]
    elapsed_s: float
    #: The coordinator's own RSS/PSS after the traffic (its thread per container included).
    coordinator_memory: dict[str, int] | None = None


class _Clock:
    """Seconds since the run began, and which phase the run is in (read by the sampler)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phase = "start"
        self.in_flight = 0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def flight(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta


def _make_container(index: int, config: FleetConfig, spec: ContainerSpec) -> Container:
    if config.runtime == "ric":
        return RuntimeContainer(index, spec)
    return ProcessContainer(index, spec)


def _sampler(
    target: Target, clock: _Clock, interval: float, stop: threading.Event, out: list[Sample]
) -> None:
    while not stop.is_set():
        found: BackendSample | None
        try:
            found = target.sample()
        except Exception:  # a sample lost to a busy or restarting server: try again
            found = None
        if found is not None:
            out.append(
                Sample(
                    t_s=round(clock.now(), 3),
                    phase=clock.phase,
                    total=found.total,
                    active=found.active,
                    idle=found.idle,
                    idle_in_transaction=found.idle_in_transaction,
                    in_flight=clock.in_flight,
                )
            )
        stop.wait(interval)


def _invoke(
    container: Container,
    config: FleetConfig,
    clock: _Clock,
    run: str,
    sequence: int,
    records: list[InvocationRecord],
) -> None:
    event = {"run": run, "container": container.index, "seq": sequence}
    started = clock.now()
    phase = clock.phase
    clock.flight(1)
    try:
        outcome = container.invoke(event, config.deadline_ms, config.grace_s)
    finally:
        clock.flight(-1)
    records.append(InvocationRecord(container.index, phase, round(started, 4), outcome))


def _drive(
    container: Container,
    config: FleetConfig,
    clock: _Clock,
    run: str,
    start_at: float,
    end_at: float,
    records: list[InvocationRecord],
) -> None:
    """Burst and sustained phases of one container: at least one invocation, bounded."""
    delay = start_at - clock.now()
    if delay > 0:
        time.sleep(delay)
    for sequence in range(config.max_invocations):
        if sequence and clock.now() >= end_at:
            break
        _invoke(container, config, clock, run, sequence, records)
        if config.think_ms:
            time.sleep(config.think_ms / 1000.0)


def _in_threads(
    containers: list[Container], work: Callable[[Container], None], timeout: float
) -> None:
    """Run ``work`` for every container in a thread of its own; wait at most ``timeout``."""
    threads = [
        threading.Thread(target=work, args=(c,), name=f"fleet-{c.index}", daemon=True)
        for c in containers
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _frozen_view(target: Target, containers: list[Container]) -> dict[str, Any]:
    """Backends while frozen, and how many frozen containers still own one (direct only)."""
    sample = target.sample()
    view: dict[str, Any] = {"server_backends": sample.total}
    if target.pgbouncer is None:
        view["held_by_frozen_containers"] = sum(
            1 for c in containers if c.last_backend_pid in sample.pids
        )
    else:
        # Through a pooler a backend belongs to the pooler, not to a container.
        view["held_by_frozen_containers"] = None
        view["pooler"] = target.pooler_stats()
    return view


def run_fleet(
    config: FleetConfig,
    target: Target,
    *,
    progress: Callable[[str], None] | None = None,
) -> FleetResult:
    """Run the fleet against ``target`` and return what was observed."""
    config.check()
    say = progress or (lambda message: None)
    run = run_id()
    if config.handler == DEFAULT_HANDLER:
        from lambda_pool.fleet.schema import SCHEMA

        try:
            target.prepare(SCHEMA)
        except Exception as exc:
            from lambda_pool.url import make_url

            where = make_url(target.url).render_as_string(hide_password=True)
            raise LambdaPoolError(
                f"the fleet could not create its table at {where}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} — check the "
                "URL, that the server is up, and that the user may CREATE in its schema"
            ) from exc
    env = {
        "LAMBDA_POOL_DATABASE_URL": target.url,
        "LAMBDA_POOL_WARM": "1" if config.warm else "0",
        "LAMBDA_POOL_TRANSACTION_POOLING": "1" if target.transaction_pooling else "0",
        **dict(config.env),
    }
    spec = ContainerSpec(
        handler=config.handler,
        code_dir=config.code_dir,
        env=env,
        start_method=config.start_method,
        log_path=config.container_log,
    )
    containers = [_make_container(i, config, spec) for i in range(config.containers)]
    server_settings = target.server_settings()
    clock = _Clock()
    records: list[InvocationRecord] = []
    samples: list[Sample] = []
    phases: dict[str, tuple[float, float]] = {}
    init_errors: list[str] = []
    memory: list[dict[str, int]] = []
    frozen: dict[str, Any] = {}
    pooler: dict[str, Any] = {}
    coordinator: dict[str, int] | None = None
    stop_sampling = threading.Event()
    sampler = threading.Thread(
        target=_sampler,
        args=(target, clock, config.sample_interval_s, stop_sampling, samples),
        name="fleet-sampler",
        daemon=True,
    )

    def start_one(container: Container) -> None:
        try:
            container.start()
        except RuntimeError as exc:
            init_errors.append(f"container {container.index}: {exc}")

    try:
        sampler.start()
        say(f"starting {config.containers} containers ({config.runtime})")
        began = clock.now()
        with concurrent.futures.ThreadPoolExecutor(config.spawn_concurrency) as pool:
            list(pool.map(start_one, containers))
        phases["start"] = (began, clock.now())

        traffic_start = clock.now() + 0.1
        ramp_end = traffic_start + config.ramp_s
        traffic_end = ramp_end + config.sustain_s
        say(f"burst 0→{config.containers} in {config.ramp_s} s, sustained {config.sustain_s} s")
        clock.phase = "burst"
        step = config.ramp_s / config.containers

        def drive(container: Container) -> None:
            _drive(
                container,
                config,
                clock,
                run,
                traffic_start + container.index * step,
                traffic_end,
                records,
            )

        switch = threading.Timer(max(0.0, ramp_end - clock.now()), _set_phase, (clock, "sustained"))
        switch.daemon = True
        switch.start()
        _in_threads(
            containers,
            drive,
            timeout=traffic_end - clock.now() + config.deadline_ms / 1000 + config.grace_s + 30,
        )
        switch.cancel()
        phases["burst"] = (traffic_start, ramp_end)
        phases["sustained"] = (ramp_end, max(ramp_end, clock.now()))
        memory = [m for m in (c.memory() for c in containers) if m is not None]
        coordinator = memory_of(os.getpid())
        pooler["after_sustained"] = target.pooler_stats()

        if config.idle_s > 0:
            say(f"freezing {config.containers} containers for {config.idle_s} s")
            began = clock.now()
            clock.phase = "frozen"
            for container in containers:
                container.freeze()
            frozen["at_freeze"] = _frozen_view(target, containers)
            time.sleep(config.idle_s)
            frozen["before_thaw"] = _frozen_view(target, containers)
            phases["frozen"] = (began, clock.now())
            if config.thaw_invocations:
                say(f"thawing: {config.thaw_invocations} invocations per container")
                began = clock.now()
                clock.phase = "thaw"

                def thaw(container: Container) -> None:
                    for sequence in range(config.thaw_invocations):
                        _invoke(container, config, clock, run, 100_000 + sequence, records)

                _in_threads(
                    containers,
                    thaw,
                    timeout=config.thaw_invocations * (config.deadline_ms / 1000 + config.grace_s)
                    + 30,
                )
                phases["thaw"] = (began, clock.now())
        clock.phase = "stop"
    finally:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda c: c.stop(), containers))
        stop_sampling.set()
        sampler.join(_STOP_SAMPLES_TIMEOUT_S)

    rows = None
    if config.handler == DEFAULT_HANDLER:
        from lambda_pool.fleet.schema import TABLE

        rows = int(target.execute(f"SELECT count(*) FROM {TABLE} WHERE run_id = %s", (run,))[0][0])
    backends_after = _settle(target)
    return FleetResult(
        config=config,
        target_kind=target.kind,
        run_id=run,
        records=sorted(records, key=lambda r: r.started_s),
        samples=samples,
        phases={name: (round(a, 3), round(b, 3)) for name, (a, b) in phases.items()},
        init_ms=[ms for c in containers for ms in c.init_ms],
        init_errors=init_errors,
        memory=memory,
        frozen=frozen,
        server_settings=server_settings,
        rows_inserted=rows,
        backends_after_stop=backends_after,
        pooler=pooler,
        elapsed_s=round(clock.now(), 2),
        coordinator_memory=coordinator,
    )


def _set_phase(clock: _Clock, phase: str) -> None:
    if clock.phase == "burst":
        clock.phase = phase


def _settle(target: Target, timeout: float = 5.0) -> int | None:
    """Backends left once the containers are gone (a backend exits a moment after its
    client); through a pooler, the pooler's own server connections."""
    deadline = time.monotonic() + timeout
    count: int | None = None
    while True:
        with contextlib.suppress(Exception):
            count = target.sample().total
        if count == 0 or time.monotonic() >= deadline or target.pgbouncer is not None:
            return count
        time.sleep(0.05)
