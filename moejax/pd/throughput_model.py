"""PrfaaS's throughput model (arXiv 2604.15039): which prompts to offload, and how to split the local cluster.

Requests whose prompt has at least `t` tokens prefill on the PrfaaS cluster and ship their KV over the
inter-cluster link; shorter ones prefill on the local cluster's prefill instances; every request decodes
on the local decode instances. At an arrival rate Λ, a share p = P(len >= t) of it is offloaded, so

    Λ_max(t) = min(Θ_prfaas / p, Θ_pd-p / (1 − p), Θ_pd-d)

with Θ_prfaas the offloaded requests/s the PrfaaS cluster can take, capped both by its compute
(instances / mean prefill time of an offloaded prompt) and by the link (bandwidth / mean KV bytes of
an offloaded prompt); Θ_pd-p the local prefill instances' requests/s on the short prompts; Θ_pd-d the
decode instances' requests/s. A term whose share is 0 is no bound.

The model works on a sample of the workload (`RequestProfile`: per request its prompt length, its
prefill time on either cluster, its KV bytes), so every mean above is a sample mean. Λ(t) is constant
between consecutive sample lengths, so searching t over the sample's distinct lengths (plus "never
offload") finds the exact maximum. `choose_threshold` picks t for a given split and link bandwidth (what a
router calls again when it measures the link: less bandwidth, a higher t, a lower offload share);
`choose_split` also searches the local cluster's prefill:decode instance ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NEVER = math.inf  # the threshold that offloads nothing


@dataclass(frozen=True)
class RequestProfile:
    """A sample of the workload's requests, costed on the deployment (sim.pd.profile builds one)."""

    prompt_len: np.ndarray  # [n] tokens
    prfaas_prefill_s: np.ndarray  # [n] seconds to prefill on one PrfaaS instance
    local_prefill_s: np.ndarray  # [n] seconds to prefill on one local prefill instance
    kv_bytes: np.ndarray  # [n] bytes shipped over the link when offloaded (KV + recurrent state)
    decode_rps: float  # requests/s one local decode instance completes

    def __post_init__(self):
        n = len(self.prompt_len)
        if n == 0:
            raise ValueError("RequestProfile needs at least one request")
        for name in ("prfaas_prefill_s", "local_prefill_s", "kv_bytes"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"RequestProfile.{name}: expected shape ({n},) like prompt_len, "
                                 f"got {np.shape(getattr(self, name))}")
        if not self.decode_rps > 0:
            raise ValueError(f"RequestProfile.decode_rps must be positive, got {self.decode_rps}")


@dataclass(frozen=True)
class Capacity:
    """Λ_max and its terms (requests/s of the whole arrival stream each part could sustain)."""

    threshold: float  # offload prompts of at least this many tokens (inf: none)
    offload_share: float  # p
    prfaas_compute: float  # PrfaaS instances / (p · mean offloaded prefill s)  = Θ_prfaas(compute) / p
    link: float  # link bandwidth / (p · mean offloaded KV bytes)  = Θ_prfaas(egress) / p
    pd_prefill: float  # Θ_pd-p / (1 − p)
    pd_decode: float  # Θ_pd-d
    prefill_instances: int
    decode_instances: int

    @property
    def throughput(self) -> float:
        """Λ_max, requests/s."""
        return min(self.prfaas_compute, self.link, self.pd_prefill, self.pd_decode)

    @property
    def bound(self) -> str:
        """The binding term(s): prfaas_compute, link, pd_prefill, pd_decode; those within 0.1% of Λ joined by
        "+" (an optimum often balances two)."""
        lam = self.throughput
        return "+".join(k for k in ("prfaas_compute", "link", "pd_prefill", "pd_decode") if getattr(self, k) <= lam * 1.001)

    def egress_bytes_per_s(self, profile: RequestProfile, rate: float | None = None) -> float:
        """Link bytes/s at arrival rate `rate` (default Λ_max)."""
        rate = self.throughput if rate is None else rate
        return rate * float(np.mean(profile.kv_bytes * (profile.prompt_len >= self.threshold)))


