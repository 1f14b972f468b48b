"""Each pool's busy intervals in one decode step per micro-batch count m (the benchmarks of
moejax.disagg): one panel per m, one row per pool."""

from __future__ import annotations

from pathlib import Path


def plot_pool_spans(spans: dict[int, dict[str, list[tuple[float, float]]]], path: Path, transport: str) -> None:
    """spans: m -> pool -> (start, end) seconds since the step's first dispatch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(spans), 1, figsize=(10, 1.6 * len(spans)), sharex=True, squeeze=False)
    colours = {"attention": "tab:blue", "experts": "tab:orange", "exchange": "tab:gray"}
    for ax, (m, pools) in zip(axes[:, 0], spans.items()):
        for row, (pool, s) in enumerate(pools.items()):
            ax.broken_barh([(a * 1e3, (b - a) * 1e3) for a, b in s], (row - 0.4, 0.8), color=colours[pool])
        ax.set_yticks(range(len(pools)), list(pools))
        ax.set_title(f"one decode step, m = {m} ({transport})", fontsize=9)
    axes[-1, 0].set_xlabel("ms since the step's first dispatch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
