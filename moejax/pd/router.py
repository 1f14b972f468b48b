"""The router in front of a prefill process and a decode process (PrfaaS, arXiv 2604.15039).

A prompt whose uncached length is at least the threshold `t` is prefilled by the prefill process,
its KV streamed to the decode process over the link; a shorter one is prefilled by the decode
process itself. (No engine keeps a prefix cache yet: a prompt's uncached length is its length.)
`t` is a setting, or `choose_threshold(state) -> t` decides it per request from the router's view
(RouterState: link throughput and backlog, queues); `ModelThreshold` is that hook driven by PrfaaS's
throughput model (moejax.pd.throughput_model) at the bandwidth the link shows. When the link saturates — the KV already
waiting for it (the sender's backlog plus the requests still prefilling there, at the bytes per
token measured so far) would take more than `max_link_wait_s` at its measured throughput — a long
prompt is prefilled locally instead, which lowers the offload share until the link drains.

The router keeps every request until its last token arrives, and no request is lost to a fault:
- the link cut mid-transfer: the sender resends; past its retries it gives the request up and the
  router has the decode process prefill it (route "local-fallback");
- the prefill process dies: what it held is sent to the decode process (route "rerouted");
- the decode process dies: it is restarted and every request it held is submitted again (route
  "resubmitted"); requests still prefilling stream to the new one.
Processes that die are restarted (`restart`, at most `max_restarts` times a role). Greedy outputs are
what one engine gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Listener

from moejax.engine.sampling import RequestError, SamplingParams, check_token_ids
from moejax.pd.link import LinkSpec
from moejax.pd.throughput_model import RequestProfile, choose_threshold

ROLES = ("prefill", "decode")


@dataclass
class Tracked:
    """A request as the router follows it."""

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    submitted: float
    route: str = ""  # "prefill" | "local" | "local-saturated" | "local-fallback" | "rerouted" | "resubmitted"
    where: str = "router"  # "router" (waiting for a process) | "prefill" | "link" (sent) | "decode"
    attempt: int = 0
    where_since: float = 0.0
    kv_bytes: int = 0
    resends: int = 0  # KV messages sent again after the link broke
    transfer_s: float | None = None
    bytes_before_handoff: int = 0
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    finished: float | None = None
    faults: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RouterState:
    """What `choose_threshold` sees when a request arrives."""

    link_throughput: float  # bytes/s measured by the sender (last second)
    link_backlog_bytes: int
    link_rate: float | None  # the link's nominal bytes/s
    prefill_queue: int  # requests at the prefill process
    decode_queue: int  # requests at the decode process


@dataclass(frozen=True)
class ModelThreshold:
    """A `choose_threshold` hook: t maximising the throughput model's Λ for this deployment's request
    profile (prefill seconds per prompt on either side, KV bytes shipped), chosen again at every
    arrival with the bandwidth the link shows — its nominal rate while nothing waits for it, the
    measured throughput once a backlog builds — so a slower link raises t and lowers the offload share.
    The defaults describe this router's deployment: one prefill process and one decode process that
    also prefills the short prompts."""

    profile: RequestProfile
    prfaas_instances: int = 1
    prefill_instances: int = 1
    decode_instances: int = 1

    def bandwidth(self, state: RouterState) -> float:
        busy = state.link_backlog_bytes > 0 and state.link_throughput > 0
        return state.link_throughput if busy or not state.link_rate else state.link_rate

    def __call__(self, state: RouterState) -> int:
        best = choose_threshold(self.profile, prfaas_instances=self.prfaas_instances,
                                prefill_instances=self.prefill_instances, decode_instances=self.decode_instances,
                                link_bytes_per_s=self.bandwidth(state))
        return sys.maxsize if best.threshold == float("inf") else int(best.threshold)


@dataclass
class _Worker:
    role: str
    generation: int
    process: subprocess.Popen
    conn: object = None
    pid: int | None = None
    kv_address: tuple[str, int] | None = None
    report: dict = field(default_factory=dict)


class Router:
    def __init__(self, model: str, *, threshold: int = 32, choose_threshold: Callable[[RouterState], int] | None = None,
                 link: LinkSpec = LinkSpec(), max_link_wait_s: float | None = None, seed: int = 0,
                 engine_options: dict | None = None, retries: int = 3, restart: bool = True,
                 admit_timeout_s: float = 60.0, max_restarts: int = 3, worker_args: Sequence[str] = (),
                 worker_env: dict | None = None):
        """engine_options: moejax.engine.build's sizes for both engines (the same on both: a request's
        KV must fit the decode side). max_link_wait_s: None never keeps a long prompt home."""
        self.model, self.seed, self.link = model, seed, link
        self.threshold, self.choose_threshold = threshold, choose_threshold
        self.max_link_wait_s, self.retries, self.restart = max_link_wait_s, retries, restart
        self.admit_timeout_s, self.max_restarts = admit_timeout_s, max_restarts
        self.engine_options = dict(engine_options or {})
        self.worker_args, self.worker_env = list(worker_args), dict(worker_env or {})
        self.requests: dict[int, Tracked] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._authkey = os.urandom(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        self._workers: dict[str, _Worker] = {}
        self._generations = {role: 0 for role in ROLES}
        self._past_reports: dict[str, list[dict]] = {role: [] for role in ROLES}  # of processes gone
        self._bytes_per_token: tuple[int, int] = (0, 0)  # KV bytes sent, prompt tokens they held
        self._limits: dict | None = None  # vocab_size and max_model_len of the engines
        self._restarts = {role: 0 for role in ROLES}
        self._closed = False
        self._t0 = time.monotonic()
        threading.Thread(target=self._accept, daemon=True, name="pd-router-accept").start()

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 300) -> Router:
        """Start both processes and wait until they serve."""
        for role in ROLES:
            self._spawn(role)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait until both processes serve; one that exits before it does is an error (its stderr,
        this process's, says why: e.g. an engine option it does not take)."""
        def failed() -> list[str]:
            return [f"the {r} process exited with code {w.process.returncode} before serving"
                    for r, w in self._workers.items() if w.pid is None and w.process.poll() is not None]

        deadline = time.monotonic() + timeout
        with self._lock:
            while not all(self._up(r) for r in ROLES):
                if failed():
                    raise RuntimeError("; ".join(failed()))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pd processes not up after {timeout} s: "
                                       f"{[r for r in ROLES if not self._up(r)]}")
                self._changed.wait(0.5)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        for w in workers:
            self._send(w.role, op="stop")
        for w in workers:
            try:
                w.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.process.kill()
        self._listener.close()

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------------------
    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Route a request -> its id. Checked here as the engines check it (RequestError naming the
        field), once a process has said what its engine takes."""
        params = params or SamplingParams()
        with self._lock:
            if self._limits is not None:
                ids = check_token_ids(prompt_token_ids, "prompt", self._limits["vocab_size"])
                if not ids or len(ids) + params.max_tokens > self._limits["max_model_len"]:
                    raise RequestError(f"a prompt of {len(ids)} tokens with max_tokens={params.max_tokens} does not "
                                       f"fit max_model_len={self._limits['max_model_len']}", param="prompt")
            rid = len(self.requests)
            t = self.requests[rid] = Tracked(rid, list(prompt_token_ids), params, self._now())
            self._route(t)
            return rid

    def wait(self, request_ids: Sequence[int] | None = None, timeout: float = 300) -> dict[int, list[int]]:
        """Each request's output tokens once all have finished."""
        deadline = time.monotonic() + timeout
        with self._lock:
            ids = list(self.requests) if request_ids is None else list(request_ids)
            while not all(self.requests[i].token_ids is not None for i in ids):
                if time.monotonic() > deadline:
                    late = {i: self.requests[i].where for i in ids if self.requests[i].token_ids is None}
                    raise TimeoutError(f"requests not finished after {timeout} s (where they are: {late})")
                self._changed.wait(0.5)
                self._check_admissions()
            return {i: self.requests[i].token_ids for i in ids}

    # --- faults and settings (for tests and benchmarks) -----------------------------------------------
    def kill(self, role: str) -> None:
        """Kill a process outright (SIGKILL): what a crash looks like to the router."""
        with self._lock:
            self._workers[role].process.kill()

    def cut_link(self, times: int) -> None:
        """The next `times` KV messages on the link break half-way."""
        self._send("prefill", op="cut", times=times)

    def set_link(self, link: LinkSpec) -> None:
        """The link's rate, latency and burst from now on (its connections stay)."""
        with self._lock:
            self.link = dataclasses.replace(link, connections=self.link.connections)
            self._send("prefill", op="link", link=dataclasses.asdict(self.link))

    def pid(self, role: str) -> int | None:
        with self._lock:
            return self._workers[role].pid if role in self._workers else None

    # --- routing --------------------------------------------------------------------------------------
    def state(self) -> RouterState:
        with self._lock:
            report = self._workers["prefill"].report if self._up("prefill") else {}
            held = [t.where for t in self.requests.values() if t.token_ids is None]
            return RouterState(report.get("throughput", 0.0), report.get("backlog_bytes", 0),
                               self.link.rate_bytes_per_s, held.count("prefill"), held.count("decode"))

    def link_wait_s(self, state: RouterState) -> float:
        """Seconds the KV already bound for the link needs at its measured throughput (else its rate)."""
        sent, tokens = self._bytes_per_token
        prefilling = sum(len(t.prompt_token_ids) for t in self.requests.values()
                         if t.where == "prefill" and t.token_ids is None)
        waiting = state.link_backlog_bytes + (sent / tokens * prefilling if tokens else 0.0)
        rate = state.link_throughput or state.link_rate
        return waiting / rate if rate else 0.0

    def _route(self, t: Tracked, fallback: str | None = None) -> None:
        """Send a request where it goes now; `fallback`: a fault's route, to the decode process."""
        if fallback is None:
            state = self.state()
            threshold = self.choose_threshold(state) if self.choose_threshold else self.threshold
            if len(t.prompt_token_ids) < threshold or not self._up("prefill"):
                fallback = "local"
            elif self.max_link_wait_s is not None and self.link_wait_s(state) > self.max_link_wait_s:
                fallback = "local-saturated"
        t.attempt += 1
        t.route = fallback or "prefill"
        if fallback is None:
            self._place(t, "prefill")
            self._send("prefill", op="submit", request_id=t.request_id, attempt=t.attempt,
                       prompt_token_ids=t.prompt_token_ids, params=t.params)
        elif self._up("decode"):
            self._place(t, "decode")
            self._send("decode", op="submit", request_id=t.request_id, attempt=t.attempt,
                       prompt_token_ids=t.prompt_token_ids, params=t.params)
        else:
            self._place(t, "router")  # sent when the decode process is back

    def _place(self, t: Tracked, where: str) -> None:
        t.where, t.where_since = where, self._now()

    def _check_admissions(self) -> None:
        """A transfer sent but never admitted (its receiver died as it arrived) goes local."""
        now = self._now()
        for t in self.requests.values():
            if t.token_ids is None and t.where == "link" and now - t.where_since > self.admit_timeout_s:
                t.faults.append("never admitted")
                self._route(t, "local-fallback")

    # --- processes ------------------------------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _up(self, role: str) -> bool:
        w = self._workers.get(role)
        return w is not None and w.pid is not None and w.process.poll() is None

    def _spawn(self, role: str) -> None:
        with self._lock:
            self._generations[role] += 1
            host, port = self._listener.address
            cmd = [sys.executable, "-m", "moejax.pd.worker", "--role", role, "--router", f"{host}:{port}",
                   "--generation", str(self._generations[role]), "--model", self.model, "--seed", str(self.seed),
                   "--engine", json.dumps(self.engine_options), "--retries", str(self.retries),
                   "--link", json.dumps(dataclasses.asdict(self.link)), *self.worker_args]
            env = {**os.environ, **self.worker_env, "MOEJAX_PD_AUTHKEY": self._authkey.hex()}
            self._workers[role] = _Worker(role, self._generations[role],
                                          subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))

    def _send(self, role: str, **message) -> None:
        w = self._workers.get(role)
        if w is None or w.conn is None:
            return
        try:
            w.conn.send(message)
        except OSError:
            pass  # the reader notices the death and reroutes

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
                hello = conn.recv()
            except (OSError, EOFError):
                if self._closed:
                    return
                continue
            threading.Thread(target=self._read, args=(conn, hello), daemon=True, name="pd-router-read").start()

    def _read(self, conn, hello: dict) -> None:
        role, generation = hello["role"], hello["generation"]
        with self._lock:
            w = self._workers.get(role)
            if w is None or w.generation != generation:
                conn.close()
                return
            w.conn, w.pid = conn, hello["pid"]
            self._limits = {k: hello[k] for k in ("vocab_size", "max_model_len")}
            w.kv_address = tuple(hello["kv_address"]) if role == "decode" else None
            self._on_up(role)
            self._changed.notify_all()
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self._on_message(role, message)
                self._changed.notify_all()
        w.process.wait()
        with self._lock:
            if not self._closed:
                self._on_down(w)
            self._changed.notify_all()

    def _on_up(self, role: str) -> None:
        decode = self._workers.get("decode")
        if decode is not None and decode.kv_address is not None and self._up("decode"):
            self._send("prefill", op="connect", address=list(decode.kv_address))
        if role == "decode":
            for t in self.requests.values():
                if t.token_ids is None and t.where == "router":
                    self._route(t, t.route)  # a local route, kept while the decode process was down

    def _on_down(self, w: _Worker) -> None:
        """A process died: what it held goes elsewhere; it is restarted."""
        self._past_reports[w.role].append(w.report)
        w.pid = None
        gone_from = ("prefill",) if w.role == "prefill" else ("decode", "link")
        route = "rerouted" if w.role == "prefill" else "resubmitted"
        if w.role == "decode":
            self._workers["decode"].kv_address = None
        if self.restart and self._restarts[w.role] < self.max_restarts:
            self._restarts[w.role] += 1
            self._spawn(w.role)
        for t in self.requests.values():
            if t.token_ids is None and t.where in gone_from:
                t.faults.append(f"{w.role} process died")
                self._route(t, route)

    def _on_message(self, role: str, m: dict) -> None:
        op = m["op"]
        if op == "link_state":
            self._workers[role].report = m
            return
        t = self.requests.get(m.get("request_id", -1))
        if t is None:
            return
        if op == "sent" and m["attempt"] == t.attempt:  # counted even if the request already finished: the
            # prefill process reports after its last write, and the decode process may be done before that
            t.kv_bytes, t.transfer_s, t.resends = m["kv_bytes"], m["transfer_s"], m["failures"]
            t.bytes_before_handoff = m["bytes_before_handoff"]
            sent, tokens = self._bytes_per_token
            self._bytes_per_token = (sent + m["kv_bytes"], tokens + len(t.prompt_token_ids))
            if t.where == "prefill" and t.token_ids is None:
                self._place(t, "link")
        elif t.token_ids is not None:
            return
        elif op == "kv_failed" and m["attempt"] == t.attempt and t.where in ("prefill", "link"):
            t.faults.append(f"KV transfer failed: {m['reason']}")
            self._route(t, "local-fallback")
        elif op == "rejected":  # the router checks what the engines check: a mismatch of the two sides
            t.token_ids, t.finish_reason, t.finished = [], "error", self._now()
            t.faults.append(f"rejected by the {role} process: {m['error']}")
        elif op == "admitted":
            self._place(t, "decode")
        elif op == "done":
            t.token_ids, t.finish_reason, t.finished = m["token_ids"], m["finish_reason"], self._now()

    # --- metrics --------------------------------------------------------------------------------------
    def metrics(self, request_ids: Sequence[int] | None = None) -> dict:
        """Per request (all, or `request_ids`): route, KV bytes shipped, transfer time, resends, faults;
        the routes' counts and the offload share; the link: bytes on the wire since the start (sent,
        and received whole), the requests' KV bytes shipped and the link's utilisation by them over
        their window (first submitted to last finished) at its nominal rate."""
        with self._lock:
            chosen = [self.requests[i] for i in (self.requests if request_ids is None else request_ids)]
            reports = {role: self._past_reports[role] + ([self._workers[role].report] if role in self._workers else [])
                       for role in ROLES}
            finished = [t.finished for t in chosen if t.finished is not None]
            window = max(finished) - min(t.submitted for t in chosen) if finished else None
            routes: dict[str, int] = {}
            for t in chosen:
                routes[t.route] = routes.get(t.route, 0) + 1
            shipped = sum(t.kv_bytes for t in chosen)
            rate = self.link.rate_bytes_per_s
            return {
                "requests": [{"request_id": t.request_id, "prompt_tokens": len(t.prompt_token_ids), "route": t.route,
                              "kv_bytes": t.kv_bytes, "kv_bytes_before_handoff": t.bytes_before_handoff,
                              "transfer_s": t.transfer_s, "resends": t.resends,
                              "e2e_s": None if t.finished is None else t.finished - t.submitted,
                              "attempts": t.attempt, "faults": t.faults} for t in chosen],
                "routes": routes,
                "offload_share": sum(1 for t in chosen if t.kv_bytes) / len(chosen) if chosen else 0.0,
                "finished": len(finished),
                "window_s": window,
                "link": {"rate_bytes_per_s": rate, "latency_s": self.link.latency_s,
                         "connections": self.link.connections,
                         "bytes_sent": sum(r.get("bytes_sent", 0) for r in reports["prefill"]),
                         "bytes_received": sum(r.get("bytes_received", 0) for r in reports["decode"]),
                         "kv_bytes_shipped": shipped,
                         "transfer_s_total": sum(t.transfer_s or 0.0 for t in chosen),
                         "utilisation": shipped / (rate * window) if rate and window else None},
            }
