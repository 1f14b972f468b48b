"""A prefill or a decode engine in its own process, driven by the router (moejax.pd.router).

    python -m moejax.pd.worker --role prefill|decode --router HOST:PORT --model NAME \\
        [--engine '{"max_model_len": 256, ...}'] [--link '{"rate_bytes_per_s": 1.25e5, ...}']

Both connect to the router's control socket (multiprocessing.connection, authkey from the
environment variable MOEJAX_PD_AUTHKEY, hex) and load the same model (same name and seed).
- prefill: layered prefill, one layer group per iteration (`--layers-per-group`), every request
  handed off; each group's KV leaves as soon as the group ran (LayerStreamer) through a KVSender
  over the emulated link to the decode process's receiver. Reports each transfer sent or given up,
  and the link's backlog and measured throughput.
- decode: a KVReceiver; admits each hand-off through the import path (`Engine.add_prefilled`), and
  prefills locally what the router sends it; reports each request's tokens when it finishes.
A request id seen before is ignored (the router may send a request both ways after a fault; either
way gives the same tokens). The process exits when the router says "stop" or goes away.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from multiprocessing.connection import Client

REPORT_EVERY_S = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moejax.pd.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("prefill", "decode"), required=True)
    p.add_argument("--router", required=True, metavar="HOST:PORT", help="the router's control address")
    p.add_argument("--generation", type=int, default=0, help="the router's count of this role's starts")
    p.add_argument("--model", required=True, help="preset, shipped checkpoint or checkpoint dir (same on both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="{}", help="JSON options of moejax.engine.build (sizes, dtype, ...)")
    p.add_argument("--link", default="{}", help="JSON fields of moejax.pd.link.LinkSpec (prefill side)")
    p.add_argument("--retries", type=int, default=3, help="resends of a request's KV before it is given up")
    p.add_argument("--layers-per-group", type=int, default=1, help="prefill: layers per streamed group")
    p.add_argument("--matmul-precision", default=None, help="jax_default_matmul_precision (as the reference)")
    return p


class Control:
    """The router connection, shared by the engine loop and the sender's threads."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["MOEJAX_PD_AUTHKEY"]))
        self._lock = threading.Lock()

    def send(self, **message) -> None:
        with self._lock:
            self.conn.send(message)

    def messages(self, timeout: float):
        """Messages waiting (waiting up to `timeout` for the first); EOFError when the router is gone."""
        if self.conn.poll(timeout):
            yield self.conn.recv()
            while self.conn.poll(0):
                yield self.conn.recv()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import jax

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    from moejax.engine import build
    from moejax.engine.jax_executor import resolve_model

    model = resolve_model(args.model, seed=args.seed)
    options = json.loads(args.engine)
    control = Control(args.router)
    if args.role == "prefill":
        groups = math.ceil(model.config.num_layers / args.layers_per_group)
        engine = build(model, "jax", policy="layered", group_table=(), max_groups=groups, seed=args.seed, **options)
        run_prefill(engine, control, args)
    else:
        engine = build(model, "jax", seed=args.seed, **options)
        run_decode(engine, control, args)


def limits(engine) -> dict:
    """What the router checks requests against before sending them (the same on both sides)."""
    return {"vocab_size": engine.config.vocab_size, "max_model_len": engine.scheduler.config.max_model_len}


def admit(control: Control, m: dict, add_request, **how) -> bool:
    """Queue a submitted request; one the engine refuses is reported to the router, not a crash."""
    from moejax.engine.sampling import RequestError

    try:
        add_request(m["prompt_token_ids"], m["params"], request_id=m["request_id"], **how)
    except RequestError as e:
        control.send(op="rejected", request_id=m["request_id"], attempt=m["attempt"], error=str(e))
        return False
    return True


