"""The fault-injecting proxy (`lambda_pool.testing.faults`) does each fault it promises.

Most tests run against a tiny echo server on loopback (so the bytes are known), and one
runs real PostgreSQL through the ``lp_fault_proxy`` fixture.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from lambda_pool.testing.faults import FaultProxy, Mode
from lambda_pool.testing.postgres import PostgresServer


class EchoServer:
    """Answers every chunk it receives with the same bytes, prefixed by ``b"<"``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.closing = False
        self.peer_closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(b"<" + data)
        self.peer_closed.set()

    def close(self) -> None:
        self.closing = True
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.thread.join(2)
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as started:
        yield started


def _client(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    return sock


def _ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(65536)


def test_pass_through_forwards_both_ways_and_counts_connections_replies_and_bytes(
    proxy: FaultProxy,
) -> None:
    with _client(proxy) as sock:
        assert _ask(sock, b"one") == b"<one"
        assert _ask(sock, b"two") == b"<two"
    counters = proxy.counters()
    assert counters.connections_accepted == 1
    assert counters.replies == 2
    assert counters.bytes_to_server == 6
    assert counters.bytes_to_client == 8
    proxy.clear_counters()
    assert proxy.counters().replies == 0


def test_the_proxy_listens_on_loopback_only(proxy: FaultProxy) -> None:
    assert proxy.host == "127.0.0.1"
    assert proxy._listener is not None
    assert proxy._listener.getsockname()[0] == "127.0.0.1"


def test_latency_holds_each_reply_at_least_the_given_time(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        assert _ask(sock, b"warm") == b"<warm"
        proxy.latency(300)
        started = time.monotonic()
        assert _ask(sock, b"slow") == b"<slow"
        assert time.monotonic() - started >= 0.3
    assert proxy.mode == Mode.LATENCY


def test_black_hole_keeps_the_connection_open_and_silent_then_heals(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with _client(proxy, timeout=0.5) as sock:
        assert _ask(sock, b"a") == b"<a"
        proxy.black_hole()
        sock.sendall(b"lost?")  # the kernel accepts it: TCP is up
        with pytest.raises(TimeoutError):
            sock.recv(100)
        assert not echo.peer_closed.is_set()  # nothing was closed upstream either
        proxy.pass_through()
        sock.settimeout(2)
        assert sock.recv(100) == b"<lost?"  # held bytes are delivered once healed


def test_a_new_connection_into_a_black_hole_is_accepted_and_never_answered(
    proxy: FaultProxy,
) -> None:
    proxy.black_hole()
    with _client(proxy, timeout=0.5) as sock:
        sock.sendall(b"hello")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert proxy.counters().connections_accepted == 1
    assert proxy.counters().bytes_to_server == 0


def test_black_hole_mid_reply_forwards_the_first_bytes_then_holds(proxy: FaultProxy) -> None:
    with _client(proxy, timeout=0.5) as sock:
        assert _ask(sock, b"x") == b"<x"
        proxy.black_hole_mid_reply(3)
        sock.sendall(b"abcdef")
        assert sock.recv(100) == b"<ab"
        with pytest.raises(TimeoutError):
            sock.recv(100)
        proxy.pass_through()
        sock.settimeout(2)
        assert sock.recv(100) == b"cdef"


def test_reset_ends_open_connections_with_an_rst(proxy: FaultProxy) -> None:
    with _client(proxy) as sock:
        assert _ask(sock, b"a") == b"<a"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


def test_reset_mode_resets_new_connections_at_once(proxy: FaultProxy) -> None:
    proxy.reset()
    # The connect, the send or the recv sees the RST, depending on timing.
    with pytest.raises(ConnectionResetError), _client(proxy) as sock:
        sock.sendall(b"a")
        sock.recv(100)
    assert proxy.counters().bytes_to_server == 0


def test_half_close_sends_end_of_stream_to_the_client_and_still_forwards_its_bytes(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with _client(proxy) as sock:
        assert _ask(sock, b"a") == b"<a"
        proxy.half_close()
        assert sock.recv(100) == b""  # a FIN
        before = proxy.counters().bytes_to_server
        sock.sendall(b"still")
        deadline = time.monotonic() + 2
        while proxy.counters().bytes_to_server == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.counters().bytes_to_server == before + 5


def test_close_ends_every_flow_and_thread_even_in_a_black_hole(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    socks = [_client(proxy, timeout=2) for _ in range(3)]
    for sock in socks:
        assert _ask(sock, b"a") == b"<a"
    proxy.black_hole()
    before = {t for t in threading.enumerate() if t.name.startswith("lambda-pool-fault-proxy")}
    assert before
    proxy.close()
    assert not any(t.is_alive() for t in before)
    for sock in socks:
        assert sock.recv(100) == b""
        sock.close()
    with pytest.raises(OSError):
        _client(proxy, timeout=0.5)


def test_url_for_replaces_only_host_and_port() -> None:
    with FaultProxy("127.0.0.1", 1) as proxy:
        url = proxy.url_for("postgresql+asyncpg://app:p%40ss@db.example:5432/app?sslmode=require")
        assert url == f"postgresql+asyncpg://app:p%40ss@127.0.0.1:{proxy.port}/app?sslmode=require"
        assert proxy.url_for("postgresql://db/x") == f"postgresql://127.0.0.1:{proxy.port}/x"
        with pytest.raises(ValueError):
            proxy.url_for("not a url")


def test_faulted_restores_pass_through(proxy: FaultProxy) -> None:
    with proxy.faulted(Mode.BLACK_HOLE):
        assert proxy.mode == Mode.BLACK_HOLE
    assert proxy.mode == Mode.PASS_THROUGH
    with pytest.raises(ValueError), proxy.faulted("sideways"):
        pass


def test_postgresql_through_the_fixture_counts_one_reply_per_round_trip(
    lp_fault_proxy: FaultProxy, postgres_url: str
) -> None:
    url = lp_fault_proxy.url_for(postgres_url)
    with psycopg.connect(url, autocommit=True, sslmode="disable") as conn:
        lp_fault_proxy.clear_counters()
        conn.execute("SELECT 1")
        conn.execute("SELECT 2")
        assert lp_fault_proxy.counters().replies == 2
    assert lp_fault_proxy.counters().connections_accepted == 0


def test_postgresql_backend_of_a_black_holed_flow_ends_once_healed_after_the_client_closed(
    lp_fault_proxy: FaultProxy,
    embedded_postgres: PostgresServer,
    postgres_url: str,
    unique_application_name: str,
) -> None:
    url = lp_fault_proxy.url_for(postgres_url)
    conn = psycopg.connect(url, application_name=unique_application_name, sslmode="disable")
    conn.execute("SELECT 1")
    lp_fault_proxy.black_hole()
    conn.pgconn.finish()  # the client gives up on it; the Terminate is held
    assert embedded_postgres.backend_count(unique_application_name) == 1
    lp_fault_proxy.pass_through()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
