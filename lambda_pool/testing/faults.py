"""A fault-injecting TCP proxy on loopback, for testing what a handler does when the
network misbehaves.

::

    from lambda_pool.testing.faults import FaultProxy

    with FaultProxy.in_front_of(server.dsn) as proxy:
        url = proxy.url_for(server.dsn)       # same DSN, host/port of the proxy
        ...                                   # connect through `url`
        proxy.black_hole()                    # the network goes silent, TCP stays up
        ...                                   # the handler must still end by its deadline
        proxy.pass_through()                  # the network heals

(or the pytest fixture ``lp_fault_proxy``, a started proxy in front of the session's
PostgreSQL).  The proxy listens on ``127.0.0.1`` only and forwards every accepted
connection (a *flow*) to one upstream address.  Its mode can be switched at any time and
applies to the flows already open and to new ones:

``pass_through()``
    forward everything (and resume held flows: their buffered bytes and end-of-stream
    are delivered, as TCP retransmissions would once a network heals);
``latency(ms)``
    hold the start of each server reply for ``ms`` milliseconds before forwarding it;
``black_hole()``
    stop forwarding in both directions; nothing is closed, so the client's kernel keeps
    seeing a live connection and only a bound in the application can notice (new
    connections are accepted and then never answered);
``black_hole_mid_reply(after_bytes)``
    forward the first ``after_bytes`` bytes of each flow's next server reply, then hold
    that flow as ``black_hole()`` does (new flows are held from the start);
``reset()``
    end every flow with a TCP RST to the client (``SO_LINGER`` 0), new ones as soon as
    they are accepted;
``half_close()``
    send the client a FIN (it reads end-of-stream) while its own bytes are still
    forwarded to the server; server replies are dropped.

Counters (:meth:`FaultProxy.counters`) give connections accepted, server replies (a
*reply* is the server data that follows the client's last bytes, i.e. one per round
trip) and the bytes forwarded each way, so tests can count round trips.

Written with the standard library only (two pump threads per flow, one accept thread):
a test tool must not pull a dependency into users' test environments, and no library
offers the in-flow faults (hold without closing, RST, half-close, cut inside a reply).
Every thread ends at :meth:`FaultProxy.close`, which shuts every socket down and joins
them with a bound.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultCounters", "FaultProxy", "Mode"]

LOOPBACK = "127.0.0.1"
_CHUNK = 65536
_JOIN_SECONDS = 2.0


class Mode:
    """The proxy's modes (strings, as :attr:`FaultProxy.mode` reports them)."""

    PASS_THROUGH = "pass_through"
    LATENCY = "latency"
    BLACK_HOLE = "black_hole"
    BLACK_HOLE_MID_REPLY = "black_hole_mid_reply"
    RESET = "reset"
    HALF_CLOSE = "half_close"


@dataclass(frozen=True)
class FaultCounters:
    """A snapshot of what the proxy did since it started (or :meth:`FaultProxy.clear_counters`)."""

    connections_accepted: int
    open_flows: int
    replies: int
    bytes_to_client: int
    bytes_to_server: int


