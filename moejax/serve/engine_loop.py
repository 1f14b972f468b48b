"""The engine on its own thread, serving many clients at once.

The engine is not thread-safe, so one thread owns it. HTTP handlers (asyncio) `submit` requests and
`abort` them through a queue that the thread drains between iterations; it steps the engine while
requests are unfinished (continuous batching: whatever is queued joins the next iteration) and sends
every request's new tokens back to its handler's asyncio queue. A bounded number of requests may be
in flight: past it `submit` raises QueueFull (the server's 429).

An engine fault (the executor raising on an iteration) finishes the requests that iteration ran with
an error; the others go on and the loop keeps serving.

Multi-host: every process runs this loop on the same engine settings. Process 0 takes the requests
(it serves HTTP) and broadcasts each batch of commands to the others before applying it, so every
process adds and aborts the same requests between the same iterations and plans the same
iterations (`follow` runs a process other than 0). Idle, process 0 broadcasts an empty batch every
`heartbeat_s` so the others are never left in a collective for long.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import queue
import threading
from dataclasses import dataclass

import jax
import numpy as np

from moejax.engine.engine import Engine, StepError
from moejax.engine.metadata import bucket
from moejax.engine.request import Request
from moejax.engine.sampling import RequestError, SamplingParams, TokenLogprobs
from moejax.serve.metrics import ServerMetrics

log = logging.getLogger("moejax.serve")


class QueueFull(RuntimeError):
    """More requests than the server holds (running + waiting); retry after `retry_after_s`."""

    def __init__(self, in_flight: int, capacity: int, retry_after_s: int):
        super().__init__(f"the server is full ({in_flight} requests in flight, room for {capacity}): "
                         f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Delta:
    """A request's new output since its last delta."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # set on the last delta: "stop" | "length" | "abort" | "error"
    error: str | None = None  # with finish_reason "error": the engine fault


