"""The KV link: a sender striping layer messages over several TCP connections through an emulated
link (a token bucket for the rate, a delay for the latency), and the receiver assembling hand-offs.

The emulation lives in the sender: every chunk written to a socket first takes its bytes from one
token bucket shared by all connections (the link's rate), and a message leaves no earlier than
`latency_s` after it was queued (propagation; messages still pipeline behind it). Rates are scaled
so that a tiny model's KV crosses a "1 Gbps" link in a test's time (`LinkSpec.emulated`).

Faults: a connection that breaks inside a message (a real one, or `cut(n)`: the next n messages
are cut half-way) is reconnected and the message sent again (a message is idempotent: the receiver
keys layers by request, attempt and layer); after `retries` failures of one request its transfer
is given up and `on_failed` tells the caller, who prefills it elsewhere.
"""

from __future__ import annotations

import collections
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moejax.engine.kv_transfer import Handoff, LayerKVState
from moejax.pd.wire import WireError, decode_layer, handoff_of, layer_message, read_message, request_message


@dataclass(frozen=True)
class LinkSpec:
    rate_bytes_per_s: float | None = None  # None: as fast as loopback goes
    latency_s: float = 0.0
    connections: int = 4
    burst_bytes: int = 64 << 10  # the bucket's depth, and the largest chunk written at once

    def __post_init__(self):
        if self.rate_bytes_per_s is not None and not self.rate_bytes_per_s > 0:
            raise ValueError(f"LinkSpec.rate_bytes_per_s={self.rate_bytes_per_s!r}: must be > 0 (None: unlimited)")
        if self.latency_s < 0:
            raise ValueError(f"LinkSpec.latency_s={self.latency_s!r}: must be >= 0")
        if not isinstance(self.connections, int) or self.connections < 1:
            raise ValueError(f"LinkSpec.connections={self.connections!r}: must be an integer >= 1")
        if self.burst_bytes < 1:
            raise ValueError(f"LinkSpec.burst_bytes={self.burst_bytes!r}: must be >= 1")

    @classmethod
    def emulated(cls, gbps: float, *, scale: float, latency_s: float = 0.0, connections: int = 4) -> LinkSpec:
        """A `gbps` link at `scale` (bytes per second = gbps * 1e9 / 8 * scale), for a model whose KV is
        `scale` times the size of the real one's. Bursts of 10 ms of its rate (at least 1500 bytes, a
        packet; at most 64 KiB), so that a slow link paces smoothly."""
        rate = gbps * 1e9 / 8 * scale
        return cls(rate, latency_s, connections, int(min(64 << 10, max(1500, rate * 0.01))))


class TokenBucket:
    """Bytes at `rate` per second with bursts of up to `burst`. `take(n)` books n bytes at once (the
    bucket may go into debt) and sleeps until the debt is paid, so concurrent takers share the rate."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.burst = rate, burst
        self._clock, self._sleep = clock, sleep
        self._tokens, self._t = float(burst), clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate) - n
            self._t = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


@dataclass
class Transfer:
    """One request's KV on its way: what the sender knows about it."""

    request_id: int
    attempt: int
    queued: float  # when its first message was queued
    messages_left: int = 0
    finished_queueing: bool = False
    bytes_sent: int = 0
    failures: int = 0
    failed: bool = False


