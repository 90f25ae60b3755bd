"""``loramix generate``: prompts in, text out, with the adapter; greedy or sampling."""
from __future__ import annotations

import argparse
import math

from ..errors import LoramixError, Problems
from .common import add_model_args, check_at_least, check_template, loaded_model, preflight


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from prompts", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--template", default="plain", help="alpaca, plain (the prompt as given) or chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.set_defaults(run=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise LoramixError(f"{args.prompt_file}: {e.strerror}") from None
    if not prompts:
        raise LoramixError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return prompts


def _check_sampling(args: argparse.Namespace, problems: Problems) -> None:
    check_at_least(args, ("max_new_tokens",), problems)
    check_at_least(args, ("top_k",), problems, minimum=0)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.add(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # NaN fails too
        problems.add(f"--top-p must be in (0, 1], got {args.top_p}")


def run(args: argparse.Namespace) -> int:
    from ..data import get_template
    from ..evaluation.generation import generate

    problems = Problems()
    prompts = problems.result(_prompts, args)
    problems.check(check_template, args.template)
    _check_sampling(args, problems)
    cfg = preflight(args, problems)
    problems.raise_if_any()
    model, tokenizer, _ = loaded_model(args, cfg)
    get_template(args.template, tokenizer)  # the chat template needs the tokenizer's own
    texts = generate(model, tokenizer, prompts, template=args.template, max_new_tokens=args.max_new_tokens,
                     do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     seed=args.seed)
    for prompt, text in zip(prompts, texts):
        print(f"### prompt\n{prompt}\n### output\n{text}\n")
    return 0