class RequestStream:
    """The deltas of one engine request, readable from the asyncio loop that submitted it."""

    def __init__(self, request_id: int, num_prompt_tokens: int, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()

    def put(self, delta: Delta) -> None:  # from the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    async def next(self) -> Delta:
        delta = await self._queue.get()
        self.finished = delta.finish_reason is not None
        return delta


@dataclass
class _Live:
    request: Request
    stream: RequestStream | None  # None on processes other than 0
    sent: int = 0
    preemptions: int = 0


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_waiting: int = 64,
                 retry_after_s: int = 1, heartbeat_s: float = 0.5):
        """max_waiting: requests held beyond the engine's max_num_seqs before answering 429."""
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.scheduler.config.max_num_seqs + max_waiting
        self.retry_after_s = retry_after_s
        self.heartbeat_s = heartbeat_s
        self.multihost = jax.process_count() > 1
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._in_flight = 0  # submitted, not finished by the engine yet
        self._in_flight_lock = threading.Lock()
        self._live: dict[int, _Live] = {}  # touched only on the engine thread
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        metrics.kv_blocks_total.set(engine.scheduler.kv.num_blocks)

    # --- the asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_guarded, name="moejax-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestStream]:
        """Queue checked requests (all or none) -> their streams; QueueFull when there is no room."""
        if len(requests) > self.capacity:  # would never fit: not a matter of retrying
            raise RequestError(f"{len(requests)} choices (prompts x n) exceed what this server holds at once "
                               f"({self.capacity})", param="n")
        with self._in_flight_lock:
            if self._in_flight + len(requests) > self.capacity:
                raise QueueFull(self._in_flight, self.capacity, self.retry_after_s)
            self._in_flight += len(requests)
        loop = asyncio.get_running_loop()
        streams = [RequestStream(next(self._ids), len(ids), loop) for ids, _ in requests]
        # one command: the engine takes them together (the n choices of a request start at once)
        self._commands.put(("add", [(s.request_id, ids, params, s) for s, (ids, params) in zip(streams, requests)]))
        return streams

    def abort(self, stream: RequestStream) -> None:
        """Abort a request (a client went away, or its text hit a stop string); its KV is freed."""
        if not stream.finished:
            self._commands.put(("abort", stream.request_id))

    # --- the engine thread ----------------------------------------------------------------------------
    def _serve_guarded(self) -> None:
        try:
            self.serve()
        except BaseException as e:  # the loop itself failed: /health reports it, handlers get errors
            self.error = e
            log.exception("the engine loop stopped")
            for live in self._live.values():
                if live.stream is not None:
                    live.stream.put(Delta([], None, "error", f"the engine loop stopped: {e!r}"))

    def serve(self) -> None:
        """Run until a stop command (on process 0 from `stop`, on the others from process 0)."""
        while True:
            leader = jax.process_index() == 0  # only process 0 takes requests
            commands = self._take(block=not self.engine.has_unfinished) if leader else []
            if self.multihost:
                commands = self._broadcast(commands)
            if not self._apply(commands):
                return
            if self.engine.has_unfinished:
                self._step()
            self._gauges()

    def _take(self, block: bool) -> list[tuple]:
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=self.heartbeat_s if self.multihost else None))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[tuple]) -> bool:
        """Apply add / abort / stop commands; False on stop."""
        for command in commands:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                for rid, ids, params, stream in command[1]:
                    try:
                        req = self.engine.add_request(ids, params, request_id=rid)
                    except RequestError as e:  # checked before submit; only a bug gets here
                        self._finished(stream, Delta([], None, "error", str(e)))
                        continue
                    self._live[rid] = _Live(req, stream)
                    self.metrics.prompt_tokens.inc(len(ids))
            elif command[0] == "abort":
                live = self._live.get(command[1])
                if live is not None:
                    self.engine.abort(command[1])
                    self._publish(command[1], live)
        return True

    def _step(self) -> None:
        try:
            out = self.engine.step()
        except StepError as e:
            log.error("%s", e, exc_info=e.__cause__)
            for rid in e.request_ids:
                live = self._live.pop(rid, None)
                if live is not None:
                    self.engine.abort(rid)
                    self.metrics.finished("error")
                    self._finished(live.stream, Delta([], None, "error", str(e)))
            return
        self.metrics.iterations.inc()
        self.metrics.expert_bytes.inc(out.result.expert_bytes)
        for row in out.plan.sampling:
            live = self._live.get(row.request_id)
            if live is not None:
                self._publish(row.request_id, live)
        self.engine.finished.clear()  # a server runs for long: keep no history
        self.engine.steps.clear()

    def _publish(self, rid: int, live: _Live) -> None:
        req = live.request
        new = req.output_token_ids[live.sent:]
        if new:
            self.metrics.generation_tokens.inc(len(new))
        if req.num_preemptions > live.preemptions:
            self.metrics.preemptions.inc(req.num_preemptions - live.preemptions)
            live.preemptions = req.num_preemptions
        if not new and not req.is_finished:
            return
        logprobs = req.logprobs[live.sent:] if req.params.logprobs is not None else None
        live.sent = req.num_output_tokens
        delta = Delta(new, logprobs, req.finish_reason if req.is_finished else None)
        if req.is_finished:
            del self._live[rid]
            self._observe(req)
            self._finished(live.stream, delta)
        elif live.stream is not None:
            live.stream.put(delta)

    def _finished(self, stream: RequestStream | None, last: Delta) -> None:
        """A request's last delta: its place in the server is free again."""
        with self._in_flight_lock:
            self._in_flight -= 1
        if stream is not None:
            stream.put(last)

    def _observe(self, req: Request) -> None:
        self.metrics.finished(req.finish_reason)
        if req.finish_reason not in ("stop", "length"):
            return
        self.metrics.ttft.observe(req.first_token_time - req.arrival_time)
        self.metrics.e2e.observe(req.finish_time - req.arrival_time)
        for gap in np.diff(req.token_times):
            self.metrics.tbt.observe(gap)

    def _gauges(self) -> None:
        s = self.engine.scheduler
        self.metrics.running.set(len(s.running))
        self.metrics.waiting.set(len(s.waiting))
        self.metrics.kv_blocks_used.set(s.kv.num_blocks - s.kv.num_free_blocks)

    # --- multi-host -----------------------------------------------------------------------------------
    def _broadcast(self, commands: list[tuple]) -> list[tuple]:
        """Process 0's commands, on every process (JSON over two broadcasts: length, then the bytes
        padded to a power of two, so few shapes compile)."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            wire = [("add", [(rid, ids, dataclasses.asdict(params)) for rid, ids, params, _ in c[1]])
                    if c[0] == "add" else c for c in commands]
            payload = json.dumps(wire).encode()
        else:
            payload = b""
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
        buf = np.zeros(bucket(n, minimum=256), np.uint8)
        buf[:len(payload)] = np.frombuffer(payload, np.uint8)
        data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n])
        if jax.process_index() == 0:
            return commands
        return [("add", [(rid, ids, SamplingParams(**params), None) for rid, ids, params in c[1]])
                if c[0] == "add" else tuple(c) for c in json.loads(data)]


def follow(engine: Engine, metrics: ServerMetrics) -> None:
    """A process other than 0 of a multi-host server: apply process 0's commands until it stops."""
    EngineLoop(engine, metrics).serve()