class KVSender:
    """Streams requests' layers to one receiver over `link.connections` sockets (layer i on socket
    i mod N, the request message on request_id mod N). on_sent(transfer, seconds) when every message
    of a request went out; on_failed(transfer, reason) when its transfer was given up."""

    def __init__(self, address: tuple[str, int] | None, link: LinkSpec, *, retries: int = 3,
                 on_sent: Callable[[Transfer, float], None] = lambda t, s: None,
                 on_failed: Callable[[Transfer, str], None] = lambda t, why: None):
        self.link, self.retries = link, retries
        self.on_sent, self.on_failed = on_sent, on_failed
        self.bytes_sent = 0  # on the wire, cut messages' partial bytes included
        self._address = address
        self._lock = threading.Lock()
        self._bucket = TokenBucket(link.rate_bytes_per_s, link.burst_bytes) if link.rate_bytes_per_s else None
        self._transfers: dict[tuple[int, int], Transfer] = {}
        self._backlog = 0
        self._sent_log: collections.deque[tuple[float, int]] = collections.deque()
        self._cuts = 0
        self._closed = False
        self._queues = [collections.deque() for _ in range(link.connections)]
        self._wake = threading.Condition(self._lock)
        self._sockets: list[socket.socket | None] = [None] * link.connections
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"kv-send-{i}")
                         for i in range(link.connections)]
        for t in self._threads:
            t.start()

    # --- what the prefill side calls ------------------------------------------------------------------
    def send_layer(self, request_id: int, attempt: int, layer: int, state: LayerKVState) -> None:
        message = layer_message(request_id, attempt, layer, state)
        self._queue(request_id, attempt, layer % self.link.connections, message)

    def finish(self, handoff: Handoff, attempt: int, layers: list[int]) -> None:
        """Queue the request message: the last of the request's messages (its layers are queued)."""
        message = request_message(handoff, attempt, layers)
        self._queue(handoff.request_id, attempt, handoff.request_id % self.link.connections, message, last=True)

    def bytes_of(self, request_id: int, attempt: int) -> int:
        """Bytes of a request's transfer on the wire so far (0 once it is done)."""
        with self._lock:
            t = self._transfers.get((request_id, attempt))
            return 0 if t is None else t.bytes_sent

    def connect_to(self, address: tuple[str, int]) -> None:
        """Send to another receiver from now on (a restarted decode process): open sockets are dropped."""
        with self._lock:
            self._address = address
            for i, s in enumerate(self._sockets):
                if s is not None:
                    s.close()
                    self._sockets[i] = None
            self._wake.notify_all()

    def set_link(self, link: LinkSpec) -> None:
        """Another rate, latency or burst from now on (the connections stay as they are)."""
        with self._lock:
            self.link = LinkSpec(link.rate_bytes_per_s, link.latency_s, self.link.connections, link.burst_bytes)
            self._bucket = TokenBucket(link.rate_bytes_per_s, link.burst_bytes) if link.rate_bytes_per_s else None

    def cut(self, times: int) -> None:
        """Fault injection: the next `times` messages break half-way (their socket closed); 0 heals the link."""
        with self._lock:
            self._cuts = times

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout=1)
        for s in self._sockets:
            if s is not None:
                s.close()

    # --- what the router watches ----------------------------------------------------------------------
    @property
    def backlog_bytes(self) -> int:
        """Bytes queued and not yet on the wire."""
        return self._backlog

    def throughput(self, window_s: float = 1.0) -> float:
        """Bytes per second put on the wire over the last window_s seconds."""
        now = time.monotonic()
        with self._lock:
            while self._sent_log and self._sent_log[0][0] < now - window_s:
                self._sent_log.popleft()
            return sum(n for _, n in self._sent_log) / window_s

    # --- the connections ------------------------------------------------------------------------------
    def _queue(self, request_id: int, attempt: int, conn: int, message: bytes, last: bool = False) -> None:
        with self._lock:
            t = self._transfers.setdefault((request_id, attempt), Transfer(request_id, attempt, time.monotonic()))
            if t.failed:
                return
            t.messages_left += 1
            t.finished_queueing |= last
            self._backlog += len(message)
            self._queues[conn].append((time.monotonic() + self.link.latency_s, t, message))
            self._wake.notify_all()

    def _run(self, i: int) -> None:
        while True:
            with self._lock:
                while not self._queues[i] and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                ready, t, message = self._queues[i].popleft()
                if t.failed:
                    self._backlog -= len(message)
                    continue
            time.sleep(max(0.0, ready - time.monotonic()))
            try:
                self._write(i, t, message)
            except OSError as e:
                self._failure(i, t, message, e)
                continue
            with self._lock:
                self._backlog -= len(message)
                t.messages_left -= 1
                done = t.finished_queueing and t.messages_left == 0
                if done:
                    del self._transfers[(t.request_id, t.attempt)]
            if done:
                self.on_sent(t, time.monotonic() - t.queued)

    def _write(self, i: int, t: Transfer, message: bytes) -> None:
        with self._lock:
            sock, address = self._sockets[i], self._address
            cut = self._cuts > 0
            self._cuts -= cut
        if sock is None:
            if address is None:
                raise ConnectionError("no receiver to send to")
            sock = socket.create_connection(address, timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets[i] = sock
        end = len(message) // 2 if cut else len(message)
        view = memoryview(message)
        for at in range(0, end, self.link.burst_bytes):
            chunk = view[at:min(end, at + self.link.burst_bytes)]
            bucket = self._bucket
            if bucket is not None:
                bucket.take(len(chunk))
            sock.sendall(chunk)
            with self._lock:
                self.bytes_sent += len(chunk)
                t.bytes_sent += len(chunk)
                self._sent_log.append((time.monotonic(), len(chunk)))
        if cut:
            raise ConnectionResetError(f"link cut (injected) {end} bytes into a {len(message)}-byte message")

    def _failure(self, i: int, t: Transfer, message: bytes, error: OSError) -> None:
        with self._lock:
            if self._sockets[i] is not None:
                self._sockets[i].close()
                self._sockets[i] = None
            t.failures += 1
            if t.failures > self.retries:
                gave_up = not t.failed
                t.failed = True
                self._backlog -= len(message)  # kept in _transfers: layers queued later are dropped too
            else:
                gave_up = False
                self._queues[i].appendleft((0.0, t, message))  # sent again first, after a back-off
        if gave_up:
            self.on_failed(t, f"{t.failures} failures, the last: {error!r}")
        elif not t.failed:
            time.sleep(0.05 * 2 ** (t.failures - 1))


class KVReceiver:
    """Accepts a sender's connections and assembles each request from its messages: a hand-off is
    put on `ready` (with its attempt) once its request message and every layer it names arrived. A
    connection broken inside a message loses only that message (the sender sends it again)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = socket.create_server((host, port))
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self.ready: queue.Queue[tuple[Handoff, int]] = queue.Queue()
        self.bytes_received = 0  # of whole messages
        self._lock = threading.Lock()
        self._requests: dict[tuple[int, int], dict] = {}
        self._layers: dict[tuple[int, int], dict[int, LayerKVState]] = collections.defaultdict(dict)
        threading.Thread(target=self._accept, daemon=True, name="kv-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(sock,), daemon=True, name="kv-recv").start()

    def _read(self, sock: socket.socket) -> None:
        with sock:
            while True:
                try:
                    header, body, n = read_message(sock)
                except (EOFError, WireError, OSError):
                    return
                key = (header["request_id"], header["attempt"])
                with self._lock:
                    self.bytes_received += n
                    if header["type"] == "layer":
                        self._layers[key][header["layer"]] = decode_layer(header, body)
                    else:
                        self._requests[key] = header
                    request = self._requests.get(key)
                    if request is None or not set(request["layers"]) <= set(self._layers[key]):
                        continue
                    del self._requests[key]
                    handoff = handoff_of(request, self._layers.pop(key))
                self.ready.put((handoff, key[1]))

    def close(self) -> None:
        self._server.close()
