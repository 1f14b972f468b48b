"""This tree against an earlier revision, side by side in one invocation: the decode step of the tiny
model (wall time of a decode-only iteration over the decode steps it ran) and the scheduler's host
overhead at 256 running requests.

    .venv/bin/python benchmarks/overhead_vs_revision.py --base 29507a1   # writes overhead_vs_revision.json
    ... --host-only   # the host overhead alone, printed, no JSON written (quick checks)

The base revision is checked out into a temporary git worktree; each round runs a probe in a fresh
process per tree (same interpreter, same venv), alternating base / this tree so that machine load
hits both alike. The probe uses only what both revisions have: `LLM`, `engine.step()`, and each
tree's own benchmarks/host_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Imports moejax from TREE (its package-dir mapping: moejax/, kernels/, meshes/), then measures.
PROBE = r'''
import importlib.util, json, os, statistics, sys, time
from pathlib import Path
TREE, DECODE = Path(sys.argv[1]), sys.argv[2] == "decode"
ROOTS = {"moejax": TREE / "moejax", "moejax.kernels": TREE / "kernels", "moejax.meshes": TREE / "meshes"}

class TreeFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in ROOTS:
            return importlib.util.spec_from_file_location(name, ROOTS[name] / "__init__.py",
                                                          submodule_search_locations=[str(ROOTS[name])])
sys.meta_path.insert(0, TreeFinder)
sys.path.insert(0, str(TREE / "benchmarks"))

import jax
import moejax
from moejax import LLM, SamplingParams
assert Path(moejax.__file__).is_relative_to(TREE), moejax.__file__

BATCH, PROMPT, NEW = 16, 32, 64
steps = []
if DECODE:
    llm = LLM("tiny-qwen3-moe", max_model_len=PROMPT + NEW, max_num_seqs=BATCH)
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    prompts = [[(7 * i + 13 * j) % 500 + 1 for j in range(PROMPT)] for i in range(BATCH)]
    for _ in range(2):  # warm-up: every shape compiled
        llm.generate(prompts, params)
    llm.add(prompts, params)
    while llm.engine.has_unfinished:
        t0 = time.perf_counter()
        out = llm.engine.step()
        if out.plan.num_prefill_tokens == 0 and out.plan.num_tokens == BATCH:
            # per decode step: a tree with multi-step decode runs up to `decode_steps` of them per iteration
            steps.append((time.perf_counter() - t0) / getattr(out.plan, "decode_steps", 1))

import host_overhead
host_overhead.main()
host = json.loads((TREE / "benchmarks" / "host_overhead.json").read_text())
print(json.dumps({"decode_step_ms_median": 1e3 * statistics.median(steps) if DECODE else None,
                  "decode_steps": len(steps),
                  "host_ms": {p: host[p]["schedule_plus_update_ms_mean"] for p in ("chunked", "layered")}}))
'''


def probe(tree: Path, decode: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tree), "decode" if decode else "host"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host-only", action="store_true", help="skip the decode step (no model is built)")
    args = ap.parse_args()
    base_sha = subprocess.run(["git", "rev-parse", args.base], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "moejax", "kernels", "meshes"],
                                capture_output=True, text=True, cwd=ROOT).stdout.strip())
    runs: dict[str, list[dict]] = {"base": [], "tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], check=True, cwd=ROOT,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                for name, tree in (("base", base_tree), ("tree", ROOT)):
                    runs[name].append(probe(tree, not args.host_only))
                    print(f"round {r + 1} {name:4s} {runs[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)

    def median(name: str, key) -> float:
        return float(np.median([key(run) for run in runs[name]]))

    summary = {}
    metrics = [("host_chunked_ms", lambda r: r["host_ms"]["chunked"]),
               ("host_layered_ms", lambda r: r["host_ms"]["layered"])]
    if not args.host_only:
        metrics.insert(0, ("decode_step_ms", lambda r: r["decode_step_ms_median"]))
    for metric, key in metrics:
        base, tree = median("base", key), median("tree", key)
        summary[metric] = {"base": base, "tree": tree, "tree_over_base": tree / base}
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "load_average": os.getloadavg(),
              "base": base_sha, "tree": head_sha + (" + uncommitted changes" if dirty else ""),
              "rounds": args.rounds, "summary": summary, "runs": runs}
    if not args.host_only:
        HERE.joinpath("overhead_vs_revision.json").write_text(json.dumps(result, indent=1))
    for metric, v in summary.items():
        print(f"{metric:16s} base {v['base']:.3f}  tree {v['tree']:.3f}  tree/base {v['tree_over_base']:.2f}")


if __name__ == "__main__":
    main()
