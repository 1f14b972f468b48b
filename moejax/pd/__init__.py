"""Prefill/decode disaggregation and Prefill-as-a-Service (PrfaaS, arXiv 2604.15039): prefill and
decode engines in separate processes, a router in front, each request's KV streamed layer by layer
while it prefills, over several TCP connections through an emulated link, surviving the faults a real
deployment meets.

    wire.py            the KV stream's messages (generic over a layer state's kind and arrays)
    link.py            LinkSpec, the token-bucket sender over N connections (retries, injected cuts), the receiver
    streaming.py       a prefill engine's finished layers, as they finish
    worker.py          `python -m moejax.pd.worker --role prefill|decode`: an engine process
    router.py          Router: routes by the uncached-length threshold, watches the link, survives faults
    throughput_model   Λ = min(Θ_prfaas/p, Θ_pd-p/(1−p), Θ_pd-d): the offload threshold t and the local
                       prefill:decode split (`choose_threshold`, `choose_split`)

The simulated deployment (a PrfaaS cluster, a local PD cluster, one link) is moejax.sim.pd.
"""

from moejax.pd.link import KVReceiver, KVSender, LinkSpec, TokenBucket
from moejax.pd.router import Router, RouterState
from moejax.pd.streaming import LayerStreamer

__all__ = ["KVReceiver", "KVSender", "LayerStreamer", "LinkSpec", "Router", "RouterState", "TokenBucket"]
