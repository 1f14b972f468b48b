"""The KV stream's wire format: one message per layer of a request, plus one with the request itself.

A message is a fixed prefix (header length, body length), a JSON header and a raw body. A layer
message's header names the request, the layer, its state's kind and each array (name, dtype, shape);
its body is the arrays' bytes back to back (numpy `tobytes`, read back with `frombuffer`). Nothing
here knows what a kind means: a paged, window, latent or recurrent state travels the same way.
A request message carries what the decode side needs besides the KV (prompt, first token, sampling
parameters, seed, the exporting model's KV layout) and the layers to wait for.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct

import jax.numpy as jnp
import numpy as np

from moejax.engine.kv_transfer import Handoff, KVPayload, LayerKVState
from moejax.engine.sampling import SamplingParams

PREFIX = struct.Struct("!IQ")  # header bytes, body bytes


class WireError(ConnectionError):
    """A stream ended inside a message or held something that is not one."""


def encode(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(len(head), len(body)) + head + body


def layer_message(request_id: int, attempt: int, layer: int, state: LayerKVState) -> bytes:
    arrays = {name: np.ascontiguousarray(np.asarray(a)) for name, a in state.arrays.items()}
    header = {"type": "layer", "request_id": request_id, "attempt": attempt, "layer": layer, "kind": state.kind,
              "arrays": [[name, a.dtype.name, list(a.shape)] for name, a in arrays.items()]}
    return encode(header, b"".join(a.tobytes() for a in arrays.values()))


def request_message(handoff: Handoff, attempt: int, layers: list[int]) -> bytes:
    """Everything of a hand-off but its layers' states; `layers`: the layers its payload has."""
    kv = handoff.kv
    return encode({"type": "request", "request_id": handoff.request_id, "attempt": attempt,
                   "prompt_token_ids": handoff.prompt_token_ids, "output_token_ids": handoff.output_token_ids,
                   "params": dataclasses.asdict(handoff.params), "seed": handoff.seed,
                   "model": kv.model, "layout": kv.layout, "num_tokens": kv.num_tokens, "layers": layers})


def decode_layer(header: dict, body: memoryview) -> LayerKVState:
    arrays, at = {}, 0
    for name, dtype, shape in header["arrays"]:
        dt = jnp.dtype(dtype)  # knows bfloat16 as well as numpy's dtypes
        n = int(np.prod(shape)) * dt.itemsize
        if at + n > len(body):
            raise WireError(f"layer {header['layer']} of request {header['request_id']}: array {name!r} "
                            f"{dtype}{shape} runs past the message's {len(body)} bytes")
        arrays[name] = np.frombuffer(body[at:at + n], dt).reshape(shape)
        at += n
    if at != len(body):
        raise WireError(f"layer {header['layer']} of request {header['request_id']}: {len(body) - at} bytes "
                        "left after its arrays")
    return LayerKVState(header["kind"], arrays)


def handoff_of(request: dict, states: dict[int, LayerKVState]) -> Handoff:
    """The hand-off a request message and its layers' states make (checked on import, not here)."""
    layers = tuple(request["layers"])
    params = dict(request["params"], stop_token_ids=tuple(request["params"]["stop_token_ids"]))
    kv = KVPayload(request["model"], request["layout"], request["num_tokens"], layers,
                   tuple(states[i] for i in layers))
    return Handoff(request["request_id"], request["prompt_token_ids"], request["output_token_ids"],
                   SamplingParams(**params), request["seed"], kv)


def read_message(sock: socket.socket) -> tuple[dict, memoryview, int]:
    """The next message on a socket -> (header, body, bytes read). EOFError at a clean end of stream,
    WireError when it ends inside a message."""
    prefix = _read_exactly(sock, PREFIX.size, at_start=True)
    head_len, body_len = PREFIX.unpack(prefix)
    header = json.loads(bytes(_read_exactly(sock, head_len)))
    body = _read_exactly(sock, body_len)
    return header, body, PREFIX.size + head_len + body_len


def _read_exactly(sock: socket.socket, n: int, at_start: bool = False) -> memoryview:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if at_start and got == 0:
                raise EOFError
            raise WireError(f"the stream ended {got} bytes into a {n}-byte read")
        got += k
    return view
