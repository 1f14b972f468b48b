"""Routed experts in a process of their own: the attention side (this engine) and an expert server
exchange each MoE layer's rows over a connection, with micro-batch ping-pong (moejax.disagg.pingpong)
so that both processes compute at once.

    build("tiny-qwen3-moe", "remote-experts", micro_batches=2)     # spawns the expert server
    python -m moejax.disagg.remote --model NAME --connect HOST:PORT # the server (the executor runs it)
    build(..., "remote-experts", listen="0.0.0.0:7777")             # or waits for one started elsewhere

Two processes have what two device pools of one process lack on a CPU: their own compute (XLA:CPU
runs every device of a process on one thread pool). The executor listens on a loopback port, starts
the server (same model name, seed and dtype, optionally pinned to `server_cpus`), and checks its
hello: the model's name and shapes and a fingerprint of the routed experts' weights, so that a
server holding other weights is refused rather than silently mixed in. With `listen=` the server is
started elsewhere (another host) and connects to this address, with the authkey both sides take
from $MOEJAX_EXPERTS_AUTHKEY.

Per MoE layer and micro-batch the executor sends (layer, rows, ids, weights) as numpy arrays and
the server answers, in order, with the experts' output and when it computed them (monotonic clock,
shared by processes of one host: the timeline's expert pool). The send waits for the rows (the
attention piece that made them); the next micro-batch's attention is dispatched before the answer
is awaited, so the server's experts and this process's attention overlap. Outputs equal the
colocated executor's: the same `Model.experts` program on the same weights.

A server that goes away is replaced (spawned again, or awaited again on `listen`) and the iteration
run again where that is harmless (RemoteExpertsExecutor); otherwise the step fails with a
ConnectionError naming the server.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Client, Listener

import jax
import jax.numpy as jnp
import numpy as np

from moejax.disagg.pingpong import PingPongExecutor
from moejax.engine.jax_executor import kv_blocks_for, resolve_model
from moejax.engine.kv_cache import state_slots_for
from moejax.models.model import Model
from moejax.models.moe import expert_counts

AUTHKEY_ENV = "MOEJAX_EXPERTS_AUTHKEY"
CONNECT_TIMEOUT_S = 300.0  # the server loads the model before it says hello


def fingerprint(model: Model) -> list[float]:
    """Per MoE layer, a sum over its routed experts' weights: equal on both sides iff they loaded the
    same experts (in practice)."""
    return [float(sum(jnp.sum(a.astype(jnp.float32)) for a in model.expert_weights(i)))
            for i, is_moe in enumerate(model.config.moe_layers) if is_moe]


def hello_of(model: Model) -> dict:
    cfg = model.config
    return {"model": cfg.name, "hidden_size": cfg.hidden_size, "num_experts": cfg.num_experts,
            "moe_layers": list(cfg.moe_layers), "dtype": str(cfg.dtype), "fingerprint": fingerprint(model)}


# --- the server -------------------------------------------------------------------------------------

def serve(model: Model, conn) -> None:
    """Answer (layer, y, ids, weights) with (out, started, finished) until the peer says stop or goes
    away."""
    buffers = {i: model.expert_weights(i) for i, is_moe in enumerate(model.config.moe_layers) if is_moe}
    conn.send(hello_of(model))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        i, y, ids, weights = message
        started = time.perf_counter()
        out = np.asarray(model.experts(jnp.asarray(y), jnp.asarray(ids), jnp.asarray(weights), buffers[i]))
        conn.send((out, started, time.perf_counter()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moejax.disagg.remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="preset, shipped checkpoint or checkpoint dir (as the engine's)")
    p.add_argument("--connect", required=True, metavar="HOST:PORT",
                   help=f"the executor's address (the authkey in ${AUTHKEY_ENV}, hex; retried until it listens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--cpus", default=None, help="CPU ids this process runs on, e.g. 1 or 2,3 (default: all)")
    args = p.parse_args(argv)
    if args.cpus:  # before JAX starts: XLA:CPU sizes its thread pool by the affinity
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    from moejax.checkpoint import load_model

    model = load_model(args.model, dtype=args.dtype, seed=args.seed)[0]
    host, port = args.connect.rsplit(":", 1)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:  # the engine may start listening after this server (multi-host launches)
        try:
            conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with conn:
        serve(model, conn)


# --- the executor -----------------------------------------------------------------------------------

class ExpertServer:
    """An expert server's connection, and its process when this side spawned it; answers come back in
    send order."""

    def __init__(self, model: Model, source: str | None = None, *, seed: int = 0, dtype: str | None = None,
                 cpus: str | None = None, listen: str | None = None):
        """Spawn a server loading `source` (seed, dtype, pinned to `cpus`), or with listen="HOST:PORT"
        wait for one started elsewhere (`python -m moejax.disagg.remote --connect HOST:PORT`, the same
        hex authkey in $MOEJAX_EXPERTS_AUTHKEY on both sides) to connect."""
        if listen is not None and not os.environ.get(AUTHKEY_ENV):
            raise ValueError(f"listen={listen!r}: set {AUTHKEY_ENV} (a hex key, e.g. `openssl rand -hex 16`) "
                             "here and for the expert server")
        self._hello = hello_of(model)
        self._spawn = None if listen is not None else [
            "--model", source, "--seed", str(seed), *(["--dtype", dtype] if dtype else []),
            *(["--cpus", cpus] if cpus else [])]
        self._listen = listen
        self.process, self.conn, self._finalizer = None, None, None
        self.connect()

    def connect(self) -> None:
        """(Re)connect: spawn a server (or wait for one to connect on `listen`), check its hello, and
        start afresh (answers owed by a previous server are dropped)."""
        if self._finalizer is not None:
            self._finalizer()  # the previous server, if any, is told to stop and reaped
        if self._listen is None:
            authkey, address = os.urandom(16), ("127.0.0.1", 0)
        else:
            host, port = self._listen.rsplit(":", 1)
            authkey, address = bytes.fromhex(os.environ[AUTHKEY_ENV]), (host, int(port))
        with Listener(address, authkey=authkey) as listener:
            if self._spawn is not None:
                host, port = listener.address
                cmd = [sys.executable, "-m", "moejax.disagg.remote", "--connect", f"{host}:{port}", *self._spawn]
                self.process = subprocess.Popen(cmd, env={**os.environ, AUTHKEY_ENV: authkey.hex()})
            self.name = (f"expert server (pid {self.process.pid})" if self.process is not None
                         else f"expert server on {self._listen}")
            self.conn = _accept(listener, self.process, self.name)
        self._finalizer = weakref.finalize(self, _shut_down, self.conn, self.process)
        hello = self._receive()
        if hello != self._hello:
            self.close()
            differ = sorted(k for k in self._hello if hello.get(k) != self._hello[k])
            raise ValueError(f"{self.name} holds other experts than this engine's model: {', '.join(differ)} differ "
                             f"(server {[hello.get(k) for k in differ]}, engine {[self._hello[k] for k in differ]})")
        self._waiting: deque[int] = deque()  # tickets sent, answers not yet received
        self._answers: dict[int, tuple] = {}
        self._sent = 0
        # answers are read as they come: a server blocked writing a big answer would stop reading the
        # next request, while this side blocks writing it. The reader holds the connection, not this
        # object: an engine dropped shuts its server down (finalize).
        self._inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_read_into, args=(self.conn, self._inbox), daemon=True,
                         name="expert-server-read").start()

    def send(self, i: int, y: jax.Array, ids: jax.Array, weights: jax.Array) -> int:
        """Send MoE layer i's rows (waits for them to be computed) -> a ticket for `receive`."""
        try:
            self.conn.send((i, *jax.device_get((y, ids, weights))))
        except OSError as e:
            raise self._gone(e) from e
        self._sent += 1
        self._waiting.append(self._sent)
        return self._sent

    def receive(self, ticket: int) -> tuple[np.ndarray, float, float]:
        """The answer to `ticket`: (out [T, D], started, finished); earlier answers are kept."""
        while ticket not in self._answers:
            answer = self._inbox.get()
            if answer is None:
                self._inbox.put(None)  # every later call fails the same way
                raise self._gone()
            self._answers[self._waiting.popleft()] = answer
        return self._answers.pop(ticket)

    def _receive(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError) as e:
            raise self._gone(e) from e

    def _gone(self, cause: BaseException | None = None) -> ConnectionError:
        code = None if self.process is None else self.process.poll()
        return ConnectionError(f"{self.name} went away" + (f" (exit code {code})" if code is not None else "")
                               + (f": {cause!r}" if cause else ""))

    def close(self) -> None:
        self._finalizer()


