"""`moejax generate | ...` — the command line."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from moejax.config import DEFAULT_MODEL

SERVE_MODEL = "stdlib-moe"  # a shipped trained checkpoint with a tokenizer and chat template: real text

# Prompts for the embedded default model (it has no tokenizer): four lengths, fixed ids.
DEFAULT_PROMPTS = [[(7 * i + 3 * n) % 500 + 1 for i in range(n)] for n in (5, 12, 23, 40)]


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids {text!r}: expected comma-separated integers") from None


def _add_model_args(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default,
                   help=f"a preset or shipped checkpoint name, e.g. stdlib-moe (default {default})")
    p.add_argument("--checkpoint", help="a HF or moejax checkpoint directory (overrides --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute/param dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0)


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moejax import LLM, SamplingParams

    offload = _offload(args)
    llm = LLM(args.checkpoint or args.model, dtype=args.dtype, seed=args.seed, layout=args.layout, offload=offload)
    prompts: list = [*(args.prompt or []), *(args.prompt_token_ids or [])]
    if not prompts:
        if llm.tokenizer is not None:
            prompts = ["The quick brown fox", "Mixture-of-experts models route each token"]
        else:
            prompts = DEFAULT_PROMPTS
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    outputs = llm.generate(prompts, params)
    stats = llm.last_stats
    offload = llm.engine.executor.offload_summary() if offload else None
    if args.json:
        json.dump({"outputs": [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                                "finish_reason": o.finish_reason} for o in outputs],
                   "stats": stats, **({"offload": offload} if offload else {})}, sys.stdout)
        print()
        return 0
    console = Console()
    table = Table(title=f"{llm.config.name} ({llm.model.dtype.name}), {len(outputs)} prompts")
    for col in ("#", "prompt", "output", "finish"):
        table.add_column(col)
    for o in outputs:
        shown = o.text if o.text is not None else " ".join(map(str, o.token_ids))
        prompt = (llm.decode(o.prompt_token_ids) if llm.tokenizer else
                  f"{len(o.prompt_token_ids)} token ids")
        table.add_row(str(o.request_id), prompt, shown, o.finish_reason)
    console.print(table)
    tokens, compile_s = stats["output_tokens"], stats["compile_seconds"]
    serving_tokens_per_s = tokens / max(stats["seconds"] - compile_s, 1e-9)
    console.print(f"{tokens} tokens in {stats['seconds']:.2f} s, of which {compile_s:.2f} s compiling "
                  f"{stats['compilations']} XLA programs (once per shape): {stats['tokens_per_s']:.1f} tokens/s, "
                  f"[bold]{serving_tokens_per_s:.1f} tokens/s not counting compilation[/bold]")
    if offload:
        rates = {k: "—" if offload[k] is None else f"{offload[k]:.3f}"
                 for k in ("hit_rate", "prefetch_precision", "prefetch_recall")}
        console.print(f"expert offload: {offload['slots']} of {offload['num_experts']} experts per layer on the device, "
                      f"predictor {offload['predictor']}: hit rate {rates['hit_rate']}, prefetch precision "
                      f"{rates['prefetch_precision']}, recall {rates['prefetch_recall']}, "
                      f"{offload['bytes_h2d'] / 1e6:.2f} MB host -> device, stalled {offload['stall_s'] * 1e3:.1f} ms")
    return 0


def _add_offload_args(p: argparse.ArgumentParser, simulated: bool | None) -> None:
    """simulated: True (simulate only), False (real only), None (either)."""
    from moejax.offload.config import LOAD_RULES, PREDICTORS

    g = p.add_argument_group("expert offload (routed experts in host memory, a device expert cache)")
    g.add_argument("--offload-experts", type=float, metavar="F",
                   help="keep the fraction F of each MoE layer's routed experts only in host memory")
    g.add_argument("--device-expert-slots", type=int, metavar="N", help="a device cache of N experts per MoE layer")
    g.add_argument("--predictor", choices=PREDICTORS, help="which experts the next layers need (default none)")
    g.add_argument("--load-rule", choices=LOAD_RULES, help="cross-layer presched (default) or layer-by-layer greedy")
    g.add_argument("--host-compute", action="store_true", help="compute a missing expert on the host when cheaper")
    if simulated is not False:
        g.add_argument("--host-link", help="simulated host link: pcie3, pcie4, pcie5, nvlink-c2c (default: the "
                                           "hardware's)")


def _offload(args: argparse.Namespace) -> dict | None:
    """The offload options given on the command line (None: no offload)."""
    names = ("offload_experts", "device_expert_slots", "predictor", "load_rule", "host_link")
    options = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "host_compute", False):
        options["host_compute"] = True
    if options and getattr(args, "hardware", None) is None:
        options.pop("host_link", None)  # real runs use the machine's link
    return options or None


def _add_common_serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a preset (default: {DEFAULT_MODEL} for real runs, qwen3-30b-a3b simulated) "
                                   "or, for real runs, a checkpoint directory")
    p.add_argument("--workload", default="sharegpt", help="sharegpt, sharegpt4, arxiv or longctx")
    p.add_argument("--rate", type=float, default=1.0, help="request arrival rate (req/s; inf: all at once)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--token-budget", type=int, default=512, help="tokens per iteration (chunked: chunk size)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds")
    p.add_argument("--slo-tbt", type=float, default=0.1, help="time-between-tokens SLO in seconds")
    p.add_argument("--cohorts-in-flight", type=int, help="layered: prompt cohorts crossing the layers at once")
    p.add_argument("--max-prefill-tokens", type=int, help="layered: prompt tokens in one cohort")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _add_placement_args(p: argparse.ArgumentParser, simulated: bool | None) -> None:
    """simulated: True (simulate only), False (real only), None (either: --hardware decides)."""
    if simulated is not False:
        p.add_argument("--hardware", default="h100x2" if simulated else None,
                       help="a moejax.sim.hardware preset (e.g. h100x2, h200)" +
                            ("" if simulated else "; simulate instead of running the model"))
        p.add_argument("--routing", default="correlated", help="simulated routing: uniform, zipf, correlated")
    if simulated is not True:
        p.add_argument("--layout", help="a moejax.meshes layout preset or .toml (default: one device)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"])


def _run_options(args: argparse.Namespace) -> dict:
    from moejax.engine.metrics import SLO

    opts = dict(workload=args.workload, rate=args.rate, num_requests=args.num_requests, seed=args.seed,
                max_model_len=args.max_model_len, token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
                slo=SLO(args.slo_ttft, args.slo_tbt), progress=True)
    for name in ("cohorts_in_flight", "max_prefill_tokens"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    if getattr(args, "hardware", None):
        opts.update(hardware=args.hardware, routing=args.routing)
    else:
        opts.update(layout=getattr(args, "layout", None), dtype=getattr(args, "dtype", None))
    opts["offload"] = _offload(args)
    return opts


def _report(results: dict, title: str, json_path: str | None, ratio_to: str | None = None) -> None:
    from rich.console import Console

    from moejax.engine.metrics import metrics_table

    runs = results["runs"] if "runs" in results else {results["policy"]: results}
    table = metrics_table(runs, title=title, ratio_to=ratio_to)
    console = Console()
    # piped, rich assumes 80 columns and would cut the run and ratio headers: print at the table's width
    console.width = max(console.width, console.measure(table, options=console.options.update_width(1000)).maximum)
    console.print(table)
    if json_path and jax.process_index() == 0:  # in a multi-host run every process has the same results
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {json_path}")


def _model(args: argparse.Namespace) -> str:
    return args.model or ("qwen3-30b-a3b" if getattr(args, "hardware", None) else DEFAULT_MODEL)


def cmd_serve(args: argparse.Namespace) -> int:
    from moejax.runs import run

    result = run(_model(args), policy=args.policy, **_run_options(args))
    where = result["hardware"] + (" (simulated)" if result["simulated"] else "")
    _report(result, f"{result['model']} on {where}: {args.policy}, {args.workload} @ {args.rate} req/s", args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moejax.runs import compare

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results = compare(policies, _model(args), **_run_options(args))
    first = next(iter(results["runs"].values()))
    where = first["hardware"] + (" (simulated)" if first["simulated"] else "")
    _report(results, f"{first['model']} on {where}: {args.workload} @ {args.rate} req/s", args.json,
            ratio_to=policies[0])
    return 0


def cmd_prfaas(args: argparse.Namespace) -> int:
    """A PrfaaS deployment simulated: the threshold and split the throughput model picks, then a request stream."""
    from moejax.sim.hardware import get_hardware, get_link
    from moejax.sim.pd import Deployment, run_deployment
    from moejax.sim.pd_models import get_pd_model

    dep = Deployment(get_pd_model(args.model), get_hardware(args.prfaas_hardware), args.prfaas_instances,
                     get_hardware(args.local_hardware), args.local_instances, get_link(args.link),
                     tbt_target_s=args.tbt_target)
    if args.link_gbps is not None:
        dep = dep.with_link_gbps(args.link_gbps)
    result = run_deployment(dep, workload=args.workload, num_requests=args.num_requests, rate=args.rate,
                            load=args.load, seed=args.seed, threshold=args.threshold,
                            prefill_instances=args.prefill_instances, requests=bool(args.json))
    plan, m = result["plan"], result["metrics"]
    t = "never" if plan["threshold"] is None else f"{plan['threshold']:,.0f} tokens"
    print(f"{result['model']}: PrfaaS {result['prfaas']}, local {result['local']}, link {result['link']} "
          f"({result['link_gbps']:g} Gbps)")
    print(f"plan: offload prompts >= {t} ({plan['offload_share']:.0%}), local split {plan['prefill_instances']} prefill : "
          f"{plan['decode_instances']} decode; capacity {plan['throughput_rps']:.2f} req/s (bound: {plan['bound']}), "
          f"egress at capacity {plan['egress_gbps_at_capacity']:.1f} Gbps")
    print(f"simulated {m['requests']} requests at {result['rate_rps']:.2f} req/s: {m['throughput_rps']:.2f} req/s, "
          f"TTFT mean {m['ttft_mean_s']:.2f} s, P90 {m['ttft_p90_s']:.2f} s, offloaded {m['offload_share']:.0%}, "
          f"egress {m['egress_gbps']:.1f} Gbps, link utilisation {m['link_utilisation']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from moejax.checkpoint import load_model
    from moejax.offload.executor import predictor_dir
    from moejax.offload.learned import record_features, text_sequences, topk_recall, train_predictor

    source = args.checkpoint or args.model
    out = args.out or predictor_dir(source)
    if out is None:
        raise ValueError(f"{source!r} is not a checkpoint directory: give --out DIR for the predictor")
    model, tokenizer = load_model(source, dtype=args.dtype, seed=args.seed)
    if tokenizer is None:
        raise ValueError(f"{model.config.name} has no tokenizer: --text cannot be encoded")
    prompts = text_sequences(tokenizer, args.text, glob=args.glob, skip_every=args.skip_every,
                             num_sequences=args.num_sequences, seq_len=args.seq_len)
    print(f"recording routing of {len(prompts)} sequences of {args.seq_len} tokens ...")
    features = record_features(model, prompts)
    trained = train_predictor(model, features, epochs=args.epochs, seed=args.seed, log=print)
    path = trained.save(out)
    k = model.config.num_experts_per_tok
    for (m, d), _ in trained.nets.items():
        recall = topk_recall(np.asarray(trained.row_logits(m, d, features.hidden[:, m - d], features.ids[:, m - d])),
                             features.ids[:, m], k)
        print(f"layer {m} from layer {m - d}: top-{k} recall on the training sequences {recall:.3f}")
    print(f"saved the predictor for {model.config.name} to {path}")
    return 0


def cmd_serve_http(args: argparse.Namespace) -> int:
    from moejax import LLM

    try:
        from moejax.serve import serve
    except ImportError as e:
        raise ValueError(f"moejax serve needs the 'serve' extra ({e.name} is missing): "
                         "pip install 'moejax[serve]'") from None
    from moejax.serve.engine_loop import follow
    from moejax.serve.metrics import ServerMetrics

    options = {k: v for k, v in (("max_model_len", args.max_model_len), ("num_blocks", args.num_blocks))
               if v is not None}
    llm = LLM(args.checkpoint or args.model, dtype=args.dtype, seed=args.seed, layout=args.layout,
              policy=args.policy, max_num_seqs=args.max_num_seqs, token_budget=args.token_budget,
              run_ahead=args.run_ahead, **options)
    if args.warmup:  # every process, in step (their engines run the same throwaway iterations)
        llm.warmup(progress=jax.process_index() == 0)
    if jax.process_index() != 0:  # multi-host: process 0 serves HTTP, this one follows its requests
        follow(llm.engine, ServerMetrics(llm.config.name))
        return 0
    serve(llm, host=args.host, port=args.port, model_name=args.served_model_name, max_waiting=args.max_waiting,
          log_level=args.log_level)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moejax.config import get_preset
    from moejax.disagg.planner import Planner
    from moejax.sim.disagg import DisaggCostModel
    from moejax.sim.hardware import get_hardware
    from moejax.sim.routing import make_routing

    cfg = get_preset(args.model)
    cost = DisaggCostModel(cfg, get_hardware(args.hardware), make_routing(args.routing, cfg, seed=args.seed),
                           context_len=args.prompt_len + args.output_len // 2,
                           max_len=args.prompt_len + args.output_len, seed=args.seed)
    planner = Planner(cost, args.slo_tpot, max_gpus=args.max_gpus)
    systems = ("janus", "megascale", "colocated") if args.compare else ("janus",)
    plans = {s: planner.plan(args.rate, args.output_len, s) for s in systems}
    feasible = plans["janus"].feasible
    if args.json:
        json.dump({"model": cfg.name, "hardware": args.hardware, "rate": args.rate, "slo_tpot_s": args.slo_tpot,
                   "prompt_len": args.prompt_len, "output_len": args.output_len, "routing": args.routing,
                   "max_gpus": args.max_gpus, **plans.pop("janus").to_dict(),
                   **({"baselines": {s: p.to_dict() for s, p in plans.items()}} if plans else {})}, sys.stdout)
        print()
    else:
        for system, p in plans.items():
            d = p.deployment
            state = "meets the SLO" if p.feasible else p.note
            print(f"{system}: {d.gpus} GPUs ({d.attention_instances} attention + {d.moe_instances} MoE instances, "
                  f"{d.micro_batches} micro-batches, {d.expert_slots} expert slots each), batch {p.batch}, "
                  f"TPOT {p.step.seconds * 1e3:.1f} ms, {p.tokens_s_per_gpu:.0f} tokens/s/GPU: {state}")
    return 0 if feasible else 1  # infeasible: the closest plan was printed, marked so


def kernels_benchmark():
    from moejax.kernels import benchmark

    return benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moejax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text / tokens (default: the embedded tiny model)")
    _add_model_args(g)
    g.add_argument("--layout", help="a moejax.meshes layout preset or .toml, over all processes' devices "
                                    "(default: one device)")
    g.add_argument("--prompt", action="append", help="a text prompt (needs a tokenizer); repeatable")
    g.add_argument("--prompt-token-ids", action="append", type=_token_ids, metavar="1,2,3",
                   help="a prompt as token ids; repeatable for a batch")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of every request's sampler")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="print {'outputs': [...]} as JSON")
    _add_offload_args(g, simulated=False)
    g.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (default: the shipped stdlib-moe)")
    _add_model_args(srv, default=SERVE_MODEL)
    srv.add_argument("--layout", help="a moejax.meshes layout preset or .toml, over all processes' devices")
    srv.add_argument("--policy", default="chunked", help="chunked, no_chunk or layered (name@budget allowed)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the model's name in the API (default: the model's)")
    srv.add_argument("--max-model-len", type=int, help="prompt + output tokens of one request")
    srv.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    srv.add_argument("--max-waiting", type=int, default=256,
                     help="requests queued beyond --max-num-seqs before answering 429")
    srv.add_argument("--token-budget", type=int, default=512, help="tokens per iteration (chunked: chunk size)")
    srv.add_argument("--num-blocks", type=int, help="KV cache blocks (default: as many as fit)")
    srv.add_argument("--log-level", default="info", help="uvicorn's log level")
    srv.add_argument("--warmup", action="store_true",
                     help="compile every program serving can meet before listening (minutes on CPU at the "
                          "default sizes), so that no request waits for a compiler")
    srv.add_argument("--run-ahead", action="store_true",
                     help="dispatch the next multi-step decode iteration before the last one's tokens are back: "
                          "more tokens/s, but a request arriving meanwhile waits one more iteration (up to 32 "
                          "decode steps, about 0.25 s) before its prefill")
    srv.set_defaults(func=cmd_serve_http)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    kern = bench.add_parser("kernels", help="expert GEMM kernels against ragged_dot, peers and the roofline")
    kernels_benchmark().add_arguments(kern)
    kern.set_defaults(func=lambda args: kernels_benchmark().main(args))
    serve = bench.add_parser("serve", help="serve a workload with the real model and report serving metrics")
    _add_common_serving(serve)
    _add_placement_args(serve, simulated=False)
    _add_offload_args(serve, simulated=False)
    serve.add_argument("--policy", default="chunked", help="chunked, no_chunk or layered (name@budget allowed)")
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("simulate", help="the same engine and metrics, on a cost model of real hardware")
    _add_common_serving(sim)
    _add_placement_args(sim, simulated=True)
    _add_offload_args(sim, simulated=True)
    sim.add_argument("--policy", default="chunked", help="chunked, no_chunk or layered (name@budget allowed)")
    sim.set_defaults(func=cmd_serve)

    cmp = sub.add_parser("compare", help="several policies on the same workload, with ratios to the first")
    cmp.add_argument("--policies", default="chunked,layered", help="comma-separated, e.g. chunked@256,layered")
    _add_common_serving(cmp)
    _add_placement_args(cmp, simulated=None)
    _add_offload_args(cmp, simulated=None)
    cmp.set_defaults(func=cmd_compare)

    pl = sub.add_parser("plan", help="Janus's SLO-aware planner: attention / MoE instances and expert replicas "
                                     "meeting a TPOT SLO at a rate with the fewest GPUs (simulated)")
    pl.add_argument("--model", default="deepseek-v2", help="a preset (default deepseek-v2)")
    pl.add_argument("--hardware", default="h100", help="the device type, a moejax.sim hardware preset")
    pl.add_argument("--rate", type=float, required=True, help="requests per second")
    pl.add_argument("--slo-tpot", type=float, required=True, help="time per output token target, seconds")
    pl.add_argument("--prompt-len", type=int, default=1024)
    pl.add_argument("--output-len", type=int, default=512)
    pl.add_argument("--routing", default="correlated", help="routing model: uniform, zipf, correlated")
    pl.add_argument("--max-gpus", type=int, default=32)
    pl.add_argument("--compare", action="store_true",
                    help="also plan MegaScale-Infer-like (fixed 1:1 ratio, token-balanced) and colocated EP")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    pf = sub.add_parser("prfaas", help="prefill-as-a-service simulated: a PrfaaS prefill cluster, a local PD "
                                       "cluster and one link (arXiv 2604.15039)")
    pf.add_argument("--model", default="mimo-v2-flash",
                    help="kimi-linear-48b-a3b, mimo-v2-flash, qwen3.5-397b-a17b, ring-2.5-1t, minimax-m2.5, "
                         "qwen3-235b-a22b (moejax.sim.pd_models)")
    pf.add_argument("--prfaas-hardware", default="h200x8", help="one PrfaaS prefill instance")
    pf.add_argument("--prfaas-instances", type=int, default=4)
    pf.add_argument("--local-hardware", default="h20x8", help="one local (prefill or decode) instance")
    pf.add_argument("--local-instances", type=int, default=8)
    pf.add_argument("--link", default="eth-100g", help="the inter-cluster link (moejax.sim.hardware.LINKS)")
    pf.add_argument("--link-gbps", type=float, help="override the link's line rate")
    pf.add_argument("--workload", default="longctx")
    pf.add_argument("--num-requests", type=int, default=2000)
    pf.add_argument("--rate", type=float, help="arrivals, req/s (default: --load x the planned capacity)")
    pf.add_argument("--load", type=float, default=0.85)
    pf.add_argument("--threshold", type=float, help="offload prompts of >= this many tokens (with --prefill-instances)")
    pf.add_argument("--prefill-instances", type=int, help="local prefill instances (default: chosen with t)")
    pf.add_argument("--tbt-target", type=float, default=0.05, help="decode step time target, seconds")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--json", help="write the plan, metrics and per-request timeline here")
    pf.set_defaults(func=cmd_prfaas)

    off = sub.add_parser("offload", help="expert offload tools").add_subparsers(dest="offload_command", required=True)
    tp = off.add_parser("train-predictor", help="record a model's routing on text and train LayerScope's learned "
                                                "expert predictor (saved next to the checkpoint)")
    _add_model_args(tp)
    tp.add_argument("--text", action="append", required=True, metavar="PATH",
                    help="a text file, or a directory of files matching --glob; repeatable")
    tp.add_argument("--glob", default="*.py", help="files to read in --text directories (default *.py)")
    tp.add_argument("--skip-every", type=int, default=0, metavar="N",
                    help="leave out every N-th file (sorted): keep a held-out split unseen")
    tp.add_argument("--num-sequences", type=int, default=64)
    tp.add_argument("--seq-len", type=int, default=512)
    tp.add_argument("--epochs", type=int, default=10)
    tp.add_argument("--out", help="where to save it (default: offload_predictor/ in the checkpoint directory)")
    tp.set_defaults(func=cmd_train_predictor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad config / checkpoint / request: one clear line, no traceback
        print(f"moejax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
