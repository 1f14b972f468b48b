"""Layered vs chunked prefill in simulation: the paper's setting, our figures beside theirs.

    .venv/bin/python benchmarks/layered_prefill_sim.py [--requests N]
    -> benchmarks/layered_prefill_sim.json, benchmarks/layered_prefill_sim_tables.md

Everything is the engine with a SimExecutor (same scheduler and policies as real runs) on a 2xH100
(TP=2) cost model, Qwen3-30B-A3B / GPT-OSS-20B / Qwen3-8B, Poisson arrivals, `correlated` routing
(calibrated to ~86% of 128 experts at 128 tokens, the paper's measurement). Workloads: arXiv
summarisation and openchat ShareGPT-4 (the Sarathi-Serve traces the paper serves), plus classic short
ShareGPT chat as a contrast. Two cost models:

  roofline    datasheet peaks x achieved-efficiency constants (moejax/sim/calibration.json default)
  paper-fit   the same with its two constants (roofline scale, per-kernel overhead) fitted so that
              *chunked* prefill reproduces the paper's Qwen3-30B-A3B arXiv point at 1.3 req/s
              (mean TTFT 2.80 s, end-to-end 9.4 s); layered is then a prediction, not a fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from moejax.engine.metrics import SLO
from moejax.runs import run
from moejax.sim.cost_model import Calibration

HERE = Path(__file__).resolve().parent
HW = "h100x2"
PAPER = {  # reported in arXiv 2510.08055 (Lee et al., Layered Prefill), Qwen3-30B-A3B on 2xH100 TP=2
    "arxiv@1.3": {"ttft_mean_s": {"chunked": 2.80, "layered": 1.24}, "e2e_mean_s": {"chunked": 9.4, "layered": 5.5}},
    "expert_traffic_change": {"arxiv": -0.39, "sharegpt4": -0.12},
    "energy_per_token_change": {"arxiv": -0.22, "sharegpt4": -0.20},
    "slo_rate_gain": "+14% .. +45%",
    "dense_qwen3_8b_ttft": {"chunked": 0.955, "layered": 1.45},
    "gpt_oss_20b_ttft_reduction": "up to 70%",
}
KEYS = ("ttft_mean_s", "ttft_p99_s", "tbt_mean_s", "tbt_p99_s", "e2e_mean_s", "expert_bytes_total", "energy_per_token_j",
        "slo_attainment", "requests_per_s")


def sim(model: str, policy: str, workload: str, rate: float, n: int, cal: Calibration | None, seed: int = 0,
        slo: SLO = SLO(), **options) -> dict:
    res = run(model, hardware=HW, policy=policy, workload=workload, rate=rate, num_requests=n, seed=seed,
              calibration=cal, slo=slo, **options)
    return {k: res["metrics"][k] for k in KEYS}


def fit_to_paper(n: int) -> tuple[Calibration, list]:
    """Grid search of (scale, kernel overhead) so chunked matches the paper's TTFT and e2e at 1.3 req/s."""
    target = PAPER["arxiv@1.3"]
    tried = []
    for scale, overhead_us in itertools.product((1.0, 1.5, 2.0, 3.0, 4.0), (3, 10, 20, 30, 40, 50)):
        cal = Calibration(scale, overhead_us * 1e-6, "fitted to the paper's chunked arXiv point")
        m = sim("qwen3-30b-a3b", "chunked", "arxiv", 1.3, n, cal)
        err = math.log(m["ttft_mean_s"] / target["ttft_mean_s"]["chunked"]) ** 2 + \
            math.log(m["e2e_mean_s"] / target["e2e_mean_s"]["chunked"]) ** 2
        tried.append({"scale": scale, "kernel_overhead_us": overhead_us, "ttft_mean_s": m["ttft_mean_s"],
                      "e2e_mean_s": m["e2e_mean_s"], "log_error": err})
        print(f"  fit scale={scale} overhead={overhead_us}us: TTFT {m['ttft_mean_s']:.2f} s, e2e {m['e2e_mean_s']:.2f} s")
    best = min(tried, key=lambda t: t["log_error"])
    return Calibration(best["scale"], best["kernel_overhead_us"] * 1e-6, "fitted to the paper's chunked arXiv point"), tried