def _accept(listener: Listener, process: subprocess.Popen | None, name: str):
    """The server's connection; fails as soon as a spawned server's process has exited, or after
    CONNECT_TIMEOUT_S."""
    accepted: list = []

    def accept():
        try:
            accepted.append(listener.accept())
        except OSError:  # the listener closed: the caller gave up
            pass

    waiter = threading.Thread(target=accept, daemon=True)
    waiter.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while waiter.is_alive() and (process is None or process.poll() is None) and time.monotonic() < deadline:
        waiter.join(0.1)
    if accepted:
        return accepted[0]
    code = None if process is None else process.poll()
    why = f"exited with code {code}" if code is not None else f"did not connect within {CONNECT_TIMEOUT_S:.0f} s"
    if process is not None:
        process.kill()
    raise ConnectionError(f"{name} {why} before saying hello" + (" (its output above says why)" if process else ""))


def _read_into(conn, inbox: queue.Queue) -> None:
    """Every answer into `inbox`, then None once the connection is gone."""
    while True:
        try:
            inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)
            return


def _shut_down(conn, process: subprocess.Popen | None) -> None:
    try:
        conn.send(None)
        conn.close()
    except OSError:
        pass
    if process is None:
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


_expert_counts = jax.jit(expert_counts, static_argnums=1)


