"""Prefill and decode engines in separate processes (PrfaaS, arXiv 2604.15039): a router in front,
each request's KV streamed layer by layer while it prefills, over several TCP connections through
an emulated link, and the faults a real deployment meets.

    wire.py       the KV stream's messages (generic over a layer state's kind and arrays)
    link.py       LinkSpec, the token-bucket sender over N connections (retries, injected cuts), the receiver
    streaming.py  a prefill engine's finished layers, as they finish
    worker.py     `python -m moejax.pd.worker --role prefill|decode`: an engine process
    router.py     Router: routes by the uncached-length threshold, watches the link, survives faults
"""

from moejax.pd.link import KVReceiver, KVSender, LinkSpec, TokenBucket
from moejax.pd.router import Router, RouterState
from moejax.pd.streaming import LayerStreamer

__all__ = ["KVReceiver", "KVSender", "LayerStreamer", "LinkSpec", "Router", "RouterState", "TokenBucket"]