def max_rate(model, policy, workload, rates, n, cal, slo, target=0.9):
    curve = {r: sim(model, policy, workload, r, n, cal, slo=slo)["slo_attainment"] for r in rates}
    ok = [r for r, a in curve.items() if a is not None and a >= target]
    return (max(ok) if ok else None), curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    n = args.requests
    t0 = time.time()
    out: dict = {"hardware": HW, "requests": n, "routing": "correlated", "paper": PAPER}

    print("1. fitting the cost model's two constants to the paper's chunked point")
    paper_fit, tried = fit_to_paper(max(60, n // 2))
    out["paper_fit"] = {"scale": paper_fit.scale, "kernel_overhead_s": paper_fit.kernel_overhead_s, "grid": tried}
    models = {"roofline": None, "paper-fit": paper_fit}

    print("2. headline: Qwen3-30B-A3B, arXiv @ 1.3 req/s, ShareGPT-4 @ 2 req/s, short ShareGPT @ 8 req/s")
    out["headline"] = {}
    for cm, cal in models.items():
        for workload, rate in (("arxiv", 1.3), ("sharegpt4", 2.0), ("sharegpt", 8.0)):
            for policy in ("chunked", "layered", "layered-adaptive"):
                key = f"{cm}/{workload}@{rate}/{policy}"
                slo = SLO(ttft_s=2.0, tbt_s=0.1 if cal is None else 0.2)
                out["headline"][key] = sim("qwen3-30b-a3b", policy, workload, rate, n, cal, slo=slo)
                print(f"  {key}: {out['headline'][key]}")

    print("3. max SLO-compliant rate (paper-fit cost model), SLO = 5x the chunked system's unloaded latency")
    out["slo_rates"] = {}
    for workload, rates in (("arxiv", [0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]),
                            ("sharegpt4", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])):
        unloaded = sim("qwen3-30b-a3b", "chunked", workload, rates[0] / 4, max(40, n // 4), paper_fit)
        slo = SLO(ttft_s=5 * unloaded["ttft_mean_s"], tbt_s=5 * unloaded["tbt_mean_s"])
        entry = {"slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}}
        for policy in ("chunked", "layered"):
            best, curve = max_rate("qwen3-30b-a3b", policy, workload, rates, n, paper_fit, slo)
            entry[policy] = {"max_rate": best, "attainment": curve}
            print(f"  {workload} {policy}: max rate {best} ({curve})")
        out["slo_rates"][workload] = entry

    print("4. other models (roofline and paper-fit constants)")
    out["models"] = {}
    for cm, cal in models.items():
        for model, workload, rate in (("gpt-oss-20b", "arxiv", 1.3), ("qwen3-8b", "arxiv", 1.3)):
            for policy in ("chunked", "layered"):
                key = f"{cm}/{model}/{workload}@{rate}/{policy}"
                out["models"][key] = sim(model, policy, workload, rate, n, cal)
                print(f"  {key}: {out['models'][key]}")

    print("5. variants: cohorts in flight, chunk 256")
    out["variants"] = {}
    for label, policy, opts in (("chunked@256", "chunked@256", {}), ("layered, 2 cohorts", "layered",
                                                                    {"cohorts_in_flight": 2})):
        for cm, cal in models.items():
            key = f"{cm}/arxiv@1.3/{label}"
            out["variants"][key] = sim("qwen3-30b-a3b", policy, "arxiv", 1.3, n, cal, **opts)
            print(f"  {key}: {out['variants'][key]}")

    out["seconds"] = time.time() - t0
    (HERE / "layered_prefill_sim.json").write_text(json.dumps(out, indent=1))
    (HERE / "layered_prefill_sim_tables.md").write_text(tables(out))
    print(f"done in {out['seconds']:.0f} s")


def tables(out: dict) -> str:
    """Markdown tables of the results (every number here comes from the JSON next to it)."""
    h, lines = out["headline"], []

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "—"

    lines += ["## Qwen3-30B-A3B on 2xH100 (TP=2): ours beside the paper", "",
              f"Paper-fit constants: roofline scale {out['paper_fit']['scale']}, "
              f"{out['paper_fit']['kernel_overhead_s'] * 1e6:.0f} µs per kernel.", "",
              "| cost model | workload | policy | mean TTFT | p99 TBT | mean e2e | expert traffic | energy/token |",
              "|---|---|---|---|---|---|---|---|"]
    for key, m in h.items():
        cm, wl, policy = key.split("/")
        lines.append(f"| {cm} | {wl} | {policy} | {m['ttft_mean_s']:.2f} s | {1e3 * m['tbt_p99_s']:.0f} ms | "
                     f"{m['e2e_mean_s']:.2f} s | {m['expert_bytes_total'] / 1e12:.1f} TB | "
                     f"{1e3 * m['energy_per_token_j']:.1f} mJ |")
    lines += ["", "Layered / chunked ratios (ours) and the paper's:", "",
              "| cost model | workload | TTFT | e2e | expert traffic | energy/token |", "|---|---|---|---|---|---|"]
    for cm in ("roofline", "paper-fit"):
        for wl in ("arxiv@1.3", "sharegpt4@2.0", "sharegpt@8.0"):
            c, lay = h[f"{cm}/{wl}/chunked"], h[f"{cm}/{wl}/layered"]
            lines.append(f"| {cm} | {wl} | {ratio(lay['ttft_mean_s'], c['ttft_mean_s'])} | "
                         f"{ratio(lay['e2e_mean_s'], c['e2e_mean_s'])} | "
                         f"{ratio(lay['expert_bytes_total'], c['expert_bytes_total'])} | "
                         f"{ratio(lay['energy_per_token_j'], c['energy_per_token_j'])} |")
    p = out["paper"]
    lines += [f"| paper | arxiv@1.3 | {p['arxiv@1.3']['ttft_mean_s']['layered'] / p['arxiv@1.3']['ttft_mean_s']['chunked']:.2f} | "
              f"{p['arxiv@1.3']['e2e_mean_s']['layered'] / p['arxiv@1.3']['e2e_mean_s']['chunked']:.2f} | "
              f"{1 + p['expert_traffic_change']['arxiv']:.2f} | {1 + p['energy_per_token_change']['arxiv']:.2f} |",
              f"| paper | sharegpt4 | — | — | {1 + p['expert_traffic_change']['sharegpt4']:.2f} | "
              f"{1 + p['energy_per_token_change']['sharegpt4']:.2f} |", ""]
    lines += ["## Max request rate with >= 90% SLO attainment (paper-fit cost model)", "",
              "| workload | SLO (TTFT, mean TBT) | chunked | layered | gain |", "|---|---|---|---|---|"]
    for wl, e in out["slo_rates"].items():
        a, b = e["chunked"]["max_rate"], e["layered"]["max_rate"]
        gain = f"{(b / a - 1) * 100:+.0f}%" if a and b else "—"
        lines.append(f"| {wl} | {e['slo']['ttft_s']:.2f} s, {1e3 * e['slo']['tbt_s']:.0f} ms | {a} | {b} | {gain} |")
    lines += ["", f"Paper: {p['slo_rate_gain']}.", "", "## Other models (arXiv @ 1.3 req/s)", "",
              "| cost model | model | chunked TTFT | layered TTFT | ratio | expert traffic ratio |", "|---|---|---|---|---|---|"]
    for cm in ("roofline", "paper-fit"):
        for model in ("gpt-oss-20b", "qwen3-8b"):
            c, lay = out["models"][f"{cm}/{model}/arxiv@1.3/chunked"], out["models"][f"{cm}/{model}/arxiv@1.3/layered"]
            lines.append(f"| {cm} | {model} | {c['ttft_mean_s']:.2f} s | {lay['ttft_mean_s']:.2f} s | "
                         f"{ratio(lay['ttft_mean_s'], c['ttft_mean_s'])} | "
                         f"{ratio(lay['expert_bytes_total'], c['expert_bytes_total'])} |")
    lines += ["", f"Paper: GPT-OSS-20B TTFT {p['gpt_oss_20b_ttft_reduction']} lower; dense Qwen3-8B TTFT "
              f"{p['dense_qwen3_8b_ttft']['chunked']} -> {p['dense_qwen3_8b_ttft']['layered']} s (slower).", "",
              "## Variants (Qwen3-30B-A3B, arXiv @ 1.3 req/s)", "",
              "| cost model | variant | mean TTFT | p99 TBT | mean e2e | expert traffic |", "|---|---|---|---|---|---|"]
    for key, m in out["variants"].items():
        cm, _, label = key.split("/")
        lines.append(f"| {cm} | {label} | {m['ttft_mean_s']:.2f} s | {1e3 * m['tbt_p99_s']:.0f} ms | "
                     f"{m['e2e_mean_s']:.2f} s | {m['expert_bytes_total'] / 1e12:.1f} TB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