def _sweep(profile: RequestProfile, prfaas_instances: int, prefill_instances: int,
           link_bytes_per_s: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Λ's length-dependent terms at every candidate threshold: the sample's distinct lengths, ascending,
    then NEVER. Returns thresholds [m] and the terms [prfaas_compute, link, pd_prefill] each [m]."""
    order = np.argsort(profile.prompt_len, kind="stable")
    lengths = np.asarray(profile.prompt_len)[order]
    n = len(lengths)
    thresholds, first = np.unique(lengths, return_index=True)  # offloaded: sorted rows first.. n-1
    first = np.append(first, n)
    thresholds = np.append(thresholds.astype(float), NEVER)

    def tail_sum(x):  # [m] Σ over offloaded rows, per candidate
        suffix = np.append(np.cumsum(np.asarray(x, float)[order][::-1])[::-1], 0.0)
        return suffix[first]

    def head_sum(x):  # [m] Σ over local rows
        return np.asarray(x, float).sum() - tail_sum(x)

    share = (n - first) / n
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 where a side gets no requests: masked
        # rate Λ offloads Λ·p requests: Λ ≤ instances / (p · mean offloaded time) = instances · n / Σ_offloaded time
        prfaas = np.where(share > 0, prfaas_instances * n / tail_sum(profile.prfaas_prefill_s), np.inf)
        link = np.where(share > 0, link_bytes_per_s * n / tail_sum(profile.kv_bytes), np.inf)
        local = np.where(share < 1, prefill_instances * n / head_sum(profile.local_prefill_s), np.inf)
    return thresholds, [prfaas, link, local]


def capacity(profile: RequestProfile, threshold: float, *, prfaas_instances: int, prefill_instances: int,
             decode_instances: int, link_bytes_per_s: float) -> Capacity:
    """Λ_max and its terms at one threshold (any value: offloads prompt_len >= threshold)."""
    offloaded = np.asarray(profile.prompt_len) >= threshold
    n, k = len(offloaded), int(offloaded.sum())
    inf = math.inf
    return Capacity(
        threshold=float(threshold), offload_share=k / n,
        prfaas_compute=prfaas_instances * n / profile.prfaas_prefill_s[offloaded].sum() if k else inf,
        link=link_bytes_per_s * n / profile.kv_bytes[offloaded].sum() if k else inf,
        pd_prefill=prefill_instances * n / profile.local_prefill_s[~offloaded].sum() if k < n else inf,
        pd_decode=decode_instances * profile.decode_rps,
        prefill_instances=prefill_instances, decode_instances=decode_instances)


def choose_threshold(profile: RequestProfile, *, prfaas_instances: int, prefill_instances: int,
                     decode_instances: int, link_bytes_per_s: float) -> Capacity:
    """The threshold t maximising Λ_max for a fixed local split, over every distinct sample length and
    "never offload" (exact: Λ only changes at sample lengths). Ties go to the highest t (least egress).

    A router calls this with the link bandwidth it measures: when the link saturates the link term
    binds, and the returned t rises (the offload share falls) until the offloaded KV fits the link."""
    for name, v in (("prfaas_instances", prfaas_instances), ("prefill_instances", prefill_instances),
                    ("decode_instances", decode_instances)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not link_bytes_per_s >= 0:
        raise ValueError(f"link_bytes_per_s must be >= 0, got {link_bytes_per_s}")
    thresholds, (prfaas, link, local) = _sweep(profile, prfaas_instances, prefill_instances, link_bytes_per_s)
    lam = np.minimum(np.minimum(np.minimum(prfaas, link), local), decode_instances * profile.decode_rps)
    best = len(lam) - 1 - int(np.argmax(lam[::-1]))  # the last maximum: highest t
    return capacity(profile, thresholds[best], prfaas_instances=prfaas_instances,
                    prefill_instances=prefill_instances, decode_instances=decode_instances,
                    link_bytes_per_s=link_bytes_per_s)


def choose_split(profile: RequestProfile, *, prfaas_instances: int, local_instances: int,
                 link_bytes_per_s: float) -> Capacity:
    """Grid search over the local cluster's prefill:decode split (prefill_instances + decode_instances
    = local_instances, at least one decode instance) and, for each, `choose_threshold`. Returns the best
    Capacity (ties: fewer prefill instances, then the highest t)."""
    if local_instances < 1:
        raise ValueError(f"local_instances must be >= 1 (decode runs locally), got {local_instances}")
    best = None
    for prefill in range(local_instances):
        c = choose_threshold(profile, prfaas_instances=prfaas_instances, prefill_instances=prefill,
                             decode_instances=local_instances - prefill, link_bytes_per_s=link_bytes_per_s)
        if best is None or c.throughput > best.throughput:
            best = c
    return best
