"""PrfaaS (arXiv 2604.15039) at the paper's scale, simulated: the Φ_kv table and the deployment table.

    .venv/bin/python benchmarks/prfaas_sim.py        # writes benchmarks/prfaas_sim.json and prfaas_sim.md

Φ_kv: KV bytes a 32K-token prefill leaves behind (moejax.sim.pd_models: full-attention KV, sliding
windows, linear layers' recurrent state) over its prefill time on 8×H200 (the cost model), per model.
Deployment: 4 PrfaaS instances of 8×H200 (32 GPUs), a local cluster of 8 instances of 8×H20 (64 GPUs),
one 100 Gbps link, the `longctx` workload (log-normal prompts μ 9.90 σ 1.0 in [128, 128K], 1,024 output
tokens). The throughput model picks t and the local split on one sample (seed 0); every system is then
simulated on a fresh stream (seed 1) at one common arrival rate. Then Λ against t, the choice against
the link's bandwidth, hybrid against dense-attention models.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np

from moejax.pd.throughput_model import capacity, choose_split
from moejax.sim.hardware import get_hardware, get_link
from moejax.sim.pd import Deployment, capacity_summary, prefill_seconds, profile, run_deployment
from moejax.sim.pd_models import PD_MODELS, get_pd_model
from moejax.sim.workloads import make_workload

OUT = Path(__file__).with_suffix(".json")
PHI_TOKENS = 32768
MODEL = "mimo-v2-flash"  # the deployment's model: a hybrid whose bf16 weights fit one 8×H20 instance
NUM_REQUESTS = 2000
LOAD = 0.85  # the common arrival rate: this share of the homogeneous 64-GPU cluster's capacity
BANDWIDTHS_GBPS = (1, 3, 10, 25, 50, 100, 200, 400)
PAPER = {"threshold": 19_400, "prfaas_rps": 3.24, "homogeneous_rps": 2.11, "naive_rps": 2.45,
         "ttft_p90_homogeneous_s": 9.73, "ttft_p90_prfaas_s": 3.51, "ttft_mean_change": -0.50,
         "egress_gbps": 13, "offload_share": 0.5}
PAPER["egress_gb_per_request"] = PAPER["egress_gbps"] / 8 / PAPER["prfaas_rps"]


def phi_kv_table() -> dict:
    hw = get_hardware("h200x8")
    rows = {}
    for name, m in PD_MODELS.items():
        kv = int(m.kv_bytes(PHI_TOKENS))
        state = sum(p.state_bytes or 0 for p in m.parts)
        seconds = float(prefill_seconds(m, hw, [PHI_TOKENS])[0])
        phi = 8 * kv / seconds / 1e9
        rows[name] = {"layout": m.layout, "layers": m.num_layers, "full_attention_layers": m.full_attention_layers,
                      "kv_bytes": kv, "fixed_state_bytes": state, "prefill_s": seconds, "phi_kv_gbps": phi,
                      "paper_phi_kv_gbps": m.paper_phi_kv_gbps, "ratio_to_paper": phi / m.paper_phi_kv_gbps,
                      "paper_implied_prefill_s": 8 * kv / (m.paper_phi_kv_gbps * 1e9), "notes": m.notes}
    return rows


def deployments(model: str, link_gbps: float = 100) -> dict[str, Deployment]:
    m, h200, h20 = get_pd_model(model), get_hardware("h200x8"), get_hardware("h20x8")
    link = get_link("eth-100g")
    prfaas = Deployment(m, h200, 4, h20, 8, link).with_link_gbps(link_gbps)
    return {"prfaas": prfaas, "homogeneous_64": Deployment(m, h200, 0, h20, 8, link),
            "homogeneous_96": Deployment(m, h200, 0, h20, 12, link)}


def deployment_table(model: str) -> dict:
    deps = deployments(model)
    planned = {k: run_deployment(d, num_requests=200)["plan"]["throughput_rps"] for k, d in deps.items()}
    rate = LOAD * planned["homogeneous_64"]
    run = dict(num_requests=NUM_REQUESTS, rate=rate, requests=False)
    rows = {"prfaas": run_deployment(deps["prfaas"], **run),
            "homogeneous_64": run_deployment(deps["homogeneous_64"], **run),
            "homogeneous_96": run_deployment(deps["homogeneous_96"], **run),
            "naive_heterogeneous": run_deployment(deps["prfaas"], threshold=0, prefill_instances=0, **run)}
    base = rows["homogeneous_64"]["plan"]["throughput_rps"]
    for r in rows.values():
        plan = r["plan"]
        r["ratio_to_homogeneous_64"] = plan["throughput_rps"] / base
        r["egress_gb_per_request"] = plan["egress_gbps_at_capacity"] / 8 / plan["throughput_rps"]
    h200, h20 = get_hardware("h200x8"), get_hardware("h20x8")
    prfaas_flops = deps["prfaas"].prfaas_instances * h200.count * h200.device.peak_flops
    return {"model": model, "common_rate_rps": rate, "systems": rows,
            "prfaas_over_local_peak_flops": prfaas_flops / (deps["prfaas"].local_instances * h20.count * h20.device.peak_flops),
            "capacity_over_paper": rows["prfaas"]["plan"]["throughput_rps"] / PAPER["prfaas_rps"]}


def at_paper_prefill_speed(model: str) -> dict:
    """The throughput model with every prefill slowed by (our Φ_kv / the paper's) for `model`: what the
    deployment gives if prefill ran as fast as the paper's Φ_kv implies (decode unchanged)."""
    slow = phi_kv_table()[model]["ratio_to_paper"]
    dep = deployments(model)["prfaas"]
    prof, _ = profile(dep, make_workload("longctx", 1.0, NUM_REQUESTS, seed=0))
    prof = replace(prof, prfaas_prefill_s=prof.prfaas_prefill_s * slow, local_prefill_s=prof.local_prefill_s * slow)
    link = dep.link_bytes_per_s
    rows = {"prfaas": choose_split(prof, prfaas_instances=4, local_instances=8, link_bytes_per_s=link),
            "homogeneous_64": choose_split(prof, prfaas_instances=0, local_instances=8, link_bytes_per_s=link),
            "naive_heterogeneous": capacity(prof, 0, prfaas_instances=4, prefill_instances=0, decode_instances=8,
                                            link_bytes_per_s=link)}
    return {"prefill_slowdown": slow, **{k: capacity_summary(c, prof) for k, c in rows.items()}}


def threshold_sweep(model: str) -> dict:
    """Λ and its terms against t, at the split the throughput model chose."""
    dep = deployments(model)["prfaas"]
    prof, _ = profile(dep, make_workload("longctx", 1.0, NUM_REQUESTS, seed=0))
    chosen = run_deployment(dep, num_requests=NUM_REQUESTS)["plan"]
    split = dict(prfaas_instances=dep.prfaas_instances, prefill_instances=chosen["prefill_instances"],
                 decode_instances=chosen["decode_instances"], link_bytes_per_s=dep.link_bytes_per_s)
    rows = []
    for t in np.geomspace(256, 131072, 28).round():
        c = capacity(prof, t, **split)
        rows.append({"threshold": float(t), "offload_share": c.offload_share, "throughput_rps": c.throughput,
                     "bound": c.bound})
    return {"split": [split["prefill_instances"], split["decode_instances"]], "rows": rows}


def bandwidth_sweep(model: str) -> list[dict]:
    rows = []
    for gbps in BANDWIDTHS_GBPS:
        plan = run_deployment(deployments(model, gbps)["prfaas"], num_requests=NUM_REQUESTS)["plan"]
        rows.append({"link_gbps": gbps, **{k: plan[k] for k in ("threshold", "offload_share", "throughput_rps",
                                                                 "bound", "prefill_instances", "egress_gbps_at_capacity")}})
    return rows


def hybrid_vs_dense() -> dict:
    """Every model whose bf16 weights fit one 8×H20 instance, on the same deployment."""
    out = {}
    free = get_hardware("h20x8").memory_bytes * 0.9
    for name, m in PD_MODELS.items():
        if m.weight_bytes() >= free:
            continue
        deps = deployments(name)
        prfaas = run_deployment(deps["prfaas"], num_requests=NUM_REQUESTS)["plan"]
        homog = run_deployment(deps["homogeneous_64"], num_requests=NUM_REQUESTS)["plan"]
        out[name] = {"layout": m.layout, "prfaas": prfaas, "homogeneous_64_rps": homog["throughput_rps"],
                     "ratio": prfaas["throughput_rps"] / homog["throughput_rps"]}
    return out


def _t(x) -> str:
    return "never" if x is None else f"{x / 1000:.1f}K"


def render(r: dict) -> str:
    L = ["# PrfaaS simulated at the paper's scale",
         "",
         f"Written by `.venv/bin/python benchmarks/prfaas_sim.py` from `prfaas_sim.json` ({r['machine']}). "
         "Prefill-as-a-Service, arXiv 2604.15039 (\"Prefill-as-a-Service ...\"); its numbers as reported "
         "(shared/PAPERS.md), not re-derived.",
         "",
         "## Φ_kv: KV bytes per second of prefill, 32K tokens on 8×H200",
         "",
         "KV: what a 32K-token prefill leaves behind (full-attention KV, sliding windows, linear layers' "
         "recurrent + conv state in bf16); prefill: one 32K prompt on one 8×H200 instance (tensor parallel), "
         "moejax's roofline cost model (uncalibrated: datasheet peaks × efficiencies). Shapes: "
         "`moejax/sim/pd_models.py` (from the public HF configs as we read them; notes below).",
         "",
         "| model | layout | full-attn layers | KV at 32K (of which fixed state) | prefill (s) | Φ_kv (Gbps) | "
         "paper Φ_kv | ours / paper | prefill the paper's Φ implies for our bytes (s) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["phi_kv"].items():
        L.append(f"| {name} | {x['layout']} | {x['full_attention_layers']} / {x['layers']} | "
                 f"{x['kv_bytes'] / 1e6:,.0f} MB ({x['fixed_state_bytes'] / 1e6:,.0f} MB) | {x['prefill_s']:.2f} | "
                 f"{x['phi_kv_gbps']:.2f} | {x['paper_phi_kv_gbps']:.2f} | {x['ratio_to_paper']:.2f} | "
                 f"{x['paper_implied_prefill_s']:.2f} |")
    phi = r["phi_kv"]
    dense = [phi[k]["phi_kv_gbps"] for k in ("minimax-m2.5", "qwen3-235b-a22b")]
    hybrid = [v["phi_kv_gbps"] for k, v in phi.items() if k not in ("minimax-m2.5", "qwen3-235b-a22b")]
    L += ["",
          f"Dense-attention models need {min(dense) / max(hybrid):.1f}–{max(dense) / min(hybrid):.0f}× the link of "
          f"the hybrids here (the paper: {33.35 / 8.25:.1f}–{59.93 / 2.59:.0f}×). Our Φ_kv is higher than the "
          "paper's by the ratio column: our prefill is faster (the last column is the prefill time the paper's "
          "Φ_kv implies for our KV bytes). The roofline runs a 32K prefill at ~70% of the H200s' dense bf16 "
          "peak, attention core included: an upper bound on speed. How the paper timed its prefills our notes do "
          "not say; real 32K prefills (attention kernels, MoE dispatch, TP communication) run below such a "
          "roofline, and the gap is widest for the small-active models, where fixed costs weigh most (Kimi Linear, "
          f"3B active: ×{phi['kimi-linear-48b-a3b']['ratio_to_paper']:.1f}; Ring-2.5-1T, 63B active: "
          f"×{phi['ring-2.5-1t']['ratio_to_paper']:.1f}). KV bytes may differ too (state dtype, what the paper "
          "counts). Order, highest Φ_kv first: ours " + " > ".join(sorted(phi, key=lambda k: -phi[k]["phi_kv_gbps"]))
          + "; the paper's " + " > ".join(sorted(phi, key=lambda k: -phi[k]["paper_phi_kv_gbps"]))
          + ". Dense above hybrid and Ring-2.5-1T lowest agree; among the other hybrids the order differs, "
          "Kimi Linear moving up where our prefill is most optimistic.",
          "", "Model notes: " + "; ".join(f"**{k}**: {v['notes']}" for k, v in phi.items()) + ".",
          ""]
    d = r["deployment"]
    P = PAPER
    L += [f"## The deployment: {d['model']}, 4×(8×H200) PrfaaS + 8×(8×H20) local, one 100 Gbps link",
          "",
          f"Capacity Λ from the throughput model (t and the local prefill:decode split by grid search on "
          f"{NUM_REQUESTS} sampled prompts); TTFT, egress and link use from the event simulation of "
          f"{NUM_REQUESTS} fresh requests at one common rate, {d['common_rate_rps']:.2f} req/s "
          f"({LOAD:.0%} of the homogeneous 64-GPU cluster's Λ). Decode: the largest batch within a 50 ms step "
          f"and the H20s' KV memory ({d['systems']['prfaas']['decode']['batch']} requests, "
          f"{d['systems']['prfaas']['decode']['step_s'] * 1e3:.0f} ms steps, bound: "
          f"{d['systems']['prfaas']['decode']['bound']}).",
          "",
          "| system | Λ (req/s) | × homogeneous 64 | t | offloaded | local prefill:decode | binds | egress at Λ (Gbps) "
          "| TTFT mean (s) | TTFT P90 (s) | egress simulated (Gbps) | link use |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"prfaas": "PrfaaS (t chosen)", "homogeneous_64": "homogeneous PD, 64 H20",
             "homogeneous_96": "homogeneous PD, 96 H20 (PrfaaS's GPU count)",
             "naive_heterogeneous": "naive heterogeneous (every prefill on H200)"}
    for k, x in d["systems"].items():
        p, m = x["plan"], x["metrics"]
        L.append(f"| {names[k]} | {p['throughput_rps']:.2f} | {x['ratio_to_homogeneous_64']:.2f} | {_t(p['threshold'])} | "
                 f"{p['offload_share']:.0%} | {p['prefill_instances']}:{p['decode_instances']} | {p['bound']} | "
                 f"{p['egress_gbps_at_capacity']:.1f} | {m['ttft_mean_s']:.2f} | {m['ttft_p90_s']:.2f} | "
                 f"{m['egress_gbps']:.1f} | {m['link_utilisation']:.0%} |")
    s = d["systems"]
    ours = s["prfaas"]["plan"]
    L += [f"| paper: PrfaaS | {P['prfaas_rps']} | {P['prfaas_rps'] / P['homogeneous_rps']:.2f} | ≈ 19.4K | ≈ 50% | "
          f"– | – | 13 | −50% vs homogeneous | {P['ttft_p90_prfaas_s']} | 13 | – |",
          f"| paper: homogeneous PD | {P['homogeneous_rps']} | 1 | – | 0% | – | – | – | – | {P['ttft_p90_homogeneous_s']} | – | – |",
          f"| paper: naive heterogeneous | {P['naive_rps']} | {P['naive_rps'] / P['homogeneous_rps']:.2f} | – | 100% | "
          "– | – | – | – | – | – | – |",
          "",
          f"What agrees: the chosen t ({_t(ours['threshold'])}, {ours['offload_share']:.0%} offloaded) is close to the "
          f"paper's ≈ 19.4K (≈ 50%); the link carries about what the paper's does per served request (egress / Λ: "
          f"{s['prfaas']['egress_gb_per_request']:.2f} GB, the paper's 13 Gbps over its 3.24 req/s, if both are one operating point: "
          f"{P['egress_gb_per_request']:.2f} GB); at 100 Gbps the link does not bind for this hybrid "
          f"({ours['egress_gbps_at_capacity']:.0f} Gbps at capacity, {s['prfaas']['metrics']['link_utilisation']:.0%} "
          "busy at the common rate); PrfaaS "
          f"beats naive heterogeneous ({ours['throughput_rps'] / s['naive_heterogeneous']['plan']['throughput_rps']:.2f}× "
          f"vs the paper's {P['prfaas_rps'] / P['naive_rps']:.2f}×) and cuts P90 TTFT ({s['homogeneous_64']['metrics']['ttft_p90_s']:.2f} → "
          f"{s['prfaas']['metrics']['ttft_p90_s']:.2f} s; the paper: 9.73 → 3.51 s). What differs and why: (1) absolute "
          f"rates are {d['capacity_over_paper']:.1f}× the paper's: our roofline prefill is faster (see the Φ_kv table), and our model is "
          "MiMo-V2-Flash (15B active), the paper's case-study model is not in our notes; (2) the gain over the "
          "homogeneous cluster depends on what that cluster is: the paper's 1.54× is over a baseline we cannot "
          f"pin down; over the 64 local H20s alone PrfaaS adds 32 H200s ({d['prfaas_over_local_peak_flops']:.1f}× the "
          "64 H20s' peak FLOPs); over 96 H20s (the same GPU count) PrfaaS gives "
          f"{ours['throughput_rps'] / s['homogeneous_96']['plan']['throughput_rps']:.2f}×, the gain of putting long "
          "prefills on compute-dense GPUs; (3) TTFT is at our common "
          "rate, not the paper's (unstated) load, so only the direction and rough size compare.",
          ""]
    a = r["at_paper_prefill_speed"]
    L += [f"With every prefill {a['prefill_slowdown']:.2f}× slower (our Φ_kv over the paper's for {d['model']}: "
          "prefill as fast as the paper's profile implies; decode unchanged), the throughput model gives:",
          "",
          "| system | Λ (req/s) | t | offloaded | local prefill:decode | binds | egress at Λ (Gbps) |",
          "|---|---|---|---|---|---|---|"]
    for k in ("prfaas", "homogeneous_64", "naive_heterogeneous"):
        p = a[k]
        L.append(f"| {names[k]} | {p['throughput_rps']:.2f} | {_t(p['threshold'])} | {p['offload_share']:.0%} | "
                 f"{p['prefill_instances']}:{p['decode_instances']} | {p['bound']} | {p['egress_gbps_at_capacity']:.1f} |")
    L += ["",
          f"PrfaaS / homogeneous: {a['prfaas']['throughput_rps'] / a['homogeneous_64']['throughput_rps']:.2f}×, "
          f"PrfaaS / naive: {a['prfaas']['throughput_rps'] / a['naive_heterogeneous']['throughput_rps']:.2f}× "
          f"(the paper: {P['prfaas_rps'] / P['homogeneous_rps']:.2f}× and {P['prfaas_rps'] / P['naive_rps']:.2f}×): "
          "slower prefill moves the absolute rates towards the paper's; the ratios depend on the baseline and "
          "on which term binds.",
          "",
          f"## Λ against the threshold (split {r['threshold_sweep']['split'][0]}:{r['threshold_sweep']['split'][1]})",
          "",
          "| t | offloaded | Λ (req/s) | binds |", "|---|---|---|---|"]
    for x in r["threshold_sweep"]["rows"][::3]:
        L.append(f"| {_t(x['threshold'])} | {x['offload_share']:.0%} | {x['throughput_rps']:.2f} | {x['bound']} |")
    L += ["", "Low t floods the PrfaaS cluster (its compute, or the link, binds); high t leaves long prompts on "
          "the H20s (local prefill binds); the optimum balances them.",
          "", "## The choice against the link's bandwidth: hybrid vs dense attention",
          "", "| link (Gbps) | " + " | ".join(f"{m}: t, offloaded, Λ, binds" for m in r["bandwidth_sweep"]) + " |",
          "|---|" + "---|" * len(r["bandwidth_sweep"])]
    for i, gbps in enumerate(BANDWIDTHS_GBPS):
        cells = []
        for rows in r["bandwidth_sweep"].values():
            x = rows[i]
            cells.append(f"{_t(x['threshold'])}, {x['offload_share']:.0%}, {x['throughput_rps']:.2f}, {x['bound']}")
        L.append(f"| {gbps} | " + " | ".join(cells) + " |")
    L += ["", "As the link narrows the chosen t rises and the offload share falls (the link term binds): what the "
          "router does when it measures a saturated link. A dense-attention model needs roughly an order of "
          "magnitude more bandwidth for the same offload share.",
          "", "## Every model that fits one 8×H20 instance, on the same deployment (100 Gbps)", "",
          "| model | layout | t | offloaded | Λ PrfaaS | Λ homogeneous 64 | × | binds | egress at Λ (Gbps) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["hybrid_vs_dense"].items():
        p = x["prfaas"]
        L.append(f"| {name} | {x['layout']} | {_t(p['threshold'])} | {p['offload_share']:.0%} | {p['throughput_rps']:.2f} | "
                 f"{x['homogeneous_64_rps']:.2f} | {x['ratio']:.2f} | {p['bound']} | {p['egress_gbps_at_capacity']:.1f} |")
    L += ["", "Qwen3.5-397B (bf16 789 GB) and Ring-2.5-1T (2 TB) do not fit 8×H20 in bf16 (moejax prices bf16 only)."]
    return "\n".join(L) + "\n"


def main() -> None:
    results = {"machine": f"simulated (moejax cost model), computed on {platform.machine()} CPU, {os.cpu_count()} cores",
               "paper": PAPER, "phi_kv": phi_kv_table(), "deployment": deployment_table(MODEL),
               "at_paper_prefill_speed": at_paper_prefill_speed(MODEL),
               "threshold_sweep": threshold_sweep(MODEL),
               "bandwidth_sweep": {m: bandwidth_sweep(m) for m in (MODEL, "minimax-m2.5")},
               "hybrid_vs_dense": hybrid_vs_dense()}
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