class _Flow:
    """One client connection and its upstream connection (opened on the first bytes)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.held = False
        self.client_spoke = False  # client bytes since the server's last reply
        self.mid_reply_budget: int | None = None
        self.half_closed = False
        self.client_done = False  # end-of-stream from the client passed on
        self.server_done = False  # end-of-stream from the server passed on
        self.ended = False
        self.threads: list[threading.Thread] = []

    # -- control (called with the proxy's lock held) --------------------------------

    def start(self) -> None:
        self._spawn(self._pump_from_client, "client")

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(
            target=target,  # type: ignore[arg-type]
            name=f"lambda-pool-fault-proxy-{name}",
            daemon=True,
        )
        self.threads.append(thread)
        thread.start()

    def rst(self) -> None:
        """End the flow with an RST towards the client and close the upstream side."""
        self.ended = True
        with contextlib.suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # SHUT_RD sends nothing but wakes the pump blocked in recv(); the close with
            # a zero linger then aborts the connection: an RST, not a FIN.
            self.client.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.client.close()
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.upstream.close()

    def send_fin(self) -> None:
        self.half_closed = True
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)

    def end(self) -> None:
        self.ended = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            # shutdown() wakes a pump blocked in recv() on this socket; close() would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _one_side_done(self) -> None:
        """Both ends said end-of-stream: the flow is over (the proxy's lock is held)."""
        if self.client_done and self.server_done:
            self.end()

    # -- pumps ------------------------------------------------------------------------

    def _wait_while_held(self) -> bool:
        """Block while the flow is held; ``False`` when the flow or the proxy ended."""
        proxy = self.proxy
        with proxy._changed:
            while self.held and not self.ended and not proxy._closing:
                proxy._changed.wait()
            return not self.ended and not proxy._closing

    def _pump_from_client(self) -> None:
        proxy = self.proxy
        try:
            while True:
                if not self._wait_while_held():
                    return
                data = self.client.recv(_CHUNK)
                # Held after the read (the black hole opened while we waited for bytes):
                # the bytes wait here, as they would in the client's send queue.
                if not self._wait_while_held():
                    return
                if not data:
                    with proxy._changed:
                        if self.upstream is None:
                            self.end()
                            return
                        with contextlib.suppress(OSError):
                            self.upstream.shutdown(socket.SHUT_WR)
                        self.client_done = True
                        self._one_side_done()
                    return
                upstream = self.upstream
                if upstream is None:
                    upstream = socket.create_connection(proxy.upstream, timeout=5.0)
                    upstream.settimeout(None)
                    # A request written in two pieces (asyncpg's Parse then Bind) would
                    # otherwise wait for the first piece's ACK: Nagle against delayed
                    # ACK, about 40 ms on loopback, which is not the network modelled.
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with proxy._changed:
                        self.upstream = upstream
                        if self.ended or proxy._closing:
                            self.end()
                            return
                        self._spawn(self._pump_from_server, "server")
                with proxy._changed:
                    self.client_spoke = True
                    proxy._bytes_to_server += len(data)
                upstream.sendall(data)
        except OSError:
            with proxy._changed:
                self.end()

    def _pump_from_server(self) -> None:
        proxy = self.proxy
        upstream = self.upstream
        assert upstream is not None
        try:
            while True:
                if not self._wait_while_held():
                    return
                data = upstream.recv(_CHUNK)
                if not self._wait_while_held():
                    return
                if not data:
                    with proxy._changed:
                        if not self.half_closed:
                            with contextlib.suppress(OSError):
                                self.client.shutdown(socket.SHUT_WR)
                        self.server_done = True
                        self._one_side_done()
                    return
                with proxy._changed:
                    if self.half_closed:
                        continue  # the client was told the stream ended: drop
                    new_reply = self.client_spoke
                    self.client_spoke = False
                    delay = proxy._latency_s if new_reply else 0.0
                    budget = self.mid_reply_budget if new_reply else None
                if delay > 0 and not self._sleep(delay):
                    return
                if budget is not None:
                    # Cut inside this reply: forward its first bytes, then hold the flow.
                    head, rest = data[:budget], data[budget:]
                    self._forward_to_client(head, new_reply)
                    with proxy._changed:
                        self.mid_reply_budget = None
                        self.held = True
                    if not self._wait_while_held():
                        return
                    if rest:
                        self._forward_to_client(rest, False)
                    continue
                self._forward_to_client(data, new_reply)
        except OSError:
            with proxy._changed:
                self.end()

    def _forward_to_client(self, data: bytes, new_reply: bool) -> None:
        # Counted before sending, so a client that has read a reply sees it counted.
        with self.proxy._changed:
            if new_reply:
                self.proxy._replies += 1
            self.proxy._bytes_to_client += len(data)
        if data:
            self.client.sendall(data)

    def _sleep(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        proxy = self.proxy
        with proxy._changed:
            while not self.ended and not proxy._closing:
                left = end - time.monotonic()
                if left <= 0:
                    return True
                proxy._changed.wait(left)
            return False


class FaultProxy:
    """A loopback TCP proxy to ``upstream`` whose faults can be switched at run time.

    Use it as a context manager (or call :meth:`start` and :meth:`close`).  ``port=0``
    picks a free port; :attr:`port` tells which.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0) -> None:
        self.upstream = (upstream_host, int(upstream_port))
        self._requested_port = port
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._closing = False
        self._flows: list[_Flow] = []
        self._mode = Mode.PASS_THROUGH
        self._latency_s = 0.0
        self._mid_reply_bytes = 0
        self._accepted = 0
        self._replies = 0
        self._bytes_to_client = 0
        self._bytes_to_server = 0

    @classmethod
    def in_front_of(cls, dsn: str) -> FaultProxy:
        """A proxy to the host and port of ``dsn`` (a ``postgresql://`` URL)."""
        parts = urlsplit(dsn)
        if not parts.hostname:
            raise ValueError("FaultProxy.in_front_of(dsn): the URL names no host")
        return cls(parts.hostname, parts.port or 5432)

    # -- life ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the FaultProxy is not started")
        return int(self._listener.getsockname()[1])

    def start(self) -> FaultProxy:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self._requested_port))
        listener.listen(64)
        # accept() polls so that close() ends the thread within this bound.
        listener.settimeout(0.1)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="lambda-pool-fault-proxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def close(self) -> None:
        """Close every flow and the listener, and join every thread (bounded)."""
        with self._changed:
            if self._closing:
                return
            self._closing = True
            flows = list(self._flows)
            for flow in flows:
                flow.end()
            self._changed.notify_all()
        threads = [t for flow in flows for t in flow.threads]
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_SECONDS)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._changed:
                if self._closing:
                    client.close()
                    return
                self._accepted += 1
                self._flows = [f for f in self._flows if not f.ended]
                flow = _Flow(self, client)
                self._flows.append(flow)
                self._apply(flow, new=True)
                if not flow.ended:
                    flow.start()

    # -- modes --------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def pass_through(self) -> None:
        """Forward everything; held flows resume with their buffered bytes."""
        self._set(Mode.PASS_THROUGH)

    def latency(self, ms: float) -> None:
        """Hold the start of every server reply ``ms`` milliseconds."""
        if ms < 0:
            raise ValueError("latency(ms): give milliseconds >= 0")
        self._set(Mode.LATENCY, latency_s=ms / 1000.0)

    def black_hole(self) -> None:
        """Stop forwarding both ways and close nothing."""
        self._set(Mode.BLACK_HOLE)

    def black_hole_mid_reply(self, after_bytes: int) -> None:
        """Forward ``after_bytes`` bytes of each flow's next server reply, then hold it."""
        if after_bytes < 0:
            raise ValueError("black_hole_mid_reply(after_bytes): give bytes >= 0")
        self._set(Mode.BLACK_HOLE_MID_REPLY, mid_reply_bytes=after_bytes)

    def reset(self) -> None:
        """RST every flow, and every new one as soon as it is accepted."""
        self._set(Mode.RESET)

    def half_close(self) -> None:
        """FIN to the client of every flow (new ones too); its bytes still reach the server."""
        self._set(Mode.HALF_CLOSE)

    def _set(self, mode: str, *, latency_s: float = 0.0, mid_reply_bytes: int = 0) -> None:
        with self._changed:
            self._mode = mode
            self._latency_s = latency_s
            self._mid_reply_bytes = mid_reply_bytes
            for flow in self._flows:
                if not flow.ended:
                    self._apply(flow, new=False)
            self._changed.notify_all()

    def _apply(self, flow: _Flow, *, new: bool) -> None:
        """Put ``flow`` in the current mode (the proxy's lock is held)."""
        mode = self._mode
        if mode == Mode.RESET:
            flow.rst()
            return
        flow.held = mode == Mode.BLACK_HOLE or (mode == Mode.BLACK_HOLE_MID_REPLY and new)
        flow.mid_reply_budget = (
            self._mid_reply_bytes if mode == Mode.BLACK_HOLE_MID_REPLY and not new else None
        )
        if mode == Mode.HALF_CLOSE and not flow.half_closed:
            flow.send_fin()

    # -- counters and addresses ---------------------------------------------------------

    def counters(self) -> FaultCounters:
        with self._changed:
            return FaultCounters(
                connections_accepted=self._accepted,
                open_flows=sum(1 for f in self._flows if not f.ended),
                replies=self._replies,
                bytes_to_client=self._bytes_to_client,
                bytes_to_server=self._bytes_to_server,
            )

    def clear_counters(self) -> None:
        with self._changed:
            self._accepted = 0
            self._replies = 0
            self._bytes_to_client = 0
            self._bytes_to_server = 0

    def url_for(self, dsn: str) -> str:
        """``dsn`` (a URL such as ``postgresql+asyncpg://u:pw@host:5432/db?x=y``) with its
        host and port replaced by the proxy's; everything else is kept as written."""
        parts = urlsplit(dsn)
        if not parts.netloc:
            raise ValueError("url_for(dsn): give a URL with a host, e.g. postgresql://h:5432/db")
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{self.host}:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @contextlib.contextmanager
    def faulted(self, mode: str, **options: float) -> Iterator[FaultProxy]:
        """``with proxy.faulted(Mode.BLACK_HOLE): ...``: the mode inside the block, then
        pass-through again."""
        setters = {
            Mode.PASS_THROUGH: lambda: self.pass_through(),
            Mode.LATENCY: lambda: self.latency(options.get("ms", 0.0)),
            Mode.BLACK_HOLE: lambda: self.black_hole(),
            Mode.BLACK_HOLE_MID_REPLY: lambda: self.black_hole_mid_reply(
                int(options.get("after_bytes", 0))
            ),
            Mode.RESET: lambda: self.reset(),
            Mode.HALF_CLOSE: lambda: self.half_close(),
        }
        if mode not in setters:
            raise ValueError(f"unknown mode {mode!r}; one of {sorted(setters)}")
        setters[mode]()
        try:
            yield self
        finally:
            self.pass_through()

    def __repr__(self) -> str:
        where = f"{LOOPBACK}:{self.port}" if self._listener is not None else "not started"
        return f"<FaultProxy {where} -> {self.upstream[0]}:{self.upstream[1]} {self._mode}>"