class RemoteExpertsExecutor(PingPongExecutor):
    """Attention, KV and sampling in this process; routed experts on an ExpertServer. An iteration
    whose server went away is run again on a new one (spawned, or connecting again on `listen`) when
    running it twice is harmless: every slice runs to the last layer (no hidden rows kept for the next
    iteration) and the model keeps no recurrent state; KV written twice is written the same."""

    def __init__(self, model: Model, server: ExpertServer, num_blocks, block_size: int, max_model_len: int, *,
                 micro_batches: int = 2, state_slots: int = 0):
        super().__init__(model, num_blocks, block_size, max_model_len, state_slots=state_slots)
        self.server, self.step_micro_batches = server, micro_batches
        self.server_restarts = 0

    def execute(self, plan):
        try:
            result = super().execute(plan)
        except ConnectionError:
            if self.num_state_slots or any(s.layer_end < self.config.num_layers for s in plan.slices):
                raise
            self.timeline.finish()  # the failed attempt's pieces
            self.server.connect()
            self.server_restarts += 1
            result = super().execute(plan)
        result.extra.update(**self.finish_pools(), server_restarts=self.server_restarts)
        return result

    def send_experts(self, i, y, ids, weights, routed_at):
        tokens = _expert_counts(ids, self.config.num_experts)
        return self.server.send(i, y, ids, weights), tokens

    def expert_output(self, ticket):
        out, started, finished = self.server.receive(ticket)
        return jnp.asarray(out), (self.timeline.add_span("experts", started, finished),)

    def close(self) -> None:
        self.server.close()


def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           dtype: str | None = None, num_blocks: int | None = None, kv_budget_bytes: int | None = None,
           micro_batches: int = 2, server_model: str | None = None, server_cpus: str | None = None,
           listen: str | None = None, state_slots: int | None = None):
    """A RemoteExpertsExecutor for `model` (a preset or checkpoint name, or a loaded Model) with a
    spawned expert server loading `server_model` (default: the name given, or a Model's preset name;
    seed and dtype as here) on the CPU ids `server_cpus` (e.g. "1"; default all); or, with
    listen="HOST:PORT", one started elsewhere that connects there (ExpertServer)."""
    from moejax.config import PRESETS
    from moejax.engine.factory import Built

    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r}: must be an integer >= 1")
    if listen is not None and (server_model or server_cpus):
        raise ValueError("listen=: the expert server is started elsewhere; server_model / server_cpus are its "
                         "--model / --cpus")
    if server_model is None and listen is None:
        server_model = model.config.name if isinstance(model, Model) else str(model)
        if isinstance(model, Model) and server_model not in PRESETS:
            raise ValueError(f"executor 'remote-experts': the expert server loads the model by name; give "
                             f"server_model= (the checkpoint {model.config.name} was loaded from)")
    preset = PRESETS.get(model) if isinstance(model, str) else None
    if preset is None:  # a Model or a checkpoint: its config once loaded
        model = resolve_model(model, dtype=dtype, seed=seed)
    cfg = preset or model.config
    if not cfg.num_experts:
        raise ValueError(f"{cfg.name} has no routed experts: executor 'remote-experts' has nothing to serve")
    if preset is not None:
        model = resolve_model(model, dtype=dtype, seed=seed)
    if model.placements.attention is not None:
        raise ValueError("executor 'remote-experts' runs this side on one device: load the model without a layout")
    max_model_len = max_model_len or min(model.config.max_position, 4096)
    state_slots = state_slots_for(model.config, max_num_seqs, state_slots)
    num_blocks, shards = kv_blocks_for(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                       block_size=block_size, num_blocks=num_blocks, kv_budget_bytes=kv_budget_bytes,
                                       state_slots=state_slots)
    server = ExpertServer(model, server_model, seed=seed, dtype=dtype, cpus=server_cpus, listen=listen)
    executor = RemoteExpertsExecutor(model, server, num_blocks, block_size, max_model_len,
                                     micro_batches=micro_batches, state_slots=state_slots)
    return Built(executor, num_blocks, max_model_len, kv_shards=shards, state_slots=state_slots)


if __name__ == "__main__":
    main()
