"""`moejax generate | ...` — the command line."""

from __future__ import annotations

import argparse
import json
import sys

from moejax.config import DEFAULT_MODEL

# Prompts for the embedded default model (it has no tokenizer): four lengths, fixed ids.
DEFAULT_PROMPTS = [[(7 * i + 3 * n) % 500 + 1 for i in range(n)] for n in (5, 12, 23, 40)]


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids {text!r}: expected comma-separated integers") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a preset name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="a HF or moejax checkpoint directory (overrides --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute/param dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0)


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moejax import LLM, SamplingParams

    llm = LLM(args.checkpoint or args.model, dtype=args.dtype, seed=args.seed)
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
    if args.json:
        json.dump({"outputs": [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                                "finish_reason": o.finish_reason} for o in outputs],
                   "stats": stats}, sys.stdout)
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
    console.print(f"{stats['output_tokens']} tokens in {stats['seconds']:.2f} s: "
                  f"[bold]{stats['tokens_per_s']:.1f} tokens/s[/bold] (includes compilation)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moejax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text / tokens (default: the embedded tiny model)")
    _add_model_args(g)
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
    g.set_defaults(func=cmd_generate)
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