def run_prefill(engine, control: Control, args) -> None:
    from moejax.pd.link import KVSender, LinkSpec
    from moejax.pd.streaming import LayerStreamer

    attempts: dict[int, int] = {}  # request -> the attempt being prefilled here
    early: dict[tuple[int, int], int] = {}  # bytes on the wire before the request's hand-off

    def sent(t, seconds):
        control.send(op="sent", request_id=t.request_id, attempt=t.attempt, kv_bytes=t.bytes_sent,
                     transfer_s=seconds, failures=t.failures,
                     bytes_before_handoff=early.pop((t.request_id, t.attempt), 0))

    def failed(t, why):
        control.send(op="kv_failed", request_id=t.request_id, attempt=t.attempt, reason=why)

    sender = KVSender(None, LinkSpec(**json.loads(args.link)), retries=args.retries, on_sent=sent, on_failed=failed)

    def finish(handoff, layers):
        attempt = attempts.pop(handoff.request_id)
        early[(handoff.request_id, attempt)] = sender.bytes_of(handoff.request_id, attempt)
        sender.finish(handoff, attempt, layers)

    streamer = LayerStreamer(engine, lambda rid, layer, state: sender.send_layer(rid, attempts[rid], layer, state),
                             finish)
    control.send(op="hello", role="prefill", generation=args.generation, pid=os.getpid(), **limits(engine))
    last_report = 0.0
    try:
        while True:
            for m in control.messages(0 if engine.has_unfinished else 0.01):
                op = m["op"]
                if op == "submit" and m["request_id"] not in attempts and admit(control, m, engine.add_request,
                                                                                  handoff=True):
                    attempts[m["request_id"]] = m["attempt"]
                elif op == "connect":
                    sender.connect_to(tuple(m["address"]))
                elif op == "link":
                    sender.set_link(LinkSpec(**m["link"]))
                elif op == "cut":
                    sender.cut(m["times"])
                elif op == "stop":
                    raise EOFError
            if engine.has_unfinished:
                streamer.after_step(engine.step())
            if time.monotonic() - last_report > REPORT_EVERY_S:
                last_report = time.monotonic()
                control.send(op="link_state", backlog_bytes=sender.backlog_bytes, throughput=sender.throughput(),
                             bytes_sent=sender.bytes_sent, queued=len(attempts))
    except (EOFError, OSError):
        sender.close()


def run_decode(engine, control: Control, args) -> None:
    import queue

    from moejax.engine.kv_transfer import KVTransferError
    from moejax.engine.sampling import RequestError
    from moejax.pd.link import KVReceiver

    receiver = KVReceiver()
    seen: set[int] = set()
    control.send(op="hello", role="decode", generation=args.generation, pid=os.getpid(),
                 kv_address=list(receiver.address), **limits(engine))
    last_report = 0.0
    try:
        while True:
            for m in control.messages(0 if engine.has_unfinished else 0.005):
                if m["op"] == "stop":
                    raise EOFError
                if m["op"] == "submit" and m["request_id"] not in seen and admit(control, m, engine.add_request):
                    seen.add(m["request_id"])
                    control.send(op="admitted", request_id=m["request_id"], attempt=m["attempt"], via="local")
            while True:
                try:
                    handoff, attempt = receiver.ready.get_nowait()
                except queue.Empty:
                    break
                if handoff.request_id in seen:
                    continue
                try:
                    engine.add_prefilled(handoff, request_id=handoff.request_id)
                except (KVTransferError, RequestError) as e:  # a payload that does not fit: prefilled here instead
                    control.send(op="kv_failed", request_id=handoff.request_id, attempt=attempt, reason=str(e))
                    continue
                seen.add(handoff.request_id)
                control.send(op="admitted", request_id=handoff.request_id, attempt=attempt, via="kv")
            if engine.has_unfinished:
                for r in engine.step().finished:
                    control.send(op="done", request_id=r.request_id, token_ids=r.output_token_ids,
                                 finish_reason=r.finish_reason)
            if time.monotonic() - last_report > REPORT_EVERY_S:
                last_report = time.monotonic()
                control.send(op="link_state", bytes_received=receiver.bytes_received)
    except (EOFError, OSError):
        receiver.close()


if __name__ == "__main__":
    main()
