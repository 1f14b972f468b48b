"""Serving metrics of a run: latency percentiles, throughput, SLO attainment, expert traffic.

The JSON layout is a stable interface for scripts and notebooks:
    {"model", "hardware", "policy", "workload", "rate", "seed", ..., "metrics": {name: value}}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.engine.request import Request

# Every run reports these (seconds, bytes, joules); None when a run cannot measure one.
METRIC_NAMES = (
    "num_requests", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tbt_mean_s", "tbt_p50_s", "tbt_p90_s", "tbt_p99_s", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s",
    "requests_per_s", "output_tokens_per_s", "slo_attainment",
    "expert_bytes_total", "expert_bytes_per_token", "energy_total_j", "energy_per_token_j",
    "num_iterations", "iteration_mean_s", "num_preemptions", "num_compilations", "duration_s",
    # expert offload runs only (moejax.offload): per-layer detail in the result's "offload" object
    "offload_hit_rate", "offload_prefetch_precision", "offload_prefetch_recall", "offload_bytes_h2d",
    "offload_stall_s",
)


@dataclass(frozen=True)
class SLO:
    """A request meets its SLO when TTFT <= ttft_s and its mean time between tokens <= tbt_s
    (DistServe's definition: attainment = share of requests meeting both)."""

    ttft_s: float = 2.0
    tbt_s: float = 0.1


@dataclass
class StepRecord:
    time: float  # clock after the step
    elapsed_s: float
    num_tokens: int
    num_prefill_tokens: int
    expert_bytes: float
    energy_j: float


def _pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(requests: list[Request], steps: list[StepRecord], slo: SLO = SLO()) -> dict:
    done = [r for r in requests if r.finish_reason in ("stop", "length")]
    ttft = [r.first_token_time - r.arrival_time for r in done]
    gaps = [np.diff(r.token_times) for r in done]
    tbt = np.concatenate(gaps) if gaps else np.array([])
    e2e = [r.finish_time - r.arrival_time for r in done]
    start = min((r.arrival_time for r in done), default=0.0)
    end = max((r.finish_time for r in done), default=0.0)
    duration = max(end - start, 1e-12)
    out_tokens = sum(r.num_output_tokens for r in done)
    served_tokens = sum(r.num_tokens for r in done)
    met = [t <= slo.ttft_s and (len(g) == 0 or g.mean() <= slo.tbt_s) for t, g in zip(ttft, gaps)]
    expert_bytes = float(sum(s.expert_bytes for s in steps))
    energy = float(sum(s.energy_j for s in steps))
    return {
        "num_requests": len(done),
        "ttft_mean_s": _mean(ttft), "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "tbt_mean_s": _mean(tbt), "tbt_p50_s": _pct(tbt, 50), "tbt_p90_s": _pct(tbt, 90), "tbt_p99_s": _pct(tbt, 99),
        "e2e_mean_s": _mean(e2e), "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
        "requests_per_s": len(done) / duration, "output_tokens_per_s": out_tokens / duration,
        "slo_attainment": _mean(met),
        "expert_bytes_total": expert_bytes,
        "expert_bytes_per_token": expert_bytes / served_tokens if served_tokens else None,
        "energy_total_j": energy if energy else None,
        "energy_per_token_j": energy / served_tokens if energy and served_tokens else None,
        "num_iterations": len(steps), "iteration_mean_s": _mean([s.elapsed_s for s in steps]),
        "num_preemptions": sum(r.num_preemptions for r in requests),
        "duration_s": duration,
    }


# --- presentation -------------------------------------------------------------------------------------

def _fmt(name: str, value) -> str:
    if value is None:
        return "—"
    if name.startswith("num_"):
        return f"{int(value)}"
    if name.endswith("_per_s"):
        return f"{value:,.4g}/s"
    if name.endswith("_s"):
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:,.3g} s"
    if name.endswith("bytes_total") or name.endswith("bytes_h2d"):
        return f"{value / 1e9:,.4g} GB"
    if name.endswith("bytes_per_token"):
        return f"{value / 1e6:,.4g} MB"
    if name.endswith("per_token_j"):
        return f"{value * 1e3:.4g} mJ"
    if name.endswith("_j"):
        return f"{value:,.4g} J"
    return f"{value:.3g}"


def metrics_table(runs: dict[str, dict], title: str = "", ratio_to: str | None = None):
    """A rich Table: one row per metric, one column per run (+ ratio columns vs `ratio_to`)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in runs:
        table.add_column(name, justify="right")
    others = [n for n in runs if ratio_to and n != ratio_to]
    for n in others:
        table.add_column(f"{n}/{ratio_to}", justify="right")
    for m in METRIC_NAMES:
        values = [runs[n]["metrics"].get(m) for n in runs]
        if all(v is None for v in values):
            continue
        row = [m] + [_fmt(m, v) for v in values]
        for n in others:
            a, b = runs[n]["metrics"].get(m), runs[ratio_to]["metrics"].get(m)
            row.append(f"{a / b:.3f}" if a is not None and b else "—")
        table.add_row(*row)
    return table
