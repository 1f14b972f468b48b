"""A prefill engine's KV, layer by layer, while it prefills.

Granularity: a layer range is final for a request once the range has run over the request's last
prompt tokens. Under layered prefill (`moejax.engine.layered`) a cohort of whole prompts crosses one
layer group per iteration, so after each iteration the group's layers are final and leave at once,
while the next group computes; the last group's layers leave with the hand-off the engine exports at
the end. (Under chunked prefill every layer becomes final in the same iteration: the stream then
starts at the hand-off.) Export reads only the finished layers (`JaxExecutor.export_kv(layers=...)`).
"""

from __future__ import annotations

from collections.abc import Callable

from moejax.engine.engine import Engine, StepOutput
from moejax.engine.kv_transfer import Handoff, LayerKVState


class LayerStreamer:
    """Call `after_step(engine.step())` after each step of `engine` (its requests added with
    handoff=True): `send_layer(request_id, layer, state)` for each layer as it becomes final, then
    `finish(handoff, layers)` once the request is handed off (`layers`: all its payload's layers; the
    hand-off is taken out of `engine.handoffs`)."""

    def __init__(self, engine: Engine, send_layer: Callable[[int, int, LayerKVState], None],
                 finish: Callable[[Handoff, list[int]], None]):
        self.engine = engine
        self.send_layer, self.finish = send_layer, finish
        self.sent: dict[int, set[int]] = {}  # request -> layers sent before its hand-off

    def after_step(self, out: StepOutput) -> None:
        e, L = self.engine, self.engine.config.num_layers
        for s in out.plan.slices:
            req = e.scheduler.requests.get(s.request_id)
            if req is None or not req.handoff or s.layer_end == L or s.context_len != req.num_prompt_tokens:
                continue  # not a hand-off's last prompt slice, or its last layers (they leave with the hand-off)
            part = e.executor.export_kv(req.block_ids, req.num_prompt_tokens, req.group_block_ids,
                                        req.state_slot, layers=range(s.layer_start, s.layer_end))
            for layer, state in zip(part.layers, part.states):
                self.send_layer(req.request_id, layer, state)
            self.sent.setdefault(req.request_id, set()).update(part.layers)
        for h in e.handoffs:
            sent = self.sent.pop(h.request_id, set())
            for layer, state in zip(h.kv.layers, h.kv.states):
                if layer not in sent:
                    self.send_layer(h.request_id, layer, state)
            self.finish(h, list(h.kv.layers))
        e.handoffs.clear()
